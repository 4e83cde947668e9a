//! AdamW with PyTorch's semantics (decoupled weight decay, bias-corrected moments).

use fibecfed_core::Real;

use crate::LoraError;
use crate::params::LoraParams;

/// Hyper-parameters; defaults are `torch.optim.AdamW`'s.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// Optimiser state for one [`LoraParams`]: first and second moments of the same shapes.
#[derive(Debug, Clone)]
pub struct AdamW<F> {
    pub config: AdamWConfig,
    m: LoraParams<F>,
    v: LoraParams<F>,
    step: u64,
}

impl<F: Real> AdamW<F> {
    pub fn new(config: AdamWConfig, params: &LoraParams<F>) -> Self {
        Self {
            config,
            m: params.zeros_like(),
            v: params.zeros_like(),
            step: 0,
        }
    }

    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// The moments and step count, for checkpoints: [`AdamW::from_state`] continues
    /// bit-exactly from them.
    pub fn state(&self) -> (&LoraParams<F>, &LoraParams<F>, u64) {
        (&self.m, &self.v, self.step)
    }

    /// Rebuilds an optimiser from [`AdamW::state`]'s parts; the moments must have the
    /// same tensors and shapes.
    pub fn from_state(
        config: AdamWConfig,
        m: LoraParams<F>,
        v: LoraParams<F>,
        step: u64,
    ) -> Result<Self, LoraError> {
        let lens = |p: &LoraParams<F>| p.slices().iter().map(|s| s.len()).collect::<Vec<_>>();
        if lens(&m) != lens(&v) {
            return Err(LoraError::Config(
                "AdamW state: first and second moments have different sizes".into(),
            ));
        }
        Ok(Self { config, m, v, step })
    }

    /// One update, as `torch.optim.AdamW.step()` (non-foreach path) computes it:
    /// p ← p·(1 − lr·wd); p ← p − (lr / bc1) · m / (√v / √bc2 + eps).
    /// Parameters, gradients and the moments must have the same tensors and shapes
    /// (the parameters this optimiser was made for); anything else is an error.
    pub fn step(
        &mut self,
        params: &mut LoraParams<F>,
        grads: &LoraParams<F>,
    ) -> Result<(), LoraError> {
        self.step_masked(params, grads, &[])
    }

    /// [`AdamW::step`] restricted to the entries a mask keeps: `masks[i]`, when present
    /// and `Some`, is a keep-flag per entry of tensor i in [`LoraParams::slices`] order.
    /// Frozen entries keep their value and their moments (FibecFed's sparse update and
    /// FFA-LoRA's frozen A); missing or `None` masks update densely. The step count
    /// (bias correction) advances once per call, as it does for a frozen torch
    /// parameter group sharing the optimiser.
    pub fn step_masked(
        &mut self,
        params: &mut LoraParams<F>,
        grads: &LoraParams<F>,
        masks: &[Option<&[bool]>],
    ) -> Result<(), LoraError> {
        let lens = |p: &LoraParams<F>| p.slices().iter().map(|s| s.len()).collect::<Vec<_>>();
        let (lp, lg, lm) = (lens(params), lens(grads), lens(&self.m));
        if lp != lg || lp != lm {
            return Err(LoraError::Config(format!(
                "AdamW step: parameter sizes {lp:?}, gradient sizes {lg:?} and optimiser state {lm:?} differ"
            )));
        }
        if masks.len() > lp.len() {
            return Err(LoraError::Config(format!(
                "AdamW step: {} masks for {} tensors",
                masks.len(),
                lp.len()
            )));
        }
        for (i, (mask, &len)) in masks.iter().zip(&lp).enumerate() {
            if let Some(mask) = mask
                && mask.len() != len
            {
                return Err(LoraError::Config(format!(
                    "AdamW step: mask of tensor {i} has {} entries, the tensor {len}",
                    mask.len()
                )));
            }
        }
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        let decay = F::from_f64(1.0 - c.lr * c.weight_decay);
        let step_size = F::from_f64(c.lr / bc1);
        let (b1, b2) = (F::from_f64(c.beta1), F::from_f64(c.beta2));
        let (one_b1, one_b2) = (F::from_f64(1.0 - c.beta1), F::from_f64(1.0 - c.beta2));
        let (bc2_sqrt, eps) = (F::from_f64(bc2_sqrt), F::from_f64(c.eps));
        let mut ms = self.m.slices_mut();
        let mut vs = self.v.slices_mut();
        let gs = grads.slices();
        for (t, (((p, g), m), v)) in params
            .slices_mut()
            .into_iter()
            .zip(gs)
            .zip(ms.iter_mut())
            .zip(vs.iter_mut())
            .enumerate()
        {
            let mask = masks.get(t).copied().flatten();
            for i in 0..p.len() {
                if mask.is_some_and(|k| !k[i]) {
                    continue;
                }
                let gi = g[i];
                m[i] = b1 * m[i] + one_b1 * gi;
                v[i] = b2 * v[i] + one_b2 * gi * gi;
                let denom = v[i].sqrt() / bc2_sqrt + eps;
                p[i] = p[i] * decay - step_size * m[i] / denom;
            }
        }
        Ok(())
    }
}
