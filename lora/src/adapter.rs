//! PEFT adapter folders: `adapter_config.json` + `adapter_model.safetensors`.

use std::fs;
use std::path::Path;

use fibecfed_core::{NamedTensors, Real};

use crate::LoraError;
use crate::config::LoraConfig;
use crate::io::{read_safetensors, write_safetensors};
use crate::params::LoraParams;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Reads a PEFT adapter folder. Shapes are checked later against a model, by
/// [`LoraParams::from_named`], because only the model knows them.
pub fn read_adapter(dir: &Path) -> Result<(LoraConfig, NamedTensors), LoraError> {
    let config_path = dir.join(CONFIG_FILE);
    let text = fs::read_to_string(&config_path).map_err(|e| LoraError::Io {
        path: config_path.clone(),
        source: e,
    })?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| LoraError::AdapterConfig {
            path: config_path.clone(),
            problem: format!("not valid JSON: {e}"),
        })?;
    let config = LoraConfig::from_peft_json(&config_path, &json)?;
    let tensors = read_safetensors(&dir.join(WEIGHTS_FILE))?;
    Ok((config, tensors))
}

/// Writes a PEFT adapter folder that `PeftModel.from_pretrained` loads. The weights
/// go first and the config last, each atomically, so a folder with a config always
/// has complete weights beside it.
pub fn write_adapter<F: Real>(
    dir: &Path,
    config: &LoraConfig,
    params: &LoraParams<F>,
) -> Result<(), LoraError> {
    fs::create_dir_all(dir).map_err(|e| LoraError::Io {
        path: dir.to_path_buf(),
        source: e,
    })?;
    write_safetensors(&dir.join(WEIGHTS_FILE), &params.to_named(), None)?;
    let config_path = dir.join(CONFIG_FILE);
    let text = serde_json::to_string_pretty(&config.to_peft_json()).map_err(|e| {
        LoraError::AdapterConfig {
            path: config_path.clone(),
            problem: e.to_string(),
        }
    })?;
    fibecfed_core::fsio::write_atomic(&config_path, text.as_bytes()).map_err(|e| {
        LoraError::Io {
            path: config_path,
            source: e,
        }
    })?;
    Ok(())
}
