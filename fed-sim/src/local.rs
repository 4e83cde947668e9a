//! One client's round, in one place: what a FibecFed client (or any baseline's) does
//! with its own data between downloading the global tensors and uploading its share.
//!
//! [`LocalTrainer`] scores the client's data (curriculum order, Fisher-momentum seed,
//! layer importance), picks the round's curriculum subset, trains on it in batches with
//! the sparse keep-masks of its own layers and the FedProx term ([`crate::step`]),
//! refuses non-finite results, refreshes the Fisher momentum, and cuts out what it
//! uploads. It reads only the config, the model and the client's own data; the engine
//! decides who trains when and what happens to the uploads.

use anyhow::{Context, Result, anyhow, bail};
use fibecfed_aggregation::{FedProx, Tensors, restrict};
use fibecfed_curriculum::{BatchOrder, Ordering, Pacing, sample_count};
use fibecfed_data::{Sample, batch_of, length_batches, padded_tokens};
use fibecfed_fisher::{
    DiagFisher, DifficultyScorer, FisherMomentum, LabelMode, PruneScores, SampleStats, SiteMask,
    ceil_fraction, delta_scores, prune_lowest, scores, site_mask,
};
use fibecfed_lora::params::{PEFT_HEAD_BIAS, PEFT_HEAD_WEIGHT, peft_site_name};
use fibecfed_lora::{AdamW, AdamWConfig, LoraConfig, LoraParams, SiteId};
use fibecfed_transformer::{Adapter, Classifier, NoHook, Reduction, SiteHook};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;

use crate::config::{CurriculumUnit, Factor, HeadMode, ImportanceKind, Prune, RunConfig};
use crate::fisher::{
    FisherHook, FisherOptions, adversarial_sensitivity, cpu_backend, fisher_pass,
    perturbation_importance,
};
use crate::server::Reply;
use crate::state::{ClientState, Pending};
use crate::step::{ProxAnchor, Step, StepOutcome};

/// Seeds of the independent random streams of a client's work.
const CLIENT_DOMAIN: u64 = 0xC11E_4700_0000_0002;
const ORDER_DOMAIN: u64 = 0x0D0E_4000_0000_0003;
const SCORE_DOMAIN: u64 = 0x5C0E_0000_0000_0004;
const BATCH_DOMAIN: u64 = 0xBA7C_4000_0000_0005;
const ADVERSARIAL_DOMAIN: u64 = 0xAD7E_5000_0000_0006;
const PRUNE_DOMAIN: u64 = 0x9E0E_0000_0000_0007;

/// The curriculum's parts a config names.
#[derive(Debug)]
pub(crate) struct Curriculum {
    pub scorer: Box<dyn DifficultyScorer>,
    pub ordering: Box<dyn Ordering>,
    pub pacing: Box<dyn Pacing>,
}

/// What one client's round reads, borrowed from the engine and shared by every client
/// (each client's work depends only on its own data, state and seeded streams).
#[derive(Debug, Clone, Copy)]
pub(crate) struct LocalTrainer<'e> {
    pub model: &'e Classifier<f32>,
    pub config: &'e RunConfig,
    pub lora: &'e LoraConfig,
    pub curriculum: &'e Curriculum,
    /// The seeded initial adapter every client starts from.
    pub template: &'e LoraParams<f32>,
}

/// A finished client's contribution to a round.
#[derive(Debug)]
pub(crate) struct Trained {
    pub state: ClientState,
    /// The tensors of the global layers (and the head when it travels); `None` when
    /// nothing is shared.
    pub upload: Option<Tensors>,
    pub loss_sum: f64,
    pub samples: usize,
    pub tokens: u64,
    /// With a batch curriculum: the batches trained on (per epoch).
    pub batches: Option<usize>,
}

/// How a client's round ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    Trained(Box<Trained>),
    /// Why, and the padded tokens it had processed until then (the round waited for it).
    Diverged(String, u64),
}

