//! Reading and writing `.safetensors` files as f32 `ndarray` tensors.
//!
//! Parsing and validation are left to the `safetensors` crate so that this module
//! accepts exactly the files the reference implementation accepts; this module only
//! adds the dtype conversion, the file handling and errors that say which file failed.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use fibecfed_core::NamedTensors;
use half::{bf16, f16};
use memmap2::Mmap;
use ndarray::{ArrayD, IxDyn};
use safetensors::tensor::{Dtype, Metadata, SafeTensorError, SafeTensors, TensorInfo, View};

/// The 8-byte little-endian header length that starts every safetensors file.
const HEADER_LEN_BYTES: usize = size_of::<u64>();

/// The key the format reserves for free-form metadata inside the JSON header.
const METADATA_KEY: &str = "__metadata__";

const FLOAT_DTYPES: &str = "F32, F16, BF16, F64";
const INT_DTYPES: &str = "I64, I32";

/// Errors from reading or writing safetensors files. Every message names the file,
/// and those about one tensor also name the tensor.
#[derive(Debug, thiserror::Error)]
pub enum TensorIoError {
    /// The file could not be opened, inspected or memory-mapped.
    #[error("cannot read safetensors file {path}: {source}")]
    Read {
        /// The file being read.
        path: PathBuf,
        /// The underlying I/O error.
        source: io::Error,
    },
    /// The bytes are not a valid safetensors file (bad header, bad offsets, truncation...).
    #[error("{path} is not a valid safetensors file: {source}")]
    Format {
        /// The file being read.
        path: PathBuf,
        /// The validation error reported by the `safetensors` crate.
        source: SafeTensorError,
    },
    /// A tensor is stored with a dtype this reader does not convert.
    #[error("tensor `{tensor}` in {path} has unsupported dtype {dtype} (supported: {supported})")]
    UnsupportedDtype {
        /// The file being read.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// The stored dtype, as spelled in the header.
        dtype: String,
        /// The dtypes the called function accepts.
        supported: &'static str,
    },
    /// A requested tensor does not exist in the file.
    #[error("tensor `{tensor}` not found in {path}")]
    TensorNotFound {
        /// The file being read.
        path: PathBuf,
        /// The requested name.
        tensor: String,
    },
    /// A tensor's shape and its data disagree.
    #[error("tensor `{tensor}` in {path}: shape {shape:?} does not match its data: {detail}")]
    ShapeMismatch {
        /// The file being read.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// The shape declared in the header.
        shape: Vec<usize>,
        /// What disagreed.
        detail: String,
    },
    /// A tensor name collides with the header's reserved metadata key.
    #[error("cannot write {path}: tensor name `{tensor}` is reserved by the safetensors format")]
    ReservedName {
        /// The file being written.
        path: PathBuf,
        /// The offending name.
        tensor: String,
    },
    /// The `safetensors` crate refused to serialize the tensors (e.g. header too large).
    #[error("cannot serialize tensors for {path}: {source}")]
    Serialize {
        /// The file being written.
        path: PathBuf,
        /// The error reported by the `safetensors` crate.
        source: SafeTensorError,
    },
    /// Writing, syncing or renaming the output failed.
    #[error("cannot write safetensors file {path}: {source}")]
    Write {
        /// The file being written (the final path, not the temporary one).
        path: PathBuf,
        /// The underlying I/O error.
        source: io::Error,
    },
}

/// Memory-maps (memmap2) a .safetensors file and converts every tensor to f32.
/// Supported stored dtypes: F32, F16, BF16 (via `half`), F64 (narrowed). Any other dtype -> error naming the tensor and dtype.
///
/// Non-finite values are returned as stored; rejecting them is the caller's decision.
pub fn read_safetensors(path: &Path) -> Result<NamedTensors, TensorIoError> {
    read_safetensors_with_metadata(path).map(|(tensors, _)| tensors)
}

/// Same, also returning the `__metadata__` string map.
///
/// A file without `__metadata__` yields an empty map.
pub fn read_safetensors_with_metadata(
    path: &Path,
) -> Result<(NamedTensors, BTreeMap<String, String>), TensorIoError> {
    read_safetensors_with_metadata_filtered(path, |_| true)
}

