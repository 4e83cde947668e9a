//! The federated rounds (FIBECFED.md §2–4) for every method: one engine whose config
//! decides the curriculum, which layers and factors travel, the sparse local update
//! and the server rule.
//!
//! Round 0 is the initialisation: clients that need it score their data and layers
//! (one Fisher pass, or the perturbation pass), the server picks the global layers, and
//! the initial model is evaluated. Rounds 1..=T then sample clients, train them in
//! parallel (rayon; each client's work depends only on its own seeded stream, so
//! results do not depend on the thread count), aggregate, evaluate every client's
//! personalised model on its own test part, and checkpoint.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use fibecfed_aggregation::{Aggregator, FedProx, Tensors, Update, message_bytes, restrict};
use fibecfed_curriculum::{Ordering, Pacing, sample_count};
use fibecfed_fisher::{
    DiagFisher, DifficultyScorer, FisherMomentum, HeadDiag, ImportanceReport, LabelMode,
    LayerSelector, SampleStats, SiteDiag, SiteMask, scores, site_mask,
};
use fibecfed_lora::params::{PEFT_HEAD_BIAS, PEFT_HEAD_WEIGHT, peft_site_name};
use fibecfed_lora::{AdamW, AdamWConfig, LoraConfig, LoraParams, SiteId};
use fibecfed_transformer::{Adapter, BertModel, Dropout, Reduction, cross_entropy};
use ndarray::ArrayD;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::checkpoint::Contents;
use crate::config::{Factor, ImportanceKind, RunConfig};
use crate::fisher::{FisherHook, FisherOptions, cpu_backend, fisher_pass, perturbation_importance};
use crate::registry::Registry;
use crate::train::{EvalCounts, Sample, batch_of, by_length, evaluate_counts, fresh_adapter};

/// Seeds of the independent random streams of a run.
const ROUND_DOMAIN: u64 = 0x5E1E_C7ED_0000_0001;
const CLIENT_DOMAIN: u64 = 0xC11E_4700_0000_0002;
const ORDER_DOMAIN: u64 = 0x0D0E_4000_0000_0003;
const SCORE_DOMAIN: u64 = 0x5C0E_0000_0000_0004;

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundMetrics {
    pub round: usize,
    pub method: String,
    pub seed: u64,
    /// Personalised accuracy: every client's own model on its own test part, weighted
    /// by test size.
    pub accuracy: f64,
    /// Mean test loss over the test samples whose logits are finite.
    pub loss: f64,
    /// Test samples whose logits were not finite (a diverged personalised model):
    /// counted as wrong, left out of `loss`.
    pub eval_non_finite: usize,
    /// Mean training loss over the round's samples (none in round 0).
    pub train_loss: Option<f64>,
    /// Samples trained on this round (summed over clients and epochs).
    pub train_samples: usize,
    /// Padded tokens through forward+backward this round (training and scoring).
    pub tokens: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub cum_bytes_up: u64,
    pub cum_bytes_down: u64,
    /// Simulated round time: the slowest participating client under the cost model.
    pub sim_seconds: f64,
    pub cum_sim_seconds: f64,
    /// Measured; the only field that differs between identical runs.
    pub wall_seconds: f64,
    pub selected: Vec<usize>,
    /// Selected clients that failed (simulated dropout) and sent nothing.
    pub dropped: Vec<usize>,
    /// Clients whose loss became NaN or infinite: left out of the aggregate, their
    /// state rolled back.
    pub diverged: Vec<usize>,
    /// Selected clients without training data.
    pub empty: Vec<usize>,
    /// The global layers.
    pub gal: Vec<usize>,
}

/// A client's data.
#[derive(Debug, Clone)]
pub struct ClientData {
    pub train: Vec<Sample>,
    pub test: Vec<Sample>,
}

/// What a client keeps between rounds.
#[derive(Debug, Clone)]
pub struct ClientState {
    /// Its full adapter: the global tensors are overwritten when it is selected, the
    /// rest is personal.
    pub params: LoraParams<f32>,
    pub opt: AdamW<f32>,
    pub momentum: Option<FisherMomentum<SiteId>>,
    /// Easy → hard order of its training samples, when a curriculum is in use.
    pub order: Option<Vec<usize>>,
    pub last_scored: Option<usize>,
}

/// The components a config names.
#[derive(Debug)]
struct Components {
    scorer: Box<dyn DifficultyScorer>,
    ordering: Box<dyn Ordering>,
    pacing: Box<dyn Pacing>,
    selector: Box<dyn LayerSelector>,
    aggregator: Box<dyn Aggregator>,
}

/// Everything a checkpoint restores.
#[derive(Debug, Clone)]
pub struct RunState {
    /// Rounds finished (0 = only the initialisation).
    pub round: usize,
    pub gal: Vec<usize>,
    pub global: Tensors,
    pub clients: Vec<ClientState>,
    pub history: Vec<RoundMetrics>,
}

/// The engine of one run.
#[derive(Debug)]
pub struct Engine<'a> {
    pub config: RunConfig,
    model: &'a BertModel<f32>,
    data: Vec<ClientData>,
    lora: LoraConfig,
    parts: Components,
    template: LoraParams<f32>,
}

