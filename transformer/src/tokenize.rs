//! Text → token ids with a Hugging Face `tokenizer.json`, and padded batches.

use std::path::{Path, PathBuf};

use tokenizers::{
    PostProcessor, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

use crate::ModelError;

/// One tokenised example: word-piece ids with [CLS]/[SEP] and segment ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
}

/// A tokenizer with our own truncation and no padding: the MiniLM tokenizer.json pads
/// and truncates to 128 by itself, which would waste compute on short batches.
#[derive(Debug, Clone)]
pub struct TextEncoder {
    tokenizer: Tokenizer,
    path: PathBuf,
    max_len: usize,
}

impl TextEncoder {
    pub fn from_file(path: &Path, max_len: usize) -> Result<Self, ModelError> {
        if !path.exists() {
            return Err(ModelError::MissingFile {
                path: path.to_path_buf(),
                hint: "a Hugging Face fast tokenizer (tokenizer.json) is required next to config.json",
            });
        }
        if max_len < 2 {
            return Err(ModelError::Input(format!(
                "max length {max_len} is too small: [CLS] and [SEP] need 2"
            )));
        }
        let tok_err = |e: &dyn std::fmt::Display| ModelError::Tokenizer {
            path: path.to_path_buf(),
            problem: e.to_string(),
        };
        let mut tokenizer = Tokenizer::from_file(path).map_err(|e| tok_err(&e))?;
        // A pair needs room for its special tokens plus one token of text; below that the
        // tokenizers crate's own truncation arithmetic underflows.
        let special = tokenizer
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(true));
        if max_len <= special {
            return Err(ModelError::Input(format!(
                "max length {max_len} leaves no room for text: this tokenizer adds {special} special tokens to a pair"
            )));
        }
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| tok_err(&e))?;
        Ok(Self {
            tokenizer,
            path: path.to_path_buf(),
            max_len,
        })
    }

    /// Token ids run below this (added tokens included): every id must be a row of
    /// the model's embedding table.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Special tokens the post-processor adds around a single sentence ([CLS] and
    /// [SEP] for BERT): the classifier reads the first position, which must be one.
    pub fn special_tokens_single(&self) -> usize {
        self.tokenizer
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(false))
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// A single text, or a pair (segment ids 0 then 1), with special tokens.
    pub fn encode(&self, text_a: &str, text_b: Option<&str>) -> Result<Encoded, ModelError> {
        let enc = match text_b {
            None => self.tokenizer.encode(text_a, true),
            Some(b) => self.tokenizer.encode((text_a, b), true),
        }
        .map_err(|e| ModelError::Tokenizer {
            path: self.path.clone(),
            problem: e.to_string(),
        })?;
        Ok(Encoded {
            ids: enc.get_ids().to_vec(),
            type_ids: enc.get_type_ids().to_vec(),
        })
    }
}

/// A right-padded batch, row-major B×T.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub batch: usize,
    pub seq_len: usize,
    pub input_ids: Vec<u32>,
    pub token_type_ids: Vec<u32>,
    /// true for real tokens, false for padding.
    pub mask: Vec<bool>,
}

impl Batch {
    /// Pads to the longest sequence of this batch.
    pub fn from_encoded(items: &[&Encoded], pad_id: u32) -> Result<Self, ModelError> {
        if items.is_empty() {
            return Err(ModelError::Input("empty batch".into()));
        }
        let seq_len = items.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        if seq_len == 0 {
            return Err(ModelError::Input(
                "every sequence in the batch is empty".into(),
            ));
        }
        let n = items.len() * seq_len;
        let (mut input_ids, mut token_type_ids, mut mask) =
            (vec![pad_id; n], vec![0; n], vec![false; n]);
        for (b, e) in items.iter().enumerate() {
            if e.ids.is_empty() {
                return Err(ModelError::Input(format!(
                    "sequence {b} of the batch is empty"
                )));
            }
            if e.type_ids.len() != e.ids.len() {
                return Err(ModelError::Input(format!(
                    "sequence {b}: {} ids but {} type ids",
                    e.ids.len(),
                    e.type_ids.len()
                )));
            }
            let row = b * seq_len;
            input_ids[row..row + e.ids.len()].copy_from_slice(&e.ids);
            token_type_ids[row..row + e.ids.len()].copy_from_slice(&e.type_ids);
            mask[row..row + e.ids.len()].fill(true);
        }
        Ok(Self {
            batch: items.len(),
            seq_len,
            input_ids,
            token_type_ids,
            mask,
        })
    }

    /// From explicit B×T arrays (fixtures, callers with their own tokenizer).
    pub fn from_parts(
        batch: usize,
        seq_len: usize,
        input_ids: Vec<u32>,
        token_type_ids: Vec<u32>,
        mask: Vec<bool>,
    ) -> Result<Self, ModelError> {
        let n = batch.saturating_mul(seq_len);
        if n == 0 || input_ids.len() != n || token_type_ids.len() != n || mask.len() != n {
            return Err(ModelError::Input(format!(
                "batch arrays must all hold {batch}×{seq_len} = {n} entries (got ids {}, types {}, mask {})",
                input_ids.len(),
                token_type_ids.len(),
                mask.len()
            )));
        }
        for b in 0..batch {
            if !mask[b * seq_len] {
                return Err(ModelError::Input(format!(
                    "sequence {b} has no tokens (its first position is padding)"
                )));
            }
        }
        Ok(Self {
            batch,
            seq_len,
            input_ids,
            token_type_ids,
            mask,
        })
    }

    pub fn lengths(&self) -> Vec<usize> {
        self.mask
            .chunks(self.seq_len)
            .map(|m| m.iter().filter(|&&x| x).count())
            .collect()
    }

    pub fn real_tokens(&self) -> usize {
        self.mask.iter().filter(|&&m| m).count()
    }
}
