//! One optimiser step on one batch, shared by a federated client's round
//! ([`crate::local`]) and centralised training ([`crate::train`]): forward, loss,
//! backward through an optional per-site hook, the FedProx term, the finite checks and
//! the (masked) AdamW step.

use anyhow::Result;
use fibecfed_aggregation::{FedProx, Tensors};
use fibecfed_lora::{AdamW, LoraParams};
use fibecfed_transformer::{
    Adapter, Batch, BertModel, Dropout, Reduction, SiteHook, cross_entropy,
};
use ndarray::Array1;
use rand_chacha::ChaCha8Rng;

/// The model and the LoRA settings every step of a run shares.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Step<'a> {
    pub model: &'a BertModel<f32>,
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
        if fwd.logits.iter().any(|v| !v.is_finite()) {
            return Ok(StepOutcome::Diverged("the logits are not finite".into()));
        }
        let (losses, dlogits) = cross_entropy(&fwd.logits, labels, self.reduction)?;
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
