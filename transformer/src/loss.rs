//! Softmax cross-entropy with natural log, as `torch.nn.functional.cross_entropy`.

use fibecfed_core::Real;
use ndarray::{Array1, Array2, Axis};

use crate::ModelError;

/// How per-sample losses combine; `Sum` gives per-sample gradients in `dlogits`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduction {
    Mean,
    Sum,
}

/// Per-sample losses ℓ_i (in f64) and ∂L/∂logits for the chosen reduction.
/// A label outside 0..C or a non-finite logit is an error naming the sample.
pub fn cross_entropy<F: Real>(
    logits: &Array2<F>,
    labels: &[usize],
    reduction: Reduction,
) -> Result<(Array1<f64>, Array2<F>), ModelError> {
    let (n, c) = logits.dim();
    if labels.len() != n {
        return Err(ModelError::Input(format!(
            "{} labels for {n} logits rows",
            labels.len()
        )));
    }
    let mut losses = Array1::zeros(n);
    let mut d = Array2::zeros((n, c));
    let w = match reduction {
        Reduction::Mean => 1.0 / n.max(1) as f64,
        Reduction::Sum => 1.0,
    };
    for (i, (row, mut drow)) in logits
        .axis_iter(Axis(0))
        .zip(d.axis_iter_mut(Axis(0)))
        .enumerate()
    {
        let y = labels[i];
        if y >= c {
            return Err(ModelError::Input(format!(
                "sample {i}: label {y} but the head has {c} classes"
            )));
        }
        if row.iter().any(|v| !v.is_finite()) {
            return Err(ModelError::NonFinite(format!(
                "sample {i}: logits {row} are not finite"
            )));
        }
        let max = row.iter().fold(f64::NEG_INFINITY, |m, v| m.max(v.as_f64()));
        let sum: f64 = row.iter().map(|v| (v.as_f64() - max).exp()).sum();
        let lse = max + sum.ln();
        losses[i] = lse - row[y].as_f64();
        for (j, (v, dv)) in row.iter().zip(drow.iter_mut()).enumerate() {
            let p = (v.as_f64() - lse).exp();
            *dv = F::from_f64(w * (p - if j == y { 1.0 } else { 0.0 }));
        }
    }
    Ok((losses, d))
}
