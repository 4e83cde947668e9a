//! The `fibecfed` command line: its commands and flags, and the one rule for failures
//! (the cause chain on stderr and exit status 2, whether the input was a bad file,
//! flag or path). `src/main.rs` only calls [`main`].

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use crate::embed::embed_file;
use crate::fisher::{
    Device, FisherOptions, FisherReport, choose_backend, difficulty_jsonl, fisher_pass,
    load_or_init_adapter, perturbation_importance,
};
use crate::model::load_model;
use crate::output::{check_input_file, check_outputs_apart, check_writable_file, write_atomic};
use crate::participant::{ClientArgs, client_command};
use crate::registry::Registry;
use crate::run::{RunArgs, run_command};
use crate::train::{TrainConfig, TrainOutputs, check_outputs, train};
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use fibecfed_data::{limit_samples, read_train_eval, read_tsv, tokenize};

#[derive(Debug, Parser)]
#[command(
    name = "fibecfed",
    version,
    about = "Federated LoRA fine-tuning with Fisher-information curricula"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Mean-pooled sentence embeddings, one JSON object per input line.
    Embed {
        /// Hugging Face BERT-family model folder (config.json, model.safetensors, tokenizer.json).
        #[arg(long)]
        model_dir: PathBuf,
        /// Text file, one input per line.
        #[arg(long)]
        input: PathBuf,
        /// JSON-lines output: {"embedding": [...]} per input line.
        #[arg(long)]
        output: PathBuf,
        /// Truncate inputs to this many tokens, [CLS] and [SEP] included.
        #[arg(long, default_value_t = 128)]
        max_len: usize,
        #[arg(long, default_value_t = 32)]
        batch_size: usize,
    },
    /// Centralised LoRA fine-tuning with AdamW; accuracy on --eval after every epoch.
    Train(TrainArgs),
    /// A federated run (FibecFed or any baseline) from a TOML config, with a checkpoint
    /// after every round; `--resume DIR` continues a stopped run.
    Run(RunArgs),
    /// Per-sample difficulty (trace of the empirical Fisher of sample i alone over every
    /// LoRA and head parameter) and per-layer importance of an adapter on a dataset.
    Fisher(FisherArgs),
    /// One FibecFed participant in a Flower federation: joins a stock `flwr` server over
    /// gRPC and trains its part of the data when the server asks.
    Client(ClientArgs),
}

/// The flags of `fibecfed train`.
#[derive(Debug, clap::Args)]
struct TrainArgs {
    /// Hugging Face BERT-family model folder (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    model_dir: PathBuf,
    /// Training TSV (any of the nine layouts in shared/data, or a header with sentence/label columns).
    #[arg(long)]
    train: PathBuf,
    /// Evaluation TSV, same layout and label set.
    #[arg(long)]
    eval: PathBuf,
    #[command(flatten)]
    config: TrainConfig,
    /// Write the trained adapter as a PEFT folder (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    save_adapter: Option<PathBuf>,
    /// Write per-epoch metrics as JSON.
    #[arg(long)]
    metrics_out: Option<PathBuf>,
    /// Train on a seeded random subset of this many examples.
    #[arg(long)]
    limit_train: Option<usize>,
    /// Evaluate on a seeded random subset of this many examples.
    #[arg(long)]
    limit_eval: Option<usize>,
}

/// Which label the per-sample gradients are taken at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LabelArg {
    /// The sample's own label: the empirical Fisher.
    True,
    /// y ~ p(·|x) from the model, seeded by --seed.
    Sampled,
}

/// How layer importance is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ImportanceArg {
    /// Normalised Fisher sums of each layer's LoRA parameters.
    Fisher,
    /// Output sensitivity of each layer to Gaussian noise on the input embeddings.
    Perturbation,
}

/// The flags of `fibecfed fisher`.
#[derive(Debug, clap::Args)]
struct FisherArgs {
    /// Hugging Face BERT-family model folder (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    model_dir: PathBuf,
    /// Labelled TSV (any of the nine layouts in shared/data, or a header with sentence/label columns).
    #[arg(long)]
    data: PathBuf,
    /// JSON-lines output, one {"index": i, "difficulty": d, "loss": l} per sample in file order.
    #[arg(long)]
    output: PathBuf,
    /// PEFT adapter folder to score with; without it, a fresh PEFT-style init from --seed.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Write per-layer importance as JSON.
    #[arg(long)]
    layer_importance: Option<PathBuf>,
    /// Truncate inputs to this many tokens, [CLS] and [SEP] included.
    #[arg(long, default_value_t = 128)]
    max_len: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    #[arg(long, value_enum, default_value_t = LabelArg::True)]
    labels: LabelArg,
    #[arg(long, value_enum, default_value_t = ImportanceArg::Fisher)]
    importance: ImportanceArg,
    /// Standard deviation of the embedding noise for --importance perturbation.
    #[arg(long, default_value_t = 0.1)]
    sigma: f32,
    /// Rank of the fresh adapter (without --adapter).
    #[arg(long, default_value_t = 8)]
    lora_rank: usize,
    /// Alpha of the fresh adapter (without --adapter).
    #[arg(long, default_value_t = 16.0)]
    lora_alpha: f32,
    /// Target modules of the fresh adapter (without --adapter).
    #[arg(long, value_delimiter = ',', default_value = "query,value")]
    targets: Vec<String>,
    /// Where per-sample gradient squares are computed: auto (the GPU when one is usable,
    /// else the CPU with a notice saying why), cpu, or cuda (an error without a usable GPU).
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
}

