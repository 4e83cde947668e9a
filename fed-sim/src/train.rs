//! Centralised LoRA fine-tuning: the single-client case of the federated engine, and
//! the `fibecfed train` command.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use fibecfed_lora::{AdamW, AdamWConfig, LoraConfig, LoraParams, write_adapter};
use fibecfed_transformer::{
    Adapter, Batch, BertModel, Dropout, Encoded, NoHook, Reduction, TextEncoder, cross_entropy,
};
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::data::Dataset;
use crate::output::{check_writable_dir, check_writable_file, write_atomic};

/// The hyper-parameters of `fibecfed train`: the CLI flags (clap) and the `config`
/// block of `metrics.json` (serde) are this one struct, so they cannot drift apart.
#[derive(Debug, Clone, Serialize, clap::Args)]
pub struct TrainConfig {
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    #[arg(long, default_value_t = 8)]
    pub lora_rank: usize,
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f32,
    #[arg(long, default_value_t = 0.0)]
    pub lora_dropout: f32,
    /// PEFT-style target modules: query,key,value,dense,attention.output.dense,intermediate.dense,output.dense.
    #[arg(long, value_delimiter = ',', default_value = "query,value")]
    pub targets: Vec<String>,
    #[arg(long, default_value_t = 5e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Truncate inputs to this many tokens, [CLS] and [SEP] included.
    #[arg(long, default_value_t = 128)]
    pub max_len: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

impl TrainConfig {
    /// Checks the flags that need no model; each message names the flag.
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 || self.batch_size == 0 {
            bail!("--epochs and --batch-size must be at least 1");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("--lr must be a positive number, got {}", self.lr);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bail!(
                "--weight-decay must be a non-negative number, got {}",
                self.weight_decay
            );
        }
        if self.lora_rank == 0 {
            bail!("--lora-rank must be at least 1");
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            bail!(
                "--lora-dropout must be in [0, 1), got {}",
                self.lora_dropout
            );
        }
        if !self.lora_alpha.is_finite() {
            bail!("--lora-alpha must be finite, got {}", self.lora_alpha);
        }
        Ok(())
    }

    /// The LoRA configuration these flags describe.
    pub fn lora(&self) -> LoraConfig {
        let targets: Vec<&str> = self.targets.iter().map(String::as_str).collect();
        let mut lora = LoraConfig::new(self.lora_rank, self.lora_alpha, &targets);
        lora.dropout = self.lora_dropout;
        lora
    }
}

/// One tokenised, labelled example.
#[derive(Debug, Clone)]
pub struct Sample {
    pub encoded: Encoded,
    pub label: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub train_loss: f64,
    pub eval_accuracy: f64,
    pub eval_loss: f64,
    pub seconds: f64,
    pub train_tokens_per_second: f64,
}