/// A finished client's contribution to a round.
struct Trained {
    state: ClientState,
    upload: Option<Tensors>,
    loss_sum: f64,
    samples: usize,
    tokens: u64,
}

enum Outcome {
    Trained(Box<Trained>),
    /// Why, and the padded tokens it had processed until then (the round waited for it).
    Diverged(String, u64),
}

impl<'a> Engine<'a> {
    /// Checks the config against the model and builds its components.
    pub fn new(
        config: RunConfig,
        registry: &Registry,
        model: &'a BertModel<f32>,
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
        let parts = Components {
            scorer: registry.scorer(&config.curriculum.scorer)?,
            ordering: registry.ordering(&config.curriculum.ordering)?,
            pacing: registry.pacing(&config.curriculum.pacing)?,
            selector: registry.selector(&config.sharing.selector, config.seed)?,
            aggregator: registry.aggregator(&config.aggregator)?,
        };
        let lora = config.lora_config();
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let template = fresh_adapter(model, &lora, classes, &mut rng)
            .context("lora: the adapter does not fit the model")?;
        Ok(Self {
            config,
            model,
            data,
            lora,
            parts,
            template,
        })
    }

    pub fn layers(&self) -> usize {
        self.model.config.num_hidden_layers
    }

    fn adam(&self) -> AdamWConfig {
        AdamWConfig {
            lr: self.config.federation.lr,
            weight_decay: self.config.federation.weight_decay,
            ..AdamWConfig::default()
        }
    }

    /// Whether the curriculum changes anything: constant pacing uses all data.
    fn uses_curriculum(&self) -> bool {
        self.parts.pacing.fraction(0, self.config.federation.rounds) < 1.0
    }

    fn uses_sparse(&self) -> bool {
        self.config.sparse.rho < 1.0
    }

    /// Names of the tensors that travel, given the global layers, in site order (the
    /// order a Flower client sends them in).
    pub fn shared_names(&self, gal: &[usize]) -> Vec<String> {
        let mut names = Vec::new();
        for site in self.template.sites.keys() {
            if gal.contains(&site.layer) {
                for f in &self.config.sharing.factors {
                    names.push(peft_site_name(*site, factor_name(*f)));
                }
            }
        }
        if self.config.sharing.head {
            names.push(PEFT_HEAD_WEIGHT.to_owned());
            names.push(PEFT_HEAD_BIAS.to_owned());
        }
        names
    }

    /// Round 0: initial state, scoring passes, global layers, first evaluation.
    pub fn initialise(&mut self) -> Result<RunState> {
        let clock = Instant::now();
        let needs_reports = self.parts.selector.needs_reports();
        let results: Vec<Result<(ClientState, Option<ImportanceReport>, u64)>> =
            (0..self.data.len())
                .into_par_iter()
                .map(|k| {
                    let (state, importance, tokens) = self.first_state(k, needs_reports)?;
                    let report = importance.map(|importance| ImportanceReport {
                        samples: self.data[k].train.len(),
                        importance,
                    });
                    Ok((state, report, tokens))
                })
                .collect();
        let mut clients = Vec::with_capacity(results.len());
        let mut reports = Vec::new();
        let (mut sim, mut tokens_total, mut up) = (0.0f64, 0u64, 0u64);
        let sim_cfg = self.config.simulation;
        for (k, r) in results.into_iter().enumerate() {
            let (state, report, tokens) = r.with_context(|| format!("client {k}: scoring pass"))?;
            let mut t = tokens as f64 * sim_cfg.seconds_per_token;
            if let Some(rep) = report {
                // n_k and one f64 per layer.
                let bytes = 8 * (rep.importance.len() as u64 + 1);
                up += bytes;
                t += bytes as f64 / sim_cfg.upload_bytes_per_second;
                reports.push(rep);
            }
            sim = sim.max(t);
            tokens_total += tokens;
            clients.push(state);
        }
        let layers = self.layers();
        let gal = self
            .parts
            .selector
            .select(&reports, layers)
            .context("sharing.selector")?;
        let down = if needs_reports {
            8 * gal.len() as u64 * clients.len() as u64
        } else {
            0
        };
        let global = self.initial_global(&gal);
        let (accuracy, loss, eval_non_finite) = self.evaluate_all(&clients, &global)?;
        let metrics = RoundMetrics {
            round: 0,
            method: self.config.method.clone(),
            seed: self.config.seed,
            accuracy,
            loss,
            eval_non_finite,
            train_loss: None,
            train_samples: 0,
            tokens: tokens_total,
            bytes_up: up,
            bytes_down: down,
            cum_bytes_up: up,
            cum_bytes_down: down,
            sim_seconds: sim,
            cum_sim_seconds: sim,
            wall_seconds: clock.elapsed().as_secs_f64(),
            selected: Vec::new(),
            dropped: Vec::new(),
            diverged: Vec::new(),
            empty: Vec::new(),
            gal: gal.clone(),
        };
        Ok(RunState {
            round: 0,
            gal,
            global,
            clients,
            history: vec![metrics],
        })
    }

