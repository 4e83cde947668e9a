//! The federated rounds (FIBECFED.md §2–4) for every method: one engine whose config
//! decides the curriculum, which layers and factors travel, the sparse local update
//! and the server rule. The engine only orchestrates (sample, dispatch, aggregate,
//! evaluate, record); one client's work is [`crate::local::LocalTrainer`]'s, and
//! saving and resuming is [`crate::checkpoint`]'s.
//!
//! Round 0 is the initialisation: clients that need it score their data and layers
//! (one Fisher pass, or the perturbation pass), the server picks the global layers, and
//! the initial model is evaluated. Rounds 1..=T then sample clients, train them in
//! parallel (rayon; each client's work depends only on its own seeded stream, so
//! results do not depend on the thread count), aggregate, evaluate every client's
//! personalised model on its own test part, and checkpoint.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use fibecfed_aggregation::{Aggregator, Tensors, restrict};
use fibecfed_fisher::{ImportanceReport, LayerSelector};
use fibecfed_lora::{LoraConfig, LoraParams};
use fibecfed_transformer::{Adapter, Classifier};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::checkpoint::{self, Contents, Shapes};
use crate::config::{CurriculumUnit, Prepare, RunConfig};
use crate::eval::{EvalCounts, evaluate_counts};
use crate::local::{Curriculum, FirstState, LocalTrainer, Outcome, overlay};
use crate::model::fresh_adapter;
use crate::registry::Registry;
use crate::server::{self, Draw};
pub use crate::state::{ClientData, ClientRound, ClientState, RoundMetrics, RunState};

mod standalone;

/// Told what a round is doing; `fibecfed run` uses it for its progress line and its
/// tests to stop a process at a chosen point.
pub trait RoundObserver: Send + Sync {
    /// Round `round`'s clients have trained; aggregation comes next.
    fn clients_trained(&self, round: usize) {
        let _ = round;
    }
}

/// The engine of one run.
pub struct Engine {
    pub config: RunConfig,
    model: Arc<Classifier<f32>>,
    data: Vec<ClientData>,
    lora: LoraConfig,
    curriculum: Curriculum,
    selector: Box<dyn LayerSelector>,
    aggregator: Box<dyn Aggregator>,
    template: LoraParams<f32>,
    observer: Option<Box<dyn RoundObserver>>,
    /// [`checkpoint::data_digest`] of `data`, computed once.
    digest: String,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("method", &self.config.method)
            .field("clients", &self.data.len())
            .field("curriculum", &self.curriculum)
            .field("selector", &self.selector)
            .field("aggregator", &self.aggregator)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Checks the config against the model and builds its components.
    pub fn new(
        config: RunConfig,
        registry: &Registry,
        model: Arc<Classifier<f32>>,
        data: Vec<ClientData>,
        classes: usize,
    ) -> Result<Self> {
        config.validate()?;
        if data.len() != config.federation.clients {
            bail!(
                "{} client data sets for federation.clients = {}",
                data.len(),
                config.federation.clients
            );
        }
        let curriculum = Curriculum {
            scorer: registry.scorer(&config.curriculum.scorer)?,
            ordering: registry.ordering(&config.curriculum.ordering)?,
            pacing: registry.pacing(&config.curriculum.pacing)?,
        };
        let selector = registry.selector(&config.sharing.selector, config.seed)?;
        let aggregator = registry.aggregator(&config.aggregator)?;
        let lora = config.lora_config();
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let template = fresh_adapter(&model, &lora, classes, &mut rng)
            .context("lora: the adapter does not fit the model")?;
        Ok(Self {
            digest: checkpoint::data_digest(&data),
            config,
            model,
            data,
            lora,
            curriculum,
            selector,
            aggregator,
            template,
            observer: None,
        })
    }

    /// Installs the observer every later round reports to.
    pub fn set_observer(&mut self, observer: Box<dyn RoundObserver>) {
        self.observer = Some(observer);
    }

    pub fn layers(&self) -> usize {
        self.model.num_layers()
    }

