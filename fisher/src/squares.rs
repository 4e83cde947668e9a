//! Per-sample gradient squares of one LoRA site and of the head.

use fibecfed_core::{Real, simd};
use ndarray::linalg::general_mat_mul;
use ndarray::{Array1, Array2, ArrayBase, ArrayView1, ArrayView2, CowArray, Data, Ix2, s};
use rayon::prelude::*;

use crate::FisherError;

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
    /// x·Aᵀ and δ·B when the caller already has them (the encoder's forward and
    /// backward form both); `None` recomputes them.
    pub products: Option<Products<'a, F>>,
}

/// The rank-r products a LoRA site's forward and backward passes form anyway.
#[derive(Debug, Clone, Copy)]
pub struct Products<'a, F> {
    /// u = x·Aᵀ, batch·seq_len × r.
    pub u: ArrayView2<'a, F>,
    /// δ·B (without the scale), batch·seq_len × r.
    pub db: ArrayView2<'a, F>,
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

/// One sample's (X_i, U_i, Δ_i, V_i): views where no copy is needed.
type SampleRows<'a, F> = (
    CowArray<'a, F, Ix2>,
    CowArray<'a, F, Ix2>,
    CowArray<'a, F, Ix2>,
    Array2<F>,
);

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

impl<F: Real> SiteRows<'_, F> {
    /// Shapes against each other; every backend runs it first, so they refuse alike.
    pub(crate) fn check(&self) -> Result<(), FisherError> {
        let n = self
            .batch
            .checked_mul(self.seq_len)
            .ok_or(FisherError::RowsOverflow {
                batch: self.batch,
                seq_len: self.seq_len,
            })?;
        let (r, d_in) = self.a.dim();
        let d_out = self.b.nrows();
        // Allocates only for the error: this runs for every site of every batch.
        let shape = |tensor: &str, expected: &[usize], found: &[usize], meaning| {
            (expected != found).then(|| FisherError::Shape {
                tensor: tensor.to_owned(),
                expected: expected.to_vec(),
                found: found.to_vec(),
                meaning,
            })
        };
        let products = self.products.as_ref();
        let problem = shape(
            "B",
            &[d_out, r],
            self.b.shape(),
            "d_out × the rank of A: ranks differ",
        )
        .or_else(|| shape("x", &[n, d_in], self.x.shape(), "batch·seq_len × d_in of A"))
        .or_else(|| {
            shape(
                "δ",
                &[n, d_out],
                self.delta.shape(),
                "batch·seq_len × d_out of B",
            )
        })
        .or_else(|| shape("mask", &[n], self.mask.shape(), "batch·seq_len"))
        .or_else(|| {
            let u = products?.u.shape();
            shape("products x·Aᵀ", &[n, r], u, "batch·seq_len × rank")
        })
        .or_else(|| {
            let db = products?.db.shape();
            shape("products δ·B", &[n, r], db, "batch·seq_len × rank")
        });
        problem.map_or(Ok(()), Err)
    }

    /// The batch's products: the caller's, or formed here into `store`. (Products is
    /// invariant in its lifetime, as ndarray views are, so the caller's views are
    /// reborrowed to the lifetime the formed ones have.)
    fn products_in<'s>(&'s self, store: &'s mut Option<OwnedProducts<F>>) -> Products<'s, F> {
        match &self.products {
            Some(p) => Products {
                u: p.u.reborrow(),
                db: p.db.reborrow(),
            },
            None => store.insert(batch_products(self)).view(),
        }
    }

    /// Sample i's masked rows: X_i, U_i = X_i·Aᵀ, Δ_i, V_i = scale·Δ_i·B, with U and
    /// δ·B taken from `p` (the whole batch's products). With right padding (the mask is
    /// 1…1 0…0, as batches are built) these are views of the real rows only, so padding
    /// costs nothing; any other mask gets masked copies.
    fn sample<'s>(&'s self, p: Products<'s, F>, i: usize) -> SampleRows<'s, F> {
        let span = i * self.seq_len..(i + 1) * self.seq_len;
        let m = self.mask.slice(s![span.clone()]);
        let len = m.iter().take_while(|&&v| v == F::one()).count();
        let prefix = m.iter().skip(len).all(|&v| v == F::zero());
        let rows = if prefix {
            s![span.start..span.start + len, ..]
        } else {
            s![span.clone(), ..]
        };
        let masked = |a: ArrayView2<'_, F>| -> Array2<F> { &a * &m.insert_axis(ndarray::Axis(1)) };
        let (x, d) = if prefix {
            (
                CowArray::from(self.x.slice(rows)),
                CowArray::from(self.delta.slice(rows)),
            )
        } else {
            (
                CowArray::from(masked(self.x.slice(rows))),
                CowArray::from(masked(self.delta.slice(rows))),
            )
        };
        let (u, v) = if prefix {
            (
                CowArray::from(p.u.slice_move(rows)),
                &p.db.slice(rows) * self.scale,
            )
        } else {
            (
                CowArray::from(masked(p.u.slice(rows))),
                masked(p.db.slice(rows)) * self.scale,
            )
        };
        (x, u, d, v)
    }
}

