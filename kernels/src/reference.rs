//! The same arithmetic as the kernels in f64 on the CPU, written for clarity: the
//! reference that GPU tests and the benchmark's correctness check compare against, and
//! that `fibecfed-fisher`'s tests check against its own CPU code. Also the random inputs
//! those checks draw.
//!
//! Conventions (those of `fibecfed_fisher::site_fisher`): a token with mask 0 is skipped
//! entirely (its rows are not read); any other mask value m weights the token's product
//! by m², because the CPU code multiplies both factors of the product by the mask.

use crate::KernelError;
use crate::shape::{DenseInputs, DenseShape, LoraInputs, LoraProducts, LoraShape};

/// Per-sample squared norms and diagonal sums of one LoRA site, in f64.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraReference {
    pub sq_a: Vec<f64>,
    pub sq_b: Vec<f64>,
    /// r × d_in row-major.
    pub diag_a: Vec<f64>,
    /// d_out × r row-major.
    pub diag_b: Vec<f64>,
}

/// Per-sample squared norms and the diagonal sum of a dense site, in f64.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseReference {
    pub sq: Vec<f64>,
    /// d_out × d_in row-major.
    pub diag: Vec<f64>,
}

/// One LoRA site in f64: per sample, ∂A = Σ_t m_t²·scale·(δ_t·B)ᵀ x_t and
/// ∂B = scale·Σ_t m_t² δ_tᵀ (x_t·Aᵀ), with the products the caller gave when it gave them.
pub fn lora_site(inputs: &LoraInputs<'_>) -> Result<LoraReference, KernelError> {
    inputs.check()?;
    let LoraShape {
        batch,
        seq_len,
        d_in,
        d_out,
        rank,
    } = inputs.shape;
    let scale = f64::from(inputs.scale);
    let mut out = LoraReference {
        sq_a: vec![0.0; batch],
        sq_b: vec![0.0; batch],
        diag_a: vec![0.0; rank * d_in],
        diag_b: vec![0.0; d_out * rank],
    };
    let mut ga = vec![0.0_f64; rank * d_in];
    let mut gb = vec![0.0_f64; d_out * rank];
    let mut u = vec![0.0_f64; rank];
    let mut v = vec![0.0_f64; rank];
    for n in 0..batch {
        ga.fill(0.0);
        gb.fill(0.0);
        for t in 0..seq_len {
            let row = n * seq_len + t;
            let m = f64::from(inputs.mask[row]);
            if m == 0.0 {
                continue;
            }
            let x = &inputs.x[row * d_in..(row + 1) * d_in];
            let d = &inputs.delta[row * d_out..(row + 1) * d_out];
            for j in 0..rank {
                (u[j], v[j]) = match &inputs.products {
                    Some(p) => (
                        f64::from(p.u[row * rank + j]),
                        f64::from(p.db[row * rank + j]),
                    ),
                    None => (
                        (0..d_in)
                            .map(|k| f64::from(inputs.a[j * d_in + k]) * f64::from(x[k]))
                            .sum(),
                        (0..d_out)
                            .map(|o| f64::from(d[o]) * f64::from(inputs.b[o * rank + j]))
                            .sum(),
                    ),
                };
            }
            let w = m * m * scale;
            for j in 0..rank {
                let vj = w * v[j];
                for (g, &xk) in ga[j * d_in..(j + 1) * d_in].iter_mut().zip(x) {
                    *g += vj * f64::from(xk);
                }
            }
            for (o, &dv) in d.iter().enumerate() {
                let dv = w * f64::from(dv);
                for j in 0..rank {
                    gb[o * rank + j] += dv * u[j];
                }
            }
        }
        out.sq_a[n] = square_into(&ga, &mut out.diag_a);
        out.sq_b[n] = square_into(&gb, &mut out.diag_b);
    }
    Ok(out)
}

/// A dense site in f64: per sample ∂W = Σ_t m_t² δ_tᵀ x_t.
pub fn dense_site(inputs: &DenseInputs<'_>) -> Result<DenseReference, KernelError> {
    inputs.check()?;
    let DenseShape {
        batch,
        seq_len,
        d_in,
        d_out,
    } = inputs.shape;
    let mut out = DenseReference {
        sq: vec![0.0; batch],
        diag: vec![0.0; d_out * d_in],
    };
    let mut g = vec![0.0_f64; d_out * d_in];
    for n in 0..batch {
        g.fill(0.0);
        for t in 0..seq_len {
            let row = n * seq_len + t;
            let m = f64::from(inputs.mask[row]);
            if m == 0.0 {
                continue;
            }
            let x = &inputs.x[row * d_in..(row + 1) * d_in];
            let d = &inputs.delta[row * d_out..(row + 1) * d_out];
            for (o, &dv) in d.iter().enumerate() {
                let dv = m * m * f64::from(dv);
                for (gk, &xk) in g[o * d_in..(o + 1) * d_in].iter_mut().zip(x) {
                    *gk += dv * f64::from(xk);
                }
            }
        }
        out.sq[n] = square_into(&g, &mut out.diag);
    }
    Ok(out)
}

