//! Loading a model folder and making the seeded initial adapter for it.

use std::path::Path;

use anyhow::{Context, Result, bail};
use fibecfed_lora::{LoraConfig, LoraParams};
use fibecfed_transformer::{BertModel, Classifier, TextEncoder};
use rand_chacha::ChaCha8Rng;

/// A fresh PEFT-style adapter for `model` (A uniform, B zero, head normal), its rank
/// checked against every site.
pub fn fresh_adapter(
    model: &Classifier<f32>,
    lora: &LoraConfig,
    num_labels: usize,
    rng: &mut ChaCha8Rng,
) -> Result<LoraParams<f32>> {
    let sites = model.resolve_sites(lora)?;
    let shapes = model.site_shapes(&sites);
    if let Some(s) = shapes.iter().find(|s| lora.r > s.d_in.min(s.d_out)) {
        bail!(
            "--lora-rank {} exceeds the smaller dimension of site {} ({}×{})",
            lora.r,
            model.site_name(s.site),
            s.d_out,
            s.d_in
        );
    }
    Ok(LoraParams::init(
        lora,
        &shapes,
        model.hidden_size(),
        num_labels,
        rng,
    ))
}

/// Loads a model folder, naming it in errors; `max_len_key` is how the caller spells
/// the length setting (`--max-len`, `model.max_len`).
pub fn load_model(
    dir: &Path,
    max_len: usize,
    max_len_key: &str,
) -> Result<(BertModel<f32>, TextEncoder)> {
    let files = fibecfed_transformer::ModelFiles::locate(dir)?;
    let model = BertModel::<f32>::load(dir)
        .with_context(|| format!("loading the model in {}", dir.display()))?;
    if max_len > model.config.max_position_embeddings {
        bail!(
            "{max_len_key} {max_len} exceeds the model's max_position_embeddings {}",
            model.config.max_position_embeddings
        );
    }
    // The tokenizer refuses a length with no room for text as bad input.
    let tok = TextEncoder::from_file(&files.tokenizer, max_len).map_err(|e| match e {
        fibecfed_transformer::ModelError::Input(_) => {
            anyhow::Error::new(e).context(format!("{max_len_key} = {max_len}"))
        }
        other => other.into(),
    })?;
    check_tokenizer(&files.tokenizer, &tok, &model)?;
    Ok((model, tok))
}

/// A tokenizer must belong to its model: ids within the embedding table, and the
/// [CLS] … [SEP] frame the classifier and the pooling expect.
fn check_tokenizer(path: &Path, tok: &TextEncoder, model: &BertModel<f32>) -> Result<()> {
    let rows = model.config.vocab_size;
    if tok.vocab_size() > rows {
        bail!(
            "{}: {} tokens, but the model's embedding table has only {rows} rows: this tokenizer belongs to another model",
            path.display(),
            tok.vocab_size()
        );
    }
    if tok.special_tokens_single() < 2 {
        bail!(
            "{}: the tokenizer adds {} special tokens to a sentence, expected [CLS] and [SEP] (a BERT post-processor): this tokenizer belongs to another model",
            path.display(),
            tok.special_tokens_single()
        );
    }
    Ok(())
}

/// Loads a LLaMA GGUF as a verbalizer classifier for the labels `label_names` (in id
/// order): the prompt and the words come from the config, else from the authors'
/// table for `dataset`. Errors name the config key, the label or the word.
pub fn load_llama(
    file: &Path,
    max_len: usize,
    template: Option<&str>,
    words: Option<&std::collections::BTreeMap<String, String>>,
    dataset: &str,
    label_names: &[String],
) -> Result<(Classifier<f32>, TextEncoder)> {
    let authors = fibecfed_data::authors_verbalizer(dataset);
    let template = match (template, authors) {
        (Some(t), _) => t.to_owned(),
        (None, Some(v)) => v.template.to_owned(),
        (None, None) => bail!(
            "model.template is not set and {dataset:?} is not one of the nine datasets with the authors' template: set model.template and model.label_words"
        ),
    };
    let words: Vec<String> = label_names
        .iter()
        .map(|name| {
            let word = match words {
                Some(w) => w.get(name).cloned(),
                None => authors.and_then(|v| {
                    v.words
                        .iter()
                        .find(|(n, _)| n == name)
                        .map(|(_, w)| (*w).to_owned())
                }),
            };
            word.with_context(|| {
                format!(
                    "model.label_words: no word for label {name:?} (the data's labels are {label_names:?})"
                )
            })
        })
        .collect::<Result<_>>()?;
    let prompt =
        fibecfed_transformer::PromptTemplate::parse(&template).context("model.template")?;
    let tok = fibecfed_transformer::TextEncoder::from_gguf(file, max_len, prompt)
        .with_context(|| format!("model.file {}", file.display()))?;
    let labels = tok.label_ids(&words).context("model.label_words")?;
    let model = fibecfed_transformer::LlamaModel::<f32>::load(file)
        .with_context(|| format!("loading the model in model.file {}", file.display()))?;
    if tok.vocab_size() > model.config.vocab_size {
        bail!(
            "{}: the tokenizer has {} tokens but the embedding table {} rows",
            file.display(),
            tok.vocab_size(),
            model.config.vocab_size
        );
    }
    Ok((Classifier::Llama { model, labels }, tok))
}
