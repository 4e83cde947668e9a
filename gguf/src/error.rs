//! What reading a GGUF can fail with: each names the file and the key, tensor or byte
//! offset at fault.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened or mapped.
    #[error("{}: {message}", path.display())]
    Io { path: PathBuf, message: String },
    /// The bytes break the format: a bad magic or version, a count or length beyond the
    /// file, an unknown value or tensor type, a misaligned or lying offset, overlapping
    /// tensors, a duplicate key or name.
    #[error("{}: malformed GGUF: {what}", path.display())]
    Malformed { path: PathBuf, what: String },
    /// A metadata key the caller needs is absent.
    #[error("{}: metadata key {key:?} is missing", path.display())]
    MissingKey { path: PathBuf, key: String },
    /// A metadata key holds another type than the caller needs.
    #[error("{}: metadata key {key:?} should be {expected}, found {found}", path.display())]
    WrongType {
        path: PathBuf,
        key: String,
        expected: &'static str,
        found: &'static str,
    },
    /// A tensor the caller needs is absent.
    #[error("{}: no tensor {tensor:?}", path.display())]
    MissingTensor { path: PathBuf, tensor: String },
    /// The `tokenizer.ggml.*` keys do not make a tokenizer; `key` is the one at fault.
    #[error("{}: {key}: {what}", path.display())]
    Tokenizer {
        path: PathBuf,
        key: &'static str,
        what: String,
    },
    /// A tensor's values cannot be had (a type not dequantised, say).
    #[error("{}: tensor {tensor:?}: {what}", path.display())]
    Tensor {
        path: PathBuf,
        tensor: String,
        what: String,
    },
}

impl GgufError {
    pub(crate) fn io(path: &Path, e: &std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    }
}