/// Adds g ⊙ g to `diag` and returns Σ g².
fn square_into(g: &[f64], diag: &mut [f64]) -> f64 {
    let mut total = 0.0;
    for (d, &v) in diag.iter_mut().zip(g) {
        *d += v * v;
        total += v * v;
    }
    total
}

/// ‖got − want‖ / ‖want‖ (0 when both are zero; infinite on NaN or a length mismatch,
/// so that an unwritten, poisoned output always fails).
pub fn rel_error(got: &[f32], want: &[f64]) -> f64 {
    if got.len() != want.len() || got.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let diff: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (f64::from(g) - w).powi(2))
        .sum();
    let norm: f64 = want.iter().map(|w| w * w).sum();
    if norm == 0.0 {
        if diff == 0.0 { 0.0 } else { f64::INFINITY }
    } else {
        (diff / norm).sqrt()
    }
}

/// A small seeded generator (SplitMix64): enough for test inputs, and it keeps this
/// crate's only dependency cudarc.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn signed(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32).mul_add(2.0, -1.0)
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    pub fn vec(&mut self, len: usize) -> Vec<f32> {
        (0..len).map(|_| self.signed()).collect()
    }
}

/// A seed from the clock, for tests that draw fresh inputs every run (they print it so
/// that a failure can be replayed).
pub fn time_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0x5EED, |d| d.as_nanos() as u64)
}

/// How a random batch's mask looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskKind {
    /// Every token real.
    Full,
    /// Right padding: each sample has a random length in 0..=T (some samples empty when
    /// T allows), the batches the encoder builds.
    Padded,
    /// Any pattern: random zeros anywhere and weights other than 1 (m² must be applied).
    Holes,
}

fn random_mask(rng: &mut SplitMix64, batch: usize, seq_len: usize, kind: MaskKind) -> Vec<f32> {
    let mut mask = vec![1.0_f32; batch * seq_len];
    for (n, sample) in mask.chunks_mut(seq_len.max(1)).enumerate() {
        match kind {
            MaskKind::Full => {}
            MaskKind::Padded => {
                // The first sample keeps its full length so that the longest row is used.
                let len = if n == 0 {
                    seq_len
                } else {
                    rng.below(seq_len + 1)
                };
                sample[len..].fill(0.0);
            }
            MaskKind::Holes => {
                for m in sample.iter_mut() {
                    *m = match rng.below(4) {
                        0 => 0.0,
                        1 => 0.5 + rng.signed().abs(),
                        _ => 1.0,
                    };
                }
            }
        }
    }
    mask
}

/// Owned random inputs of one LoRA site (entries uniform in [-1, 1), never all zero).
#[derive(Debug, Clone)]
pub struct LoraData {
    pub shape: LoraShape,
    pub x: Vec<f32>,
    pub delta: Vec<f32>,
    pub mask: Vec<f32>,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub scale: f32,
    /// x·Aᵀ and δ·B formed in f64 and rounded, as the encoder would hand them over.
    pub u: Vec<f32>,
    pub db: Vec<f32>,
}

impl LoraData {
    pub fn random(shape: LoraShape, kind: MaskKind, rng: &mut SplitMix64) -> Self {
        let n = shape.batch * shape.seq_len;
        let LoraShape {
            d_in, d_out, rank, ..
        } = shape;
        let x = rng.vec(n * d_in);
        let delta = rng.vec(n * d_out);
        let a = rng.vec(rank * d_in);
        let b = rng.vec(d_out * rank);
        let (u, db) = lora_products(&shape, &x, &delta, &a, &b);
        Self {
            shape,
            mask: random_mask(rng, shape.batch, shape.seq_len, kind),
            x,
            delta,
            a,
            b,
            scale: 0.5 + rng.signed().abs() * 2.0,
            u,
            db,
        }
    }

    /// Borrowed inputs, with or without the products.
    pub fn inputs(&self, with_products: bool) -> LoraInputs<'_> {
        LoraInputs {
            shape: self.shape,
            x: &self.x,
            delta: &self.delta,
            mask: &self.mask,
            a: &self.a,
            b: &self.b,
            scale: self.scale,
            products: with_products.then_some(LoraProducts {
                u: &self.u,
                db: &self.db,
            }),
        }
    }
}