    /// The scoring pass of client k with its current model: curriculum order, Fisher
    /// momentum seed and (when asked) layer importance. Returns the importance and the
    /// padded tokens it cost.
    fn score(
        &self,
        k: usize,
        state: &mut ClientState,
        round: usize,
        importance: bool,
    ) -> Result<(Option<Vec<f64>>, u64)> {
        let samples = &self.data[k].train;
        let adapter = Adapter {
            params: &state.params,
            scale: self.lora.scale(),
        };
        let options = FisherOptions {
            batch_size: self.config.federation.batch_size,
            labels: if self.config.curriculum.sampled_labels {
                LabelMode::Sampled
            } else {
                LabelMode::True
            },
            seed: mix(self.config.seed, SCORE_DOMAIN, round as u64, k as u64),
        };
        let report = fisher_pass(self.model, adapter, samples, options, cpu_backend())?;
        let pass_tokens = padded_tokens(samples, options.batch_size);
        let mut tokens = pass_tokens;
        if self.uses_curriculum() {
            let s = scores(self.parts.scorer.as_ref(), &report.samples)?;
            let seed = mix(self.config.seed, ORDER_DOMAIN, round as u64, k as u64);
            state.order = Some(self.parts.ordering.order(&s, seed)?);
        }
        // The momentum is seeded once; a later rescoring leaves it to the recurrence
        // F_t = γ·F_{t−1} + (1−γ)·F̂_t that training keeps up.
        if self.uses_sparse() && state.momentum.is_none() {
            state.momentum = Some(FisherMomentum::seeded(
                self.config.sparse.gamma,
                &report.diag,
            )?);
        }
        state.last_scored = Some(round);
        let importance = match (importance, self.config.sharing.importance) {
            (false, _) => None,
            (true, ImportanceKind::Fisher) => Some(report.layer_importance),
            (true, ImportanceKind::Perturbation) => {
                // Two forward passes, a third of a forward+backward each.
                tokens += 2 * pass_tokens / 3;
                Some(perturbation_importance(
                    self.model,
                    adapter,
                    samples,
                    options.batch_size,
                    self.config.sharing.perturbation_sigma,
                    options.seed,
                )?)
            }
        };
        Ok((importance, tokens))
    }

    /// Personalised accuracy and loss over every client's test part.
    fn evaluate_all(&self, clients: &[ClientState], global: &Tensors) -> Result<(f64, f64, usize)> {
        let per: Vec<Result<(EvalCounts, usize)>> = clients
            .par_iter()
            .enumerate()
            .map(|(k, c)| self.evaluate_client(k, c, global))
            .collect();
        let (mut total, mut n) = (EvalCounts::default(), 0usize);
        for (k, r) in per.into_iter().enumerate() {
            let (c, m) = r.with_context(|| format!("evaluating client {k}"))?;
            total.correct += c.correct;
            total.loss_sum += c.loss_sum;
            total.non_finite += c.non_finite;
            n += m;
        }
        if n == 0 {
            bail!("no client has test data: the test file is empty or data.limit_test is 0");
        }
        if total.non_finite == n {
            bail!(
                "every client's model gives non-finite outputs on its test data: the run diverged (lower federation.lr)"
            );
        }
        Ok((
            total.correct as f64 / n as f64,
            total.loss_sum / (n - total.non_finite) as f64,
            total.non_finite,
        ))
    }

