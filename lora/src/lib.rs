//! LoRA adapters for BERT-family encoders: sites, trainable parameters, PEFT adapter
//! files, safetensors I/O and the AdamW optimiser.
//!
//! Owns: which linear modules carry adapters ([`LoraConfig`], [`SiteId`]), the
//! factors A (r×d_in) and B (d_out×r) with PEFT's initialisation ([`LoraParams`]),
//! reading and writing adapter folders that PEFT itself reads and writes, and the
//! safetensors files behind them. Does not own the encoder's forward or backward pass
//! (that is `fibecfed-transformer`), nor the shared vocabulary it is written in: the
//! `NamedTensors` map and the `Real` float trait are `fibecfed-core`'s.
//!
//! ```
//! use fibecfed_lora::{LoraConfig, SiteKind};
//! let config = LoraConfig::new(8, 16.0, &["query", "value"]);
//! let sites = config.resolve_sites(6).unwrap();
//! assert_eq!(sites.len(), 12);
//! assert_eq!(sites[1].kind, SiteKind::Value);
//! assert_eq!(config.scale(), 2.0);
//! ```

pub mod adapter;
pub mod config;
pub mod io;
pub mod optim;
pub mod params;

use std::path::PathBuf;

pub use adapter::{read_adapter, write_adapter};
pub use config::{LoraConfig, SiteId, SiteKind, target_matches};
pub use io::TensorIoError;
pub use optim::{AdamW, AdamWConfig};
pub use params::{Head, LoraParams, LoraWeights, SiteShape};

/// Errors of adapter configuration and files; each names the file or field at fault.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("invalid LoRA configuration: {0}")]
    Config(String),
    #[error(
        "unknown LoRA target module `{target}`: it matches no module of the model; valid: {valid}"
    )]
    UnknownTarget { target: String, valid: String },
    #[error("{path}: {problem}")]
    AdapterConfig { path: PathBuf, problem: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tensors(#[from] TensorIoError),
    #[error("{file}: tensor `{tensor}` has shape {found}, expected {expected}")]
    Shape {
        file: String,
        tensor: String,
        expected: String,
        found: String,
    },
    #[error("{file}: tensor `{tensor}` holds the non-finite value {value}")]
    NonFinite {
        file: String,
        tensor: String,
        value: f32,
    },
    #[error("{file}: tensor `{tensor}` is missing")]
    MissingTensor { file: String, tensor: String },
    #[error("{file}: unexpected tensor `{tensor}`: {why}")]
    UnexpectedTensor {
        file: String,
        tensor: String,
        why: String,
    },
}
