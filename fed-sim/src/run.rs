//! `fibecfed run`: a federated run from a TOML config into an output folder, with a
//! checkpoint after every round and `--resume`.
//!
//! The folder holds `config.toml` (the config as run, paths resolved), `partition.json`
//! (who holds what), `metrics.jsonl` (one [`RoundMetrics`] per round, rewritten
//! atomically from the checkpoint's history, so it never holds a round the checkpoint
//! lacks) and `checkpoint.safetensors`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::checkpoint;
use crate::config::{ModelKind, RunConfig};
use crate::engine::{ClientData, Engine, RoundMetrics, RoundObserver, RunState};
use crate::model::{load_llama, load_model};
use crate::output::{
    FolderLock, LOCK_FILE, check_input_file, check_outputs_apart, check_writable_dir, lock_folder,
    same_file, write_atomic,
};
use crate::registry::Registry;
use fibecfed_data::{Sample, limit_samples, partition, read_train_eval, tokenize};
use fibecfed_transformer::Classifier;
use std::sync::Arc;

const CONFIG_FILE: &str = "config.toml";
const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
const METRICS_FILE: &str = "metrics.jsonl";
const PARTITION_FILE: &str = "partition.json";
/// Test hook: hang (to be killed) in this round after the clients trained.
const HANG_ENV: &str = "FIBECFED_TEST_HANG_ROUND";

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// The run's TOML config (see configs/ for FibecFed and every baseline).
    #[arg(long, required_unless_present = "resume", conflicts_with = "resume")]
    pub config: Option<PathBuf>,
    /// Output folder: config.toml, partition.json, metrics.jsonl, checkpoint.
    #[arg(long, required_unless_present = "resume", conflicts_with = "resume")]
    pub out: Option<PathBuf>,
    /// Continue the run in this folder from its last checkpoint.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// Overrides model.dir (model.file for a LLaMA config).
    #[arg(long, conflicts_with = "resume")]
    pub model_dir: Option<PathBuf>,
    /// Overrides model.file (the GGUF of `model.kind = "llama"`).
    #[arg(long, value_name = "GGUF", conflicts_with_all = ["resume", "model_dir"])]
    pub model_file: Option<PathBuf>,
    /// Overrides data.train.
    #[arg(long, conflicts_with = "resume")]
    pub train: Option<PathBuf>,
    /// Overrides data.test.
    #[arg(long, conflicts_with = "resume")]
    pub test: Option<PathBuf>,
    /// Overrides seed.
    #[arg(long, conflicts_with = "resume")]
    pub seed: Option<u64>,
}

/// Runs (or resumes) to the last round; returns the output folder. A new run that
/// fails before its first checkpoint takes back what it wrote (a folder it created
/// included), so the same command can simply be run again.
pub fn run_command(args: &RunArgs, registry: &Registry) -> Result<PathBuf> {
    let fresh = args.out.as_ref().is_some_and(|o| !o.exists());
    let (opened, lock) = open(args, registry)?;
    // Which kernels the products run on decides the last bits (see `crate::blas`).
    eprintln!("OpenBLAS kernels: {}", crate::blas::core_name());
    let out = opened.out.clone();
    let resuming = opened.resuming;
    let result = run_opened(opened, registry);
    // Still holding the lock: no other process can be starting in the folder.
    if result.is_err() && !resuming && !out.join(CHECKPOINT_FILE).exists() {
        for f in [CONFIG_FILE, PARTITION_FILE, METRICS_FILE] {
            let _ = std::fs::remove_file(out.join(f));
        }
        if fresh {
            let _ = std::fs::remove_file(out.join(LOCK_FILE));
            let _ = std::fs::remove_dir(&out);
        }
    }
    drop(lock);
    result
}