    /// Runs round `state.round + 1`.
    pub fn round(&mut self, state: &mut RunState, hang_after_training: bool) -> Result<()> {
        let clock = Instant::now();
        let t = state.round + 1;
        let f = self.config.federation.clone();
        let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed ^ ROUND_DOMAIN);
        rng.set_stream(t as u64);
        let m = self.config.clients_per_round();
        let mut selected = rand::seq::index::sample(&mut rng, f.clients, m).into_vec();
        selected.sort_unstable();
        let dropped: Vec<usize> = selected
            .iter()
            .copied()
            .filter(|_| rng.random::<f64>() < f.dropout_probability)
            .collect();
        let empty: Vec<usize> = selected
            .iter()
            .copied()
            .filter(|&k| self.data[k].train.is_empty())
            .collect();
        let active: Vec<usize> = selected
            .iter()
            .copied()
            .filter(|k| !dropped.contains(k) && !empty.contains(k))
            .collect();
        // Nothing global (local-only): nothing is sent, not even an empty message.
        let down_bytes = if state.global.is_empty() {
            0
        } else {
            message_bytes(&state.global)?
        };
        let this = &*self;
        let global = &state.global;
        let gal = &state.gal;
        let outcomes: Vec<Result<Outcome>> = active
            .par_iter()
            .map(|&k| this.train_client(k, t, state.clients[k].clone(), global, gal))
            .collect();
        if hang_after_training {
            // Test hook: the resume test kills the process here, mid-round.
            eprintln!("test hook: round {t} trained, hanging before aggregation");
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        let sim_cfg = self.config.simulation;
        // A client's simulated time before its upload: download, then its compute.
        let work_time = |tokens: u64| {
            tokens as f64 * sim_cfg.seconds_per_token
                + down_bytes as f64 / sim_cfg.download_bytes_per_second
        };
        let mut updates = Vec::new();
        let mut diverged = Vec::new();
        let (mut loss_sum, mut samples, mut tokens, mut up) = (0.0f64, 0usize, 0u64, 0u64);
        let mut sim = 0.0f64;
        for (&k, outcome) in active.iter().zip(outcomes) {
            match outcome.with_context(|| format!("round {t}, client {k}"))? {
                Outcome::Diverged(why, spent) => {
                    eprintln!("round {t}: client {k} left out of the aggregate: {why}");
                    diverged.push(k);
                    tokens += spent;
                    sim = sim.max(work_time(spent));
                }
                Outcome::Trained(tr) => {
                    let mut time = work_time(tr.tokens);
                    if let Some(tensors) = tr.upload {
                        let bytes = message_bytes(&tensors)?;
                        up += bytes;
                        time += bytes as f64 / sim_cfg.upload_bytes_per_second;
                        updates.push(Update {
                            client: k,
                            samples: self.data[k].train.len(),
                            tensors,
                        });
                    }
                    sim = sim.max(time);
                    loss_sum += tr.loss_sum;
                    samples += tr.samples;
                    tokens += tr.tokens;
                    state.clients[k] = tr.state;
                }
            }
        }
        if !updates.is_empty() && !state.global.is_empty() {
            state.global = self
                .parts
                .aggregator
                .aggregate(&state.global, &updates)
                .with_context(|| format!("round {t}: aggregation"))?;
        }
        // Everyone selected downloads the global tensors, even those that fail later.
        let down = down_bytes * (selected.len() - empty.len()) as u64;
        let (accuracy, loss, eval_non_finite) = self.evaluate_all(&state.clients, &state.global)?;
        let prev = state
            .history
            .last()
            .ok_or_else(|| anyhow!("run state without round 0"))?;
        let metrics = RoundMetrics {
            round: t,
            method: self.config.method.clone(),
            seed: self.config.seed,
            accuracy,
            loss,
            eval_non_finite,
            train_loss: (samples > 0).then(|| loss_sum / samples as f64),
            train_samples: samples,
            tokens,
            bytes_up: up,
            bytes_down: down,
            cum_bytes_up: prev.cum_bytes_up + up,
            cum_bytes_down: prev.cum_bytes_down + down,
            sim_seconds: sim,
            cum_sim_seconds: prev.cum_sim_seconds + sim,
            wall_seconds: clock.elapsed().as_secs_f64(),
            selected,
            dropped,
            diverged,
            empty,
            gal: state.gal.clone(),
        };
        state.history.push(metrics);
        state.round = t;
        Ok(())
    }

    /// The global layers when they can be chosen without the clients' reports (a
    /// selector such as `fixed`, `random`, `all` or `none`): what a participant that
    /// runs on its own (a Flower client) computes identically to every other one.
    pub fn standalone_gal(&self) -> Result<Vec<usize>> {
        if self.parts.selector.needs_reports() {
            bail!(
                "sharing.selector needs every client's layer importance at the server, which a stock Flower server does not gather; fix the global layers with selector = {{ kind = \"fixed\", layers = [...] }} (for example the top layers of `fibecfed fisher --layer-importance` on a sample of the data)"
            );
        }
        self.parts
            .selector
            .select(&[], self.layers())
            .context("sharing.selector")
    }

    /// The initial global tensors for the global layers `gal`: the seeded initial
    /// adapter, identical on every participant with the same config.
    pub fn initial_global(&self, gal: &[usize]) -> Tensors {
        let names = self.shared_names(gal);
        restrict(&self.template.to_named(), |n| names.iter().any(|m| m == n))
    }

    /// Client k's state before its first round: the initial adapter and, where the
    /// config uses them, its curriculum order and Fisher momentum from one scoring
    /// pass. Returns the padded tokens the pass cost.
    pub fn start_client(&self, k: usize) -> Result<(ClientState, u64)> {
        if k >= self.data.len() {
            bail!("client {k} does not exist ({} clients)", self.data.len());
        }
        let (state, _, tokens) = self
            .first_state(k, false)
            .with_context(|| format!("client {k}: scoring pass"))?;
        Ok((state, tokens))
    }

    /// Client k's round-0 state: the initial adapter, fresh optimiser, and the scoring
    /// pass when the config uses its results (with the layer importance when
    /// `importance`); also the importance and the pass's padded tokens.
    fn first_state(
        &self,
        k: usize,
        importance: bool,
    ) -> Result<(ClientState, Option<Vec<f64>>, u64)> {
        let mut state = ClientState {
            params: self.template.clone(),
            opt: AdamW::new(self.adam(), &self.template),
            momentum: None,
            order: None,
            last_scored: None,
        };
        let needs_pass = self.uses_curriculum() || self.uses_sparse() || importance;
        if !needs_pass || self.data[k].train.is_empty() {
            return Ok((state, None, 0));
        }
        let (report, tokens) = self.score(k, &mut state, 0, importance)?;
        Ok((state, report, tokens))
    }