fn sum_sq<F: Real>(a: &Array2<F>) -> F {
    a.iter().map(|&v| v * v).sum()
}

/// Σ (P·Pᵀ) ⊙ (Q·Qᵀ) = ‖Pᵀ·Q‖²_F, without forming Pᵀ·Q.
fn ghost<F: Real, S: Data<Elem = F>, T: Data<Elem = F>>(
    p: &ArrayBase<S, Ix2>,
    q: &ArrayBase<T, Ix2>,
) -> F {
    let t = p.nrows();
    let mut gp = Array2::zeros((t, t));
    let mut gq = Array2::zeros((t, t));
    general_mat_mul(F::one(), p, &p.t(), F::zero(), &mut gp);
    general_mat_mul(F::one(), q, &q.t(), F::zero(), &mut gq);
    gp.iter().zip(gq.iter()).map(|(&a, &b)| a * b).sum()
}

/// ‖∂ℓ_i/∂A‖² and ‖∂ℓ_i/∂B‖² for every sample of the batch.
pub fn sq_norms<F: Real>(
    rows: &SiteRows<'_, F>,
    method: NormMethod,
) -> Result<(Vec<F>, Vec<F>), FisherError> {
    rows.check()?;
    let (r, d_in) = rows.a.dim();
    let d_out = rows.b.nrows();
    let t = rows.seq_len;
    let ghost_cheaper = |d: usize| t * (r + d) < r * d;
    fibecfed_core::blas::single_threaded();
    let mut store = None;
    let products = rows.products_in(&mut store);
    let use_ghost = |dim| match method {
        NormMethod::Ghost => true,
        NormMethod::Materialize => false,
        NormMethod::Auto => ghost_cheaper(dim),
    };
    // Samples are independent and each result lands in its own slot: parallel and
    // still deterministic.
    let pairs: Vec<(F, F)> = (0..rows.batch)
        .into_par_iter()
        .map(|i| {
            let (x, u, d, v) = rows.sample(products, i);
            let a2 = if use_ghost(d_in) {
                ghost(&v, &x)
            } else {
                sum_sq(&v.t().dot(&x))
            };
            let b2 = if use_ghost(d_out) {
                ghost(&d, &u)
            } else {
                sum_sq(&d.t().dot(&u))
            };
            (a2, b2 * rows.scale * rows.scale)
        })
        .collect();
    let (sq_a, sq_b) = pairs.into_iter().unzip();
    Ok((sq_a, sq_b))
}