fn run_opened(opened: Opened, registry: &Registry) -> Result<PathBuf> {
    let Opened {
        out,
        config,
        text,
        resuming,
    } = opened;
    let Prepared {
        model,
        data,
        label_names,
        train_examples,
        test_examples,
    } = prepare(&config)?;
    let classes = label_names.len();
    if !resuming {
        write_atomic(&out.join(CONFIG_FILE), text.as_bytes())?;
        write_partition(&out, &data, &label_names)?;
    }
    eprintln!(
        "{}: {} clients, {} training and {} test examples ({} labels), {} rounds of {} clients",
        config.method,
        config.federation.clients,
        train_examples,
        test_examples,
        classes,
        config.federation.rounds,
        config.clients_per_round()
    );

    let mut engine = Engine::new(config, registry, Arc::new(model), data, classes)?;
    if let Some(round) = std::env::var(HANG_ENV).ok().and_then(|v| v.parse().ok()) {
        engine.set_observer(Box::new(HangAfterTraining { round }));
    }
    let mut state = if resuming {
        let path = out.join(CHECKPOINT_FILE);
        let contents = checkpoint::load(&path)?;
        let state = engine
            .restore(&contents, &text)
            .with_context(|| format!("checkpoint {}", path.display()))?;
        write_metrics(&out, &state.history)?;
        eprintln!("resuming after round {}", state.round);
        state
    } else {
        let state = engine.initialise()?;
        save(&engine, &state, &out, &text)?;
        state
    };
    let rounds = engine.config.federation.rounds;
    let bar = progress(rounds, state.round);
    report(&bar, state.history.last());
    while state.round < rounds {
        engine.round(&mut state)?;
        save(&engine, &state, &out, &text)?;
        bar.inc(1);
        report(&bar, state.history.last());
    }
    bar.finish_and_clear();
    Ok(out)
}

/// The run folder, its config and the config's text as it is (to be) saved there.
struct Opened {
    out: PathBuf,
    config: RunConfig,
    text: String,
    resuming: bool,
}

/// The files a run writes into its folder.
const RUN_FILES: [&str; 4] = [CONFIG_FILE, PARTITION_FILE, METRICS_FILE, CHECKPOINT_FILE];

/// Reads the config of a new run (paths resolved, overrides applied) or of the run
/// to resume, checks the folder and locks it: the lock is held for the whole run, so
/// a second `run` or `--resume` of the folder is refused.
fn open(args: &RunArgs, registry: &Registry) -> Result<(Opened, FolderLock)> {
    let (out, config, text, resuming, lock) = if let Some(dir) = &args.resume {
        let path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!("--resume {}: cannot read {}", dir.display(), path.display())
        })?;
        let config =
            RunConfig::parse(&text).with_context(|| format!("config {}", path.display()))?;
        check_inputs(&config, None, None)?;
        crate::blas::use_kernel(config.compute.blas)
            .with_context(|| format!("config {}", path.display()))?;
        check_writable_dir(dir)?;
        let lock = lock_folder(dir)?;
        if !dir.join(CHECKPOINT_FILE).exists() {
            bail!(
                "--resume {}: no {CHECKPOINT_FILE} there (the run never finished round 0)",
                dir.display()
            );
        }
        // The config as parsed, not as typed: a comment or reordered keys in
        // config.toml do not block a resume; a changed value does.
        let text = config.to_toml()?;
        (dir.clone(), config, text, true, lock)
    } else {
        let (Some(config_path), Some(out)) = (&args.config, &args.out) else {
            bail!("give --config FILE and --out DIR, or --resume DIR");
        };
        let mut config = RunConfig::load(config_path)?;
        config.override_paths(
            args.model_dir.as_deref(),
            args.train.as_deref(),
            args.test.as_deref(),
        );
        if let Some(f) = &args.model_file {
            if config.model.kind != ModelKind::Llama {
                bail!(
                    "--model-file names a GGUF, read only with model.kind = \"llama\" (config {} has a BERT model: use --model-dir)",
                    config_path.display()
                );
            }
            config.model.file = Some(f.clone());
        }
        if let Some(s) = args.seed {
            config.seed = s;
        }
        // Absolute, so that `--resume` works from any directory.
        for p in [
            &mut config.model.dir,
            &mut config.model.file,
            &mut config.data.train,
            &mut config.data.test,
        ]
        .into_iter()
        .flatten()
        {
            *p = std::path::absolute(&*p)
                .with_context(|| format!("cannot resolve {}", p.display()))?;
        }
        registry
            .check(&config)
            .and_then(|()| config.check_new_run())
            .with_context(|| format!("config {}", config_path.display()))?;
        check_inputs(&config, Some(config_path), Some(out))?;
        // Before the folder is locked: this may restart the process.
        crate::blas::use_kernel(config.compute.blas)
            .with_context(|| format!("config {}", config_path.display()))?;
        check_writable_dir(out)?;
        let lock = lock_folder(out)?;
        // Under the lock, so two runs started together cannot both pass this.
        if out.join(CHECKPOINT_FILE).exists() {
            bail!(
                "{} already holds a run: continue it with --resume {0}, or choose an empty --out (nothing was changed)",
                out.display()
            );
        }
        if let Some(file) = RUN_FILES.iter().find(|f| out.join(f).exists()) {
            bail!(
                "{} already holds {file} but no checkpoint (a run that never finished round 0, or a file of yours): remove it or choose an empty --out (nothing was changed)",
                out.display()
            );
        }
        let text = config.to_toml()?;
        (out.clone(), config, text, false, lock)
    };
    Ok((
        Opened {
            out,
            config,
            text,
            resuming,
        },
        lock,
    ))
}