fn run_fisher(args: &FisherArgs) -> Result<()> {
    check_fisher_args(args)?;
    // Before any file is read: `--device cuda` on a machine without a GPU fails at once.
    let chosen = choose_backend(args.device)?;
    eprintln!("{}", chosen.notice);
    let data = read_tsv(&args.data)?;
    if data.num_labels() < 2 {
        anyhow::bail!(
            "{}: only one label value ({:?}); a classifier's Fisher needs at least 2 classes",
            args.data.display(),
            data.label_names
        );
    }
    let (model, tok) = load_model(&args.model_dir, args.max_len, "--max-len")?;
    let model = fibecfed_transformer::Classifier::Bert(model);
    let targets: Vec<&str> = args.targets.iter().map(String::as_str).collect();
    let fresh = fibecfed_lora::LoraConfig::new(args.lora_rank, args.lora_alpha, &targets);
    let (lora, params) = load_or_init_adapter(
        &model,
        args.adapter.as_deref(),
        &fresh,
        data.num_labels(),
        args.seed,
    )?;
    // Label ids are positions in the file's label list (fixed for the nine datasets,
    // sorted values otherwise): with a different class count they would not mean what
    // the head's rows mean.
    if params.num_labels() != data.num_labels() {
        anyhow::bail!(
            "{} has {} label values {:?} but the adapter's head has {} classes: label ids would not line up",
            args.data.display(),
            data.num_labels(),
            data.label_names,
            params.num_labels()
        );
    }
    let adapter = fibecfed_transformer::Adapter {
        params: &params,
        scale: lora.scale(),
    };
    let samples = tokenize(&tok, &data, &args.data)?;
    let options = FisherOptions {
        batch_size: args.batch_size,
        labels: match args.labels {
            LabelArg::True => fibecfed_fisher::LabelMode::True,
            LabelArg::Sampled => fibecfed_fisher::LabelMode::Sampled,
        },
        seed: args.seed,
    };
    let start = Instant::now();
    let report = fisher_pass(&model, adapter, &samples, options, &*chosen.backend)
        .with_context(|| format!("{}", args.data.display()))?;
    let seconds = start.elapsed().as_secs_f64();
    let importance = match (&args.layer_importance, args.importance) {
        (None, _) => None,
        (Some(path), ImportanceArg::Fisher) => {
            Some((path, "fisher", report.layer_importance.clone()))
        }
        (Some(path), ImportanceArg::Perturbation) => Some((
            path,
            "perturbation",
            perturbation_importance(
                &model,
                adapter,
                &samples,
                args.batch_size,
                args.sigma,
                args.seed,
            )?,
        )),
    };
    // Everything is computed before anything is written.
    write_fisher(args, &report, samples.len(), importance)?;
    eprintln!(
        "scored {} samples of {} in {seconds:.1} s into {}",
        samples.len(),
        args.data.display(),
        args.output.display()
    );
    Ok(())
}

/// The flag checks of `fibecfed fisher` that need no file.
fn check_fisher_args(args: &FisherArgs) -> Result<()> {
    check_input_file("--data", &args.data)?;
    let mut inputs = vec![
        ("--data", args.data.as_path()),
        ("--model-dir", &args.model_dir),
    ];
    if let Some(a) = &args.adapter {
        inputs.push(("--adapter", a));
    }
    let mut outputs = vec![("--output", args.output.clone())];
    if let Some(p) = &args.layer_importance {
        outputs.push(("--layer-importance", p.clone()));
    }
    check_outputs_apart(&inputs, &outputs)?;
    check_writable_file(&args.output)?;
    if let Some(p) = &args.layer_importance {
        check_writable_file(p)?;
    }
    if args.batch_size == 0 || args.max_len < 2 {
        anyhow::bail!("--batch-size must be at least 1 and --max-len at least 2");
    }
    if args.importance == ImportanceArg::Perturbation {
        if args.layer_importance.is_none() {
            anyhow::bail!("--importance perturbation needs --layer-importance FILE to write to");
        }
        if !(args.sigma.is_finite() && args.sigma > 0.0) {
            anyhow::bail!("--sigma must be a positive number, got {}", args.sigma);
        }
    }
    Ok(())
}

