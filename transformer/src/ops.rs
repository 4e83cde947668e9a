//! Row-wise kernels of the encoder: LayerNorm, activations, masked softmax, and their
//! backward passes. Everything here is elementwise or per row; the matrix products
//! live in `encoder.rs` and go to BLAS.

use fibecfed_lora::Real;
use ndarray::{Array1, Array2, ArrayView2, Axis, Zip};

use crate::config::Activation;
use crate::weights::LayerNorm;

/// What LayerNorm's backward needs: the normalised input and 1/σ per row.
#[derive(Debug, Clone)]
pub(crate) struct NormCache<F> {
    pub xhat: Array2<F>,
    pub rstd: Array1<F>,
}

/// LayerNorm over the last axis, in place; returns the cache when `record`.
pub(crate) fn layer_norm<F: Real>(
    mut x: Array2<F>,
    ln: &LayerNorm<F>,
    record: bool,
) -> (Array2<F>, Option<NormCache<F>>) {
    let d = F::from_f64(x.ncols() as f64);
    let mut rstd = Array1::zeros(x.nrows());
    for (mut row, r) in x.axis_iter_mut(Axis(0)).zip(rstd.iter_mut()) {
        let mean = row.iter().copied().sum::<F>() / d;
        // Two passes: the one-pass E[x²]−E[x]² loses digits when |mean| ≫ σ.
        let var = row.iter().map(|&v| (v - mean) * (v - mean)).sum::<F>() / d;
        let s = F::one() / (var + ln.eps).sqrt();
        row.mapv_inplace(|v| (v - mean) * s);
        *r = s;
    }
    let cache = record.then(|| NormCache {
        xhat: x.clone(),
        rstd,
    });
    Zip::from(x.rows_mut()).for_each(|mut row| {
        Zip::from(&mut row)
            .and(&ln.gamma)
            .and(&ln.beta)
            .for_each(|v, &g, &b| *v = *v * g + b);
    });
    (x, cache)
}

/// dx = σ⁻¹ · (dx̂ − mean(dx̂) − x̂ · mean(dx̂ ⊙ x̂)), dx̂ = dy ⊙ γ.
pub(crate) fn layer_norm_backward<F: Real>(
    dy: &Array2<F>,
    ln: &LayerNorm<F>,
    cache: &NormCache<F>,
) -> Array2<F> {
    let d = F::from_f64(dy.ncols() as f64);
    let mut dx = dy * &ln.gamma;
    Zip::from(dx.rows_mut())
        .and(cache.xhat.rows())
        .and(&cache.rstd)
        .for_each(|mut g, xh, &s| {
            let m1 = g.iter().copied().sum::<F>() / d;
            let m2 = g.iter().zip(xh.iter()).map(|(&a, &b)| a * b).sum::<F>() / d;
            Zip::from(&mut g)
                .and(&xh)
                .for_each(|v, &x| *v = s * (*v - m1 - x * m2));
        });
    dx
}

/// Applies the activation in place; with `record`, returns f'(x) for the backward.
pub(crate) fn activate<F: Real>(
    x: &mut Array2<F>,
    act: Activation,
    record: bool,
) -> Option<Array2<F>> {
    let half = F::from_f64(0.5);
    let mut grad = record.then(|| Array2::zeros(x.raw_dim()));
    match act {
        Activation::Gelu => {
            let inv_sqrt2 = F::from_f64(std::f64::consts::FRAC_1_SQRT_2);
            let inv_sqrt_2pi = F::from_f64(1.0 / (2.0 * std::f64::consts::PI).sqrt());
            let f = |v: F| {
                let cdf = half * (F::one() + (v * inv_sqrt2).erf());
                (v * cdf, cdf + v * inv_sqrt_2pi * (-half * v * v).fast_exp())
            };
            apply(x, grad.as_mut(), f);
        }
        Activation::GeluTanh => {
            let c = F::from_f64((2.0 / std::f64::consts::PI).sqrt());
            let k = F::from_f64(0.044_715);
            let three = F::from_f64(3.0);
            let f = |v: F| {
                let t = (c * (v + k * v * v * v)).tanh();
                let y = half * v * (F::one() + t);
                let dy = half * (F::one() + t)
                    + half * v * (F::one() - t * t) * c * (F::one() + three * k * v * v);
                (y, dy)
            };
            apply(x, grad.as_mut(), f);
        }
        Activation::Relu => {
            let f = |v: F| {
                if v > F::zero() {
                    (v, F::one())
                } else {
                    (F::zero(), F::zero())
                }
            };
            apply(x, grad.as_mut(), f);
        }
    }
    grad
}

fn apply<F: Real>(x: &mut Array2<F>, grad: Option<&mut Array2<F>>, f: impl Fn(F) -> (F, F)) {
    match grad {
        Some(g) => Zip::from(x).and(g).for_each(|v, d| {
            let (y, dy) = f(*v);
            *v = y;
            *d = dy;
        }),
        None => x.mapv_inplace(|v| f(v).0),
    }
}

/// Softmax of each row over the unmasked columns; masked columns get exactly 0, as
/// adding finfo.min before softmax does in PyTorch.
pub(crate) fn masked_softmax_rows<F: Real>(s: &mut Array2<F>, key_mask: &[bool]) {
    for mut row in s.rows_mut() {
        let mut max = F::neg_infinity();
        for (v, &m) in row.iter().zip(key_mask) {
            if m && *v > max {
                max = *v;
            }
        }
        let mut sum = F::zero();
        for (v, &m) in row.iter_mut().zip(key_mask) {
            *v = if m { (*v - max).fast_exp() } else { F::zero() };
            sum += *v;
        }
        let inv = F::one() / sum;
        row.mapv_inplace(|v| v * inv);
    }
}

/// dS = P ⊙ (dP − rowsum(P ⊙ dP)), in place on dP, times `scale`.
pub(crate) fn softmax_backward_rows<F: Real>(dp: &mut Array2<F>, p: &ArrayView2<F>, scale: F) {
    Zip::from(dp.rows_mut())
        .and(p.rows())
        .for_each(|mut d, pr| {
            let dot = d.iter().zip(pr.iter()).map(|(&a, &b)| a * b).sum::<F>();
            Zip::from(&mut d)
                .and(&pr)
                .for_each(|g, &pv| *g = pv * (*g - dot) * scale);
        });
}