/// Before the run folder is touched: the data files must be regular files (a FIFO
/// would block forever), and no file a new run (into `out`) writes may be one of its
/// inputs. A resume writes only its own folder's files.
fn check_inputs(config: &RunConfig, config_path: Option<&Path>, out: Option<&Path>) -> Result<()> {
    let mut inputs: Vec<(&str, &Path)> = Vec::new();
    if let Some(p) = config_path {
        inputs.push(("--config", p));
    }
    for (key, path) in [
        ("data.train", &config.data.train),
        ("data.test", &config.data.test),
    ] {
        if let Some(p) = path {
            check_input_file(key, p)?;
            inputs.push((key, p));
        }
    }
    if let Some(p) = &config.model.dir {
        inputs.push(("model.dir", p));
    }
    if let Some(p) = &config.model.file {
        check_input_file("model.file", p)?;
        inputs.push(("model.file", p));
    }
    let Some(out) = out else { return Ok(()) };
    let outputs: Vec<(&str, PathBuf)> = RUN_FILES.iter().map(|f| ("--out", out.join(f))).collect();
    check_outputs_apart(&inputs, &outputs)?;
    if out.exists() && inputs.iter().any(|(_, p)| same_file(p, out)) {
        bail!("--out {} is one of the run's inputs", out.display());
    }
    Ok(())
}

/// A config's model and its clients' data.
#[derive(Debug)]
pub struct Prepared {
    pub model: Classifier<f32>,
    /// One part per client, as `partition` cut it.
    pub data: Vec<ClientData>,
    pub label_names: Vec<String>,
    pub train_examples: usize,
    pub test_examples: usize,
}

/// Loads the model and the data a config names, and cuts the data into the clients'
/// parts. Deterministic in the config: every participant of a multi-process federation
/// that reads the same files with the same config gets the same parts.
pub fn prepare(config: &RunConfig) -> Result<Prepared> {
    let llama = config.model.kind == ModelKind::Llama;
    let model_path = if llama {
        config
            .model
            .file
            .clone()
            .context("model.file is not set: a LLaMA model is a GGUF file")?
    } else {
        config
            .model
            .dir
            .clone()
            .context("model.dir is not set: put it in the config or pass --model-dir")?
    };
    let train_file = config
        .data
        .train
        .clone()
        .context("data.train is not set: put it in the config or pass --train")?;
    let test_file = config
        .data
        .test
        .clone()
        .context("data.test is not set: put it in the config or pass --test")?;
    if config.data.limit_train == Some(0) || config.data.limit_test == Some(0) {
        bail!("data.limit_train and data.limit_test must be at least 1");
    }
    let (train_set, test_set) = read_train_eval(&train_file, &test_file)?;
    let classes = train_set.label_names.len();
    let (model, tok) = if llama {
        load_llama(
            &model_path,
            config.model.max_len,
            config.model.template.as_deref(),
            config.model.label_words.as_ref(),
            &train_set.name,
            &train_set.label_names,
        )?
    } else {
        let (m, tok) = load_model(&model_path, config.model.max_len, "model.max_len")?;
        (Classifier::Bert(m), tok)
    };
    let train = limit_samples(
        tokenize(&tok, &train_set, &train_file)?,
        config.data.limit_train,
        config.seed,
    );
    let test = limit_samples(
        tokenize(&tok, &test_set, &test_file)?,
        config.data.limit_test,
        config.seed.wrapping_add(1),
    );
    let labels = |s: &[Sample]| s.iter().map(|x| x.label).collect::<Vec<_>>();
    let parts = partition(
        &config.partition,
        &labels(&train),
        &labels(&test),
        classes,
        config.federation.clients,
        config.seed,
    )?;
    let pick = |all: &[Sample], ids: &[usize]| ids.iter().map(|&i| all[i].clone()).collect();
    let data: Vec<ClientData> = parts
        .train
        .iter()
        .zip(&parts.test)
        .map(|(tr, te)| ClientData {
            train: pick(&train, tr),
            test: pick(&test, te),
        })
        .collect();
    Ok(Prepared {
        model,
        data,
        label_names: train_set.label_names,
        train_examples: train.len(),
        test_examples: test.len(),
    })
}

