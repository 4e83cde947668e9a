//! `fibecfed embed`: mean-pooled sentence embeddings as JSON lines.

use std::path::Path;

use anyhow::{Context, Result};
use fibecfed_transformer::{Batch, BertModel, Encoded, TextEncoder, mean_pool};

use crate::output::write_atomic;

/// Embeds every line of `input` (an empty line embeds the empty text) and writes one
/// `{"embedding": [...]}` per line, in input order. The output is written atomically
/// at the end; callers check it is writable before loading a model
/// ([`crate::output::check_writable_file`]).
pub fn embed_file(
    model: &BertModel<f32>,
    tok: &TextEncoder,
    input: &Path,
    output: &Path,
    batch_size: usize,
) -> Result<usize> {
    let text = std::fs::read_to_string(input)
        .with_context(|| format!("cannot read {}", input.display()))?;
    let lines: Vec<&str> = text.lines().collect();
    let encoded = lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            tok.encode(l, None)
                .with_context(|| format!("{}: line {}", input.display(), i + 1))
        })
        .collect::<Result<Vec<Encoded>>>()?;
    let embeddings = embed(model, &encoded, batch_size)?;
    let mut out = String::new();
    for e in &embeddings {
        out.push_str(&serde_json::to_string(
            &serde_json::json!({ "embedding": e }),
        )?);
        out.push('\n');
    }
    write_atomic(output, out.as_bytes())?;
    Ok(lines.len())
}

/// Mean-pooled last hidden states, batched by length to avoid padding work.
pub fn embed(
    model: &BertModel<f32>,
    encoded: &[Encoded],
    batch_size: usize,
) -> Result<Vec<Vec<f32>>> {
    let mut order: Vec<usize> = (0..encoded.len()).collect();
    order.sort_by_key(|&i| encoded[i].ids.len());
    let mut out = vec![Vec::new(); encoded.len()];
    for chunk in order.chunks(batch_size.max(1)) {
        let items: Vec<&Encoded> = chunk.iter().map(|&i| &encoded[i]).collect();
        let batch = Batch::from_encoded(&items, model.config.pad_token_id)?;
        let pooled = mean_pool(&model.encode(&batch, None)?, &batch);
        for (&i, row) in chunk.iter().zip(pooled.rows()) {
            out[i] = row.to_vec();
        }
    }
    Ok(out)
}
