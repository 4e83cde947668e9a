//! `fibecfed client`: one FibecFed participant in a Flower federation over the legacy
//! transport (`fibecfed-flower`: a stock `start_server`, deprecated by flwr since 1.13;
//! the Flower App in `flower/app`, over [`crate::node`], is the current way), running
//! the same client code as the simulation's engine:
//! curriculum, sparse Fisher-momentum updates in its own layers, upload of the global
//! layers' tensors only.
//!
//! The global layers are agreed without the server: a stock Flower server runs FedAvg
//! on whatever tensors arrive and never sends metrics back, so the server-side
//! consensus of FibecFed's layer selection cannot happen there. The config fixes them
//! instead (`selector = { kind = "fixed", layers = [...] }`, or any selector that needs
//! no reports, such as a seeded `random`), and every participant derives the same list.
//!
//! Each client derives its data part from the config exactly as `fibecfed run` does
//! (same files, same seed, same partition), so K processes with `--client-id 0..K`
//! hold disjoint parts.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use fibecfed_aggregation::Tensors;
use fibecfed_flower::{Config, EvaluateOutput, FitOutput, NpyArray, Options, Value};
use ndarray::ArrayD;

use crate::checkpoint::{self, Contents};
use crate::engine::{ClientState, Engine};
use crate::output::{FolderLock, check_writable_dir, lock_folder, same_file, write_atomic};
use crate::registry::Registry;
use crate::run::{Prepared, prepare};

const STATE_FILE: &str = "client-state.safetensors";
/// Test hook: sleep this many milliseconds at the start of every fit, so that a test
/// can kill the process while it trains.
const FIT_DELAY_ENV: &str = "FIBECFED_TEST_FIT_DELAY_MS";

/// The flags of `fibecfed client`.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// The Flower server, HOST:PORT (a stock `flwr` server's fleet address).
    #[arg(long)]
    pub server: String,
    /// The federation's TOML config (the same file on every client).
    #[arg(long)]
    pub config: PathBuf,
    /// Which of the config's `federation.clients` parts of the data this process holds.
    #[arg(long)]
    pub client_id: usize,
    /// Keep this client's state (adapter, optimiser, Fisher momentum, curriculum) here
    /// after every fit, and continue from it after a restart.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Write every upload here as it was sent (fit-NNN/tensor-III.npy + fit.json): an
    /// audit of what left the machine.
    #[arg(long)]
    pub record_dir: Option<PathBuf>,
    /// PEM file of the CA that signed the server's certificate: connect with TLS.
    #[arg(long)]
    pub root_certificates: Option<PathBuf>,
    /// Name to verify in the server's certificate (default: the host of --server).
    #[arg(long, requires = "root_certificates")]
    pub tls_domain: Option<String>,
    /// Connection attempts before giving up (exponential backoff from 0.5 s to 30 s).
    #[arg(long, default_value_t = 8)]
    pub connect_attempts: u32,
    /// Seconds the server may take, once it accepts the connection, to answer (TLS,
    /// HTTP/2, a first gRPC request) and to acknowledge a keep-alive ping.
    #[arg(long, default_value_t = fibecfed_flower::DEFAULT_ANSWER_TIMEOUT.as_secs())]
    pub answer_timeout: u64,
    /// Seconds of silence on the connection before the client pings the server (0:
    /// never). gRPC servers close connections pinged more often than every 300 s.
    #[arg(long, default_value_t = fibecfed_flower::DEFAULT_KEEPALIVE_INTERVAL.as_secs())]
    pub keepalive: u64,
    /// Largest gRPC message in MiB, both ways; must match the server's
    /// `grpc_max_message_length`.
    #[arg(long, default_value_t = 512)]
    pub max_message_mib: usize,
    /// Overrides model.dir.
    #[arg(long)]
    pub model_dir: Option<PathBuf>,
    /// Overrides data.train.
    #[arg(long)]
    pub train: Option<PathBuf>,
    /// Overrides data.test.
    #[arg(long)]
    pub test: Option<PathBuf>,
}