/// Integer tensors (I64, I32) as i64 vectors with shape, for fixtures holding token ids; errors as above.
pub fn read_i64_tensor(path: &Path, name: &str) -> Result<(Vec<usize>, Vec<i64>), TensorIoError> {
    let mapped = map_file(path)?;
    let parsed = Parsed::new(path, mapped.bytes())?;
    let info = parsed
        .metadata
        .info(name)
        .ok_or_else(|| TensorIoError::TensorNotFound {
            path: path.to_path_buf(),
            tensor: name.to_owned(),
        })?;
    let bytes = parsed.tensor_bytes(name, info)?;
    let values = match info.dtype {
        Dtype::I64 => decode::<8, _>(bytes, i64::from_le_bytes),
        Dtype::I32 => decode::<4, _>(bytes, |b| i64::from(i32::from_le_bytes(b))),
        _ => None,
    }
    .ok_or_else(|| unsupported(path, name, info.dtype, INT_DTYPES))?;
    // The header check already guarantees this; kept so a crate regression
    // surfaces as an error rather than a silently mis-shaped fixture.
    let expected = checked_len(&info.shape);
    if expected != Some(values.len()) {
        return Err(shape_mismatch(path, name, &info.shape, values.len()));
    }
    Ok((info.shape.clone(), values))
}

/// Writes F32 tensors (little-endian, safetensors format, names sorted) atomically (a temporary file of its own in the same folder, fsync, rename:
/// [`fibecfed_core::fsio::write_atomic`]); so an existing file is never left half-written. Metadata optional.
///
/// Renaming over the target (rather than truncating it) also keeps any live memory map
/// of the old file valid, since the old inode stays intact until unmapped.
pub fn write_safetensors(
    path: &Path,
    tensors: &NamedTensors,
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<(), TensorIoError> {
    if tensors.contains_key(METADATA_KEY) {
        return Err(TensorIoError::ReservedName {
            path: path.to_path_buf(),
            tensor: METADATA_KEY.to_owned(),
        });
    }

    // Every tensor is F32, so the crate's (dtype, name) ordering is name order.
    let views = tensors
        .iter()
        .map(|(name, array)| (name.as_str(), F32View(array)));
    // An empty map is dropped: safetensors 0.8 sizes the JSON object from the
    // tensor count plus the number of metadata *entries*, so zero tensors with an
    // empty `__metadata__` emits an unparseable header. Readers see an empty map
    // either way.
    let info: Option<HashMap<String, String>> = metadata
        .filter(|m| !m.is_empty())
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
    let bytes = safetensors::serialize(views, info).map_err(|source| TensorIoError::Serialize {
        path: path.to_path_buf(),
        source,
    })?;

    fibecfed_core::fsio::write_atomic(path, &bytes).map_err(|source| TensorIoError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Either a live mapping or nothing: zero-length files are not mapped because
/// mapping an empty file fails (EINVAL) on some platforms, and an empty slice gives
/// the crate's own "header too small" error instead.
struct Mapped(Option<Mmap>);

impl Mapped {
    fn bytes(&self) -> &[u8] {
        self.0.as_deref().unwrap_or(&[])
    }
}

fn map_file(path: &Path) -> Result<Mapped, TensorIoError> {
    let read_err = |source| TensorIoError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    let len = file.metadata().map_err(read_err)?.len();
    if len == 0 {
        return Ok(Mapped(None));
    }
    // SAFETY: the mapping is only read, and it is dropped before these functions
    // return. The remaining hazard is another process truncating or rewriting the
    // file in place while it is mapped; our own writer never does that (it renames
    // a fresh file over the target), which is the usual contract for model files.
    let mmap = unsafe { Mmap::map(&file) }.map_err(read_err)?;
    Ok(Mapped(Some(mmap)))
}

/// A validated header plus the data section it indexes.
struct Parsed<'a> {
    path: &'a Path,
    metadata: Metadata,
    data: &'a [u8],
}

impl<'a> Parsed<'a> {
    fn new(path: &'a Path, bytes: &'a [u8]) -> Result<Self, TensorIoError> {
        let format_err = |source| TensorIoError::Format {
            path: path.to_path_buf(),
            source,
        };
        // `read_metadata` validates the header, every offset and that the data
        // section is exactly covered, so the slicing below cannot go out of bounds;
        // it still uses `get` so a crate regression cannot turn into a panic.
        let (header_len, metadata) = SafeTensors::read_metadata(bytes).map_err(format_err)?;
        let data = HEADER_LEN_BYTES
            .checked_add(header_len)
            .and_then(|start| bytes.get(start..))
            .ok_or_else(|| format_err(SafeTensorError::InvalidHeaderLength))?;
        Ok(Self {
            path,
            metadata,
            data,
        })
    }

    fn tensor_bytes(&self, name: &str, info: &TensorInfo) -> Result<&'a [u8], TensorIoError> {
        let (start, end) = info.data_offsets;
        self.data
            .get(start..end)
            .ok_or_else(|| TensorIoError::Format {
                path: self.path.to_path_buf(),
                source: SafeTensorError::InvalidOffset(name.to_owned()),
            })
    }
}

/// Decodes little-endian `N`-byte elements; `None` if the bytes are not a whole
/// number of elements.
fn decode<const N: usize, T>(bytes: &[u8], f: impl Fn([u8; N]) -> T) -> Option<Vec<T>> {
    let (chunks, rest) = bytes.as_chunks::<N>();
    rest.is_empty()
        .then(|| chunks.iter().map(|&c| f(c)).collect())
}

/// `None` for dtypes we do not convert (and for a ragged byte count, which the
/// header validation already excludes).
fn decode_float(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    match dtype {
        Dtype::F32 => decode::<4, _>(bytes, f32::from_le_bytes),
        Dtype::F16 => decode::<2, _>(bytes, |b| f16::from_le_bytes(b).to_f32()),
        Dtype::BF16 => decode::<2, _>(bytes, |b| bf16::from_le_bytes(b).to_f32()),
        // Narrowing rounds to nearest and saturates to infinity, matching what
        // `torch.Tensor.float()` does with float64 weights.
        Dtype::F64 => decode::<8, _>(bytes, |b| f64::from_le_bytes(b) as f32),
        _ => None,
    }
}

fn checked_len(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

fn to_array(
    path: &Path,
    name: &str,
    shape: &[usize],
    values: Vec<f32>,
) -> Result<ArrayD<f32>, TensorIoError> {
    let len = values.len();
    // ndarray rejects shapes whose element count overflows `isize`, which the
    // safetensors header check (in `usize`) lets through for zero-sized tensors.
    ArrayD::from_shape_vec(IxDyn(shape), values).map_err(|e| TensorIoError::ShapeMismatch {
        path: path.to_path_buf(),
        tensor: name.to_owned(),
        shape: shape.to_vec(),
        detail: format!("{len} elements: {e}"),
    })
}

fn shape_mismatch(path: &Path, name: &str, shape: &[usize], len: usize) -> TensorIoError {
    TensorIoError::ShapeMismatch {
        path: path.to_path_buf(),
        tensor: name.to_owned(),
        shape: shape.to_vec(),
        detail: format!("{len} elements"),
    }
}

fn unsupported(path: &Path, name: &str, dtype: Dtype, supported: &'static str) -> TensorIoError {
    TensorIoError::UnsupportedDtype {
        path: path.to_path_buf(),
        tensor: name.to_owned(),
        dtype: dtype.to_string(),
        supported,
    }
}

/// Presents an f32 array to the serializer. Bytes are produced on demand so the
/// whole set of tensors is copied once (into the output buffer), not twice.
struct F32View<'a>(&'a ArrayD<f32>);

impl View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        self.0.shape()
    }

    fn data(&self) -> Cow<'_, [u8]> {
        // `iter` walks logical (row-major) order whatever the memory layout, which
        // is the order safetensors stores.
        Cow::Owned(self.0.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    fn data_len(&self) -> usize {
        self.0.len() * size_of::<f32>()
    }
}