/// Writes the difficulties and, when asked, the layer importance.
fn write_fisher(
    args: &FisherArgs,
    report: &FisherReport,
    samples: usize,
    importance: Option<(&PathBuf, &str, Vec<f64>)>,
) -> Result<()> {
    write_atomic(&args.output, difficulty_jsonl(report)?.as_bytes())?;
    if let Some((path, method, layers)) = importance {
        let json = serde_json::json!({
            "method": method,
            "labels": format!("{:?}", args.labels).to_lowercase(),
            "samples": samples,
            "layers": layers,
            "fisher_layer_sums": report.layer_sums,
        });
        write_atomic(path, serde_json::to_string_pretty(&json)?.as_bytes())?;
    }
    Ok(())
}

/// Parses the command line and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match start_threads().and_then(|()| run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// The most worker threads `RAYON_NUM_THREADS` may ask for: results do not depend on
/// the count, and beyond this a machine spends its time starting threads (100,000
/// of them took minutes, then failed).
const MAX_THREADS: usize = 1024;

/// Starts rayon's pool from `RAYON_NUM_THREADS` up front, so a bad value is an error
/// naming the variable instead of a panic deep inside the first parallel loop.
fn start_threads() -> Result<()> {
    let threads = match std::env::var("RAYON_NUM_THREADS") {
        Err(_) => 0,
        // Set but empty reads as unset, as rayon itself reads it.
        Ok(v) if v.trim().is_empty() => 0,
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n <= MAX_THREADS => n,
            _ => anyhow::bail!(
                "RAYON_NUM_THREADS = {v:?}: must be a whole number from 0 (one per core) to {MAX_THREADS}"
            ),
        },
    };
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .with_context(|| format!("RAYON_NUM_THREADS = {threads}: cannot start the worker threads"))
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Fisher(args) => run_fisher(&args),
        Command::Client(args) => client_command(&args, &Registry::builtin()),
        Command::Run(args) => {
            let out = run_command(&args, &Registry::builtin())?;
            eprintln!("metrics in {}", out.join("metrics.jsonl").display());
            Ok(())
        }
        Command::Embed {
            model_dir,
            input,
            output,
            max_len,
            batch_size,
        } => {
            check_input_file("--input", &input)?;
            check_outputs_apart(
                &[("--input", &input), ("--model-dir", &model_dir)],
                &[("--output", output.clone())],
            )?;
            check_writable_file(&output)?;
            if batch_size == 0 {
                anyhow::bail!("--batch-size must be at least 1");
            }
            let (model, tok) = load_model(&model_dir, max_len, "--max-len")?;
            let start = Instant::now();
            let n = embed_file(&model, &tok, &input, &output, batch_size)?;
            eprintln!(
                "embedded {n} lines into {} in {:.1} s",
                output.display(),
                start.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::Train(args) => run_train(args),
    }
}

/// `fibecfed train`: centralised LoRA fine-tuning.
fn run_train(args: TrainArgs) -> Result<()> {
    let TrainArgs {
        model_dir,
        train: train_file,
        eval,
        config,
        save_adapter,
        metrics_out,
        limit_train,
        limit_eval,
    } = args;
    let outputs = TrainOutputs {
        save_adapter,
        metrics_out,
    };
    check_input_file("--train", &train_file)?;
    check_input_file("--eval", &eval)?;
    check_outputs_apart(
        &[
            ("--train", &train_file),
            ("--eval", &eval),
            ("--model-dir", &model_dir),
        ],
        &outputs.files(),
    )?;
    check_outputs(&outputs)?;
    config.validate()?;
    if limit_train == Some(0) || limit_eval == Some(0) {
        anyhow::bail!("--limit-train and --limit-eval must be at least 1");
    }
    let mut lora = config.lora();
    lora.base_model_name_or_path = Some(model_dir.display().to_string());
    let (train_set, eval_set) = read_train_eval(&train_file, &eval)?;
    let (model, tok) = load_model(&model_dir, config.max_len, "--max-len")?;
    let model = fibecfed_transformer::Classifier::Bert(model);
    model.resolve_sites(&lora)?;
    let seed = config.seed;
    let train_samples = limit_samples(tokenize(&tok, &train_set, &train_file)?, limit_train, seed);
    let eval_samples = limit_samples(
        tokenize(&tok, &eval_set, &eval)?,
        limit_eval,
        seed.wrapping_add(1),
    );
    eprintln!(
        "training on {} examples of {}, evaluating on {} of {}; labels {:?}",
        train_samples.len(),
        train_file.display(),
        eval_samples.len(),
        eval.display(),
        train_set.label_names
    );
    let show = std::io::stderr().is_terminal();
    train(
        &model,
        &config,
        &lora,
        &train_samples,
        &eval_samples,
        train_set.label_names.len(),
        &outputs,
        show,
    )?;
    Ok(())
}
