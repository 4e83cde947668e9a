//! One client's round, in one place: what a FibecFed client (or any baseline's) does
//! with its own data between downloading the global tensors and uploading its share.
//!
//! [`LocalTrainer`] scores the client's data (curriculum order, Fisher-momentum seed,
//! layer importance), picks the round's curriculum subset, trains on it in batches with
//! the sparse keep-masks of its own layers and the FedProx term ([`crate::step`]),
//! refuses non-finite results, refreshes the Fisher momentum, and cuts out what it
//! uploads. It reads only the config, the model and the client's own data; the engine
//! decides who trains when and what happens to the uploads.

use anyhow::{Result, anyhow, bail};
use fibecfed_aggregation::{FedProx, Tensors, restrict};
use fibecfed_curriculum::{Ordering, Pacing, sample_count};
use fibecfed_data::{Sample, batch_of, padded_tokens};
use fibecfed_fisher::{
    DiagFisher, DifficultyScorer, FisherMomentum, LabelMode, SampleStats, SiteMask, scores,
    site_mask,
};
use fibecfed_lora::params::{PEFT_HEAD_BIAS, PEFT_HEAD_WEIGHT, peft_site_name};
use fibecfed_lora::{AdamW, AdamWConfig, LoraConfig, LoraParams, SiteId};
use fibecfed_transformer::{Adapter, BertModel, NoHook, Reduction, SiteHook};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;

use crate::config::{Factor, HeadMode, ImportanceKind, RunConfig};
use crate::fisher::{FisherHook, FisherOptions, cpu_backend, fisher_pass, perturbation_importance};
use crate::state::ClientState;
use crate::step::{ProxAnchor, Step, StepOutcome};

/// Seeds of the independent random streams of a client's work.
const CLIENT_DOMAIN: u64 = 0xC11E_4700_0000_0002;
const ORDER_DOMAIN: u64 = 0x0D0E_4000_0000_0003;
const SCORE_DOMAIN: u64 = 0x5C0E_0000_0000_0004;

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
    pub model: &'e BertModel<f32>,
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
}

/// How a client's round ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    Trained(Box<Trained>),
    /// Why, and the padded tokens it had processed until then (the round waited for it).
    Diverged(String, u64),
}

/// A client's round-0 state, the layer importance it reports (when asked) and the
/// padded tokens its scoring pass cost.
pub(crate) type FirstState = (ClientState, Option<Vec<f64>>, u64);

/// What a client trains with in round t, fixed before its first step.
struct RoundPlan {
    subset: Vec<usize>,
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
        self.model.config.num_hidden_layers
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

    /// A client's round-0 state on `data`: the initial adapter, a fresh optimiser, and
    /// the scoring pass when the config uses its results (with the layer importance
    /// when `importance`); also the importance and the pass's padded tokens.
    pub fn first_state(&self, k: usize, data: &[Sample], importance: bool) -> Result<FirstState> {
        let mut state = ClientState {
            params: self.template.clone(),
            opt: AdamW::new(self.adam(), self.template),
            momentum: None,
            order: None,
            last_scored: None,
        };
        let needs_pass = self.uses_curriculum() || self.uses_sparse() || importance;
        if !needs_pass || data.is_empty() {
            return Ok((state, None, 0));
        }
        let (report, tokens) = self.score(k, data, &mut state, 0, importance)?;
        Ok((state, report, tokens))
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
        let report = fisher_pass(self.model, adapter, samples, options, cpu_backend())?;
        let pass_tokens = padded_tokens(samples, options.batch_size);
        let mut tokens = pass_tokens;
        if self.uses_curriculum() {
            let s = scores(self.curriculum.scorer.as_ref(), &report.samples)?;
            let seed = mix(self.config.seed, ORDER_DOMAIN, round as u64, k as u64);
            state.order = Some(self.curriculum.ordering.order(&s, seed)?);
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
        overlay(&mut state.params, global)?;
        let mut tokens = self.rescore_if_due(k, t, data, &mut state)?;
        let plan = self.plan(t, data.len(), &state, gal)?;
        let mask_refs: Vec<Option<&[bool]>> = plan.masks.iter().map(|m| m.as_deref()).collect();
        let anchor = plan.prox.map(|prox| ProxAnchor {
            prox,
            names: &plan.names,
            global,
            shared: &plan.shared,
        });
        let step = Step {
            model: self.model,
            scale: self.lora.scale(),
            dropout: self.lora.dropout,
            reduction: Reduction::Sum,
            max_grad_norm: self.config.federation.max_grad_norm,
        };
        let collect_fisher = state.momentum.is_some();
        let mut fresh: DiagFisher<SiteId> = DiagFisher::new();
        let mut rng =
            ChaCha8Rng::seed_from_u64(mix(self.config.seed, CLIENT_DOMAIN, t as u64, k as u64));
        let (mut loss_sum, mut seen) = (0.0f64, 0usize);
        let mut subset = plan.subset;
        let mut no_hook = NoHook;
        for _ in 0..self.config.federation.local_epochs {
            subset.shuffle(&mut rng);
            for chunk in subset.chunks(self.config.federation.batch_size) {
                let batch = batch_of(data, chunk, self.model.config.pad_token_id)?;
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
        Self::finish(t, state, &fresh, &plan.shared, loss_sum, seen, tokens)
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
        let subset: Vec<usize> = match &state.order {
            Some(order) => order[..count].to_vec(),
            None => (0..n).collect(),
        };
        let prox = (self.config.client.prox_mu > 0.0)
            .then(|| FedProx::new(self.config.client.prox_mu))
            .transpose()?;
        Ok(RoundPlan {
            subset,
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
        })))
    }

    /// Keep-masks in [`LoraParams::slices`] order: frozen factors never move; sites of
    /// the client's own layers keep the top-ρ units by Fisher momentum; the rest update
    /// densely, and so does the head unless it is frozen.
    fn masks(&self, state: &ClientState, gal: &[usize]) -> Result<Vec<Option<Vec<bool>>>> {
        let frozen = &self.config.lora.frozen;
        let freeze = |f: Factor| frozen.contains(&f);
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
            let m = mask.unwrap_or_else(|| SiteMask::dense(r, d_in, d_out));
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
        if self.config.sharing.head == HeadMode::Frozen {
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