/// Owned random inputs of one dense site.
#[derive(Debug, Clone)]
pub struct DenseData {
    pub shape: DenseShape,
    pub x: Vec<f32>,
    pub delta: Vec<f32>,
    pub mask: Vec<f32>,
}

impl DenseData {
    pub fn random(shape: DenseShape, kind: MaskKind, rng: &mut SplitMix64) -> Self {
        let n = shape.batch * shape.seq_len;
        Self {
            shape,
            x: rng.vec(n * shape.d_in),
            delta: rng.vec(n * shape.d_out),
            mask: random_mask(rng, shape.batch, shape.seq_len, kind),
        }
    }

    pub fn inputs(&self) -> DenseInputs<'_> {
        DenseInputs {
            shape: self.shape,
            x: &self.x,
            delta: &self.delta,
            mask: &self.mask,
        }
    }
}

/// x·Aᵀ and δ·B for every row (f32 inputs, f64 sums rounded to f32, as the encoder would
/// hand them over); rows the mask skips are formed too and never read.
fn lora_products(
    s: &LoraShape,
    x: &[f32],
    delta: &[f32],
    a: &[f32],
    b: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let (d_in, d_out, rank) = (s.d_in, s.d_out, s.rank);
    let n = s.batch * s.seq_len;
    let mut u = vec![0.0; n * rank];
    let mut db = vec![0.0; n * rank];
    for row in 0..n {
        for j in 0..rank {
            let dot_a: f64 = (0..d_in)
                .map(|k| f64::from(a[j * d_in + k]) * f64::from(x[row * d_in + k]))
                .sum();
            let dot_b: f64 = (0..d_out)
                .map(|o| f64::from(delta[row * d_out + o]) * f64::from(b[o * rank + j]))
                .sum();
            u[row * rank + j] = dot_a as f32;
            db[row * rank + j] = dot_b as f32;
        }
    }
    (u, db)
}

/// Non-finite values (NaN, +Inf, −Inf in turn) in every row the kernels must not read:
/// the rows whose mask is 0, which include the right padding past each sample's length.
/// A kernel that read one would turn a sum into NaN or Inf.
fn poison_rows(mask: &[f32], buffers: &mut [(&mut [f32], usize)]) {
    const BAD: [f32; 3] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
    for (row, _) in mask.iter().enumerate().filter(|(_, m)| **m == 0.0) {
        for (i, (buf, width)) in buffers.iter_mut().enumerate() {
            buf[row * *width..(row + 1) * *width].fill(BAD[(row + i) % BAD.len()]);
        }
    }
}

impl LoraData {
    /// NaN and ±Inf in x, δ, x·Aᵀ and δ·B on every masked row (see `poison_rows`).
    pub fn poison_masked_rows(&mut self) {
        let s = self.shape;
        poison_rows(
            &self.mask,
            &mut [
                (&mut self.x, s.d_in),
                (&mut self.delta, s.d_out),
                (&mut self.u, s.rank),
                (&mut self.db, s.rank),
            ],
        );
    }
}

impl DenseData {
    /// NaN and ±Inf in x and δ on every masked row (see `poison_rows`).
    pub fn poison_masked_rows(&mut self) {
        let s = self.shape;
        poison_rows(
            &self.mask,
            &mut [(&mut self.x, s.d_in), (&mut self.delta, s.d_out)],
        );
    }
}

/// ‖G_nᵀ·X_n‖²_F per sample by the Gram identity, in f64:
/// Σ_{t,t'} w_t w_t' (g_t·g_t')(x_t·x_t') with w_t = m_t²·gscale, rows with mask 0
/// skipped. It costs O(T²·(M + K)) per sample instead of the O(T·M·K) of forming the
/// product, so the bench checks its full-size timed runs with it, and it shares no code
/// with [`lora_site`] / [`dense_site`], which check it in turn.
#[allow(clippy::too_many_arguments)]
pub fn gram_sq(
    g: &[f32],
    m: usize,
    x: &[f32],
    k: usize,
    mask: &[f32],
    batch: usize,
    seq_len: usize,
    gscale: f64,
) -> Vec<f64> {
    let dot = |a: &[f32], b: &[f32]| -> f64 {
        a.iter()
            .zip(b)
            .map(|(&p, &q)| f64::from(p) * f64::from(q))
            .sum()
    };
    (0..batch)
        .map(|n| {
            let rows: Vec<(usize, f64)> = (n * seq_len..(n + 1) * seq_len)
                .filter(|&r| mask[r] != 0.0)
                .map(|r| (r, f64::from(mask[r]).powi(2) * gscale))
                .collect();
            let mut total = 0.0;
            for (i, &(r, wr)) in rows.iter().enumerate() {
                for &(q, wq) in &rows[i..] {
                    let term = wr
                        * wq
                        * dot(&g[r * m..(r + 1) * m], &g[q * m..(q + 1) * m])
                        * dot(&x[r * k..(r + 1) * k], &x[q * k..(q + 1) * k]);
                    total += if q == r { term } else { 2.0 * term };
                }
            }
            total
        })
        .collect()
}

