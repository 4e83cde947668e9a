//! Loading a model folder and making the seeded initial adapter for it.

use std::path::Path;

use anyhow::{Context, Result, bail};
use fibecfed_lora::{LoraConfig, LoraParams};
use fibecfed_transformer::{BertModel, TextEncoder};
use rand_chacha::ChaCha8Rng;

/// A fresh PEFT-style adapter for `model` (A uniform, B zero, head normal), its rank
/// checked against every site.
pub fn fresh_adapter(
    model: &BertModel<f32>,
    lora: &LoraConfig,
    num_labels: usize,
    rng: &mut ChaCha8Rng,
) -> Result<LoraParams<f32>> {
    let sites = lora.resolve_sites(model.config.num_hidden_layers)?;
    let shapes = model.site_shapes(&sites);
    if let Some(s) = shapes.iter().find(|s| lora.r > s.d_in.min(s.d_out)) {
        bail!(
            "--lora-rank {} exceeds the smaller dimension of site {} ({}×{})",
            lora.r,
            s.site,
            s.d_out,
            s.d_in
        );
    }
    Ok(LoraParams::init(
        lora,
        &shapes,
        model.config.hidden_size,
        num_labels,
        rng,
    ))
}

/// Loads a model folder, naming it in errors.
pub fn load_model(dir: &Path, max_len: usize) -> Result<(BertModel<f32>, TextEncoder)> {
    let files = fibecfed_transformer::ModelFiles::locate(dir)?;
    let model = BertModel::<f32>::load(dir)
        .with_context(|| format!("loading the model in {}", dir.display()))?;
    if max_len > model.config.max_position_embeddings {
        bail!(
            "--max-len {max_len} exceeds the model's max_position_embeddings {}",
            model.config.max_position_embeddings
        );
    }
    let tok = TextEncoder::from_file(&files.tokenizer, max_len)?;
    Ok((model, tok))
}