    /// One client's round-local work, borrowing the engine's shared parts.
    fn trainer(&self) -> LocalTrainer<'_> {
        LocalTrainer {
            model: &self.model,
            config: &self.config,
            lora: &self.lora,
            curriculum: &self.curriculum,
            template: &self.template,
        }
    }

    /// Names of the tensors that travel, given the global layers, in site order (the
    /// order a Flower client sends them in).
    pub fn shared_names(&self, gal: &[usize]) -> Vec<String> {
        self.trainer().shared_names(gal)
    }

    /// Round 0: initial state, scoring passes, global layers, first evaluation.
    pub fn initialise(&mut self) -> Result<RunState> {
        let clock = Instant::now();
        let needs_reports = self.selector.needs_reports();
        let deferred = self.config.federation.prepare == Prepare::OnSelection;
        let results: Vec<Result<FirstState>> = (0..self.data.len())
            .into_par_iter()
            .map(|k| {
                self.trainer()
                    .first_state(k, &self.data[k].train, needs_reports, deferred)
            })
            .collect();
        let mut clients = Vec::with_capacity(results.len());
        let mut reports = Vec::new();
        // Per client: the padded tokens of its passes and the bytes of its report.
        let mut spent = Vec::with_capacity(results.len());
        for (k, r) in results.into_iter().enumerate() {
            let (state, importance, passes) =
                r.with_context(|| format!("client {k}: scoring pass"))?;
            let mut bytes = 0;
            if let Some(importance) = importance {
                bytes = server::report_bytes(importance.len());
                reports.push(ImportanceReport {
                    samples: self.data[k].train.len(),
                    importance,
                });
            }
            spent.push((passes, bytes));
            clients.push(state);
        }
        let gal = self
            .selector
            .select(&reports, self.layers())
            .context("sharing.selector")?;
        if self.config.sparse.prune.is_some() && deferred {
            for state in &mut clients {
                state.pending.prune = true;
            }
        } else if self.config.sparse.prune.is_some() {
            let pruned: Vec<Result<u64>> = clients
                .par_iter_mut()
                .enumerate()
                .map(|(k, state)| {
                    self.trainer()
                        .prune(k, &self.data[k].train, state, &gal)
                        .with_context(|| format!("client {k}: pruning mask"))
                })
                .collect();
            for (s, r) in spent.iter_mut().zip(pruned) {
                s.0 += r?;
            }
        }
        let global = self.initial_global(&gal);
        let evaluation = self.evaluate_all(&clients, &global)?;
        let mut metrics = server::round0_metrics(
            &self.config,
            &spent,
            needs_reports,
            &gal,
            evaluation,
            self.pruned_neurons(&clients, &gal),
        );
        metrics.wall_seconds = clock.elapsed().as_secs_f64();
        Ok(RunState {
            round: 0,
            gal,
            global,
            clients,
            history: vec![metrics],
        })
    }

    /// With `[sparse.prune]`: the neurons each client pruned (the most over clients;
    /// every client prunes the same count).
    /// A client that has not pruned yet (`federation.prepare = "on_selection"`)
    /// counts what it will prune, so the field reads as in an up-front run.
    fn pruned_neurons(&self, clients: &[ClientState], gal: &[usize]) -> Option<usize> {
        self.config.sparse.prune.map(|_| {
            clients
                .iter()
                .map(|c| {
                    if c.pending.prune {
                        self.trainer().prune_count(gal)
                    } else {
                        c.pruned_count()
                    }
                })
                .max()
                .unwrap_or(0)
        })
    }

    /// Personalised accuracy and loss over every client's test part.
    fn evaluate_all(&self, clients: &[ClientState], global: &Tensors) -> Result<(f64, f64, usize)> {
        let per: Vec<Result<(EvalCounts, usize)>> = clients
            .par_iter()
            .enumerate()
            .map(|(k, c)| self.evaluate_client(k, c, global))
            .collect();
        let per = per
            .into_iter()
            .enumerate()
            .map(|(k, r)| r.with_context(|| format!("evaluating client {k}")))
            .collect::<Result<Vec<_>>>()?;
        server::combine_evaluations(&per)
    }

    /// Runs round `state.round + 1`.
    pub fn round(&mut self, state: &mut RunState) -> Result<()> {
        let clock = Instant::now();
        let t = state.round + 1;
        let draw = self.draw(t);
        // Round-0 work a client deferred (`federation.prepare = "on_selection"`), done
        // before it trains and kept even if its training diverges, so that it is done
        // (and paid for) once; its tokens count in this round's time for the client.
        let prepared: Vec<Result<(usize, ClientState, u64)>> = draw
            .active
            .par_iter()
            .filter(|&&k| state.clients[k].pending.any())
            .map(|&k| {
                let mut client = state.clients[k].clone();
                let tokens = self
                    .trainer()
                    .prepare_pending(k, &self.data[k].train, &mut client, &state.gal)
                    .with_context(|| format!("round {t}, client {k}: deferred preparation"))?;
                Ok((k, client, tokens))
            })
            .collect();
        let mut prep_tokens = BTreeMap::new();
        for r in prepared {
            let (k, client, tokens) = r?;
            state.clients[k] = client;
            prep_tokens.insert(k, tokens);
        }
        let outcomes: Vec<Result<Outcome>> = draw
            .active
            .par_iter()
            .map(|&k| {
                self.trainer().train(
                    k,
                    t,
                    &self.data[k].train,
                    state.clients[k].clone(),
                    &state.global,
                    &state.gal,
                )
            })
            .collect();
        if let Some(observer) = &self.observer {
            observer.clients_trained(t);
        }
        // Each outcome as the server sees it; the trained clients' new states are
        // adopted (a diverged client keeps its state, its deferred preparation aside).
        let mut replies = Vec::with_capacity(outcomes.len());
        for (&k, outcome) in draw.active.iter().zip(outcomes) {
            let prep = prep_tokens.get(&k).copied().unwrap_or(0);
            let (reply, trained) = outcome
                .with_context(|| format!("round {t}, client {k}"))?
                .into_reply(prep);
            if let Some(client) = trained {
                state.clients[k] = client;
            }
            replies.push((k, reply));
        }
        let data = &self.data;
        let (g, down) = server::settle(
            t,
            self.config.simulation,
            self.aggregator.as_mut(),
            &mut state.global,
            &draw,
            replies,
            |k| data[k].train.len(),
        )?;
        let evaluation = if self.config.evaluates(t) {
            let (a, l, n) = self.evaluate_all(&state.clients, &state.global)?;
            (Some(a), Some(l), n)
        } else {
            (None, None, 0)
        };
        let batch_curriculum = self.config.curriculum.unit == CurriculumUnit::Batch
            && self.trainer().uses_curriculum();
        let mut metrics = server::round_metrics(
            &self.config,
            t,
            draw,
            g,
            down,
            evaluation,
            batch_curriculum,
            state.history.last(),
            &state.gal,
            self.pruned_neurons(&state.clients, &state.gal),
        )?;
        metrics.wall_seconds = clock.elapsed().as_secs_f64();
        state.history.push(metrics);
        state.round = t;
        Ok(())
    }

    /// Round t's clients from the server's own stream.
    fn draw(&self, t: usize) -> Draw {
        server::draw(&self.config, t, |k| !self.data[k].train.is_empty())
    }

    /// The initial global tensors for the global layers `gal`: the seeded initial
    /// adapter, identical on every participant with the same config.
    pub fn initial_global(&self, gal: &[usize]) -> Tensors {
        let names = self.shared_names(gal);
        restrict(&self.template.to_named(), |n| names.iter().any(|m| m == n))
    }

    /// Client k's personalised model (its state with `global` laid over) on its test
    /// part: accuracy, mean loss over finite outputs, and the test size.
    pub fn evaluate_client(
        &self,
        k: usize,
        state: &ClientState,
        global: &Tensors,
    ) -> Result<(EvalCounts, usize)> {
        let test = &self
            .data
            .get(k)
            .ok_or_else(|| anyhow!("client {k} does not exist"))?
            .test;
        if test.is_empty() {
            return Ok((EvalCounts::default(), 0));
        }
        let mut params = state.params.clone();
        overlay(&mut params, global)?;
        let adapter = Adapter {
            params: &params,
            scale: self.lora.scale(),
        };
        Ok((evaluate_counts(&self.model, adapter, test, 64)?, test.len()))
    }

    /// What converting this run's state to and from a checkpoint needs.
    fn shapes(&self) -> Shapes<'_> {
        Shapes {
            template: &self.template,
            adam: self.trainer().adam(),
            gamma: self.config.sparse.gamma,
            digest: self.digest.clone(),
            rounds: self.config.federation.rounds,
            layers: self.model.num_layers(),
            sizes: self
                .data
                .iter()
                .map(|d| (d.train.len(), d.test.len()))
                .collect(),
        }
    }

    /// Checkpoint contents of `state` (and of the aggregator's own state).
    pub fn snapshot(&self, state: &RunState, config_text: &str) -> Result<Contents> {
        checkpoint::snapshot(&self.shapes(), state, self.aggregator.state(), config_text)
    }

    /// Rebuilds the state (and the aggregator's) from a checkpoint.
    pub fn restore(&mut self, c: &Contents, config_text: &str) -> Result<RunState> {
        let (state, aggregator) = checkpoint::restore(&self.shapes(), c, config_text)?;
        self.aggregator
            .load_state(&aggregator)
            .context("checkpoint: aggregator state")?;
        Ok(state)
    }
}