/// A LoRA site's per-sample (‖∂A‖², ‖∂B‖²) by the Gram identity ([`gram_sq`]); the
/// products x·Aᵀ and δ·B are the caller's when given, else formed here (f32 inputs,
/// f64 sums, rounded to f32 as the GPU's would be).
pub fn lora_gram(inputs: &LoraInputs<'_>) -> Result<(Vec<f64>, Vec<f64>), KernelError> {
    inputs.check()?;
    let s = inputs.shape;
    let formed;
    let (u, db) = if let Some(p) = &inputs.products {
        (p.u, p.db)
    } else {
        formed = lora_products(&s, inputs.x, inputs.delta, inputs.a, inputs.b);
        (formed.0.as_slice(), formed.1.as_slice())
    };
    let scale = f64::from(inputs.scale);
    let sq_a = gram_sq(
        db,
        s.rank,
        inputs.x,
        s.d_in,
        inputs.mask,
        s.batch,
        s.seq_len,
        scale,
    );
    let sq_b = gram_sq(
        u,
        s.rank,
        inputs.delta,
        s.d_out,
        inputs.mask,
        s.batch,
        s.seq_len,
        scale,
    );
    Ok((sq_a, sq_b))
}

/// A dense site's per-sample ‖∂W‖² by the Gram identity ([`gram_sq`]).
pub fn dense_gram(inputs: &DenseInputs<'_>) -> Result<Vec<f64>, KernelError> {
    inputs.check()?;
    let s = inputs.shape;
    Ok(gram_sq(
        inputs.delta,
        s.d_out,
        inputs.x,
        s.d_in,
        inputs.mask,
        s.batch,
        s.seq_len,
        1.0,
    ))
}

/// The largest relative error of one sample: max_n |got_n − want_n| / |want_n| over the
/// samples with want_n ≠ 0, and |got_n| for those with want_n = 0 (which must be exact
/// zeros: an empty sample). Infinite for a NaN or a length mismatch.
pub fn per_sample_error(got: &[f32], want: &[f64]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    got.iter()
        .zip(want)
        .map(|(&g, &w)| {
            let g = f64::from(g);
            if g.is_nan() {
                f64::INFINITY
            } else if w == 0.0 {
                g.abs()
            } else {
                (g - w).abs() / w.abs()
            }
        })
        .fold(0.0, f64::max)
}

fn abs(v: &[f32]) -> Vec<f32> {
    v.iter().map(|x| x.abs()).collect()
}

impl LoraData {
    /// The same batch with every input replaced by its absolute value: its reference
    /// outputs bound the size of the terms each output sums (see [`bounded_error`]).
    pub fn magnitudes(&self) -> Self {
        Self {
            shape: self.shape,
            x: abs(&self.x),
            delta: abs(&self.delta),
            mask: abs(&self.mask),
            a: abs(&self.a),
            b: abs(&self.b),
            scale: self.scale.abs(),
            u: abs(&self.u),
            db: abs(&self.db),
        }
    }
}

impl DenseData {
    /// See [`LoraData::magnitudes`].
    pub fn magnitudes(&self) -> Self {
        Self {
            shape: self.shape,
            x: abs(&self.x),
            delta: abs(&self.delta),
            mask: abs(&self.mask),
        }
    }
}

/// max_i |got_i − want_i| / bound_i, where bound is the reference computed on the
/// inputs' magnitudes ([`LoraData::magnitudes`]): the error of a rounded sum is bounded
/// relative to the sum of its terms' sizes, not to the sum itself, which cancellation can
/// make arbitrarily small (a rank-1 factor of a 3-token sample, say). Entries whose bound
/// is 0 have no terms and must be exactly 0. Infinite for a NaN or a length mismatch.
pub fn bounded_error(got: &[f32], want: &[f64], bound: &[f64]) -> f64 {
    if got.len() != want.len() || got.len() != bound.len() {
        return f64::INFINITY;
    }
    got.iter()
        .zip(want)
        .zip(bound)
        .map(|((&g, &w), &b)| {
            let g = f64::from(g);
            if g.is_nan() {
                f64::INFINITY
            } else if b == 0.0 {
                if g == 0.0 { 0.0 } else { f64::INFINITY }
            } else {
                (g - w).abs() / b
            }
        })
        .fold(0.0, f64::max)
}
