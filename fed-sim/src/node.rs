//! One client of a federation whose server runs elsewhere — the Flower ClientApp,
//! through the Python bindings — computing exactly what the simulated client of the
//! same id computes: its layer report, its pruning mask once the global layers are
//! known, its rounds and its evaluation.
//!
//! With a state folder, every step reads the client's state from disk and writes it
//! back under the folder's lock, so the node may live in a new process for every
//! message (as Flower's SuperNode runs its ClientApp) and survive a restart. A step
//! asked again — the server resending round t after the first reply was lost — gives
//! the same answer: the state before the last round is kept beside the current one
//! and the round is recomputed from it, bit for bit.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use fibecfed_aggregation::Tensors;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, Contents};
use crate::config::RunConfig;
use crate::engine::{ClientState, Engine};
use crate::eval::EvalCounts;
use crate::output::{FolderLock, check_writable_dir, lock_folder_waiting};
use crate::registry::Registry;
use crate::run::{Prepared, prepare};
use crate::server::{LayerReport, Reply};

/// The client's state after its last step.
const CURRENT: &str = "node-state.safetensors";
/// Its state before its last round, for a round asked again.
const PREVIOUS: &str = "node-state.previous.safetensors";
/// How long a step waits for another process to release the state folder (a
/// ClientApp of a killed SuperNode finishing its step) before refusing.
const LOCK_WAIT: Duration = Duration::from_secs(600);

/// Where a node's model, data and state are; the paths override the config's.
#[derive(Debug, Clone, Default)]
pub struct NodePaths {
    pub model_dir: Option<PathBuf>,
    pub train: Option<PathBuf>,
    pub test: Option<PathBuf>,
    /// Keep the client's state here between steps (and processes).
    pub state_dir: Option<PathBuf>,
}

/// What a node has done so far, saved with its state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Progress {
    /// Its layer report: importance (when the selector reads it) and the scoring
    /// pass's padded tokens.
    importance: Option<Vec<f64>>,
    report_tokens: u64,
    /// The global layers it was told, the padded tokens of its pruning epochs and the
    /// neurons it prunes.
    gal: Option<Vec<usize>>,
    prune_tokens: u64,
    #[serde(default)]
    pruned: Option<usize>,
    /// The last round it trained in (0: none yet).
    round: usize,
}

/// A participant's config: the file, its model folder and data files overridden
/// (`[model_dir, train, test]`), checked against the registry as a new run's.
pub(crate) fn participant_config(
    path: &Path,
    [model_dir, train, test]: [Option<&Path>; 3],
    registry: &Registry,
) -> Result<RunConfig> {
    let mut config = RunConfig::load(path)?;
    config.override_paths(model_dir, train, test);
    registry
        .check(&config)
        .and_then(|()| config.check_new_run())
        .with_context(|| format!("config {}", path.display()))?;
    Ok(config)
}

/// A node's answer to the setup step.
#[derive(Debug, Clone)]
pub struct Setup {
    /// Padded tokens of its pruning epochs (0 without `[sparse.prune]`).
    pub tokens: u64,
    /// LoRA output neurons it pruned (`None` without `[sparse.prune]`).
    pub pruned: Option<usize>,
    /// The seeded initial adapter's tensors of the global layers (the same on every
    /// node with the same config and model).
    pub initial: Tensors,
}

/// One FibecFed client.
pub struct Node {
    engine: Engine,
    k: usize,
    /// [`RunConfig::federation_digest`]: saved states made with another config (paths
    /// aside) are refused.
    digest: String,
    state_dir: Option<PathBuf>,
    /// The state without a state folder.
    memory: Option<(ClientState, Progress, Option<ClientState>)>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("client", &self.k)
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Loads the config, the model and client `client`'s part of the data (the part
    /// `fibecfed run` gives it: same files, seed and partition).
    pub fn new(
        config: &Path,
        client: usize,
        paths: &NodePaths,
        registry: &Registry,
    ) -> Result<Self> {
        let cfg = participant_config(
            config,
            [
                paths.model_dir.as_deref(),
                paths.train.as_deref(),
                paths.test.as_deref(),
            ],
            registry,
        )?;
        crate::blas::check_kernel(cfg.compute.blas)
            .with_context(|| format!("config {}", config.display()))?;
        if client >= cfg.federation.clients {
            bail!(
                "client id {client} is out of range: config {} has federation.clients = {} (ids 0..{})",
                config.display(),
                cfg.federation.clients,
                cfg.federation.clients
            );
        }
        if let Some(dir) = &paths.state_dir {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create the state folder {}", dir.display()))?;
            check_writable_dir(dir)?;
        }
        let digest = cfg.federation_digest()?;
        let Prepared {
            model,
            data,
            label_names,
            ..
        } = prepare(&cfg)?;
        let engine = Engine::new(cfg, registry, Arc::new(model), data, label_names.len())?;
        Ok(Self {
            engine,
            k: client,
            digest,
            state_dir: paths.state_dir.clone(),
            memory: None,
        })
    }

