//! Tokenised, labelled samples and the batches made of them.

use std::path::{Path, PathBuf};

use fibecfed_transformer::{Batch, Encoded, ModelError, TextEncoder};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::tsv::Dataset;

/// One tokenised, labelled example.
#[derive(Debug, Clone)]
pub struct Sample {
    pub encoded: Encoded,
    pub label: usize,
}

/// An example the tokenizer refused, with where it came from.
#[derive(Debug, thiserror::Error)]
#[error("{}: example {example}: {source}", file.display())]
pub struct TokenizeError {
    pub file: PathBuf,
    /// 1-based position among the file's examples.
    pub example: usize,
    /// Boxed: the model's error is large, and this one travels by value.
    #[source]
    pub source: Box<ModelError>,
}

/// Tokenises every example of `data`, read from `file` (named in errors).
pub fn tokenize(
    tok: &TextEncoder,
    data: &Dataset,
    file: &Path,
) -> Result<Vec<Sample>, TokenizeError> {
    data.examples
        .iter()
        .enumerate()
        .map(|(i, ex)| {
            let encoded = tok
                .encode(&ex.text_a, ex.text_b.as_deref())
                .map_err(|source| TokenizeError {
                    file: file.to_owned(),
                    example: i + 1,
                    source: Box::new(source),
                })?;
            Ok(Sample {
                encoded,
                label: ex.label,
            })
        })
        .collect()
}

/// Sample ids sorted by length, so that batches of neighbours carry little padding.
pub fn by_length(samples: &[Sample]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..samples.len()).collect();
    order.sort_by_key(|&i| samples[i].encoded.ids.len());
    order
}

/// `ids` cut into batches of `batch_size` by length: sorted by token count (stable,
/// so equal lengths keep their order in `ids`, which a caller shuffles first), then
/// chunked. The batches hold exactly the samples of `ids`, each once; they come out
/// shortest first, and a trainer shuffles them before use.
pub fn length_batches(samples: &[Sample], ids: &[usize], batch_size: usize) -> Vec<Vec<usize>> {
    let mut sorted = ids.to_vec();
    sorted.sort_by_key(|&i| samples[i].encoded.ids.len());
    sorted
        .chunks(batch_size.max(1))
        .map(<[usize]>::to_vec)
        .collect()
}

/// The right-padded batch of `samples[ids]`, padded with `pad_token_id`.
pub fn batch_of(samples: &[Sample], ids: &[usize], pad_token_id: u32) -> Result<Batch, ModelError> {
    let items: Vec<&Encoded> = ids.iter().map(|&i| &samples[i].encoded).collect();
    Batch::from_encoded(&items, pad_token_id)
}

/// Padded tokens of a pass over `samples` in length-sorted batches of `batch_size`.
pub fn padded_tokens(samples: &[Sample], batch_size: usize) -> u64 {
    by_length(samples)
        .chunks(batch_size.max(1))
        .map(|c| {
            let longest = c
                .iter()
                .map(|&i| samples[i].encoded.ids.len())
                .max()
                .unwrap_or(0);
            (c.len() * longest) as u64
        })
        .sum()
}

/// Takes a seeded random subset of at most `limit` samples (the files are often
/// sorted by label, so a prefix would be one class).
pub fn limit_samples(samples: Vec<Sample>, limit: Option<usize>, seed: u64) -> Vec<Sample> {
    match limit {
        Some(n) if n < samples.len() => {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_1111);
            let mut idx: Vec<usize> = (0..samples.len()).collect();
            idx.shuffle(&mut rng);
            idx.truncate(n);
            idx.sort_unstable();
            idx.into_iter().map(|i| samples[i].clone()).collect()
        }
        _ => samples,
    }
}
