//! One optimiser step on one batch, shared by a federated client's round
//! ([`crate::local`]) and centralised training ([`crate::train`]): forward, loss,
//! backward through an optional per-site hook, the FedProx term, the finite checks and
//! the (masked) AdamW step.

use anyhow::Result;
use fibecfed_aggregation::{FedProx, Tensors};
use fibecfed_lora::{AdamW, LoraParams};
use fibecfed_transformer::{
    Adapter, Batch, Classifier, Dropout, Reduction, SiteHook, cross_entropy,
};
use ndarray::Array1;
use rand_chacha::ChaCha8Rng;

/// The model and the LoRA settings every step of a run shares.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Step<'a> {
    pub model: &'a Classifier<f32>,
    /// LoRA's α/r.
    pub scale: f32,
    /// LoRA dropout probability.
    pub dropout: f32,
    /// How the batch's loss is reduced. `Mean`: the gradient of the mean loss comes
    /// straight out of backward (centralised training). `Sum`: backward sees the
    /// summed loss, so that each sample's rows of δ are its own gradient (what the
    /// Fisher hook needs), and the gradient is scaled by 1/B afterwards. The two round
    /// differently, and each caller keeps the one its results were made with.
    pub reduction: Reduction,
    /// Clip the gradient to this global L2 norm before the optimiser step (torch's
    /// `clip_grad_norm_`); `None` leaves it as it is.
    pub max_grad_norm: Option<f64>,
}

/// Scales `grads` so that their global L2 norm, over the entries that train (those
/// `masks` keep; every entry where a mask is absent), is at most `max_norm`, as torch's
/// `clip_grad_norm_` does: the norm is taken in f64, and the factor is
/// `max_norm / (norm + 1e-6)`, applied only when below 1. Returns the norm before.
pub(crate) fn clip_grad_norm(
    grads: &mut LoraParams<f32>,
    masks: &[Option<&[bool]>],
    max_norm: f64,
) -> f64 {
    let mut sq = 0.0f64;
    for (i, g) in grads.slices().into_iter().enumerate() {
        match masks.get(i).copied().flatten() {
            Some(keep) => {
                for (v, k) in g.iter().zip(keep) {
                    if *k {
                        sq += f64::from(*v) * f64::from(*v);
                    }
                }
            }
            None => sq += g.iter().map(|v| f64::from(*v) * f64::from(*v)).sum::<f64>(),
        }
    }
    let norm = sq.sqrt();
    let factor = max_norm / (norm + 1e-6);
    if factor < 1.0 {
        // Frozen entries are scaled too; the optimiser never reads them.
        let factor = factor as f32;
        for s in grads.slices_mut() {
            for v in s.iter_mut() {
                *v *= factor;
            }
        }
    }
    norm
}

/// The FedProx pull of the shared tensors towards the round's global model.
#[derive(Debug)]
pub(crate) struct ProxAnchor<'a> {
    pub prox: FedProx,
    /// PEFT names in [`LoraParams::slices`] order.
    pub names: &'a [String],
    pub global: &'a Tensors,
    /// The tensors that travel: only they are anchored.
    pub shared: &'a [String],
}

/// What a step did.
#[derive(Debug)]
pub(crate) enum StepOutcome {
    /// The parameters moved; per-sample losses and their sum (in sample order).
    Stepped { losses: Array1<f64>, loss_sum: f64 },
    /// Nothing moved: why the step was refused (a non-finite logit, loss or gradient).
    Diverged(String),
}

