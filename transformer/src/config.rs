//! Hugging Face `config.json` of a BERT-family encoder.

use std::path::Path;

use serde_json::Value;

use crate::ModelError;

/// The feed-forward nonlinearity named by `hidden_act`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu`: exact, x·Φ(x) with erf (BERT's default).
    Gelu,
    /// `gelu_new` / `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    Relu,
}

/// The architecture numbers the encoder needs; nothing else from config.json is read.
#[derive(Debug, Clone, PartialEq)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: Activation,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub pad_token_id: u32,
}

impl BertConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let json: Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: path.to_path_buf(),
            problem: format!("not valid JSON: {e}"),
        })?;
        Self::from_json(path, &json)
    }

    /// Parses and checks a config; every problem names the key.
    pub fn from_json(path: &Path, json: &Value) -> Result<Self, ModelError> {
        let err = |problem: String| ModelError::Config {
            path: path.to_path_buf(),
            problem,
        };
        let obj = json
            .as_object()
            .ok_or_else(|| err("expected a JSON object".into()))?;
        let uint = |key: &str| -> Result<usize, ModelError> {
            match obj.get(key) {
                None => Err(err(format!("missing key `{key}`"))),
                Some(v) => v
                    .as_u64()
                    .filter(|&n| n > 0)
                    .map(|n| n as usize)
                    .ok_or_else(|| {
                        err(format!(
                            "key `{key}`: expected a positive integer, found {v}"
                        ))
                    }),
            }
        };
        if let Some(mt) = obj.get("model_type").and_then(Value::as_str)
            && mt != "bert"
        {
            return Err(err(format!(
                "model_type `{mt}` is not supported: this encoder implements the BERT family (model_type \"bert\")"
            )));
        }
        if let Some(p) = obj.get("position_embedding_type").and_then(Value::as_str)
            && p != "absolute"
        {
            return Err(err(format!(
                "position_embedding_type `{p}` is not supported (only \"absolute\")"
            )));
        }
        let hidden_act = match obj.get("hidden_act").and_then(Value::as_str) {
            None => return Err(err("missing key `hidden_act`".into())),
            Some("gelu") => Activation::Gelu,
            Some("gelu_new" | "gelu_pytorch_tanh" | "gelu_fast") => Activation::GeluTanh,
            Some("relu") => Activation::Relu,
            Some(other) => {
                return Err(err(format!(
                    "key `hidden_act`: `{other}` is not supported (gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, relu)"
                )));
            }
        };
        let layer_norm_eps = match obj.get("layer_norm_eps") {
            None => 1e-12,
            Some(v) => v
                .as_f64()
                .filter(|e| *e > 0.0 && e.is_finite())
                .ok_or_else(|| {
                    err(format!(
                        "key `layer_norm_eps`: expected a positive number, found {v}"
                    ))
                })?,
        };
        let config = Self {
            vocab_size: uint("vocab_size")?,
            hidden_size: uint("hidden_size")?,
            num_hidden_layers: uint("num_hidden_layers")?,
            num_attention_heads: uint("num_attention_heads")?,
            intermediate_size: uint("intermediate_size")?,
            hidden_act,
            max_position_embeddings: uint("max_position_embeddings")?,
            type_vocab_size: uint("type_vocab_size")?,
            layer_norm_eps,
            pad_token_id: match obj.get("pad_token_id") {
                None | Some(Value::Null) => 0,
                Some(v) => v
                    .as_u64()
                    .and_then(|p| u32::try_from(p).ok())
                    .ok_or_else(|| {
                        err(format!(
                            "key `pad_token_id`: expected a token id, found {v}"
                        ))
                    })?,
            },
        };
        if config.pad_token_id as usize >= config.vocab_size {
            return Err(err(format!(
                "pad_token_id {} is outside the vocabulary of {} entries",
                config.pad_token_id, config.vocab_size
            )));
        }
        if !config
            .hidden_size
            .is_multiple_of(config.num_attention_heads)
        {
            return Err(err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                config.hidden_size, config.num_attention_heads
            )));
        }
        Ok(config)
    }
}