    pub fn client(&self) -> usize {
        self.k
    }

    /// Digest of the config the federation shares (paths left out): the server
    /// compares it with its own.
    pub fn config_digest(&self) -> &str {
        &self.digest
    }

    /// The config, as the node runs it.
    pub fn config(&self) -> &RunConfig {
        &self.engine.config
    }

    /// Round 0: the client's scoring pass (once; asked again, the saved answer) and
    /// its layer report; with the last round the client trained in (0: none) and
    /// whether it has its global layers, which a server compares with its own record
    /// when a node claims the client.
    pub fn report(&mut self) -> Result<(LayerReport, usize, bool)> {
        let _lock = self.lock()?;
        let progress = if let Some((_, progress, _)) = self.load_saved()? {
            progress
        } else {
            let (state, importance, tokens) = self.engine.client_first(self.k)?;
            let progress = Progress {
                importance,
                report_tokens: tokens,
                ..Progress::default()
            };
            self.store(&state, &progress, Keep::Nothing)?;
            progress
        };
        let (train, test) = self.engine.client_sizes(self.k).unwrap_or_default();
        let (round, set_up) = (progress.round, progress.gal.is_some());
        let report = LayerReport {
            client: self.k,
            train,
            test,
            importance: progress.importance,
            tokens: progress.report_tokens,
            layers: self.engine.layers(),
        };
        Ok((report, round, set_up))
    }

    /// Round 0, once the server chose the global layers `gal`: the pruning mask (with
    /// `[sparse.prune]`; deferred to the client's first round with `federation.prepare =
    /// "on_selection"`) and the initial global tensors. Asked again, the saved answer.
    pub fn setup(&mut self, gal: &[usize]) -> Result<Setup> {
        let _lock = self.lock()?;
        let (mut state, mut progress, _) = self.loaded()?;
        if progress.round > 0 {
            bail!(
                "client {}: its state folder holds a run that got to round {}; a new run needs new state folders",
                self.k,
                progress.round
            );
        }
        match &progress.gal {
            Some(had) if had != gal => bail!(
                "client {}: the server now says the global layers are {gal:?}, it said {had:?} before",
                self.k
            ),
            Some(_) => {}
            None => {
                let (tokens, pruned) = self.engine.client_setup(self.k, &mut state, gal)?;
                progress.prune_tokens = tokens;
                progress.pruned = pruned;
                progress.gal = Some(gal.to_vec());
                self.store(&state, &progress, Keep::Nothing)?;
            }
        }
        Ok(Setup {
            tokens: progress.prune_tokens,
            pruned: progress.pruned,
            initial: self.engine.initial_global(gal),
        })
    }

    /// Round t: trains on `global` (the global layers' tensors; `gal`, when given,
    /// must be the global layers of [`Self::setup`]). Asked again for the round it last
    /// trained in, it recomputes that round from the state before it, which gives the
    /// same reply.
    pub fn fit(&mut self, t: usize, global: &Tensors, told: Option<&[usize]>) -> Result<Reply> {
        let _lock = self.lock()?;
        let (state, mut progress, previous) = self.loaded()?;
        let gal = progress.gal.clone().ok_or_else(|| {
            anyhow!(
                "client {}: asked to train before the server told it the global layers",
                self.k
            )
        })?;
        if let Some(told) = told
            && told != gal.as_slice()
        {
            bail!(
                "client {}: round {t} names the global layers {told:?}, but the setup chose {gal:?}",
                self.k
            );
        }
        self.check_global(global, &gal)?;
        let last = progress.round;
        if t == 0 || t < last || (t == last && previous.is_none()) {
            bail!(
                "client {}: asked to train in round {t}, but its saved state is after round {last}",
                self.k
            );
        }
        let base = if t == last {
            previous.as_ref().unwrap_or(&state)
        } else {
            &state
        };
        let (reply, new_state) = self.engine.client_reply(self.k, t, base, global, &gal)?;
        if t > last {
            // A new round, recorded even when it changed nothing (a client that
            // diverged with nothing deferred keeps its state), so that the round the
            // state is after is the last one the client answered.
            progress.round = t;
            let after = new_state.as_ref().unwrap_or(&state);
            self.store(after, &progress, Keep::Previous(&state))?;
        } else if let Some(new_state) = new_state {
            // The same round again: its state replaces the one it made before (the
            // same, unless the global tensors differ this time).
            self.store(&new_state, &progress, Keep::Same)?;
        }
        Ok(reply)
    }