    /// Client k's work in round t (1-based) on its own: download `global`, train, and
    /// the upload (the tensors of the global layers). A diverged client gives an
    /// error naming why; its state is left as it was.
    pub fn run_client(
        &self,
        k: usize,
        t: usize,
        state: &mut ClientState,
        global: &Tensors,
        gal: &[usize],
    ) -> Result<ClientRound> {
        if k >= self.data.len() || t == 0 {
            bail!("client {k}, round {t}: no such client or round (rounds count from 1)");
        }
        if self.data[k].train.is_empty() {
            bail!("client {k} has no training data");
        }
        match self.train_client(k, t, state.clone(), global, gal)? {
            Outcome::Diverged(why, _) => bail!("client {k} diverged: {why}"),
            Outcome::Trained(tr) => {
                *state = tr.state;
                Ok(ClientRound {
                    upload: tr.upload.unwrap_or_default(),
                    train_loss: tr.loss_sum / tr.samples.max(1) as f64,
                    samples: tr.samples,
                    tokens: tr.tokens,
                })
            }
        }
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
        Ok((evaluate_counts(self.model, adapter, test, 64)?, test.len()))
    }

    /// Training and test examples of client k.
    pub fn client_sizes(&self, k: usize) -> Option<(usize, usize)> {
        self.data.get(k).map(|d| (d.train.len(), d.test.len()))
    }

    /// One client's state as checkpoint contents (names prefixed `client{k}/`).
    pub fn client_snapshot(&self, k: usize, client: &ClientState) -> Result<Contents> {
        let mut c = Contents::default();
        let meta = client_contents(k, client, &mut c);
        c.state = serde_json::to_string(&meta)?;
        Ok(c)
    }

    /// The inverse of [`Self::client_snapshot`], checked against client k's data.
    pub fn client_restore(&self, k: usize, c: &Contents) -> Result<ClientState> {
        let cm: ClientMeta = serde_json::from_str(&c.state).context("client state")?;
        self.check_order(k, &cm)?;
        self.client_from(k, &cm, c)
    }

    /// Client k's local work in round t: download, (re)score if due, train on its
    /// curriculum subset with the sparse mask, upload.
    fn train_client(
        &self,
        k: usize,
        t: usize,
        mut state: ClientState,
        global: &Tensors,
        gal: &[usize],
    ) -> Result<Outcome> {
        let f = &self.config.federation;
        let data = &self.data[k].train;
        overlay(&mut state.params, global)?;
        let mut tokens = 0u64;
        let every = self.config.curriculum.rescore_every;
        let due = every > 0
            && state
                .last_scored
                .is_some_and(|s| t.saturating_sub(s) >= every);
        if due {
            tokens += self.score(k, &mut state, t, false)?.1;
        }
        let count = sample_count(self.parts.pacing.fraction(t - 1, f.rounds), data.len());
        let mut subset: Vec<usize> = match &state.order {
            Some(order) => order[..count].to_vec(),
            None => (0..data.len()).collect(),
        };
        let masks = self.masks(&state, gal)?;
        let mask_refs: Vec<Option<&[bool]>> = masks.iter().map(|m| m.as_deref()).collect();
        let prox = (self.config.client.prox_mu > 0.0)
            .then(|| FedProx::new(self.config.client.prox_mu))
            .transpose()?;
        let names = tensor_names(&state.params);
        let shared = self.shared_names(gal);
        let collect_fisher = state.momentum.is_some();
        let mut fresh: DiagFisher<SiteId> = DiagFisher::new();
        let mut rng =
            ChaCha8Rng::seed_from_u64(mix(self.config.seed, CLIENT_DOMAIN, t as u64, k as u64));
        let scale = self.lora.scale();
        let (mut loss_sum, mut seen) = (0.0f64, 0usize);
        for _ in 0..f.local_epochs {
            subset.shuffle(&mut rng);
            for chunk in subset.chunks(f.batch_size) {
                let batch = batch_of(self.model, data, chunk)?;
                tokens += (batch.batch * batch.seq_len) as u64;
                let labels: Vec<usize> = chunk.iter().map(|&i| data[i].label).collect();
                let adapter = Adapter {
                    params: &state.params,
                    scale,
                };
                let dropout = Some(Dropout {
                    p: self.lora.dropout,
                    rng: &mut rng,
                });
                let fwd = self.model.forward(&batch, adapter, dropout)?;
                if fwd.logits.iter().any(|v| !v.is_finite()) {
                    return Ok(Outcome::Diverged(
                        format!("round {t}: the logits are not finite"),
                        tokens,
                    ));
                }
                // Summed loss: each sample's rows of δ are then its own gradient (what
                // the Fisher hook needs); the step uses the mean, scaled below.
                let (losses, dlogits) = cross_entropy(&fwd.logits, &labels, Reduction::Sum)?;
                let batch_loss: f64 = losses.iter().sum();
                if !batch_loss.is_finite() {
                    return Ok(Outcome::Diverged(
                        format!("round {t}: the training loss is {batch_loss}"),
                        tokens,
                    ));
                }
                let mut grads = if collect_fisher {
                    let mut hook = FisherHook {
                        backend: cpu_backend(),
                        stats: vec![SampleStats::zeros(self.layers()); chunk.len()],
                        diag: &mut fresh,
                        skip_layers: gal,
                        error: None,
                    };
                    let g = self
                        .model
                        .backward(&batch, adapter, &fwd, &dlogits, &mut hook)?;
                    if let Some(e) = hook.error {
                        return Err(e);
                    }
                    fresh.samples += chunk.len();
                    g
                } else {
                    self.model.backward(
                        &batch,
                        adapter,
                        &fwd,
                        &dlogits,
                        &mut fibecfed_transformer::NoHook,
                    )?
                };
                let inv = 1.0 / chunk.len() as f32;
                for s in grads.slices_mut() {
                    for g in s.iter_mut() {
                        *g *= inv;
                    }
                }
                if let Some(prox) = prox {
                    let params = state.params.slices();
                    for ((g, p), name) in grads.slices_mut().into_iter().zip(params).zip(&names) {
                        if let Some(anchor) = global.get(name).filter(|_| shared.contains(name))
                            && let Some(a) = anchor.as_slice()
                        {
                            prox.add_gradient(g, p, a)?;
                        }
                    }
                }
                if grads
                    .slices()
                    .iter()
                    .any(|s| s.iter().any(|v| !v.is_finite()))
                {
                    return Ok(Outcome::Diverged(
                        format!("round {t}: a gradient is not finite"),
                        tokens,
                    ));
                }
                state
                    .opt
                    .step_masked(&mut state.params, &grads, &mask_refs)?;
                loss_sum += batch_loss;
                seen += chunk.len();
            }
        }
        // The last step may have overflowed a weight, or the squares the momentum: such
        // a client must not reach the aggregate.
        if state
            .params
            .slices()
            .iter()
            .any(|s| s.iter().any(|v| !v.is_finite()))
        {
            return Ok(Outcome::Diverged(
                format!("round {t}: a weight is not finite after training"),
                tokens,
            ));
        }
        if let Some(momentum) = state.momentum.as_mut()
            && fresh.samples > 0
        {
            if let Some(what) = fresh.first_non_finite() {
                return Ok(Outcome::Diverged(
                    format!("round {t}: the Fisher of {what} is not finite"),
                    tokens,
                ));
            }
            momentum.update(&fresh)?;
        }
        let upload = (!shared.is_empty())
            .then(|| restrict(&state.params.to_named(), |n| shared.iter().any(|s| s == n)));
        Ok(Outcome::Trained(Box::new(Trained {
            state,
            upload,
            loss_sum,
            samples: seen,
            tokens,
        })))
    }