/// Runs the participant until the server dismisses it.
pub fn client_command(args: &ClientArgs, registry: &Registry) -> Result<()> {
    let config = crate::node::participant_config(
        &args.config,
        [
            args.model_dir.as_deref(),
            args.train.as_deref(),
            args.test.as_deref(),
        ],
        registry,
    )?;
    // The kernels the config asks for, as `fibecfed run` does (may restart the process).
    crate::blas::use_kernel(config.compute.blas)
        .with_context(|| format!("config {}", args.config.display()))?;
    eprintln!("OpenBLAS kernels: {}", crate::blas::core_name());
    if args.client_id >= config.federation.clients {
        bail!(
            "--client-id {} is out of range: the config has federation.clients = {} (ids 0..{})",
            args.client_id,
            config.federation.clients,
            config.federation.clients
        );
    }
    // One lock per folder (--state-dir and --record-dir may be one), held until the
    // participant ends: two participants never share a folder.
    let mut locks: Vec<(&PathBuf, FolderLock)> = Vec::new();
    for dir in [&args.state_dir, &args.record_dir].into_iter().flatten() {
        check_writable_dir(dir)?;
        if !locks.iter().any(|(held, _)| same_file(held, dir)) {
            locks.push((dir, lock_folder(dir)?));
        }
    }
    let root_certificates = args
        .root_certificates
        .as_ref()
        .map(|p| {
            let pem = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
            // Checked here, before the model loads, rather than at the first connection.
            fibecfed_flower::check_root_certificates(&pem, &p.display().to_string())?;
            anyhow::Ok(pem)
        })
        .transpose()?;
    let mut options = Options::new(args.server.clone());
    options.root_certificates = root_certificates;
    options.tls_domain.clone_from(&args.tls_domain);
    options.attempts = args.connect_attempts.max(1);
    options.answer_timeout = Duration::from_secs(args.answer_timeout.max(1));
    options.keepalive_interval = (args.keepalive > 0).then(|| Duration::from_secs(args.keepalive));
    options.max_message_bytes = args
        .max_message_mib
        .checked_mul(1 << 20)
        .filter(|&b| b > 0)
        .ok_or_else(|| {
            anyhow!(
                "--max-message-mib must be between 1 and {}",
                usize::MAX >> 20
            )
        })?;

    let text = config.to_toml()?;
    let Prepared {
        model,
        data,
        label_names,
        ..
    } = prepare(&config)?;
    let engine = Engine::new(config, registry, Arc::new(model), data, label_names.len())?;
    let participant = Participant::new(engine, args, text)?;
    let summary = fibecfed_flower::run(participant, &options)?;
    eprintln!(
        "client {}: the server ended the federation ({} instructions over {} connections)",
        args.client_id, summary.answered, summary.sessions
    );
    Ok(())
}

/// One FibecFed client behind the Flower protocol.
struct Participant {
    engine: Engine,
    k: usize,
    gal: Vec<usize>,
    /// The shared tensors' names, in the order they travel.
    names: Vec<String>,
    /// The seeded initial global tensors: the server's starting point, and the shapes
    /// every tensor it sends must have.
    initial: Tensors,
    state: ClientState,
    /// Fits done (this client's round counter when the server sends none).
    fits: usize,
    config_text: String,
    state_dir: Option<PathBuf>,
    record_dir: Option<PathBuf>,
}

impl Participant {
    fn new(engine: Engine, args: &ClientArgs, config_text: String) -> Result<Self> {
        let k = args.client_id;
        let gal = engine.standalone_gal()?;
        let names = engine.shared_names(&gal);
        if names.is_empty() {
            bail!("the config shares no tensor (local-only): there is nothing to federate");
        }
        let restored = match &args.state_dir {
            Some(dir) if dir.join(STATE_FILE).exists() => {
                Some(restore(&engine, k, &dir.join(STATE_FILE), &config_text)?)
            }
            _ => None,
        };
        let (state, fits) = if let Some((state, fits)) = restored {
            eprintln!("client {k}: continuing from its saved state after {fits} fits");
            (state, fits)
        } else {
            let (state, tokens) = engine.start_client(k)?;
            eprintln!("client {k}: ready (scoring pass: {tokens} padded tokens)");
            (state, 0)
        };
        let (train, test) = engine.client_sizes(k).unwrap_or_default();
        eprintln!(
            "client {k}: {train} training and {test} test examples; global layers {gal:?} ({} tensors)",
            names.len()
        );
        let initial = engine.initial_global(&gal);
        Ok(Self {
            engine,
            k,
            gal,
            initial,
            names,
            state,
            fits,
            config_text,
            state_dir: args.state_dir.clone(),
            record_dir: args.record_dir.clone(),
        })
    }

