//! LoRA sites of a BERT-family encoder or a LLaMA decoder, and PEFT's
//! `adapter_config.json`.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::LoraError;

/// The linear modules of a block that can carry a LoRA adapter. A BERT block has the
/// first six; a LLaMA block has all seven, named by [`SiteKind::llama_suffix`]:
/// `Intermediate` is its `up_proj`, `Output` its `down_proj`, and `Gate` (LLaMA only,
/// last so that the order of the BERT kinds, and every map keyed by them, is unchanged)
/// its `gate_proj`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum SiteKind {
    Query,
    Key,
    Value,
    AttentionOutput,
    Intermediate,
    Output,
    Gate,
}

impl SiteKind {
    pub const ALL: [SiteKind; 6] = [
        SiteKind::Query,
        SiteKind::Key,
        SiteKind::Value,
        SiteKind::AttentionOutput,
        SiteKind::Intermediate,
        SiteKind::Output,
    ];

    /// The seven of a LLaMA block, in the order of its forward pass.
    pub const LLAMA: [SiteKind; 7] = [
        SiteKind::Query,
        SiteKind::Key,
        SiteKind::Value,
        SiteKind::AttentionOutput,
        SiteKind::Gate,
        SiteKind::Intermediate,
        SiteKind::Output,
    ];

    /// The module path inside a BERT layer, as Hugging Face names it. `Gate` has none in
    /// BERT; its LLaMA name is returned so that the function stays total, and
    /// [`LoraConfig::resolve_sites`] never yields it.
    pub fn suffix(self) -> &'static str {
        match self {
            SiteKind::Query => "attention.self.query",
            SiteKind::Key => "attention.self.key",
            SiteKind::Value => "attention.self.value",
            SiteKind::AttentionOutput => "attention.output.dense",
            SiteKind::Intermediate => "intermediate.dense",
            SiteKind::Output => "output.dense",
            SiteKind::Gate => "mlp.gate_proj",
        }
    }

    /// The module path inside a LLaMA layer (`model.layers.N.<this>`), as transformers
    /// and PEFT name it.
    pub fn llama_suffix(self) -> &'static str {
        match self {
            SiteKind::Query => "self_attn.q_proj",
            SiteKind::Key => "self_attn.k_proj",
            SiteKind::Value => "self_attn.v_proj",
            SiteKind::AttentionOutput => "self_attn.o_proj",
            SiteKind::Gate => "mlp.gate_proj",
            SiteKind::Intermediate => "mlp.up_proj",
            SiteKind::Output => "mlp.down_proj",
        }
    }
}

/// One LoRA site: a linear module in one encoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SiteId {
    pub layer: usize,
    pub kind: SiteKind,
}

impl SiteId {
    pub fn new(layer: usize, kind: SiteKind) -> Self {
        Self { layer, kind }
    }

    /// Module path in a `BertModel`, e.g. `encoder.layer.3.attention.self.value`.
    pub fn module_path(self) -> String {
        format!("encoder.layer.{}.{}", self.layer, self.kind.suffix())
    }

    /// Module path in a LLaMA model, e.g. `model.layers.3.self_attn.v_proj`.
    pub fn llama_module_path(self) -> String {
        format!("model.layers.{}.{}", self.layer, self.kind.llama_suffix())
    }
}

impl fmt::Display for SiteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.module_path())
    }
}

/// Does a PEFT `target_modules` entry select this module path? PEFT's rule for a list
/// of names: the full path equals the entry or ends with `.entry`. So `dense` selects
/// all three dense modules and `output.dense` selects both output projections.
pub fn target_matches(target: &str, module_path: &str) -> bool {
    module_path == target
        || (module_path.len() > target.len()
            && module_path.ends_with(target)
            && module_path.as_bytes()[module_path.len() - target.len() - 1] == b'.')
}

/// What LoRA is applied where: the subset of PEFT's `LoraConfig` that we implement.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f32,
    pub dropout: f32,
    /// PEFT-style names: `query`, `value`, `dense`, `attention.output.dense`, ...
    pub target_modules: Vec<String>,
    /// PEFT's rank-stabilised scaling alpha/sqrt(r) instead of alpha/r.
    pub use_rslora: bool,
    /// Recorded in adapter_config.json so PEFT knows which base to load.
    pub base_model_name_or_path: Option<String>,
}

