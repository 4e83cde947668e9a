//! Row-wise kernels of the encoder: LayerNorm, activations, masked softmax, and their
//! backward passes. Everything here is elementwise or per row; the matrix products
//! live in `encoder.rs` and go to BLAS.

use fibecfed_core::{Real, simd};
use ndarray::parallel::prelude::*;
use ndarray::{Array1, Array2, ArrayView2, Zip};
use rayon::prelude::*;

use crate::config::Activation;
use crate::weights::LayerNorm;

/// What LayerNorm's backward needs: the normalised input and 1/σ per row.
#[derive(Debug, Clone)]
pub(crate) struct NormCache<F> {
    pub xhat: Array2<F>,
    pub rstd: Array1<F>,
}

/// LayerNorm over the last axis, in place, rows in parallel; returns the cache when
/// `record`.
pub(crate) fn layer_norm<F: Real>(
    mut x: Array2<F>,
    ln: &LayerNorm<F>,
    record: bool,
) -> (Array2<F>, Option<NormCache<F>>) {
    let d = F::from_f64(x.ncols() as f64);
    let mut rstd = Array1::zeros(x.nrows());
    Zip::from(x.rows_mut())
        .and(&mut rstd)
        .par_for_each(|mut row, r| {
            let mean = row.iter().copied().sum::<F>() / d;
            // Two passes: the one-pass E[x²]−E[x]² loses digits when |mean| ≫ σ.
            let var = row.iter().map(|&v| (v - mean) * (v - mean)).sum::<F>() / d;
            let s = F::one() / (var + ln.eps).sqrt();
            row.mapv_inplace(|v| (v - mean) * s);
            *r = s;
        });
    let cache = record.then(|| NormCache {
        xhat: x.clone(),
        rstd,
    });
    Zip::from(x.rows_mut()).par_for_each(|mut row| {
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
    let mut dx = Array2::zeros(dy.raw_dim());
    Zip::from(dx.rows_mut())
        .and(dy.rows())
        .and(cache.xhat.rows())
        .and(&cache.rstd)
        .par_for_each(|mut g, dyr, xh, &s| {
            Zip::from(&mut g)
                .and(&dyr)
                .and(&ln.gamma)
                .for_each(|o, &a, &b| *o = a * b);
            let m1 = g.iter().copied().sum::<F>() / d;
            let m2 = g.iter().zip(xh.iter()).map(|(&a, &b)| a * b).sum::<F>() / d;
            Zip::from(&mut g)
                .and(&xh)
                .for_each(|v, &x| *v = s * (*v - m1 - x * m2));
        });
    dx
}

/// a += b, in parallel.
pub(crate) fn add_assign<F: Real>(a: &mut Array2<F>, b: &Array2<F>) {
    Zip::from(a).and(b).par_for_each(|a, &b| *a += b);
}

/// a *= b, in parallel.
pub(crate) fn mul_assign<F: Real>(a: &mut Array2<F>, b: &Array2<F>) {
    Zip::from(a).and(b).par_for_each(|a, &b| *a *= b);
}

/// Applies the activation in place (in parallel); with `record`, returns f'(x) for
/// the backward.
pub(crate) fn activate<F: Real>(
    x: &mut Array2<F>,
    act: Activation,
    record: bool,
) -> Option<Array2<F>> {
    let half = F::from_f64(0.5);
    let mut grad = record.then(|| Array2::zeros(x.raw_dim()));
    match act {
        Activation::Gelu => apply(x, grad.as_mut(), Real::gelu_with_grad),
        Activation::GeluTanh => {
            let c = F::from_f64((2.0 / std::f64::consts::PI).sqrt());
            let k = F::from_f64(0.044_715);
            let three = F::from_f64(3.0);
            apply(x, grad.as_mut(), |v: F| {
                let t = (c * (v + k * v * v * v)).tanh();
                let y = half * v * (F::one() + t);
                let dy = half * (F::one() + t)
                    + half * v * (F::one() - t * t) * c * (F::one() + three * k * v * v);
                (y, dy)
            });
        }
        Activation::Relu => apply(x, grad.as_mut(), |v: F| {
            if v > F::zero() {
                (v, F::one())
            } else {
                (F::zero(), F::zero())
            }
        }),
    }
    grad
}

/// Elementwise (y, dy) = f(x) over contiguous chunks in parallel; chunks keep the
/// inner loop a plain slice loop the compiler vectorises.
fn apply<F: Real>(x: &mut Array2<F>, grad: Option<&mut Array2<F>>, f: impl Fn(F) -> (F, F) + Sync) {
    const CHUNK: usize = 8192;
    match grad {
        Some(g) => {
            if let (Some(xs), Some(gs)) = (x.as_slice_mut(), g.as_slice_mut()) {
                xs.par_chunks_mut(CHUNK)
                    .zip(gs.par_chunks_mut(CHUNK))
                    .for_each(|(xc, gc)| {
                        simd(|| {
                            for (v, d) in xc.iter_mut().zip(gc.iter_mut()) {
                                (*v, *d) = f(*v);
                            }
                        });
                    });
            } else {
                Zip::from(x).and(g).for_each(|v, d| (*v, *d) = f(*v));
            }
        }
        None => match x.as_slice_mut() {
            Some(xs) => xs.par_chunks_mut(CHUNK).for_each(|xc| {
                simd(|| {
                    for v in xc {
                        *v = f(*v).0;
                    }
                });
            }),
            None => Zip::from(x).par_for_each(|v| *v = f(*v).0),
        },
    }
}

/// Softmax of each row over the unmasked columns; masked columns get exactly 0, as
/// adding finfo.min before softmax does in PyTorch (exp of −∞ is 0 here too). The
/// loops are branch-free so they vectorise.
pub(crate) fn masked_softmax_rows<F: Real>(s: &mut Array2<F>, key_mask: &[bool]) {
    simd(|| masked_softmax_rows_inner(s, key_mask));
}

/// The causal form of [`masked_softmax_rows`] for a square block of one sequence: row
/// i's softmax runs over the keys j ≤ i that are not padding; later keys get exactly 0.
pub(crate) fn causal_softmax_rows<F: Real>(s: &mut Array2<F>, key_mask: &[bool]) {
    simd(|| {
        for (i, mut row) in s.rows_mut().into_iter().enumerate() {
            if let Some(r) = row.as_slice_mut() {
                let (seen, future) = r.split_at_mut((i + 1).min(r.len()));
                softmax_slice(seen, &key_mask[..seen.len()]);
                future.fill(F::zero());
            }
        }
    });
}

// Must inline into `simd`'s AVX2 instance to be compiled with its features.
#[allow(clippy::inline_always)]
#[inline(always)]
fn masked_softmax_rows_inner<F: Real>(s: &mut Array2<F>, key_mask: &[bool]) {
    let mut scratch = Vec::new();
    for mut row in s.rows_mut() {
        if let Some(r) = row.as_slice_mut() {
            softmax_slice(r, key_mask);
        } else {
            // Strided rows (not produced today) go through a contiguous copy.
            scratch.clear();
            scratch.extend(row.iter().copied());
            softmax_slice(&mut scratch, key_mask);
            row.iter_mut().zip(&scratch).for_each(|(d, &v)| *d = v);
        }
    }
}

#[allow(clippy::inline_always)]
#[inline(always)]
fn softmax_slice<F: Real>(r: &mut [F], key_mask: &[bool]) {
    let ninf = F::neg_infinity();
    for (v, &m) in r.iter_mut().zip(key_mask) {
        *v = if m { *v } else { ninf };
    }
    let max = lanes(r, ninf, |a, b| if b > a { b } else { a });
    for v in r.iter_mut() {
        *v = (*v - max).fast_exp();
    }
    let inv = F::one() / lanes(r, F::zero(), |a, b| a + b);
    for v in r.iter_mut() {
        *v *= inv;
    }
}

/// A reduction over 8 independent accumulators. Strict IEEE order forbids the
/// compiler from vectorising a plain `fold` (it may not reassociate), which made the
/// softmax 4× slower than its exp.
#[allow(clippy::inline_always)]
#[inline(always)]
fn lanes<F: Real>(r: &[F], init: F, f: impl Fn(F, F) -> F) -> F {
    const L: usize = 8;
    let mut acc = [init; L];
    let chunks = r.chunks_exact(L);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..L {
            acc[i] = f(acc[i], c[i]);
        }
    }
    let mut out = acc.iter().copied().fold(init, &f);
    for &v in rest {
        out = f(out, v);
    }
    out
}

/// dS = P ⊙ (dP − rowsum(P ⊙ dP)), in place on dP, times `scale`.
pub(crate) fn softmax_backward_rows<F: Real>(dp: &mut Array2<F>, p: &ArrayView2<F>, scale: F) {
    simd(|| {
        Zip::from(dp.rows_mut())
            .and(p.rows())
            .for_each(|mut d, pr| {
                if let (Some(ds), Some(ps)) = (d.as_slice_mut(), pr.as_slice()) {
                    let dot = dot_lanes(ds, ps);
                    for (g, &pv) in ds.iter_mut().zip(ps) {
                        *g = pv * (*g - dot) * scale;
                    }
                } else {
                    let dot = d.iter().zip(pr.iter()).map(|(&a, &b)| a * b).sum::<F>();
                    Zip::from(&mut d)
                        .and(&pr)
                        .for_each(|g, &pv| *g = pv * (*g - dot) * scale);
                }
            });
    });
}

/// Σ aᵢ·bᵢ over 8 independent accumulators (see [`lanes`]).
#[allow(clippy::inline_always)]
#[inline(always)]
fn dot_lanes<F: Real>(a: &[F], b: &[F]) -> F {
    const L: usize = 8;
    let mut acc = [F::zero(); L];
    let (ca, cb) = (a.chunks_exact(L), b.chunks_exact(L));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..L {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().copied().sum::<F>() + ra.iter().zip(rb).map(|(&x, &y)| x * y).sum::<F>()
}