/// Like [`read_safetensors`], but converts only the tensors whose name `keep`
/// accepts; the others are neither decoded nor dtype-checked. Checkpoints carry
/// tensors a consumer does not use (an I64 `position_ids` buffer, pooler or MLM
/// heads), and those must not make loading fail.
pub fn read_safetensors_filtered(
    path: &Path,
    keep: impl Fn(&str) -> bool,
) -> Result<NamedTensors, TensorIoError> {
    read_safetensors_with_metadata_filtered(path, keep).map(|(tensors, _)| tensors)
}

/// [`read_safetensors_filtered`] that also returns the `__metadata__` map: one
/// mapping and one header parse serve both.
pub fn read_safetensors_with_metadata_filtered(
    path: &Path,
    keep: impl Fn(&str) -> bool,
) -> Result<(NamedTensors, BTreeMap<String, String>), TensorIoError> {
    let mapped = map_file(path)?;
    let parsed = Parsed::new(path, mapped.bytes())?;
    let mut tensors = NamedTensors::new();
    for (name, info) in parsed.metadata.tensors() {
        if !keep(&name) {
            continue;
        }
        let bytes = parsed.tensor_bytes(&name, info)?;
        let values = decode_float(info.dtype, bytes)
            .ok_or_else(|| unsupported(path, &name, info.dtype, FLOAT_DTYPES))?;
        let array = to_array(path, &name, &info.shape, values)?;
        tensors.insert(name, array);
    }
    let metadata = parsed
        .metadata
        .metadata()
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok((tensors, metadata))
}