    /// Keep-masks in [`LoraParams::slices`] order: frozen factors never move; sites of
    /// the client's own layers keep the top-ρ units by Fisher momentum; the rest and
    /// the head update densely.
    fn masks(&self, state: &ClientState, gal: &[usize]) -> Result<Vec<Option<Vec<bool>>>> {
        let frozen = &self.config.lora.frozen;
        let mut out = Vec::new();
        for (site, w) in &state.params.sites {
            let (r, d_in, d_out) = (w.a.nrows(), w.a.ncols(), w.b.nrows());
            let mut mask: Option<SiteMask> = None;
            if !gal.contains(&site.layer)
                && let Some(m) = &state.momentum
                && let Some(diag) = m.current().sites.get(site)
            {
                mask = Some(site_mask(
                    diag,
                    self.config.sparse.rho,
                    self.config.sparse.granularity,
                )?);
            }
            let dense = || SiteMask::dense(r, d_in, d_out);
            let m = mask.unwrap_or_else(dense);
            let freeze = |f: Factor| frozen.contains(&f);
            out.push(if freeze(Factor::A) {
                Some(vec![false; r * d_in])
            } else {
                Some(m.a.iter().copied().collect())
            });
            out.push(if freeze(Factor::B) {
                Some(vec![false; d_out * r])
            } else {
                Some(m.b.iter().copied().collect())
            });
        }
        out.push(None);
        out.push(None);
        Ok(out)
    }

    /// Checkpoint contents of `state`.
    pub fn snapshot(&self, state: &RunState, config_text: &str) -> Result<Contents> {
        let mut c = Contents::default();
        for (name, a) in &state.global {
            c.f32.insert(format!("global/{name}"), a.clone());
        }
        for (name, a) in self.parts.aggregator.state() {
            c.f32.insert(format!("aggregator/{name}"), a);
        }
        let metas = state
            .clients
            .iter()
            .enumerate()
            .map(|(k, client)| client_contents(k, client, &mut c))
            .collect();
        let meta = Meta {
            config: config_text.to_owned(),
            sizes: self.sizes(),
            round: state.round,
            gal: state.gal.clone(),
            clients: metas,
            history: state.history.clone(),
        };
        c.state = serde_json::to_string(&meta)?;
        Ok(c)
    }