impl LoraConfig {
    pub fn new(r: usize, alpha: f32, target_modules: &[&str]) -> Self {
        Self {
            r,
            alpha,
            dropout: 0.0,
            target_modules: target_modules.iter().map(|s| (*s).to_owned()).collect(),
            use_rslora: false,
            base_model_name_or_path: None,
        }
    }

    /// The factor in W0 + scale·B·A.
    pub fn scale(&self) -> f32 {
        if self.use_rslora {
            self.alpha / (self.r as f32).sqrt()
        } else {
            self.alpha / self.r as f32
        }
    }

    pub fn validate(&self) -> Result<(), LoraError> {
        if self.r == 0 {
            return Err(LoraError::Config("LoRA rank r must be at least 1".into()));
        }
        if !self.alpha.is_finite() {
            return Err(LoraError::Config(format!(
                "lora_alpha must be finite, got {}",
                self.alpha
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(LoraError::Config(format!(
                "lora_dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        if self.target_modules.is_empty() {
            return Err(LoraError::Config(
                "target_modules is empty: name at least one module".into(),
            ));
        }
        Ok(())
    }

    /// The sites of an encoder with `num_layers` layers that the targets select, in
    /// (layer, kind) order. A target that selects nothing is an error, as in PEFT,
    /// because a typo would otherwise train nothing silently.
    pub fn resolve_sites(&self, num_layers: usize) -> Result<Vec<SiteId>, LoraError> {
        self.validate()?;
        let all: Vec<SiteId> = (0..num_layers)
            .flat_map(|layer| SiteKind::ALL.map(|kind| SiteId::new(layer, kind)))
            .collect();
        for target in &self.target_modules {
            if !all.iter().any(|s| target_matches(target, &s.module_path())) {
                return Err(LoraError::UnknownTarget {
                    target: target.clone(),
                    valid: "query, key, value, dense, attention.output.dense, intermediate.dense, \
                            output.dense, or a full path such as encoder.layer.0.attention.self.query"
                        .into(),
                });
            }
        }
        Ok(all
            .into_iter()
            .filter(|s| {
                let path = s.module_path();
                self.target_modules.iter().any(|t| target_matches(t, &path))
            })
            .collect())
    }

    /// The sites of a LLaMA decoder with `num_layers` layers that the targets select
    /// (PEFT's names: `q_proj`, `v_proj`, `mlp.down_proj`, `model.layers.0.self_attn.q_proj`,
    /// ...), in (layer, kind) order; a target that selects nothing is an error.
    pub fn resolve_llama_sites(&self, num_layers: usize) -> Result<Vec<SiteId>, LoraError> {
        self.validate()?;
        let all: Vec<SiteId> = (0..num_layers)
            .flat_map(|layer| SiteKind::LLAMA.map(|kind| SiteId::new(layer, kind)))
            .collect();
        for target in &self.target_modules {
            if !all
                .iter()
                .any(|s| target_matches(target, &s.llama_module_path()))
            {
                return Err(LoraError::UnknownTarget {
                    target: target.clone(),
                    valid: "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, or a \
                            full path such as model.layers.0.self_attn.q_proj"
                        .into(),
                });
            }
        }
        let mut sites: Vec<SiteId> = all
            .into_iter()
            .filter(|s| {
                let path = s.llama_module_path();
                self.target_modules.iter().any(|t| target_matches(t, &path))
            })
            .collect();
        sites.sort();
        Ok(sites)
    }

    /// PEFT's `adapter_config.json`, with the fields PEFT needs to load it.
    pub fn to_peft_json(&self) -> serde_json::Value {
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.target_modules,
            "bias": "none",
            "fan_in_fan_out": false,
            "modules_to_save": ["classifier"],
            "init_lora_weights": true,
            "inference_mode": true,
            "use_rslora": self.use_rslora,
            "use_dora": false,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "revision": null,
        })
    }

    /// Reads PEFT's `adapter_config.json`, refusing the options we do not implement
    /// rather than silently computing something else.
    pub fn from_peft_json(path: &Path, value: &serde_json::Value) -> Result<Self, LoraError> {
        let bad = |field: &str, expected: &str| LoraError::AdapterConfig {
            path: path.to_path_buf(),
            problem: format!("field `{field}`: expected {expected}"),
        };
        let obj = value
            .as_object()
            .ok_or_else(|| bad("(root)", "a JSON object"))?;
        if let Some(t) = obj.get("peft_type").and_then(|v| v.as_str())
            && t != "LORA"
        {
            return Err(bad("peft_type", &format!("\"LORA\", found \"{t}\"")));
        }
        let r = obj
            .get("r")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| bad("r", "a positive integer"))? as usize;
        let alpha = obj
            .get("lora_alpha")
            .and_then(serde_json::Value::as_f64)
            .ok_or_else(|| bad("lora_alpha", "a number"))? as f32;
        let dropout = match obj.get("lora_dropout") {
            None | Some(serde_json::Value::Null) => 0.0,
            Some(v) => v.as_f64().ok_or_else(|| bad("lora_dropout", "a number"))? as f32,
        };
        let target_modules = match obj.get("target_modules") {
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("target_modules", "a list of strings"))?,
            Some(serde_json::Value::String(s)) => {
                return Err(bad(
                    "target_modules",
                    &format!(
                        "a list of module names; regular expressions such as \"{s}\" are not supported"
                    ),
                ));
            }
            _ => return Err(bad("target_modules", "a list of module names")),
        };
        let flag = |name: &str| {
            obj.get(name)
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false)
        };
        if flag("use_dora") {
            return Err(bad("use_dora", "false (DoRA is not implemented)"));
        }
        if flag("fan_in_fan_out") {
            return Err(bad(
                "fan_in_fan_out",
                "false (BERT stores weights as out×in)",
            ));
        }
        if let Some(b) = obj.get("bias").and_then(|v| v.as_str())
            && b != "none"
        {
            return Err(bad(
                "bias",
                &format!("\"none\" (trainable biases are not implemented), found \"{b}\""),
            ));
        }
        for pattern in ["rank_pattern", "alpha_pattern"] {
            if let Some(serde_json::Value::Object(m)) = obj.get(pattern)
                && !m.is_empty()
            {
                return Err(bad(pattern, "empty (per-module ranks are not implemented)"));
            }
        }
        if obj.get("layers_to_transform").is_some_and(|v| !v.is_null()) {
            return Err(bad(
                "layers_to_transform",
                "null (layer subsets are not implemented)",
            ));
        }
        let config = LoraConfig {
            r,
            alpha,
            dropout,
            target_modules,
            use_rslora: flag("use_rslora"),
            base_model_name_or_path: obj
                .get("base_model_name_or_path")
                .and_then(|v| v.as_str())
                .map(str::to_owned),
        };
        config.validate().map_err(|e| LoraError::AdapterConfig {
            path: path.to_path_buf(),
            problem: e.to_string(),
        })?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_suffix_rule() {
        assert!(target_matches(
            "query",
            "encoder.layer.0.attention.self.query"
        ));
        assert!(target_matches(
            "dense",
            "encoder.layer.0.intermediate.dense"
        ));
        assert!(target_matches(
            "output.dense",
            "encoder.layer.0.attention.output.dense"
        ));
        assert!(target_matches(
            "output.dense",
            "encoder.layer.0.output.dense"
        ));
        assert!(!target_matches(
            "output.dense",
            "encoder.layer.0.intermediate.dense"
        ));
        assert!(!target_matches(
            "ery",
            "encoder.layer.0.attention.self.query"
        ));
        assert!(target_matches(
            "encoder.layer.1.attention.self.key",
            "encoder.layer.1.attention.self.key"
        ));
    }

    #[test]
    fn resolve_counts_and_rejects_unknown() {
        let c = LoraConfig::new(8, 16.0, &["query", "value"]);
        assert_eq!(c.resolve_sites(6).map(|s| s.len()).ok(), Some(12));
        let c = LoraConfig::new(8, 16.0, &["dense"]);
        assert_eq!(c.resolve_sites(2).map(|s| s.len()).ok(), Some(6));
        let c = LoraConfig::new(8, 16.0, &["qeury"]);
        let err = c
            .resolve_sites(6)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("qeury"), "{err}");
        assert!(
            LoraConfig::new(0, 16.0, &["query"])
                .resolve_sites(6)
                .is_err()
        );
    }
}
