//! Diagonal empirical Fisher information for FibecFed: per-sample gradient squares of
//! LoRA sites and of the classification head, and their diagonal sums.
//!
//! Owns the arithmetic on arrays only: it knows nothing about transformers. A site is
//! described by its input rows x, output-gradient rows δ, token mask, factors A and B
//! and scale ([`SiteRows`]), which is exactly what `fibecfed-transformer`'s backward
//! hook hands out. Per sample i (rows t of that sequence), with u_t = A·x_t and
//! v_t = scale·Bᵀ·δ_t:
//!
//! ∂ℓ_i/∂A = Σ_t v_t x_tᵀ,   ∂ℓ_i/∂B = scale · Σ_t δ_t u_tᵀ.
//!
//! [`sq_norms`] gives ‖∂ℓ_i/∂A‖² and ‖∂ℓ_i/∂B‖² per sample, by the Gram ("ghost") form
//! Σ_{t,t'} (v_t·v_t')(x_t·x_t') when a sequence is short relative to the width, or by
//! forming one sample's gradient at a time otherwise ([`NormMethod::Auto`] picks by
//! cost); [`site_fisher`] also sums the squared gradients over samples (the diagonal
//! Fisher F_A, F_B) one sample at a time, never holding a (batch × r × d) tensor.
//!
//! Not built yet (issue "Fisher information and curriculum"): difficulty scores over a
//! whole adapter, layer importance, Fisher momentum, masks, the global-aggregation-layer
//! selection and the `fibecfed fisher` command.
//!
//! ```
//! use fibecfed_fisher::{NormMethod, SiteRows, sq_norms};
//! use ndarray::array;
//! // One sample of two tokens, d_in = 2, d_out = 1, r = 1.
//! let x = array![[1.0_f64, 0.0], [0.0, 1.0]];
//! let delta = array![[1.0_f64], [2.0]];
//! let mask = array![1.0_f64, 1.0];
//! let (a, b) = (array![[1.0_f64, 1.0]], array![[1.0_f64]]);
//! let rows = SiteRows { x: x.view(), delta: delta.view(), mask: mask.view(), batch: 1, seq_len: 2, a: a.view(), b: b.view(), scale: 1.0 };
//! let (sq_a, sq_b) = sq_norms(&rows, NormMethod::Auto).unwrap();
//! // ∂A = [1·(1,0) + 2·(0,1)] = (1, 2): ‖·‖² = 5. u = (1, 1): ∂B = 1·1 + 2·1 = 3: 9.
//! assert_eq!((sq_a[0], sq_b[0]), (5.0, 9.0));
//! ```

// ndarray's matrix products go to BLAS; this links the OpenBLAS provider.
extern crate blas_src;

use std::iter::Sum;

use ndarray::linalg::general_mat_mul;
use ndarray::{Array1, Array2, ArrayView1, ArrayView2, LinalgScalar, ScalarOperand, s};
use num_traits::Float;

/// The float types the Fisher arithmetic runs in (f32 in training, f64 in tests).
pub trait Scalar: Float + LinalgScalar + ScalarOperand + Sum + std::fmt::Debug + 'static {}
impl<T: Float + LinalgScalar + ScalarOperand + Sum + std::fmt::Debug + 'static> Scalar for T {}

/// One LoRA site's rows for a batch, as the encoder's backward hook sees them.
#[derive(Debug, Clone, Copy)]
pub struct SiteRows<'a, F> {
    /// LoRA input rows, batch·seq_len × d_in (row i·T + t).
    pub x: ArrayView2<'a, F>,
    /// ∂loss/∂(site output) rows, batch·seq_len × d_out, for a loss that sums the
    /// per-sample losses (so that row blocks are per-sample gradients).
    pub delta: ArrayView2<'a, F>,
    /// 1 for real tokens, 0 for padding.
    pub mask: ArrayView1<'a, F>,
    pub batch: usize,
    pub seq_len: usize,
    /// r × d_in
    pub a: ArrayView2<'a, F>,
    /// d_out × r
    pub b: ArrayView2<'a, F>,
    pub scale: F,
}

/// How per-sample norms are formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormMethod {
    /// The cheaper of the two for these shapes.
    Auto,
    /// Gram matrices of the sequence: O(T²·(r + d)) per sample.
    Ghost,
    /// The sample's gradient itself, then its squares: O(T·r·d) per sample.
    Materialize,
}