impl Step<'_> {
    /// One step on `batch`: `params` and `opt` move unless the outcome is `Diverged`.
    /// `masks` are AdamW's keep-masks ([`AdamW::step_masked`]); empty is dense.
    pub fn run(
        &self,
        batch: &Batch,
        labels: &[usize],
        params: &mut LoraParams<f32>,
        opt: &mut AdamW<f32>,
        masks: &[Option<&[bool]>],
        rng: &mut ChaCha8Rng,
        hook: &mut dyn SiteHook<f32>,
        prox: Option<&ProxAnchor<'_>>,
    ) -> Result<StepOutcome> {
        let adapter = Adapter {
            params,
            scale: self.scale,
        };
        let dropout = Some(Dropout {
            p: self.dropout,
            rng,
        });
        let fwd = self.model.forward(batch, adapter, dropout)?;
        if fwd.logits().iter().any(|v| !v.is_finite()) {
            return Ok(StepOutcome::Diverged("the logits are not finite".into()));
        }
        let (losses, dlogits) = cross_entropy(fwd.logits(), labels, self.reduction)?;
        let loss_sum: f64 = losses.iter().sum();
        if !loss_sum.is_finite() {
            return Ok(StepOutcome::Diverged(format!(
                "the training loss is {loss_sum}"
            )));
        }
        let mut grads = self.model.backward(batch, adapter, &fwd, &dlogits, hook)?;
        if self.reduction == Reduction::Sum {
            let inv = 1.0 / labels.len() as f32;
            for s in grads.slices_mut() {
                for g in s.iter_mut() {
                    *g *= inv;
                }
            }
        }
        if let Some(anchor) = prox {
            anchor.add_to(&mut grads, params)?;
        }
        if grads
            .slices()
            .iter()
            .any(|s| s.iter().any(|v| !v.is_finite()))
        {
            return Ok(StepOutcome::Diverged("a gradient is not finite".into()));
        }
        if let Some(max_norm) = self.max_grad_norm {
            clip_grad_norm(&mut grads, masks, max_norm);
        }
        opt.step_masked(params, &grads, masks)?;
        Ok(StepOutcome::Stepped { losses, loss_sum })
    }
}

impl ProxAnchor<'_> {
    /// grads += μ·(params − global) on the shared tensors.
    fn add_to(&self, grads: &mut LoraParams<f32>, params: &LoraParams<f32>) -> Result<()> {
        let values = params.slices();
        for ((g, p), name) in grads.slices_mut().into_iter().zip(values).zip(self.names) {
            if let Some(anchor) = self.global.get(name).filter(|_| self.shared.contains(name))
                && let Some(a) = anchor.as_slice()
            {
                self.prox.add_gradient(g, p, a)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn params(values: &[Vec<f32>]) -> LoraParams<f32> {
        let mut rng = <ChaCha8Rng as rand::SeedableRng>::seed_from_u64(1);
        let lora = fibecfed_lora::LoraConfig::new(2, 4.0, &["query"]);
        let sites = lora.resolve_sites(1).unwrap();
        let shapes: Vec<fibecfed_lora::SiteShape> = sites
            .iter()
            .map(|&site| fibecfed_lora::SiteShape {
                site,
                d_in: 3,
                d_out: 3,
            })
            .collect();
        let mut p = LoraParams::init(&lora, &shapes, 3, 2, &mut rng);
        for (s, v) in p.slices_mut().into_iter().zip(values) {
            s.copy_from_slice(v);
        }
        p
    }

    proptest! {
        /// Against a direct f64 computation: the norm over kept entries, the factor
        /// max/(norm+1e-6) when below 1, every entry scaled alike.
        #[test]
        fn clipping_matches_an_f64_recomputation(
            a in prop::collection::vec(-10.0f32..10.0, 6),
            b in prop::collection::vec(-10.0f32..10.0, 6),
            w in prop::collection::vec(-10.0f32..10.0, 6),
            bias in prop::collection::vec(-10.0f32..10.0, 2),
            keep in prop::collection::vec(any::<bool>(), 6),
            max_norm in 0.01f64..100.0,
        ) {
            let values = vec![a, b, w, bias];
            let mut g = params(&values);
            let masks: Vec<Option<&[bool]>> = vec![Some(&keep), None, None, None];
            let norm = clip_grad_norm(&mut g, &masks, max_norm);
            let mut sq = 0.0f64;
            for (i, v) in values.iter().enumerate() {
                for (j, x) in v.iter().enumerate() {
                    if i != 0 || keep[j] {
                        sq += f64::from(*x).powi(2);
                    }
                }
            }
            let expected = sq.sqrt();
            prop_assert!((norm - expected).abs() <= 1e-12 * expected.max(1.0));
            let factor = (max_norm / (expected + 1e-6)).min(1.0);
            for (got, want) in g.slices().iter().zip(&values) {
                for (x, y) in got.iter().zip(want) {
                    let r = f64::from(*y) * factor;
                    prop_assert!((f64::from(*x) - r).abs() <= 1e-6 * r.abs().max(1e-6), "{} vs {}", x, r);
                }
            }
        }
    }

    #[test]
    fn a_norm_below_the_limit_leaves_the_gradient_bitwise_alone() {
        let values = vec![vec![0.1f32; 6], vec![-0.2; 6], vec![0.3; 6], vec![0.0; 2]];
        let mut g = params(&values);
        clip_grad_norm(&mut g, &[], 100.0);
        for (got, want) in g.slices().iter().zip(&values) {
            assert_eq!(got.to_vec(), *want);
        }
    }
}