pub fn tokenize(tok: &TextEncoder, data: &Dataset, file: &Path) -> Result<Vec<Sample>> {
    data.examples
        .iter()
        .enumerate()
        .map(|(i, ex)| {
            let encoded = tok
                .encode(&ex.text_a, ex.text_b.as_deref())
                .with_context(|| format!("{}: example {}", file.display(), i + 1))?;
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

/// The right-padded batch of `samples[ids]`.
pub fn batch_of(
    model: &BertModel<f32>,
    samples: &[Sample],
    ids: &[usize],
) -> Result<Batch, fibecfed_transformer::ModelError> {
    let items: Vec<&Encoded> = ids.iter().map(|&i| &samples[i].encoded).collect();
    Batch::from_encoded(&items, model.config.pad_token_id)
}

/// Accuracy and mean loss over `samples`; batches are formed by length so that
/// little compute goes to padding (order does not change the result).
pub fn evaluate(
    model: &BertModel<f32>,
    adapter: Adapter<'_, f32>,
    samples: &[Sample],
    batch_size: usize,
) -> Result<(f64, f64)> {
    if samples.is_empty() {
        bail!("the evaluation set is empty");
    }
    let c = evaluate_counts(model, adapter, samples, batch_size)?;
    if c.non_finite > 0 {
        bail!(
            "the model's outputs are not finite for {} of {} evaluation samples (training diverged? try a lower --lr)",
            c.non_finite,
            samples.len()
        );
    }
    Ok((
        c.correct as f64 / samples.len() as f64,
        c.loss_sum / samples.len() as f64,
    ))
}

/// What an evaluation pass counts.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EvalCounts {
    pub correct: usize,
    /// Σ loss over the samples whose logits are finite.
    pub loss_sum: f64,
    /// Samples whose logits are not finite (a diverged model): counted wrong, left out
    /// of the loss.
    pub non_finite: usize,
}

/// Correct predictions and the summed loss over `samples` (federated evaluation adds
/// these up over clients).
pub fn evaluate_counts(
    model: &BertModel<f32>,
    adapter: Adapter<'_, f32>,
    samples: &[Sample],
    batch_size: usize,
) -> Result<EvalCounts> {
    let mut c = EvalCounts::default();
    for chunk in by_length(samples).chunks(batch_size.max(1)) {
        let batch = batch_of(model, samples, chunk)?;
        let logits = model.logits(&batch, adapter)?;
        let finite: Vec<usize> = (0..chunk.len())
            .filter(|&r| logits.row(r).iter().all(|v| v.is_finite()))
            .collect();
        c.non_finite += chunk.len() - finite.len();
        if finite.is_empty() {
            continue;
        }
        let rows = logits.select(ndarray::Axis(0), &finite);
        let labels: Vec<usize> = finite.iter().map(|&r| samples[chunk[r]].label).collect();
        let (losses, _) = cross_entropy(&rows, &labels, Reduction::Sum)?;
        c.loss_sum += losses.sum();
        for (row, &y) in rows.rows().into_iter().zip(&labels) {
            let pred = row
                .iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |best, (j, &v)| {
                    if v > best.1 { (j, v) } else { best }
                })
                .0;
            c.correct += usize::from(pred == y);
        }
    }
    Ok(c)
}

/// Where `train` writes.
#[derive(Debug, Clone, Default)]
pub struct TrainOutputs {
    pub save_adapter: Option<PathBuf>,
    pub metrics_out: Option<PathBuf>,
}

/// Fails before any training if an output cannot be written.
pub fn check_outputs(out: &TrainOutputs) -> Result<()> {
    if let Some(dir) = &out.save_adapter {
        check_writable_dir(dir)?;
    }
    if let Some(file) = &out.metrics_out {
        check_writable_file(file)?;
    }
    Ok(())
}

/// Trains LoRA + head with AdamW on `train`, evaluating on `eval` after each epoch.
pub fn train(
    model: &BertModel<f32>,
    config: &TrainConfig,
    lora: &LoraConfig,
    train: &[Sample],
    eval: &[Sample],
    num_labels: usize,
    outputs: &TrainOutputs,
    show_progress: bool,
) -> Result<(LoraParams<f32>, Vec<EpochMetrics>)> {
    if train.is_empty() {
        bail!("the training set is empty");
    }
    config.validate()?;
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut params = fresh_adapter(model, lora, num_labels, &mut rng)?;
    let scale = lora.scale();
    let mut opt = AdamW::new(
        AdamWConfig {
            lr: config.lr,
            weight_decay: config.weight_decay,
            ..AdamWConfig::default()
        },
        &params,
    );
    let mut history = Vec::new();
    for epoch in 1..=config.epochs {
        let start = Instant::now();
        let mut order: Vec<usize> = (0..train.len()).collect();
        order.shuffle(&mut rng);
        let bar = progress_bar(
            order.len().div_ceil(config.batch_size),
            epoch,
            show_progress,
        );
        let (mut loss_sum, mut seen, mut tokens) = (0.0, 0usize, 0usize);
        for (step, chunk) in order.chunks(config.batch_size).enumerate() {
            let items: Vec<&Encoded> = chunk.iter().map(|&i| &train[i].encoded).collect();
            let labels: Vec<usize> = chunk.iter().map(|&i| train[i].label).collect();
            let batch = Batch::from_encoded(&items, model.config.pad_token_id)?;
            let adapter = Adapter {
                params: &params,
                scale,
            };
            let dropout = Some(Dropout {
                p: lora.dropout,
                rng: &mut rng,
            });
            let fwd = model.forward(&batch, adapter, dropout)?;
            let (losses, dlogits) = cross_entropy(&fwd.logits, &labels, Reduction::Mean)
                .with_context(|| {
                    format!(
                        "epoch {epoch}, step {}: training diverged (try a lower --lr)",
                        step + 1
                    )
                })?;
            let grads = model.backward(&batch, adapter, &fwd, &dlogits, &mut NoHook)?;
            opt.step(&mut params, &grads)?;
            loss_sum += losses.sum();
            seen += chunk.len();
            tokens += batch.real_tokens();
            bar.set_message(format!("loss {:.4}", loss_sum / seen as f64));
            bar.inc(1);
        }
        bar.finish_and_clear();
        let train_seconds = start.elapsed().as_secs_f64();
        let (accuracy, eval_loss) = evaluate(
            model,
            Adapter {
                params: &params,
                scale,
            },
            eval,
            64,
        )?;
        let m = EpochMetrics {
            epoch,
            train_loss: loss_sum / seen as f64,
            eval_accuracy: accuracy,
            eval_loss,
            seconds: start.elapsed().as_secs_f64(),
            train_tokens_per_second: tokens as f64 / train_seconds,
        };
        eprintln!(
            "epoch {epoch}: train loss {:.4}, eval accuracy {:.4} ({} examples), eval loss {:.4}, {:.1} s ({:.0} train tokens/s)",
            m.train_loss,
            m.eval_accuracy,
            eval.len(),
            m.eval_loss,
            m.seconds,
            m.train_tokens_per_second
        );
        history.push(m);
        write_outputs(outputs, config, lora, &params, &history)?;
    }
    Ok((params, history))
}

/// Written after every epoch, so an interrupted run keeps its finished epochs.
fn write_outputs(
    outputs: &TrainOutputs,
    config: &TrainConfig,
    lora: &LoraConfig,
    params: &LoraParams<f32>,
    history: &[EpochMetrics],
) -> Result<()> {
    if let Some(dir) = &outputs.save_adapter {
        write_adapter(dir, lora, params)
            .with_context(|| format!("saving the adapter to {}", dir.display()))?;
    }
    if let Some(file) = &outputs.metrics_out {
        let json = serde_json::json!({ "epochs": history, "config": config });
        let text = serde_json::to_string_pretty(&json)?;
        write_atomic(file, text.as_bytes())?;
    }
    Ok(())
}

fn progress_bar(len: usize, epoch: usize, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    if let Ok(style) = ProgressStyle::with_template(
        "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg} (eta {eta})",
    ) {
        bar.set_style(style);
    }
    bar.set_prefix(format!("epoch {epoch}"));
    bar
}

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