impl Outcome {
    /// The round as the server sees it, `prep` padded tokens of deferred preparation
    /// added to the client's; with the trained client's new state (`None` when it
    /// diverged).
    pub fn into_reply(self, prep: u64) -> (Reply, Option<ClientState>) {
        match self {
            Outcome::Diverged(why, tokens) => (
                Reply::Diverged {
                    why,
                    tokens: tokens + prep,
                },
                None,
            ),
            Outcome::Trained(tr) => {
                let tr = *tr;
                (
                    Reply::Trained {
                        upload: tr.upload,
                        loss_sum: tr.loss_sum,
                        samples: tr.samples,
                        tokens: tr.tokens + prep,
                        batches: tr.batches,
                    },
                    Some(tr.state),
                )
            }
        }
    }
}

/// A client's round-0 state, the layer importance it reports (when asked) and the
/// padded tokens its scoring pass cost.
pub(crate) type FirstState = (ClientState, Option<Vec<f64>>, u64);

/// What the mask epochs of one client yield.
struct MaskEpochs {
    /// Per local site, a score per output neuron.
    scores: Vec<Vec<f64>>,
    /// The local sites, in the order of `scores` (read by the test).
    #[cfg_attr(not(test), allow(dead_code))]
    local: Vec<SiteId>,
    tokens: u64,
    /// The adapter after the epochs: discarded by `prune`, read by the test that
    /// recomputes the scores from it.
    #[cfg_attr(not(test), allow(dead_code))]
    trained: LoraParams<f32>,
}

/// What a client trains with in round t, fixed before its first step.
struct RoundPlan {
    subset: Vec<usize>,
    /// With a batch curriculum: the round's batches, trained intact in this order
    /// every epoch (the authors' code never reshuffles them).
    batches: Option<Vec<Vec<usize>>>,
    masks: Vec<Option<Vec<bool>>>,
    prox: Option<FedProx>,
    names: Vec<String>,
    shared: Vec<String>,
}