    /// The client's personalised model (its state with `global` laid over) on its test
    /// part: evaluation counts and the test size. With `round`, the evaluation of that
    /// round: refused when the client's state is already past it.
    pub fn evaluate(
        &mut self,
        global: &Tensors,
        round: Option<usize>,
    ) -> Result<(EvalCounts, usize)> {
        let _lock = self.lock()?;
        let (state, progress, _) = self.loaded()?;
        if let Some(t) = round
            && progress.round > t
        {
            bail!(
                "client {}: asked to evaluate round {t}, but its saved state is after round {}; a new run needs new state folders",
                self.k,
                progress.round
            );
        }
        if let Some(gal) = &progress.gal {
            self.check_global(global, gal)?;
        }
        self.engine.evaluate_client(self.k, &state, global)
    }

    /// The client's training and test examples.
    pub fn sizes(&self) -> (usize, usize) {
        self.engine.client_sizes(self.k).unwrap_or_default()
    }

    /// [`checkpoint::data_digest`] of every client's data as this node read it: nodes
    /// of one federation must agree on it.
    pub fn data_digest(&self) -> &str {
        self.engine.data_digest()
    }

    /// The global tensors must be exactly those of the global layers, with their
    /// shapes and finite values.
    fn check_global(&self, global: &Tensors, gal: &[usize]) -> Result<()> {
        let expected = self.engine.initial_global(gal);
        for (name, a) in global {
            let Some(e) = expected.get(name) else {
                bail!(
                    "client {}: the server sent tensor {name}, which is not one of the global layers {gal:?}",
                    self.k
                );
            };
            if a.shape() != e.shape() {
                bail!(
                    "client {}: tensor {name} has shape {:?}, the model's is {:?}",
                    self.k,
                    a.shape(),
                    e.shape()
                );
            }
            if let Some(bad) = a.iter().find(|v| !v.is_finite()) {
                bail!(
                    "client {}: tensor {name} holds a non-finite value {bad}",
                    self.k
                );
            }
        }
        if let Some(name) = expected.keys().find(|n| !global.contains_key(*n)) {
            bail!(
                "client {}: the server sent no {name}, a tensor of the global layers {gal:?}",
                self.k
            );
        }
        Ok(())
    }

    fn lock(&self) -> Result<Option<FolderLock>> {
        self.state_dir
            .as_deref()
            .map(|dir| lock_folder_waiting(dir, LOCK_WAIT))
            .transpose()
    }

    fn loaded(&self) -> Result<(ClientState, Progress, Option<ClientState>)> {
        self.load_saved()?.ok_or_else(|| {
            anyhow!(
                "client {}: no state yet: the server must ask for its layer report first",
                self.k
            )
        })
    }

    /// The saved state, its progress and the state before its last round.
    fn load_saved(&self) -> Result<Option<(ClientState, Progress, Option<ClientState>)>> {
        let Some(dir) = &self.state_dir else {
            return Ok(self.memory.clone());
        };
        let (current, previous) = (dir.join(CURRENT), dir.join(PREVIOUS));
        // A crash between the two renames of `store` leaves only the previous state,
        // which is then the current one.
        let (path, has_previous) = if current.exists() {
            (current, previous.exists())
        } else if previous.exists() {
            (previous.clone(), false)
        } else {
            return Ok(None);
        };
        let (state, progress) = self.read(&path)?;
        let before = if has_previous {
            let (state, p) = self.read(&previous)?;
            // Only the state right before the current round serves a repeat of it.
            (p.round < progress.round).then_some(state)
        } else {
            None
        };
        Ok(Some((state, progress, before)))
    }

