//! FedProx (Li et al. 2020): the client adds (μ/2)‖w − w_global‖² to its loss so that
//! local training does not drift far from the global model.

use crate::AggregationError;

/// The proximal term over the shared tensors, applied by the client.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FedProx {
    /// Proximal strength μ ≥ 0; 0 is plain local training.
    pub mu: f32,
}

impl FedProx {
    pub fn new(mu: f32) -> Result<Self, AggregationError> {
        if !(mu.is_finite() && mu >= 0.0) {
            return Err(AggregationError::Config(format!(
                "FedProx `mu` is {mu}, expected a finite value >= 0"
            )));
        }
        Ok(Self { mu })
    }

    /// grad += μ (param − anchor), elementwise.
    pub fn add_gradient(
        &self,
        grad: &mut [f32],
        param: &[f32],
        anchor: &[f32],
    ) -> Result<(), AggregationError> {
        check_lengths(Some(grad.len()), param, anchor)?;
        // μ = 0 must leave grad bitwise alone (0·∞ would be NaN, and −0 + 0 is +0).
        if self.mu == 0.0 {
            return Ok(());
        }
        for ((g, &p), &a) in grad.iter_mut().zip(param).zip(anchor) {
            *g += self.mu * (p - a);
        }
        Ok(())
    }

    /// (μ/2) Σ (param − anchor)², accumulated in f64.
    pub fn penalty(&self, param: &[f32], anchor: &[f32]) -> Result<f64, AggregationError> {
        check_lengths(None, param, anchor)?;
        // As in `add_gradient`: μ = 0 is exactly no term, even against a non-finite anchor.
        if self.mu == 0.0 {
            return Ok(0.0);
        }
        let sq: f64 = param
            .iter()
            .zip(anchor)
            .map(|(&p, &a)| (f64::from(p) - f64::from(a)).powi(2))
            .sum();
        Ok(0.5 * f64::from(self.mu) * sq)
    }
}

fn check_lengths(
    grad: Option<usize>,
    param: &[f32],
    anchor: &[f32],
) -> Result<(), AggregationError> {
    let n = param.len();
    if anchor.len() != n || grad.is_some_and(|g| g != n) {
        let grad = grad.map_or(String::new(), |g| format!("grad has {g} values, "));
        return Err(AggregationError::Length(format!(
            "FedProx: {grad}param has {n}, anchor (global) has {}",
            anchor.len()
        )));
    }
    Ok(())
}