    /// The server's tensors as named global tensors, after checking that they are the
    /// ones this model shares.
    fn global_of(&self, parameters: Vec<NpyArray>) -> Result<Tensors, String> {
        if parameters.len() != self.names.len() {
            return Err(format!(
                "the server sent {} tensors; this client shares {} ({} global layers {:?}): configs differ between server and clients?",
                parameters.len(),
                self.names.len(),
                self.gal.len(),
                self.gal
            ));
        }
        let mut out = Tensors::new();
        for (name, p) in self.names.iter().zip(parameters) {
            let expected = self
                .initial
                .get(name)
                .map(|a| a.shape().to_vec())
                .ok_or_else(|| format!("{name} is not part of the adapter"))?;
            if p.shape != expected {
                return Err(format!(
                    "tensor {name}: the server sent shape {:?}, the model has {expected:?}",
                    p.shape
                ));
            }
            if let Some(bad) = p.data.iter().find(|v| !v.is_finite()) {
                return Err(format!(
                    "tensor {name}: the server sent a non-finite value {bad}"
                ));
            }
            let a = ArrayD::from_shape_vec(p.shape, p.data).map_err(|e| format!("{name}: {e}"))?;
            out.insert(name.clone(), a);
        }
        Ok(out)
    }

    fn to_npy(&self, tensors: &Tensors) -> Result<Vec<NpyArray>, String> {
        self.names
            .iter()
            .map(|name| {
                let a = tensors
                    .get(name)
                    .ok_or_else(|| format!("{name} missing from the upload"))?;
                NpyArray::new(a.shape().to_vec(), a.iter().copied().collect())
                    .map_err(|e| e.to_string())
            })
            .collect()
    }

    fn fit_inner(&mut self, parameters: Vec<NpyArray>, config: &Config) -> Result<FitOutput> {
        let global = self.global_of(parameters).map_err(|e| anyhow!(e))?;
        // The server's round number drives the pacing and seeds; without it, our own
        // count of fits.
        let round = match config.get("server_round").and_then(Value::as_u64) {
            Some(r) if r > 0 => r as usize,
            _ => self.fits + 1,
        };
        eprintln!("client {}: round {round}: fit started", self.k);
        if let Some(ms) = std::env::var(FIT_DELAY_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
        {
            std::thread::sleep(Duration::from_millis(ms));
        }
        let mut state = self.state.clone();
        let result = self
            .engine
            .run_client(self.k, round, &mut state, &global, &self.gal)?;
        let parameters = self.to_npy(&result.upload).map_err(|e| anyhow!(e))?;
        let (train, _) = self.engine.client_sizes(self.k).unwrap_or_default();
        let out = FitOutput {
            parameters,
            num_examples: train as u64,
            metrics: [
                ("client_id".to_owned(), Value::U64(self.k as u64)),
                ("train_loss".to_owned(), Value::Double(result.train_loss)),
                (
                    "train_samples".to_owned(),
                    Value::U64(result.samples as u64),
                ),
                ("tokens".to_owned(), Value::U64(result.tokens)),
            ]
            .into(),
        };
        if let Some(dir) = &self.record_dir {
            record(dir, self.fits + 1, round, &self.names, &out)?;
        }
        // Saved before it becomes the client's state: a failed save fails the fit and
        // leaves memory and disk at the same (previous) fit.
        if let Some(dir) = &self.state_dir {
            self.save(&dir.join(STATE_FILE), &state, self.fits + 1)?;
        }
        self.state = state;
        self.fits += 1;
        eprintln!(
            "client {}: round {round} trained on {} samples, loss {:.4}; uploading {} tensors",
            self.k,
            result.samples,
            result.train_loss,
            out.parameters.len()
        );
        Ok(out)
    }

    fn save(&self, path: &Path, state: &ClientState, fits: usize) -> Result<()> {
        let mut c = self.engine.client_snapshot(self.k, state)?;
        let inner: serde_json::Value = serde_json::from_str(&c.state)?;
        c.state = serde_json::json!({
            "config": self.config_text,
            "client": self.k,
            "fits": fits,
            "data": self.engine.data_digest(),
            "client_state": inner,
        })
        .to_string();
        checkpoint::save(path, &c)
    }
}

/// A saved participant: its state and fit count, refused when the config or client
/// id differs.
fn restore(
    engine: &Engine,
    k: usize,
    path: &Path,
    config_text: &str,
) -> Result<(ClientState, usize)> {
    let mut c: Contents = checkpoint::load(path)?;
    let wrapper: serde_json::Value =
        serde_json::from_str(&c.state).with_context(|| format!("{}", path.display()))?;
    let field = |name: &str| {
        wrapper
            .get(name)
            .ok_or_else(|| anyhow!("{}: no {name:?} in the saved state", path.display()))
    };
    if field("config")?.as_str() != Some(config_text) {
        bail!(
            "{} was saved with another config; move it away or use the config it was made with",
            path.display()
        );
    }
    if field("client")?.as_u64() != Some(k as u64) {
        bail!(
            "{} belongs to client {}, not --client-id {k}",
            path.display(),
            field("client")?
        );
    }
    // Saved states of versions before the digest resume with the size check alone.
    if let Some(digest) = wrapper.get("data")
        && digest.as_str() != Some(engine.data_digest())
    {
        bail!(
            "{} was saved on other data (same config, other file contents); restore the data files or move the saved state away",
            path.display()
        );
    }
    let fits = field("fits")?
        .as_u64()
        .ok_or_else(|| anyhow!("{}: bad fit count", path.display()))? as usize;
    c.state = field("client_state")?.to_string();
    let state = engine
        .client_restore(k, &c)
        .with_context(|| format!("{}", path.display()))?;
    Ok((state, fits))
}

/// Writes what a fit sent: `fit-NNN/tensor-III.npy` and `fit-NNN/fit.json`.
fn record(dir: &Path, fit: usize, round: usize, names: &[String], out: &FitOutput) -> Result<()> {
    let sub = dir.join(format!("fit-{fit:03}"));
    std::fs::create_dir_all(&sub).with_context(|| format!("cannot create {}", sub.display()))?;
    for (i, t) in out.parameters.iter().enumerate() {
        write_atomic(&sub.join(format!("tensor-{i:03}.npy")), &t.to_bytes())?;
    }
    let meta = serde_json::json!({
        "fit": fit,
        "round": round,
        "num_examples": out.num_examples,
        "names": names,
    });
    // Last, so a reader that sees fit.json sees every tensor.
    write_atomic(
        &sub.join("fit.json"),
        serde_json::to_string_pretty(&meta)?.as_bytes(),
    )
}

/// Why the participant refused an instruction: an anyhow error (often a plain message),
/// shown with its whole context chain on one line (`{:#}`), which is the text the
/// server receives. The chain is in that text, so `source` is `None`.
#[derive(Debug)]
pub(crate) struct Refusal(anyhow::Error);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for Refusal {}

impl From<anyhow::Error> for Refusal {
    fn from(e: anyhow::Error) -> Self {
        Self(e)
    }
}

impl From<String> for Refusal {
    fn from(message: String) -> Self {
        Self(anyhow::Error::msg(message))
    }
}

impl fibecfed_flower::Client for Participant {
    type Error = Refusal;

