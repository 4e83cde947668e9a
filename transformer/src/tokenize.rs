//! Text → token ids with a Hugging Face `tokenizer.json` (or a decoder's tokenizer and a
//! prompt template), and padded batches.

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
    /// Set for a decoder: the example goes into this prompt, without special tokens.
    prompt: Option<PromptTemplate>,
}

/// A part of a prompt template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    A,
    B,
    /// A space before the next text, tokenised with it (` word`, as in running text,
    /// rather than a lone space token then `word`).
    Space,
}

/// A prompt around an example, e.g. `{a} . It was` or `{a} ? {b} These two sentences
/// are`: the decoder reads the label words' logits after its last token (the authors'
/// templates cut at their `<mask>`, FIBECFED.md §7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptTemplate {
    source: String,
    pieces: Vec<Piece>,
}

impl PromptTemplate {
    /// `{a}` once (the sentence or first text), `{b}` at most once (the second text of
    /// a pair); any other brace is an error.
    pub fn parse(template: &str) -> Result<Self, ModelError> {
        let bad = |why: &str| ModelError::Input(format!("prompt template {template:?}: {why}"));
        let mut pieces = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find(['{', '}']) {
            if open > 0 {
                pieces.push(Piece::Text(rest[..open].to_owned()));
            }
            let tail = &rest[open..];
            if let Some(t) = tail.strip_prefix("{a}") {
                pieces.push(Piece::A);
                rest = t;
            } else if let Some(t) = tail.strip_prefix("{b}") {
                pieces.push(Piece::B);
                rest = t;
            } else {
                return Err(bad("only {a} and {b} may appear in braces"));
            }
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_owned()));
        }
        // "… ? {b}": the space goes with the text that follows it.
        let mut i = 0;
        while i + 1 < pieces.len() {
            if let (Piece::Text(t), Piece::A | Piece::B) = (&pieces[i], &pieces[i + 1])
                && t.ends_with(' ')
            {
                let kept = t.trim_end_matches(' ').to_owned();
                if kept.is_empty() {
                    pieces[i] = Piece::Space;
                } else {
                    pieces[i] = Piece::Text(kept);
                    pieces.insert(i + 1, Piece::Space);
                    i += 1;
                }
            }
            i += 1;
        }
        let count = |p: &Piece| pieces.iter().filter(|x| *x == p).count();
        if count(&Piece::A) != 1 || count(&Piece::B) > 1 {
            return Err(bad("it needs {a} exactly once and {b} at most once"));
        }
        Ok(Self {
            source: template.to_owned(),
            pieces,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the template reads a second text.
    pub fn has_pair(&self) -> bool {
        self.pieces.contains(&Piece::B)
    }
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
            prompt: None,
        })
    }

    /// A decoder's encoder: each example goes into `prompt`, tokenised without special
    /// tokens, piece by piece (the template's text and each text on its own, so that a
    /// long text is cut by tokens, from its end, and the template's tail, which the
    /// label word follows, always stays). `source` names the tokenizer's file in errors.
    pub fn prompted(
        tokenizer: Tokenizer,
        source: &Path,
        max_len: usize,
        prompt: PromptTemplate,
    ) -> Result<Self, ModelError> {
        let mut tokenizer = tokenizer;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| ModelError::Tokenizer {
                path: source.to_path_buf(),
                problem: e.to_string(),
            })?;
        let enc = Self {
            tokenizer,
            path: source.to_path_buf(),
            max_len,
            prompt: None,
        };
        let fixed: usize = prompt
            .pieces
            .iter()
            .map(|p| match p {
                Piece::Text(t) => enc.plain(t).map(|ids| ids.len()),
                Piece::A | Piece::B => Ok(1),
                Piece::Space => Ok(0),
            })
            .sum::<Result<usize, ModelError>>()?;
        if fixed > max_len {
            return Err(ModelError::Input(format!(
                "max length {max_len} leaves no room for text in the prompt {:?} ({fixed} tokens with one token per text)",
                prompt.as_str()
            )));
        }
        Ok(Self {
            prompt: Some(prompt),
            ..enc
        })
    }

    /// [`TextEncoder::prompted`] with the tokenizer a GGUF file describes
    /// (`tokenizer.ggml.*`).
    pub fn from_gguf(
        path: &Path,
        max_len: usize,
        prompt: PromptTemplate,
    ) -> Result<Self, ModelError> {
        let g = fibecfed_gguf::Gguf::open(path)?;
        let tokenizer = fibecfed_gguf::tokenizer(&g)?;
        Self::prompted(tokenizer, path, max_len, prompt)
    }

    /// Token ids of `text` without special tokens or truncation.
    fn plain(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer {
                path: self.path.clone(),
                problem: e.to_string(),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// The token id of each label word, which must be exactly one token (as the
    /// authors assert); the error names the word.
    pub fn label_ids(&self, words: &[String]) -> Result<Vec<u32>, ModelError> {
        words
            .iter()
            .map(|w| {
                let ids = self.plain(w)?;
                match ids[..] {
                    [id] => Ok(id),
                    _ => Err(ModelError::Input(format!(
                        "label word {w:?} is {} tokens ({ids:?}) in {}: a verbalizer needs one token a word (mind the leading space)",
                        ids.len(),
                        self.path.display()
                    ))),
                }
            })
            .collect()
    }

    /// The prompt of a decoder's encoder, if it has one.
    pub fn prompt(&self) -> Option<&PromptTemplate> {
        self.prompt.as_ref()
    }

    fn encode_prompt(
        &self,
        prompt: &PromptTemplate,
        text_a: &str,
        text_b: Option<&str>,
    ) -> Result<Encoded, ModelError> {
        if prompt.has_pair() != text_b.is_some() {
            return Err(ModelError::Input(format!(
                "the prompt {:?} reads {} but the example has {}",
                prompt.as_str(),
                if prompt.has_pair() {
                    "two texts"
                } else {
                    "one text"
                },
                if text_b.is_some() { "two" } else { "one" }
            )));
        }
        // A text after a Space piece is tokenised with one leading space.
        let spaced = |piece: &Piece| {
            prompt
                .pieces
                .windows(2)
                .any(|w| w[0] == Piece::Space && &w[1] == piece)
        };
        let text = |t: &str, piece: Piece| {
            if spaced(&piece) {
                self.plain(&format!(" {t}"))
            } else {
                self.plain(t)
            }
        };
        let mut a = text(text_a, Piece::A)?;
        let mut b = match text_b {
            Some(t) => text(t, Piece::B)?,
            None => Vec::new(),
        };
        let mut fixed = Vec::new();
        for p in &prompt.pieces {
            if let Piece::Text(t) = p {
                fixed.push(self.plain(t)?);
            }
        }
        let budget = self
            .max_len
            .saturating_sub(fixed.iter().map(Vec::len).sum::<usize>());
        // Longest first, from the end, as the encoder's pair truncation does.
        while a.len() + b.len() > budget {
            if a.len() >= b.len() {
                a.pop();
            } else {
                b.pop();
            }
        }
        let mut fixed = fixed.into_iter();
        let mut ids = Vec::with_capacity(self.max_len);
        for p in &prompt.pieces {
            match p {
                Piece::Text(_) => ids.extend(fixed.next().unwrap_or_default()),
                Piece::A => ids.extend_from_slice(&a),
                Piece::B => ids.extend_from_slice(&b),
                Piece::Space => {}
            }
        }
        Ok(Encoded {
            type_ids: vec![0; ids.len()],
            ids,
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
        if let Some(prompt) = &self.prompt {
            return self.encode_prompt(prompt, text_a, text_b);
        }
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