/// Adds s2·(g ⊙ g) to `acc` and returns s2·Σ g², in one pass over g.
fn square_into<F: Real>(acc: &mut Array2<F>, g: &Array2<F>, s2: F) -> F {
    let mut total = F::zero();
    ndarray::Zip::from(acc).and(g).for_each(|a, &v| {
        let v2 = s2 * v * v;
        *a += v2;
        total += v2;
    });
    total
}

/// out = Σ_t p_tᵀ q_t = Pᵀ·Q for P (len × r), Q (len × d): one sample's LoRA gradient.
/// With r of 8 or 16 and len of a sentence, BLAS's packing costs more than the
/// arithmetic; r axpy's per token over Q's contiguous row stay in cache and vectorise.
fn outer_sum<F: Real>(p: &ArrayView2<'_, F>, q: &ArrayView2<'_, F>, out: &mut Array2<F>) {
    out.fill(F::zero());
    let d = q.ncols();
    let Some(flat) = out.as_slice_mut() else {
        general_mat_mul(F::one(), &p.t(), q, F::zero(), out);
        return;
    };
    for (prow, qrow) in p.rows().into_iter().zip(q.rows()) {
        let Some(qs) = qrow.as_slice() else {
            general_mat_mul(F::one(), &p.t(), q, F::zero(), out);
            return;
        };
        for (c, &pc) in prow.iter().enumerate() {
            if pc == F::zero() {
                continue;
            }
            for (o, &qv) in flat[c * d..(c + 1) * d].iter_mut().zip(qs) {
                *o += pc * qv;
            }
        }
    }
}

/// Rows per block of [`batch_products`].
const PRODUCT_ROWS: usize = 256;

/// x·Aᵀ and δ·B for the whole batch, padding rows included, in a few large GEMMs over
/// row blocks in parallel: far cheaper than one small GEMM per sample.
fn batch_products<F: Real>(rows: &SiteRows<'_, F>) -> OwnedProducts<F> {
    let (n, r) = (rows.x.nrows(), rows.a.nrows());
    let mut u = Array2::zeros((n, r));
    let mut db = Array2::zeros((n, r));
    u.axis_chunks_iter_mut(ndarray::Axis(0), PRODUCT_ROWS)
        .into_par_iter()
        .enumerate()
        .for_each(|(k, mut block)| {
            let start = k * PRODUCT_ROWS;
            let x = rows.x.slice(s![start..start + block.nrows(), ..]);
            general_mat_mul(F::one(), &x, &rows.a.t(), F::zero(), &mut block);
        });
    db.axis_chunks_iter_mut(ndarray::Axis(0), PRODUCT_ROWS)
        .into_par_iter()
        .enumerate()
        .for_each(|(k, mut block)| {
            let start = k * PRODUCT_ROWS;
            let d = rows.delta.slice(s![start..start + block.nrows(), ..]);
            general_mat_mul(F::one(), &d, &rows.b, F::zero(), &mut block);
        });
    OwnedProducts { u, db }
}

/// [`Products`] formed here because the caller had none.
struct OwnedProducts<F> {
    u: Array2<F>,
    db: Array2<F>,
}

impl<F> OwnedProducts<F> {
    fn view(&self) -> Products<'_, F> {
        Products {
            u: self.u.view(),
            db: self.db.view(),
        }
    }
}

/// Samples per task of [`site_fisher`]. Fixed, so that the diagonal sums are added in
/// the same order whatever the number of threads: results are bitwise reproducible.
const SAMPLES_PER_TASK: usize = 2;