    /// Rebuilds the state (and the aggregator's) from a checkpoint.
    pub fn restore(&mut self, c: &Contents, config_text: &str) -> Result<RunState> {
        let meta: Meta = serde_json::from_str(&c.state).context("checkpoint state")?;
        if meta.config != config_text {
            bail!(
                "config.toml differs from the config the checkpoint was made with; restore it or start a new run"
            );
        }
        if meta.sizes != self.sizes() {
            bail!(
                "the data differ from the checkpoint's: clients' (train, test) sizes were {:?}, now {:?}; restore the data files or start a new run",
                meta.sizes,
                self.sizes()
            );
        }
        if meta.clients.len() != self.data.len() {
            bail!(
                "checkpoint: {} client states for {} clients",
                meta.clients.len(),
                self.data.len()
            );
        }
        for (k, cm) in meta.clients.iter().enumerate() {
            self.check_order(k, cm)?;
        }
        let prefixed = |prefix: &str| -> Tensors {
            c.f32
                .iter()
                .filter_map(|(n, a)| n.strip_prefix(prefix).map(|s| (s.to_owned(), a.clone())))
                .collect()
        };
        let global = prefixed("global/");
        self.parts
            .aggregator
            .load_state(&prefixed("aggregator/"))
            .context("checkpoint: aggregator state")?;
        let clients = meta
            .clients
            .iter()
            .enumerate()
            .map(|(k, cm)| self.client_from(k, cm, c))
            .collect::<Result<Vec<_>>>()?;
        Ok(RunState {
            round: meta.round,
            gal: meta.gal,
            global,
            clients,
            history: meta.history,
        })
    }

    /// A checkpoint's curriculum order must be a permutation of client k's samples.
    fn check_order(&self, k: usize, cm: &ClientMeta) -> Result<()> {
        if let Some(order) = &cm.order {
            let n = self.data.get(k).map_or(0, |d| d.train.len());
            let mut seen = vec![false; n];
            let permutation = order.len() == n
                && order.iter().all(|&i| match seen.get_mut(i) {
                    Some(s) if !*s => {
                        *s = true;
                        true
                    }
                    _ => false,
                });
            if !permutation {
                bail!(
                    "checkpoint: client {k}'s curriculum order is not a permutation of its {n} samples"
                );
            }
        }
        Ok(())
    }

    /// Client k's state from the `client{k}/` tensors of a checkpoint.
    fn client_from(&self, k: usize, cm: &ClientMeta, c: &Contents) -> Result<ClientState> {
        let prefixed = |prefix: &str| -> Tensors {
            c.f32
                .iter()
                .filter_map(|(n, a)| n.strip_prefix(prefix).map(|s| (s.to_owned(), a.clone())))
                .collect()
        };
        let load = |what: &str| -> Result<LoraParams<f32>> {
            let mut p = self.template.clone();
            let t = prefixed(&format!("client{k}/{what}/"));
            if t.len() != p.to_named().len() {
                bail!(
                    "checkpoint: client {k} {what}: {} tensors, expected {}",
                    t.len(),
                    p.to_named().len()
                );
            }
            overlay(&mut p, &t)?;
            Ok(p)
        };
        let params = load("params")?;
        let opt = AdamW::from_state(self.adam(), load("m")?, load("v")?, cm.adam_steps)?;
        let momentum = if cm.momentum {
            let prefix = format!("client{k}/fisher/");
            let named: BTreeMap<String, ArrayD<f64>> = c
                .f64
                .iter()
                .filter_map(|(n, a)| n.strip_prefix(&prefix).map(|s| (s.to_owned(), a.clone())))
                .collect();
            let diag = diag_from_named(&self.template, &named)
                .with_context(|| format!("checkpoint: client {k} Fisher momentum"))?;
            Some(FisherMomentum::seeded(self.config.sparse.gamma, &diag)?)
        } else {
            None
        };
        Ok(ClientState {
            params,
            opt,
            momentum,
            order: cm.order.clone(),
            last_scored: cm.last_scored,
        })
    }

    fn sizes(&self) -> Vec<(usize, usize)> {
        self.data
            .iter()
            .map(|d| (d.train.len(), d.test.len()))
            .collect()
    }
}

/// Writes client k's tensors into `c` under `client{k}/`; returns its metadata.
fn client_contents(k: usize, client: &ClientState, c: &mut Contents) -> ClientMeta {
    let (m, v, steps) = client.opt.state();
    for (prefix, p) in [("params", &client.params), ("m", m), ("v", v)] {
        for (name, a) in p.to_named() {
            c.f32.insert(format!("client{k}/{prefix}/{name}"), a);
        }
    }
    if let Some(mom) = &client.momentum {
        for (name, a) in diag_named(mom.current()) {
            c.f64.insert(format!("client{k}/fisher/{name}"), a);
        }
    }
    ClientMeta {
        adam_steps: steps,
        order: client.order.clone(),
        last_scored: client.last_scored,
        momentum: client.momentum.is_some(),
    }
}