/// Test hook (`FIBECFED_TEST_HANG_ROUND`): the resume test kills the process here, in
/// the middle of a round, after its clients trained and before anything is saved.
struct HangAfterTraining {
    round: usize,
}

impl RoundObserver for HangAfterTraining {
    fn clients_trained(&self, round: usize) {
        if round == self.round {
            eprintln!("test hook: round {round} trained, hanging before aggregation");
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
    }
}

fn save(engine: &Engine, state: &RunState, out: &Path, text: &str) -> Result<()> {
    if let Some(m) = state.history.last() {
        check_finite(m)?;
    }
    let contents = engine
        .snapshot(state, text)
        .with_context(|| format!("round {}: lower federation.lr", state.round))?;
    checkpoint::save(&out.join(CHECKPOINT_FILE), &contents)?;
    write_metrics(out, &state.history)
}

/// JSON has no NaN or infinity (serde writes `null`), so a metric that is not finite
/// would make a run folder that can never resume; stop with the key to change instead.
fn check_finite(m: &RoundMetrics) -> Result<()> {
    let fields = [
        ("accuracy", m.accuracy.unwrap_or(0.0), "the evaluation"),
        ("loss", m.loss.unwrap_or(0.0), "the evaluation"),
        (
            // The running total includes this round's time.
            "cum_sim_seconds",
            m.cum_sim_seconds,
            "simulation.seconds_per_token, simulation.upload_bytes_per_second and simulation.download_bytes_per_second",
        ),
        (
            "train_loss",
            m.train_loss.unwrap_or(0.0),
            "federation.lr (training)",
        ),
    ];
    for (name, value, source) in fields {
        if !value.is_finite() {
            bail!(
                "round {}: metric {name} is {value}, which metrics.jsonl cannot hold; check {source}",
                m.round
            );
        }
    }
    Ok(())
}

fn write_metrics(out: &Path, history: &[RoundMetrics]) -> Result<()> {
    let mut text = String::new();
    for m in history {
        text += &serde_json::to_string(m)?;
        text.push('\n');
    }
    write_atomic(&out.join(METRICS_FILE), text.as_bytes())
}

#[derive(Serialize)]
struct ClientPart {
    client: usize,
    train: usize,
    test: usize,
    /// Training examples per label.
    train_labels: Vec<usize>,
}

fn write_partition(out: &Path, data: &[ClientData], labels: &[String]) -> Result<()> {
    let parts: Vec<ClientPart> = data
        .iter()
        .enumerate()
        .map(|(client, d)| {
            let mut hist = vec![0; labels.len()];
            for s in &d.train {
                hist[s.label] += 1;
            }
            ClientPart {
                client,
                train: d.train.len(),
                test: d.test.len(),
                train_labels: hist,
            }
        })
        .collect();
    let json = serde_json::json!({ "labels": labels, "clients": parts });
    write_atomic(
        &out.join(PARTITION_FILE),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )
}

fn progress(rounds: usize, done: usize) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(rounds as u64);
    if let Ok(style) = ProgressStyle::with_template(
        "round {pos}/{len} [{elapsed_precise}] {wide_bar} {msg} (eta {eta})",
    ) {
        bar.set_style(style);
    }
    bar.set_position(done as u64);
    bar
}

/// One line per round: in the bar's message on a terminal, on stderr otherwise.
fn report(bar: &ProgressBar, m: Option<&RoundMetrics>) {
    let Some(m) = m else { return };
    let eval = match (m.accuracy, m.loss) {
        (Some(a), Some(l)) => format!("accuracy {a:.4}, loss {l:.4}"),
        _ => "not evaluated".to_owned(),
    };
    let line = format!(
        "round {}: {eval}, up {:.2} MB, simulated {:.0} s, wall {:.1} s{}",
        m.round,
        m.cum_bytes_up as f64 / 1e6,
        m.cum_sim_seconds,
        m.wall_seconds,
        if m.dropped.is_empty() && m.diverged.is_empty() {
            String::new()
        } else {
            format!(", dropped {:?}, diverged {:?}", m.dropped, m.diverged)
        }
    );
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.set_message(line);
    }
}