impl LocalTrainer<'_> {
    pub fn adam(&self) -> AdamWConfig {
        AdamWConfig {
            lr: self.config.federation.lr,
            weight_decay: self.config.federation.weight_decay,
            ..AdamWConfig::default()
        }
    }

    /// Whether the curriculum changes anything: constant pacing uses all data.
    pub fn uses_curriculum(&self) -> bool {
        self.curriculum
            .pacing
            .fraction(0, self.config.federation.rounds)
            < 1.0
    }

    pub fn uses_sparse(&self) -> bool {
        self.config.sparse.rho < 1.0
    }

    fn layers(&self) -> usize {
        self.model.num_layers()
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
        if self.config.sharing.head == HeadMode::Shared {
            names.push(PEFT_HEAD_WEIGHT.to_owned());
            names.push(PEFT_HEAD_BIAS.to_owned());
        }
        names
    }

    /// How a client steps: the summed loss (so that the Fisher hook sees per-sample
    /// rows), LoRA dropout and the clipping norm of the config.
    fn step(&self) -> Step<'_> {
        Step {
            model: self.model,
            scale: self.lora.scale(),
            dropout: self.lora.dropout,
            reduction: Reduction::Sum,
            max_grad_norm: self.config.federation.max_grad_norm,
        }
    }

    /// The seeded initial adapter, a fresh optimiser, nothing scored.
    fn initial_state(&self) -> ClientState {
        ClientState {
            params: self.template.clone(),
            opt: AdamW::new(self.adam(), self.template),
            momentum: None,
            order: None,
            last_scored: None,
            batch_lens: None,
            pruned: None,
            pending: Pending::default(),
        }
    }

    /// A client's round-0 state on `data`: the initial adapter, a fresh optimiser, and
    /// the scoring pass when the config uses its results (with the layer importance
    /// when `importance`); also the importance and the pass's padded tokens.
    /// With `defer` (`federation.prepare = "on_selection"` in the simulation), only
    /// what the server needs now runs, and the rest is left pending.
    pub fn first_state(
        &self,
        k: usize,
        data: &[Sample],
        importance: bool,
        defer: bool,
    ) -> Result<FirstState> {
        let mut state = self.initial_state();
        let needs_pass = self.uses_curriculum() || self.uses_sparse() || importance;
        if !needs_pass || data.is_empty() {
            return Ok((state, None, 0));
        }
        // Deferred: only what the server needs now. The adversarial importance runs
        // on its own; the Fisher and perturbation importance come from (or beside) the
        // scoring pass, which then runs now as before.
        if defer && (!importance || self.config.sharing.importance == ImportanceKind::Adversarial) {
            let mut report = None;
            let mut tokens = 0;
            if importance {
                let adapter = Adapter {
                    params: &state.params,
                    scale: self.lora.scale(),
                };
                let (scores, batch_tokens) = self.adversarial(k, data, adapter)?;
                // Counted as in `score`.
                tokens += batch_tokens + 2 * batch_tokens / 3;
                report = Some(scores);
            }
            state.pending.score = self.uses_curriculum() || self.uses_sparse();
            // As `score` marks it when it runs in round 0 (with no pass when only the
            // importance was wanted): `rescore_every` counts from round 0 either way.
            if !state.pending.score {
                state.last_scored = Some(0);
            }
            return Ok((state, report, tokens));
        }
        let (report, tokens) = self.score(k, data, &mut state, 0, importance)?;
        Ok((state, report, tokens))
    }

    /// The round-0 work client k deferred (`federation.prepare = "on_selection"`),
    /// done on its untouched initial state before its first training round: the
    /// scoring pass as round 0 would have run it, then the pruning mask. Returns the
    /// padded tokens it cost.
    pub fn prepare_pending(
        &self,
        k: usize,
        data: &[Sample],
        state: &mut ClientState,
        gal: &[usize],
    ) -> Result<u64> {
        let mut tokens = 0;
        if state.pending.score {
            tokens += self.score(k, data, state, 0, false)?.1;
            state.pending.score = false;
        }
        if state.pending.prune {
            tokens += self.prune(k, data, state, gal)?;
            state.pending.prune = false;
        }
        Ok(tokens)
    }

    /// The neurons `[sparse.prune]` prunes on a client whose own layers are those
    /// outside `gal`: ⌈ratio·n⌉ of the n output neurons of its local sites (what
    /// `prune_lowest` prunes), 0 when every layer is global or nothing is pruned.
    pub fn prune_count(&self, gal: &[usize]) -> usize {
        let Some(prune) = self.config.sparse.prune else {
            return 0;
        };
        let n: usize = self
            .template
            .sites
            .iter()
            .filter(|(s, _)| !gal.contains(&s.layer))
            .map(|(_, w)| w.b.nrows())
            .sum();
        if n == 0 {
            return 0;
        }
        // The rounding `prune_lowest` uses.
        ceil_fraction(prune.ratio, n)
    }

    /// The scoring pass of client k with its current model: curriculum order, Fisher
    /// momentum seed and (when asked) layer importance. Returns the importance and the
    /// padded tokens it cost.
    pub fn score(
        &self,
        k: usize,
        samples: &[Sample],
        state: &mut ClientState,
        round: usize,
        importance: bool,
    ) -> Result<(Option<Vec<f64>>, u64)> {
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
        let kind = self.config.sharing.importance;
        // The adversarial importance needs no Fisher pass of its own; every other call
        // runs it, as it always did (a rescoring pass counts its tokens even when
        // nothing reads its results).
        let needs_pass = !(importance && kind == ImportanceKind::Adversarial)
            || self.uses_curriculum()
            || self.uses_sparse();
        let pass_tokens = padded_tokens(samples, options.batch_size);
        let mut tokens = 0;
        let mut layer_importance = Vec::new();
        if needs_pass {
            let report = fisher_pass(self.model, adapter, samples, options, cpu_backend())?;
            tokens += pass_tokens;
            if self.uses_curriculum() {
                let s = scores(self.curriculum.scorer.as_ref(), &report.samples)?;
                let seed = mix(self.config.seed, ORDER_DOMAIN, round as u64, k as u64);
                match self.config.curriculum.unit {
                    CurriculumUnit::Sample => {
                        state.order = Some(self.curriculum.ordering.order(&s, seed)?);
                    }
                    CurriculumUnit::Batch => {
                        let draw = mix(self.config.seed, BATCH_DOMAIN, round as u64, k as u64);
                        let batches = BatchOrder::new(
                            &s,
                            self.config.federation.batch_size,
                            self.curriculum.ordering.as_ref(),
                            draw,
                            seed,
                        )?;
                        let (order, lens) = batches.to_parts();
                        state.order = Some(order);
                        state.batch_lens = Some(lens);
                    }
                }
            }
            // The momentum is seeded once; a later rescoring leaves it to the recurrence
            // F_t = γ·F_{t−1} + (1−γ)·F̂_t that training keeps up.
            if self.uses_sparse() && state.momentum.is_none() {
                state.momentum = Some(FisherMomentum::seeded(
                    self.config.sparse.gamma,
                    &report.diag,
                )?);
            }
            layer_importance = report.layer_importance;
        }
        state.last_scored = Some(round);
        let importance = match (importance, kind) {
            (false, _) => None,
            (true, ImportanceKind::Fisher) => Some(layer_importance),
            (true, ImportanceKind::Adversarial) => {
                let (scores, batch_tokens) = self.adversarial(k, samples, adapter)?;
                // A forward+backward, then two forwards (a third of one each).
                tokens += batch_tokens + 2 * batch_tokens / 3;
                Some(scores)
            }
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

    /// Client k's adversarial layer sensitivity on one seeded draw of
    /// `sharing.adversarial_samples` of its samples (all of them when it has fewer).
    fn adversarial(
        &self,
        k: usize,
        samples: &[Sample],
        adapter: Adapter<'_, f32>,
    ) -> Result<(Vec<f64>, u64)> {
        let mut ids: Vec<usize> = (0..samples.len()).collect();
        let mut rng =
            ChaCha8Rng::seed_from_u64(mix(self.config.seed, ADVERSARIAL_DOMAIN, 0, k as u64));
        ids.shuffle(&mut rng);
        ids.truncate(self.config.sharing.adversarial_samples);
        let drawn: Vec<Sample> = ids.iter().map(|&i| samples[i].clone()).collect();
        adversarial_sensitivity(
            self.model,
            adapter,
            &drawn,
            self.config.sharing.adversarial_step,
        )
        .with_context(|| format!("sharing.importance = \"adversarial\": client {k}"))
    }

    /// The one-time pruning mask of `[sparse.prune]` for client k, whose own layers
    /// are those outside `gal`: `epochs` local epochs from the initial adapter with a
    /// fresh optimiser over its data (in curriculum order, all of it, the same batches
    /// each epoch), each output neuron of its local sites scored per epoch, and the
    /// lowest pruned (`fibecfed_fisher::prune_lowest`). The epochs' training is then
    /// discarded, as the authors' code does; `state` keeps its parameters (the initial
    /// ones) with the pruned rows of B zeroed, and the pruned neurons. Returns the
    /// padded tokens the epochs cost.
    pub fn prune(
        &self,
        k: usize,
        data: &[Sample],
        state: &mut ClientState,
        gal: &[usize],
    ) -> Result<u64> {
        let Some(prune) = self.config.sparse.prune else {
            return Ok(0);
        };
        let any_local = state.params.sites.keys().any(|s| !gal.contains(&s.layer));
        // Every layer global: nothing to prune, and no mask epochs to pay for.
        let (pruned_local, tokens) = if any_local {
            let epochs = self.mask_epochs(k, data, state, gal, prune)?;
            (prune_lowest(&epochs.scores, prune.ratio)?, epochs.tokens)
        } else {
            (Vec::new(), 0)
        };
        let mut pruned = Vec::with_capacity(state.params.sites.len());
        let mut next = pruned_local.into_iter();
        for (site, w) in &mut state.params.sites {
            let neurons = if gal.contains(&site.layer) {
                Vec::new()
            } else {
                next.next().unwrap_or_default()
            };
            // A zero row of B is a zero LoRA output for that neuron, and its keep-mask
            // ([`Self::masks`]) keeps it zero: the neuron neither acts nor learns.
            for &j in &neurons {
                w.b.row_mut(j).fill(0.0);
            }
            pruned.push(neurons);
        }
        state.pruned = Some(pruned);
        Ok(tokens)
    }

    /// The mask epochs of [`Self::prune`]: the neuron scores (with momentum) of the
    /// local sites, the sites, the padded tokens, and the adapter they trained (which
    /// `prune` discards).
    fn mask_epochs(
        &self,
        k: usize,
        data: &[Sample],
        state: &ClientState,
        gal: &[usize],
        prune: Prune,
    ) -> Result<MaskEpochs> {
        let blank = self.initial_state();
        // Frozen factors and a frozen head stay frozen; nothing is sparse yet.
        let masks = self.masks(&blank, gal)?;
        let ClientState {
            mut params,
            mut opt,
            ..
        } = blank;
        let mask_refs: Vec<Option<&[bool]>> = masks.iter().map(|m| m.as_deref()).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(mix(self.config.seed, PRUNE_DOMAIN, 0, k as u64));
        let batch_size = self.config.federation.batch_size;
        let batches: Vec<Vec<usize>> = match (&state.order, &state.batch_lens) {
            _ if self.config.federation.length_buckets => {
                // Cut by length once, in a seeded order: the same batches every epoch.
                let mut ids: Vec<usize> = (0..data.len()).collect();
                ids.shuffle(&mut rng);
                let mut batches = length_batches(data, &ids, batch_size);
                batches.shuffle(&mut rng);
                batches
            }
            (Some(order), Some(lens)) => BatchOrder::from_parts(order, lens)?.batches,
            (order, _) => {
                let ids: Vec<usize> = order.clone().unwrap_or_else(|| (0..data.len()).collect());
                ids.chunks(batch_size).map(<[usize]>::to_vec).collect()
            }
        };
        let local: Vec<SiteId> = params
            .sites
            .keys()
            .copied()
            .filter(|s| !gal.contains(&s.layer))
            .collect();
        let step = self.step();
        let scale = f64::from(self.lora.scale());
        let lr = self.config.federation.lr;
        let mut scores = PruneScores::new(prune.momentum)?;
        let mut tokens = 0u64;
        for epoch in 0..prune.epochs {
            let before = effective_weights(&params, &local, scale);
            for chunk in &batches {
                let batch = batch_of(data, chunk, self.model.pad_token_id())?;
                tokens += (batch.batch * batch.seq_len) as u64;
                let labels: Vec<usize> = chunk.iter().map(|&i| data[i].label).collect();
                let outcome = step.run(
                    &batch,
                    &labels,
                    &mut params,
                    &mut opt,
                    &mask_refs,
                    &mut rng,
                    &mut NoHook,
                    None,
                )?;
                if let StepOutcome::Diverged(why) = outcome {
                    bail!(
                        "sparse.prune: client {k}'s mask epoch {} diverged ({why}); lower federation.lr",
                        epoch + 1
                    );
                }
            }
            let after = effective_weights(&params, &local, scale);
            let epoch_scores = before
                .iter()
                .zip(&after)
                .map(|(b, a)| delta_scores(&(a - b).view(), lr))
                .collect();
            scores.add_epoch(epoch_scores)?;
        }
        Ok(MaskEpochs {
            scores: scores.scores().to_vec(),
            local,
            tokens,
            trained: params,
        })
    }

    /// Client k's local work in round t (1-based) on `data`: download `global`,
    /// (re)score if due, train on its curriculum subset with the sparse mask, upload.
    pub fn train(
        &self,
        k: usize,
        t: usize,
        data: &[Sample],
        mut state: ClientState,
        global: &Tensors,
        gal: &[usize],
    ) -> Result<Outcome> {
        // On the untouched initial state, before the global tensors are laid over.
        let mut tokens = self.prepare_pending(k, data, &mut state, gal)?;
        overlay(&mut state.params, global)?;
        tokens += self.rescore_if_due(k, t, data, &mut state)?;
        let plan = self.plan(t, data.len(), &state, gal)?;
        let mask_refs: Vec<Option<&[bool]>> = plan.masks.iter().map(|m| m.as_deref()).collect();
        let anchor = plan.prox.map(|prox| ProxAnchor {
            prox,
            names: &plan.names,
            global,
            shared: &plan.shared,
        });
        let step = self.step();
        let collect_fisher = state.momentum.is_some();
        let mut fresh: DiagFisher<SiteId> = DiagFisher::new();
        let mut rng =
            ChaCha8Rng::seed_from_u64(mix(self.config.seed, CLIENT_DOMAIN, t as u64, k as u64));
        let (mut loss_sum, mut seen) = (0.0f64, 0usize);
        let mut subset = plan.subset;
        let mut no_hook = NoHook;
        let curriculum_batches = plan.batches.as_ref().map(Vec::len);
        let batch_size = self.config.federation.batch_size;
        for _ in 0..self.config.federation.local_epochs {
            let bucketed: Vec<Vec<usize>>;
            let shuffled: Vec<&[usize]> = if self.config.federation.length_buckets {
                // The same samples as without buckets (a batch curriculum's picked
                // batches, pooled), regrouped by length and the batches shuffled.
                subset.shuffle(&mut rng);
                let mut batches = length_batches(data, &subset, batch_size);
                batches.shuffle(&mut rng);
                bucketed = batches;
                bucketed.iter().map(Vec::as_slice).collect()
            } else if let Some(batches) = &plan.batches {
                batches.iter().map(Vec::as_slice).collect()
            } else {
                subset.shuffle(&mut rng);
                subset.chunks(batch_size).collect()
            };
            for chunk in shuffled {
                let batch = batch_of(data, chunk, self.model.pad_token_id())?;
                tokens += (batch.batch * batch.seq_len) as u64;
                let labels: Vec<usize> = chunk.iter().map(|&i| data[i].label).collect();
                let mut fisher_hook = collect_fisher.then(|| FisherHook {
                    backend: cpu_backend(),
                    stats: vec![SampleStats::zeros(self.layers()); chunk.len()],
                    diag: &mut fresh,
                    skip_layers: gal,
                    error: None,
                });
                let hook: &mut dyn SiteHook<f32> = match fisher_hook.as_mut() {
                    Some(h) => h,
                    None => &mut no_hook,
                };
                let ClientState { params, opt, .. } = &mut state;
                let outcome = step.run(
                    &batch,
                    &labels,
                    params,
                    opt,
                    &mask_refs,
                    &mut rng,
                    hook,
                    anchor.as_ref(),
                )?;
                if let Some(e) = fisher_hook.and_then(|h| h.error) {
                    return Err(e);
                }
                match outcome {
                    StepOutcome::Diverged(why) => {
                        return Ok(Outcome::Diverged(format!("round {t}: {why}"), tokens));
                    }
                    StepOutcome::Stepped { loss_sum: l, .. } => {
                        if collect_fisher {
                            fresh.samples += chunk.len();
                        }
                        loss_sum += l;
                        seen += chunk.len();
                    }
                }
            }
        }
        let outcome = Self::finish(t, state, &fresh, &plan.shared, loss_sum, seen, tokens)?;
        Ok(match outcome {
            Outcome::Trained(mut tr) => {
                tr.batches = curriculum_batches;
                Outcome::Trained(tr)
            }
            other @ Outcome::Diverged(..) => other,
        })
    }

    /// A rescoring pass when `curriculum.rescore_every` rounds have passed since the
    /// last; its padded tokens (0 when none was due).
    fn rescore_if_due(
        &self,
        k: usize,
        t: usize,
        data: &[Sample],
        state: &mut ClientState,
    ) -> Result<u64> {
        let every = self.config.curriculum.rescore_every;
        let due = every > 0
            && state
                .last_scored
                .is_some_and(|s| t.saturating_sub(s) >= every);
        Ok(if due {
            self.score(k, data, state, t, false)?.1
        } else {
            0
        })
    }

    /// The round's curriculum subset, keep-masks, FedProx term and tensor names.
    fn plan(&self, t: usize, n: usize, state: &ClientState, gal: &[usize]) -> Result<RoundPlan> {
        let fraction = self
            .curriculum
            .pacing
            .fraction(t - 1, self.config.federation.rounds);
        let count = sample_count(fraction, n);
        let (subset, batches) = match (&state.order, &state.batch_lens) {
            (Some(order), Some(lens)) => {
                let batches = BatchOrder::from_parts(order, lens)?
                    .batches_at(fraction)
                    .to_vec();
                (batches.concat(), Some(batches))
            }
            (Some(order), None) => (order[..count].to_vec(), None),
            (None, _) => ((0..n).collect(), None),
        };
        let prox = (self.config.client.prox_mu > 0.0)
            .then(|| FedProx::new(self.config.client.prox_mu))
            .transpose()?;
        Ok(RoundPlan {
            subset,
            batches,
            masks: self.masks(state, gal)?,
            prox,
            names: tensor_names(&state.params),
            shared: self.shared_names(gal),
        })
    }

    /// After the last step: the finite checks, the momentum refresh and the upload.
    fn finish(
        t: usize,
        mut state: ClientState,
        fresh: &DiagFisher<SiteId>,
        shared: &[String],
        loss_sum: f64,
        samples: usize,
        tokens: u64,
    ) -> Result<Outcome> {
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
            momentum.update(fresh)?;
        }
        let upload = (!shared.is_empty())
            .then(|| restrict(&state.params.to_named(), |n| shared.iter().any(|s| s == n)));
        Ok(Outcome::Trained(Box::new(Trained {
            state,
            upload,
            loss_sum,
            samples,
            tokens,
            batches: None,
        })))
    }

    /// Keep-masks in [`LoraParams::slices`] order: frozen factors never move; sites of
    /// the client's own layers keep the top-ρ units by Fisher momentum; the rest update
    /// densely, and so does the head unless it is frozen.
    fn masks(&self, state: &ClientState, gal: &[usize]) -> Result<Vec<Option<Vec<bool>>>> {
        let frozen = &self.config.lora.frozen;
        let freeze = |f: Factor| frozen.contains(&f);
        let mut out = Vec::new();
        for (i, (site, w)) in state.params.sites.iter().enumerate() {
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
            let m = mask.unwrap_or_else(|| SiteMask::dense(r, d_in, d_out));
            out.push(if freeze(Factor::A) {
                Some(vec![false; r * d_in])
            } else {
                Some(m.a.iter().copied().collect())
            });
            let mut b: Vec<bool> = if freeze(Factor::B) {
                vec![false; d_out * r]
            } else {
                m.b.iter().copied().collect()
            };
            // A pruned neuron's row of B (d_out × r, row-major) never moves.
            if let Some(neurons) = state.pruned.as_ref().and_then(|p| p.get(i)) {
                for &j in neurons {
                    if let Some(row) = b.get_mut(j * r..(j + 1) * r) {
                        row.fill(false);
                    }
                }
            }
            out.push(Some(b));
        }
        if matches!(self.config.sharing.head, HeadMode::Frozen | HeadMode::None) {
            let head = &state.params.head;
            out.push(Some(vec![false; head.weight.len()]));
            out.push(Some(vec![false; head.bias.len()]));
        } else {
            out.push(None);
            out.push(None);
        }
        Ok(out)
    }
}