/// Per-sample squared norms plus the diagonal sums Σ_i (∂ℓ_i/∂A)², Σ_i (∂ℓ_i/∂B)².
/// One sample's gradient (r × d, in cache) at a time is formed, squared and added to
/// its task's partial diagonal; tasks of [`SAMPLES_PER_TASK`] samples run in parallel
/// and their partials are added in sample order. Never holds a (batch × r × d) tensor.
pub fn site_fisher<F: Real>(rows: &SiteRows<'_, F>) -> Result<SiteSquares<F>, FisherError> {
    rows.check()?;
    // The samples run on rayon's workers; OpenBLAS's own threads would fight them.
    fibecfed_core::blas::single_threaded();
    let mut store = None;
    let products = rows.products_in(&mut store);
    // B's gradient is formed transposed (r × d_out) so that both products are
    // Σ_t p_tᵀ q_t with long contiguous rows; its diagonal stays transposed until the end.
    let (r, d_in) = rows.a.dim();
    let d_out = rows.b.nrows();
    let empty = |n| SiteSquares {
        sq_a: Vec::with_capacity(n),
        sq_b: Vec::with_capacity(n),
        diag_a: Array2::zeros((r, d_in)),
        diag_b: Array2::zeros((r, d_out)),
    };
    let s2 = rows.scale * rows.scale;
    let ids: Vec<usize> = (0..rows.batch).collect();
    let partials: Vec<SiteSquares<F>> = ids
        .par_chunks(SAMPLES_PER_TASK)
        .map(|chunk| {
            let mut part = empty(chunk.len());
            let mut ga = Array2::zeros((r, d_in));
            let mut gbt = Array2::zeros((r, d_out));
            simd(|| {
                for &i in chunk {
                    let (x, u, d, v) = rows.sample(products, i);
                    outer_sum(&v.view(), &x.view(), &mut ga);
                    outer_sum(&u.view(), &d.view(), &mut gbt);
                    part.sq_a.push(square_into(&mut part.diag_a, &ga, F::one()));
                    part.sq_b.push(square_into(&mut part.diag_b, &gbt, s2));
                }
            });
            part
        })
        .collect();
    let mut out = empty(rows.batch);
    for p in partials {
        out.sq_a.extend(p.sq_a);
        out.sq_b.extend(p.sq_b);
        out.diag_a.zip_mut_with(&p.diag_a, |acc, &g| *acc += g);
        out.diag_b.zip_mut_with(&p.diag_b, |acc, &g| *acc += g);
    }
    out.diag_b = out.diag_b.reversed_axes().as_standard_layout().into_owned();
    Ok(out)
}

/// The head logits = pooled·Wᵀ + b: per-sample ‖∂ℓ_i/∂W‖² = ‖g_i‖²·‖p_i‖² and
/// ‖∂ℓ_i/∂b‖² = ‖g_i‖² (g = ∂ℓ/∂logits, p = pooled), and the diagonal sums.
// Views are cheap handles, passed by value as `SiteHook::head` hands them out.
#[allow(clippy::needless_pass_by_value)]
pub fn head_fisher<F: Real>(
    pooled: ArrayView2<'_, F>,
    dlogits: ArrayView2<'_, F>,
) -> Result<HeadSquares<F>, FisherError> {
    if pooled.nrows() != dlogits.nrows() {
        return Err(FisherError::Shape {
            tensor: "dlogits".into(),
            expected: vec![pooled.nrows(), dlogits.ncols()],
            found: dlogits.shape().to_vec(),
            meaning: "one row per row of pooled",
        });
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

/// Where per-sample gradient squares are computed: [`CpuBackend`] (this crate's CPU
/// code, any float type) or [`crate::CudaBackend`] (f32 on a GPU through the fused
/// kernels of `fibecfed-kernels`). Every backend returns the same layout: `sq_a`, `sq_b`
/// per sample, `diag_a` r × d_in, `diag_b` d_out × r.
pub trait FisherBackend<F> {
    fn site(&self, rows: &SiteRows<'_, F>) -> Result<SiteSquares<F>, FisherError>;
}

/// The CPU backend: [`site_fisher`].
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuBackend;

impl<F: Real> FisherBackend<F> for CpuBackend {
    fn site(&self, rows: &SiteRows<'_, F>) -> Result<SiteSquares<F>, FisherError> {
        site_fisher(rows)
    }
}
