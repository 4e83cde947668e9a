//! `fibecfed`: the command-line front end. Every failure prints the cause chain and
//! exits with status 2, whether the input was a bad file, flag or path.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use clap::{Parser, Subcommand};
use fibecfed_sim::data::read_train_eval;
use fibecfed_sim::embed::embed_file;
use fibecfed_sim::output::check_writable_file;
use fibecfed_sim::train::{
    TrainConfig, TrainOutputs, check_outputs, limit_samples, load_model, tokenize, train,
};

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
    Train {
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
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Embed {
            model_dir,
            input,
            output,
            max_len,
            batch_size,
        } => {
            check_writable_file(&output)?;
            let (model, tok) = load_model(&model_dir, max_len)?;
            let start = Instant::now();
            let n = embed_file(&model, &tok, &input, &output, batch_size)?;
            eprintln!(
                "embedded {n} lines into {} in {:.1} s",
                output.display(),
                start.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::Train {
            model_dir,
            train: train_file,
            eval,
            config,
            save_adapter,
            metrics_out,
            limit_train,
            limit_eval,
        } => {
            let outputs = TrainOutputs {
                save_adapter,
                metrics_out,
            };
            check_outputs(&outputs)?;
            config.validate()?;
            if limit_train == Some(0) || limit_eval == Some(0) {
                anyhow::bail!("--limit-train and --limit-eval must be at least 1");
            }
            let mut lora = config.lora();
            lora.base_model_name_or_path = Some(model_dir.display().to_string());
            let (train_set, eval_set) = read_train_eval(&train_file, &eval)?;
            let (model, tok) = load_model(&model_dir, config.max_len)?;
            lora.resolve_sites(model.config.num_hidden_layers)?;
            let seed = config.seed;
            let train_samples =
                limit_samples(tokenize(&tok, &train_set, &train_file)?, limit_train, seed);
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
    }
}
