//! Centralised LoRA fine-tuning: the single-client case of the federated engine, and
//! the `fibecfed train` command.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use fibecfed_data::{Sample, batch_of};
use fibecfed_lora::{AdamW, AdamWConfig, LoraConfig, LoraParams, write_adapter};
use fibecfed_transformer::{Adapter, Classifier, NoHook, Reduction};
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::config::{Hyper, HyperNames};
use crate::eval::evaluate;
use crate::model::fresh_adapter;
use crate::output::{check_writable_dir, check_writable_file, write_atomic};
use crate::step::{Step, StepOutcome};

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
    /// Clip each step's gradient to this global L2 norm (torch's clip_grad_norm_).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_grad_norm: Option<f64>,
}

impl TrainConfig {
    /// Checks the flags that need no model; each message names the flag.
    pub fn validate(&self) -> Result<()> {
        Hyper {
            epochs: self.epochs,
            batch_size: self.batch_size,
            lr: self.lr,
            weight_decay: self.weight_decay,
            rank: self.lora_rank,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
        }
        .check(&HyperNames::FLAGS)?;
        crate::config::check_max_grad_norm(self.max_grad_norm, "--max-grad-norm")?;
        crate::config::check_alpha(self.lora_alpha, HyperNames::FLAGS.alpha)
    }

    /// The LoRA configuration these flags describe.
    pub fn lora(&self) -> LoraConfig {
        let targets: Vec<&str> = self.targets.iter().map(String::as_str).collect();
        let mut lora = LoraConfig::new(self.lora_rank, self.lora_alpha, &targets);
        lora.dropout = self.lora_dropout;
        lora
    }
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

impl EpochMetrics {
    /// The epoch's line on stderr.
    fn report(&self, eval_examples: usize) {
        eprintln!(
            "epoch {}: train loss {:.4}, eval accuracy {:.4} ({eval_examples} examples), eval loss {:.4}, {:.1} s ({:.0} train tokens/s)",
            self.epoch,
            self.train_loss,
            self.eval_accuracy,
            self.eval_loss,
            self.seconds,
            self.train_tokens_per_second
        );
    }
}

/// Where `train` writes.
#[derive(Debug, Clone, Default)]
pub struct TrainOutputs {
    pub save_adapter: Option<PathBuf>,
    pub metrics_out: Option<PathBuf>,
}

impl TrainOutputs {
    /// Every file these outputs write, by flag (an adapter folder as its two files).
    pub fn files(&self) -> Vec<(&'static str, PathBuf)> {
        let mut files = Vec::new();
        if let Some(dir) = &self.save_adapter {
            for f in [
                fibecfed_lora::adapter::CONFIG_FILE,
                fibecfed_lora::adapter::WEIGHTS_FILE,
            ] {
                files.push(("--save-adapter", dir.join(f)));
            }
        }
        if let Some(file) = &self.metrics_out {
            files.push(("--metrics-out", file.clone()));
        }
        files
    }
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
    model: &Classifier<f32>,
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
    // Gradients of the mean loss straight out of backward, as this command always did.
    let step = Step {
        model,
        scale,
        dropout: lora.dropout,
        reduction: Reduction::Mean,
        max_grad_norm: config.max_grad_norm,
    };
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
        let (loss_sum, seen, tokens) = train_epoch(
            &step,
            epoch,
            train,
            &order,
            config.batch_size,
            &mut params,
            &mut opt,
            &mut rng,
            &bar,
        )?;
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
        m.report(eval.len());
        history.push(m);
        write_outputs(outputs, config, lora, &params, &history)?;
    }
    Ok((params, history))
}

/// One pass over `train` in `order`: the summed loss, the samples and the real tokens
/// trained on.
fn train_epoch(
    step: &Step<'_>,
    epoch: usize,
    train: &[Sample],
    order: &[usize],
    batch_size: usize,
    params: &mut LoraParams<f32>,
    opt: &mut AdamW<f32>,
    rng: &mut ChaCha8Rng,
    bar: &ProgressBar,
) -> Result<(f64, usize, usize)> {
    let (mut loss_sum, mut seen, mut tokens) = (0.0, 0usize, 0usize);
    for (i, chunk) in order.chunks(batch_size).enumerate() {
        let labels: Vec<usize> = chunk.iter().map(|&i| train[i].label).collect();
        let batch = batch_of(train, chunk, step.model.pad_token_id())?;
        let outcome = step.run(&batch, &labels, params, opt, &[], rng, &mut NoHook, None)?;
        let losses = match outcome {
            StepOutcome::Stepped { losses, .. } => losses,
            StepOutcome::Diverged(why) => bail!(
                "epoch {epoch}, step {}: training diverged (try a lower --lr): {why}",
                i + 1
            ),
        };
        loss_sum += losses.sum();
        seen += chunk.len();
        tokens += batch.real_tokens();
        bar.set_message(format!("loss {:.4}", loss_sum / seen as f64));
        bar.inc(1);
    }
    Ok((loss_sum, seen, tokens))
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