/// What one client's round produced ([`Engine::run_client`]).
#[derive(Debug, Clone)]
pub struct ClientRound {
    /// The tensors of the global layers, by PEFT name (empty when nothing is shared).
    pub upload: Tensors,
    /// Mean training loss over the samples seen.
    pub train_loss: f64,
    /// Samples trained on (over all local epochs).
    pub samples: usize,
    pub tokens: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct ClientMeta {
    adam_steps: u64,
    order: Option<Vec<usize>>,
    last_scored: Option<usize>,
    momentum: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    config: String,
    /// (train, test) sizes per client: a resume on other data is refused.
    sizes: Vec<(usize, usize)>,
    round: usize,
    gal: Vec<usize>,
    clients: Vec<ClientMeta>,
    history: Vec<RoundMetrics>,
}

fn factor_name(f: Factor) -> &'static str {
    match f {
        Factor::A => "lora_A",
        Factor::B => "lora_B",
    }
}

/// PEFT names in [`LoraParams::slices`] order.
fn tensor_names(p: &LoraParams<f32>) -> Vec<String> {
    let mut names = Vec::new();
    for site in p.sites.keys() {
        names.push(peft_site_name(*site, "lora_A"));
        names.push(peft_site_name(*site, "lora_B"));
    }
    names.push(PEFT_HEAD_WEIGHT.to_owned());
    names.push(PEFT_HEAD_BIAS.to_owned());
    names
}

/// Copies every tensor of `tensors` into the parameter of the same PEFT name; a name
/// the adapter lacks or a shape that differs is an error.
pub fn overlay(params: &mut LoraParams<f32>, tensors: &Tensors) -> Result<()> {
    let names = tensor_names(params);
    let mut slices: BTreeMap<&str, &mut [f32]> = names
        .iter()
        .map(String::as_str)
        .zip(params.slices_mut())
        .collect();
    for (name, t) in tensors {
        let dst = slices
            .get_mut(name.as_str())
            .ok_or_else(|| anyhow!("tensor {name} is not part of the adapter"))?;
        let src = t
            .as_slice()
            .ok_or_else(|| anyhow!("tensor {name} is not contiguous"))?;
        if src.len() != dst.len() {
            bail!(
                "tensor {name} has {} values, the adapter {}",
                src.len(),
                dst.len()
            );
        }
        dst.copy_from_slice(src);
    }
    Ok(())
}

fn diag_named(d: &DiagFisher<SiteId>) -> Vec<(String, ArrayD<f64>)> {
    let mut out = Vec::new();
    for (site, s) in &d.sites {
        out.push((peft_site_name(*site, "lora_A"), s.a.clone().into_dyn()));
        out.push((peft_site_name(*site, "lora_B"), s.b.clone().into_dyn()));
    }
    if let Some(h) = &d.head {
        out.push((PEFT_HEAD_WEIGHT.to_owned(), h.weight.clone().into_dyn()));
        out.push((PEFT_HEAD_BIAS.to_owned(), h.bias.clone().into_dyn()));
    }
    out
}

/// A [`DiagFisher`] with `samples` = 1 holding `named` exactly (so its mean is itself).
fn diag_from_named(
    template: &LoraParams<f32>,
    named: &BTreeMap<String, ArrayD<f64>>,
) -> Result<DiagFisher<SiteId>> {
    let get2 = |name: &str| -> Result<ndarray::Array2<f64>> {
        named
            .get(name)
            .ok_or_else(|| anyhow!("{name} is missing"))?
            .clone()
            .into_dimensionality()
            .map_err(|e| anyhow!("{name}: {e}"))
    };
    let mut d = DiagFisher::new();
    for site in template.sites.keys() {
        let (a_name, b_name) = (
            peft_site_name(*site, "lora_A"),
            peft_site_name(*site, "lora_B"),
        );
        if named.contains_key(&a_name) {
            d.sites.insert(
                *site,
                SiteDiag {
                    a: get2(&a_name)?,
                    b: get2(&b_name)?,
                },
            );
        }
    }
    if named.contains_key(PEFT_HEAD_WEIGHT) {
        let bias = named
            .get(PEFT_HEAD_BIAS)
            .ok_or_else(|| anyhow!("{PEFT_HEAD_BIAS} is missing"))?
            .clone()
            .into_dimensionality()
            .map_err(|e| anyhow!("{PEFT_HEAD_BIAS}: {e}"))?;
        d.head = Some(HeadDiag {
            weight: get2(PEFT_HEAD_WEIGHT)?,
            bias,
        });
    }
    d.samples = 1;
    Ok(d)
}

/// Padded tokens of a pass over `samples` in length-sorted batches.
fn padded_tokens(samples: &[Sample], batch_size: usize) -> u64 {
    by_length(samples)
        .chunks(batch_size.max(1))
        .map(|c| {
            let longest = c
                .iter()
                .map(|&i| samples[i].encoded.ids.len())
                .max()
                .unwrap_or(0);
            (c.len() * longest) as u64
        })
        .sum()
}

/// A seed for stream (a, b) of domain `domain`.
fn mix(seed: u64, domain: u64, a: u64, b: u64) -> u64 {
    // SplitMix64 finaliser over the combined words: distinct inputs give unrelated seeds.
    let mut z = seed
        ^ domain
        ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ b.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