/// Per-sample squared norms and diagonal Fisher sums of one site.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteSquares<F> {
    /// ‖∂ℓ_i/∂A‖² per sample.
    pub sq_a: Vec<F>,
    /// ‖∂ℓ_i/∂B‖² per sample.
    pub sq_b: Vec<F>,
    /// Σ_i (∂ℓ_i/∂A)², r × d_in.
    pub diag_a: Array2<F>,
    /// Σ_i (∂ℓ_i/∂B)², d_out × r.
    pub diag_b: Array2<F>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FisherError {
    #[error("Fisher site rows: {0}")]
    Shape(String),
}

impl<F: Scalar> SiteRows<'_, F> {
    fn check(&self) -> Result<(), FisherError> {
        let n = self
            .batch
            .checked_mul(self.seq_len)
            .ok_or_else(|| FisherError::Shape("batch × seq_len overflows".into()))?;
        let (r, d_in) = self.a.dim();
        let (d_out, r2) = self.b.dim();
        let problems = [
            (
                self.x.nrows() != n,
                format!(
                    "x has {} rows, expected batch·seq_len = {n}",
                    self.x.nrows()
                ),
            ),
            (
                self.delta.nrows() != n,
                format!("δ has {} rows, expected {n}", self.delta.nrows()),
            ),
            (
                self.mask.len() != n,
                format!("mask has {} entries, expected {n}", self.mask.len()),
            ),
            (
                self.x.ncols() != d_in,
                format!("x has {} columns but A is {r}×{d_in}", self.x.ncols()),
            ),
            (
                self.delta.ncols() != d_out,
                format!("δ has {} columns but B is {d_out}×{r2}", self.delta.ncols()),
            ),
            (
                r != r2,
                format!("A is {r}×{d_in} but B is {d_out}×{r2}: ranks differ"),
            ),
        ];
        match problems.into_iter().find(|(bad, _)| *bad) {
            Some((_, msg)) => Err(FisherError::Shape(msg)),
            None => Ok(()),
        }
    }

    /// Sample i's masked rows: X_i, U_i = X_i·Aᵀ, Δ_i, V_i = scale·Δ_i·B.
    fn sample(&self, i: usize) -> (Array2<F>, Array2<F>, Array2<F>, Array2<F>) {
        let rows = s![i * self.seq_len..(i + 1) * self.seq_len, ..];
        let m = self
            .mask
            .slice(s![i * self.seq_len..(i + 1) * self.seq_len]);
        let m = m.insert_axis(ndarray::Axis(1));
        let x = &self.x.slice(rows) * &m;
        let d = &self.delta.slice(rows) * &m;
        let u = x.dot(&self.a.t());
        let v = d.dot(&self.b) * self.scale;
        (x, u, d, v)
    }
}

fn sum_sq<F: Scalar>(a: &Array2<F>) -> F {
    a.iter().map(|&v| v * v).sum()
}

/// Σ (P·Pᵀ) ⊙ (Q·Qᵀ) = ‖Pᵀ·Q‖²_F, without forming Pᵀ·Q.
fn ghost<F: Scalar>(p: &Array2<F>, q: &Array2<F>) -> F {
    let t = p.nrows();
    let mut gp = Array2::zeros((t, t));
    let mut gq = Array2::zeros((t, t));
    general_mat_mul(F::one(), p, &p.t(), F::zero(), &mut gp);
    general_mat_mul(F::one(), q, &q.t(), F::zero(), &mut gq);
    gp.iter().zip(gq.iter()).map(|(&a, &b)| a * b).sum()
}

/// ‖∂ℓ_i/∂A‖² and ‖∂ℓ_i/∂B‖² for every sample of the batch.
pub fn sq_norms<F: Scalar>(
    rows: &SiteRows<'_, F>,
    method: NormMethod,
) -> Result<(Vec<F>, Vec<F>), FisherError> {
    rows.check()?;
    let (r, d_in) = rows.a.dim();
    let d_out = rows.b.nrows();
    let t = rows.seq_len;
    let ghost_cheaper = |d: usize| t * (r + d) < r * d;
    let (mut sq_a, mut sq_b) = (
        Vec::with_capacity(rows.batch),
        Vec::with_capacity(rows.batch),
    );
    for i in 0..rows.batch {
        let (x, u, d, v) = rows.sample(i);
        let use_ghost = |dim| match method {
            NormMethod::Ghost => true,
            NormMethod::Materialize => false,
            NormMethod::Auto => ghost_cheaper(dim),
        };
        sq_a.push(if use_ghost(d_in) {
            ghost(&v, &x)
        } else {
            sum_sq(&v.t().dot(&x))
        });
        let b2 = if use_ghost(d_out) {
            ghost(&d, &u)
        } else {
            sum_sq(&d.t().dot(&u))
        };
        sq_b.push(b2 * rows.scale * rows.scale);
    }
    Ok((sq_a, sq_b))
}