    fn read(&self, path: &Path) -> Result<(ClientState, Progress)> {
        let mut c: Contents = checkpoint::load(path)?;
        let wrapper: serde_json::Value =
            serde_json::from_str(&c.state).with_context(|| format!("{}", path.display()))?;
        let field = |name: &str| {
            wrapper
                .get(name)
                .ok_or_else(|| anyhow!("{}: no {name:?} in the saved state", path.display()))
        };
        if field("config_digest")?.as_str() != Some(&self.digest) {
            bail!(
                "{} was saved with another config; move it away or use the config it was made with",
                path.display()
            );
        }
        if field("client")?.as_u64() != Some(self.k as u64) {
            bail!(
                "{} belongs to client {}, not client {}",
                path.display(),
                field("client")?,
                self.k
            );
        }
        if field("data")?.as_str() != Some(self.engine.data_digest()) {
            bail!(
                "{} was saved on other data (same config, other file contents); restore the data files or move the saved state away",
                path.display()
            );
        }
        let progress: Progress = serde_json::from_value(field("progress")?.clone())
            .with_context(|| format!("{}: progress", path.display()))?;
        c.state = field("client_state")?.to_string();
        let state = self
            .engine
            .client_restore(self.k, &c)
            .with_context(|| format!("{}", path.display()))?;
        Ok((state, progress))
    }

    /// The checkpoint of a state and its progress.
    fn contents(&self, state: &ClientState, progress: &Progress) -> Result<Contents> {
        let mut c = self.engine.client_snapshot(self.k, state)?;
        let inner: serde_json::Value = serde_json::from_str(&c.state)?;
        c.state = serde_json::json!({
            "config_digest": self.digest,
            "client": self.k,
            "data": self.engine.data_digest(),
            "progress": progress,
            "client_state": inner,
        })
        .to_string();
        Ok(c)
    }

    /// Writes the client's current state and progress to `path` (one file).
    pub fn save(&self, path: &Path) -> Result<()> {
        let _lock = self.lock()?;
        let (state, progress, _) = self.loaded()?;
        checkpoint::save(path, &self.contents(&state, &progress)?)
    }

    /// Replaces the client's state with one [`Self::save`] wrote (refused when it was
    /// made with another config, client or data). A round asked again after a load is
    /// recomputed only if it is a new one.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let (state, progress) = self.read(path)?;
        let _lock = self.lock()?;
        if let Some(dir) = &self.state_dir {
            let before = dir.join(PREVIOUS);
            if before.exists() {
                std::fs::remove_file(&before)
                    .with_context(|| format!("cannot remove {}", before.display()))?;
            }
        }
        self.store(&state, &progress, Keep::Nothing)
    }

    /// Saves `state` as the current one, keeping beside it what `keep` says.
    fn store(&mut self, state: &ClientState, progress: &Progress, keep: Keep<'_>) -> Result<()> {
        let Some(dir) = self.state_dir.clone() else {
            let previous = match keep {
                Keep::Nothing => None,
                Keep::Previous(p) => Some(p.clone()),
                Keep::Same => self.memory.take().and_then(|m| m.2),
            };
            self.memory = Some((state.clone(), progress.clone(), previous));
            return Ok(());
        };
        let (current, before) = (dir.join(CURRENT), dir.join(PREVIOUS));
        let c = self.contents(state, progress)?;
        // Without the current file (a crash between this rename and the save below),
        // the previous file already holds the state this round started from.
        if matches!(keep, Keep::Previous(_)) && current.exists() {
            std::fs::rename(&current, &before).with_context(|| {
                format!("cannot move {} to {}", current.display(), before.display())
            })?;
        }
        checkpoint::save(&current, &c)
    }
}

/// What [`Node::store`] keeps beside the state it saves.
#[derive(Clone, Copy)]
enum Keep<'a> {
    /// No previous state (round 0, or a loaded state).
    Nothing,
    /// A new round: this state, the current one until now, becomes the previous one
    /// (on disk: the current file is renamed).
    Previous(&'a ClientState),
    /// The same round again: the previous state stays.
    Same,
}
