//! The tokenizer a GGUF file describes in its `tokenizer.ggml.*` keys, built as a
//! `tokenizers` tokenizer.
//!
//! Byte-level BPE (`tokenizer.ggml.model = "gpt2"`, which LLaMA-architecture models such
//! as SmolLM2 use) is built the way transformers' GGUF loader builds it (read in
//! `transformers/integrations/ggml.py`, checked on SmolLM2's file by the tests): the
//! vocabulary from `tokens` (id = position), `merges` as "left right" pairs, a BPE with
//! the unknown token `tokens[unknown_token_id]`, byte fallback and fused unknowns, the
//! ByteLevel pre-tokenizer (GPT-2's regex, no prefix space) and decoder, and every token
//! of type 3 (control) or 4 (user-defined) in `token_type` as an added token (special for
//! control). No post-processor: whether a BOS goes in front is the caller's, from
//! `tokenizer.ggml.add_bos_token` (transformers' loader adds one regardless).
//! `tokenizer.ggml.pre` (llama.cpp's name for the pre-tokenizer regex) is not used:
//! transformers ignores it too. Other models (`llama`: SentencePiece) are refused by key.

use std::collections::HashMap;
use std::str::FromStr;

use serde_json::json;
use tokenizers::Tokenizer;

use crate::{Gguf, GgufError, Value};

/// GGUF's token types (llama.cpp's `llama_token_type`).
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// The tokenizer `g` describes.
pub fn tokenizer(g: &Gguf) -> Result<Tokenizer, GgufError> {
    let fail = |key: &'static str, what: String| GgufError::Tokenizer {
        path: g.path().to_path_buf(),
        key,
        what,
    };
    let model = g.get_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(fail(
            "tokenizer.ggml.model",
            format!("{model:?}: only \"gpt2\" (byte-level BPE) is built"),
        ));
    }
    let tokens = g.get_strings("tokenizer.ggml.tokens")?;
    if tokens.is_empty() {
        return Err(fail("tokenizer.ggml.tokens", "no tokens".to_owned()));
    }
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut ids = HashMap::with_capacity(tokens.len());
    for (id, &t) in tokens.iter().enumerate() {
        if let Some(first) = ids.insert(t, id) {
            return Err(fail(
                "tokenizer.ggml.tokens",
                format!("token {t:?} appears twice (ids {first} and {id})"),
            ));
        }
        vocab.insert(t.to_owned(), json!(id));
    }
    let merges = g.get_strings("tokenizer.ggml.merges")?;
    let mut pairs = Vec::with_capacity(merges.len());
    for (i, m) in merges.iter().enumerate() {
        let pair = m
            .split_once(' ')
            .filter(|(a, b)| ids.contains_key(a) && ids.contains_key(b) && !b.contains(' '));
        match pair {
            Some((a, b)) => pairs.push(json!([a, b])),
            None => {
                return Err(fail(
                    "tokenizer.ggml.merges",
                    format!("merge {i} ({m:?}) is not two tokens of the vocabulary"),
                ));
            }
        }
    }
    let unk_id = match g.metadata().get("tokenizer.ggml.unknown_token_id") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|id| usize::try_from(id).ok())
                .filter(|&id| id < tokens.len())
                .ok_or_else(|| {
                    fail(
                        "tokenizer.ggml.unknown_token_id",
                        format!("{v:?} is not a token id below {}", tokens.len()),
                    )
                })?,
        ),
    };
    let types: Vec<i64> = match g.metadata().get("tokenizer.ggml.token_type") {
        None => Vec::new(),
        Some(Value::Array(items)) if items.len() == tokens.len() => items
            .iter()
            .map(|v| match v {
                Value::I32(t) => Ok(i64::from(*t)),
                other => Err(fail(
                    "tokenizer.ggml.token_type",
                    format!("holds {} values, not int32", other.type_name()),
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(fail(
                "tokenizer.ggml.token_type",
                format!(
                    "should be an array of {} int32, found {}",
                    tokens.len(),
                    match other {
                        Value::Array(items) => format!("an array of {}", items.len()),
                        v => v.type_name().to_owned(),
                    }
                ),
            ));
        }
    };
    let added: Vec<serde_json::Value> = types
        .iter()
        .enumerate()
        .filter(|&(_, &t)| t == CONTROL || t == USER_DEFINED)
        .map(|(id, &t)| {
            json!({
                "id": id,
                "content": tokens[id],
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": t == CONTROL,
            })
        })
        .collect();
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {
            "type": "ByteLevel",
            "add_prefix_space": false,
            "trim_offsets": false,
            "use_regex": true
        },
        "post_processor": null,
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": false,
            "trim_offsets": false,
            "use_regex": true
        },
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": unk_id.map(|id| tokens[id]),
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": true,
            "byte_fallback": true,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": pairs
        }
    });
    Tokenizer::from_str(&spec.to_string()).map_err(|e| {
        fail(
            "tokenizer.ggml.tokens",
            format!("tokenizers refused the vocabulary: {e}"),
        )
    })
}