pub(crate) fn factor_name(f: Factor) -> &'static str {
    match f {
        Factor::A => "lora_A",
        Factor::B => "lora_B",
    }
}

/// PEFT names in [`LoraParams::slices`] order.
pub(crate) fn tensor_names(p: &LoraParams<f32>) -> Vec<String> {
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
pub(crate) fn overlay(params: &mut LoraParams<f32>, tensors: &Tensors) -> Result<()> {
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

/// scale·B·A in f64 for each of `sites` (d_out × d_in): the site's effective weight.
fn effective_weights(
    params: &LoraParams<f32>,
    sites: &[SiteId],
    scale: f64,
) -> Vec<ndarray::Array2<f64>> {
    sites
        .iter()
        .filter_map(|s| params.sites.get(s))
        .map(|w| {
            let b = w.b.mapv(f64::from);
            let a = w.a.mapv(f64::from);
            b.dot(&a) * scale
        })
        .collect()
}

/// A seed for stream (a, b) of domain `domain`.
pub(crate) fn mix(seed: u64, domain: u64, a: u64, b: u64) -> u64 {
    // SplitMix64 finaliser over the combined words: distinct inputs give unrelated seeds.
    let mut z = seed
        ^ domain
        ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ b.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;
    use fibecfed_transformer::Encoded;
    use rand::Rng;

    /// The mask epochs against a recomputation: with one epoch the score of neuron j is
    /// mean_i (ΔW_eff[j,i]/lr)², ΔW_eff = scale·(B₁A₁ − B₀A₀) formed here from the
    /// initial and the trained adapters in f64; the pruned neurons are exactly the
    /// ⌈ratio·n⌉ lowest scores (brute force over all local neurons), and their rows of
    /// B are zero.
    #[test]
    fn the_mask_prunes_the_lowest_scores_of_the_mask_epochs() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../transformer/tests/fixtures/tiny-bert");
        let model = Classifier::Bert(fibecfed_transformer::BertModel::<f32>::load(&dir).unwrap());
        let config = RunConfig::parse(
            "method = \"t\"\n[federation]\nbatch_size = 4\nlr = 1e-2\n[lora]\nrank = 4\n[sparse]\nrho = 1.0\n[sparse.prune]\nratio = 0.1\nepochs = 1\n",
        )
        .unwrap();
        let registry = Registry::builtin();
        let curriculum = Curriculum {
            scorer: registry.scorer(&config.curriculum.scorer).unwrap(),
            ordering: registry.ordering(&config.curriculum.ordering).unwrap(),
            pacing: registry.pacing(&config.curriculum.pacing).unwrap(),
        };
        let lora = config.lora_config();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let template = crate::model::fresh_adapter(&model, &lora, 2, &mut rng).unwrap();
        let trainer = LocalTrainer {
            model: &model,
            config: &config,
            lora: &lora,
            curriculum: &curriculum,
            template: &template,
        };
        let data: Vec<Sample> = (0..18)
            .map(|_| {
                let len = rng.random_range(2..12);
                Sample {
                    encoded: Encoded {
                        ids: (0..len).map(|_| rng.random_range(1..60)).collect(),
                        type_ids: vec![0; len],
                    },
                    label: rng.random_range(0..2),
                }
            })
            .collect();
        let gal = [0usize];
        let (mut state, _, _) = trainer.first_state(0, &data, false, false).unwrap();
        let prune = config.sparse.prune.unwrap();
        let epochs = trainer.mask_epochs(0, &data, &state, &gal, prune).unwrap();
        assert_eq!(epochs.local.len(), 2, "query and value of layer 1");
        let scale = f64::from(lora.scale());
        let lr = config.federation.lr;
        for (site, scores) in epochs.local.iter().zip(&epochs.scores) {
            let (w0, w1) = (&template.sites[site], &epochs.trained.sites[site]);
            let (d_out, d_in) = (w0.b.nrows(), w0.a.ncols());
            assert_eq!(scores.len(), d_out);
            for (j, &got) in scores.iter().enumerate() {
                let mut want = 0.0f64;
                for i in 0..d_in {
                    let mut delta = 0.0f64;
                    for r in 0..w0.a.nrows() {
                        delta += f64::from(w1.b[[j, r]]) * f64::from(w1.a[[r, i]])
                            - f64::from(w0.b[[j, r]]) * f64::from(w0.a[[r, i]]);
                    }
                    want += (scale * delta / lr).powi(2);
                }
                want /= d_in as f64;
                assert!(
                    (got - want).abs() <= 1e-9 * want.max(1e-12),
                    "{site} {j}: {got} vs {want}"
                );
            }
        }
        trainer.prune(0, &data, &mut state, &gal).unwrap();
        let pruned = state.pruned.clone().unwrap();
        let mut all: Vec<(f64, usize, usize)> = Vec::new();
        for (s, scores) in epochs.scores.iter().enumerate() {
            for (j, &v) in scores.iter().enumerate() {
                all.push((v, s, j));
            }
        }
        let k = (0.1 * all.len() as f64).ceil() as usize;
        let count: usize = pruned.iter().map(Vec::len).sum();
        assert_eq!(count, k);
        // Every pruned score is at most every kept score.
        let is_pruned = |s: usize, j: usize| pruned[2 + s].contains(&j);
        let worst_pruned = all
            .iter()
            .filter(|a| is_pruned(a.1, a.2))
            .map(|a| a.0)
            .fold(f64::MIN, f64::max);
        let best_kept = all
            .iter()
            .filter(|a| !is_pruned(a.1, a.2))
            .map(|a| a.0)
            .fold(f64::MAX, f64::min);
        assert!(worst_pruned <= best_kept, "{worst_pruned} > {best_kept}");
        assert!(
            pruned[0].is_empty() && pruned[1].is_empty(),
            "layer 0 is global"
        );
        for (i, (site, w)) in state.params.sites.iter().enumerate() {
            for &j in &pruned[i] {
                assert!(w.b.row(j).iter().all(|&v| v == 0.0), "{site} row {j}");
            }
        }
        // The mask epochs' training is discarded: the state is the initial adapter but
        // for the zeroed rows.
        for (site, w) in &state.params.sites {
            assert_eq!(w.a, template.sites[site].a);
        }
    }
}