/// Per-sample squared norms plus the diagonal sums Σ_i (∂ℓ_i/∂A)², Σ_i (∂ℓ_i/∂B)²,
/// one sample's gradient at a time.
pub fn site_fisher<F: Scalar>(rows: &SiteRows<'_, F>) -> Result<SiteSquares<F>, FisherError> {
    rows.check()?;
    let mut out = SiteSquares {
        sq_a: Vec::with_capacity(rows.batch),
        sq_b: Vec::with_capacity(rows.batch),
        diag_a: Array2::zeros(rows.a.raw_dim()),
        diag_b: Array2::zeros(rows.b.raw_dim()),
    };
    let mut ga = Array2::zeros(rows.a.raw_dim());
    let mut gb = Array2::zeros(rows.b.raw_dim());
    for i in 0..rows.batch {
        let (x, u, d, v) = rows.sample(i);
        general_mat_mul(F::one(), &v.t(), &x, F::zero(), &mut ga);
        general_mat_mul(rows.scale, &d.t(), &u, F::zero(), &mut gb);
        out.sq_a.push(sum_sq(&ga));
        out.sq_b.push(sum_sq(&gb));
        out.diag_a.zip_mut_with(&ga, |acc, &g| *acc = *acc + g * g);
        out.diag_b.zip_mut_with(&gb, |acc, &g| *acc = *acc + g * g);
    }
    Ok(out)
}

/// The head logits = pooled·Wᵀ + b: per-sample ‖∂ℓ_i/∂W‖² = ‖g_i‖²·‖p_i‖² and
/// ‖∂ℓ_i/∂b‖² = ‖g_i‖² (g = ∂ℓ/∂logits, p = pooled), and the diagonal sums.
// Views are cheap handles, passed by value as `SiteHook::head` hands them out.
#[allow(clippy::needless_pass_by_value)]
pub fn head_fisher<F: Scalar>(
    pooled: ArrayView2<'_, F>,
    dlogits: ArrayView2<'_, F>,
) -> Result<HeadSquares<F>, FisherError> {
    if pooled.nrows() != dlogits.nrows() {
        return Err(FisherError::Shape(format!(
            "pooled has {} rows but dlogits {}",
            pooled.nrows(),
            dlogits.nrows()
        )));
    }
    let p2 = pooled.mapv(|v| v * v);
    let g2 = dlogits.mapv(|v| v * v);
    let pn: Array1<F> = p2.rows().into_iter().map(|r| r.sum()).collect();
    let gn: Array1<F> = g2.rows().into_iter().map(|r| r.sum()).collect();
    Ok(HeadSquares {
        sq_weight: (&gn * &pn).to_vec(),
        sq_bias: gn.to_vec(),
        diag_weight: g2.t().dot(&p2),
        diag_bias: g2.sum_axis(ndarray::Axis(0)),
    })
}

/// Per-sample squared norms and diagonal sums of the classification head.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadSquares<F> {
    pub sq_weight: Vec<F>,
    pub sq_bias: Vec<F>,
    /// labels × hidden
    pub diag_weight: Array2<F>,
    pub diag_bias: Array1<F>,
}

/// Where per-sample gradient squares are computed: this crate's CPU code, or the CUDA
/// kernels of `fibecfed-kernels` when a GPU is present.
pub trait FisherBackend<F> {
    fn site(&self, rows: &SiteRows<'_, F>) -> Result<SiteSquares<F>, FisherError>;
}

/// The CPU backend: [`site_fisher`].
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuBackend;

impl<F: Scalar> FisherBackend<F> for CpuBackend {
    fn site(&self, rows: &SiteRows<'_, F>) -> Result<SiteSquares<F>, FisherError> {
        site_fisher(rows)
    }
}