    fn get_properties(&mut self, _: &Config) -> Result<Config, Refusal> {
        let (train, test) = self.engine.client_sizes(self.k).unwrap_or_default();
        Ok([
            ("client_id".to_owned(), Value::U64(self.k as u64)),
            ("train_examples".to_owned(), Value::U64(train as u64)),
            ("test_examples".to_owned(), Value::U64(test as u64)),
            (
                "global_layers".to_owned(),
                Value::String(
                    self.gal
                        .iter()
                        .map(usize::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                ),
            ),
            ("tensors".to_owned(), Value::U64(self.names.len() as u64)),
        ]
        .into())
    }

    fn get_parameters(&mut self, _: &Config) -> Result<Vec<NpyArray>, Refusal> {
        // Before any round this is the seeded initial adapter, the same on every
        // client; the server asks one client for its starting point.
        Ok(if self.fits == 0 {
            self.to_npy(&self.initial)
        } else {
            self.to_npy(&self.state.params.to_named())
        }?)
    }

    fn fit(&mut self, parameters: Vec<NpyArray>, config: &Config) -> Result<FitOutput, Refusal> {
        let k = self.k;
        Ok(self
            .fit_inner(parameters, config)
            .with_context(|| format!("client {k}"))?)
    }

    fn evaluate(
        &mut self,
        parameters: Vec<NpyArray>,
        _: &Config,
    ) -> Result<EvaluateOutput, Refusal> {
        let global = self.global_of(parameters)?;
        let (counts, n) = self
            .engine
            .evaluate_client(self.k, &self.state, &global)
            .with_context(|| format!("client {}", self.k))?;
        if n == 0 {
            return Err(format!("client {} has no test data", self.k).into());
        }
        let finite = n - counts.non_finite;
        let loss = if finite == 0 {
            f64::INFINITY
        } else {
            counts.loss_sum / finite as f64
        };
        Ok(EvaluateOutput {
            loss: loss as f32,
            num_examples: n as u64,
            metrics: [
                (
                    "accuracy".to_owned(),
                    Value::Double(counts.correct as f64 / n as f64),
                ),
                (
                    "non_finite".to_owned(),
                    Value::U64(counts.non_finite as u64),
                ),
            ]
            .into(),
        })
    }
}
