//! Shapes, borrowed inputs and owned outputs of the two site kinds, and their checks.
//!
//! Every matrix is row-major f32; the rows of a batch are sample-major (row n·T + t for
//! sample n, token t). Checks run before anything touches the device, so a bad shape
//! is a [`KernelError::Shape`] naming the buffer, never a panic or an out-of-bounds read.

use crate::{KernelError, ShapeError};

/// The largest dimension the kernels accept. They index with 32-bit integers, and some
/// indices run a tile past a dimension (a tile's first column plus its width, a chunk's
/// first row plus its height, at most 128), so the cap leaves two of the widest tiles
/// of headroom below `i32::MAX` rather than none.
pub const MAX_DIM: usize = i32::MAX as usize - 256;

/// One LoRA site's batch: x (B·T × d_in), δ (B·T × d_out), A (r × d_in), B (d_out × r).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraShape {
    pub batch: usize,
    pub seq_len: usize,
    pub d_in: usize,
    pub d_out: usize,
    pub rank: usize,
}

/// A dense linear site's batch: x (B·T × d_in), δ (B·T × d_out); its weight is d_out × d_in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DenseShape {
    pub batch: usize,
    pub seq_len: usize,
    pub d_in: usize,
    pub d_out: usize,
}

/// u = x·Aᵀ and δ·B (without the scale), B·T × r each, when the caller already has them
/// (the encoder's forward and backward passes form both).
#[derive(Debug, Clone, Copy)]
pub struct LoraProducts<'a> {
    pub u: &'a [f32],
    pub db: &'a [f32],
}

/// One LoRA site's inputs. With u_t = A·x_t, v_t = scale·Bᵀ·δ_t and token weight m_t
/// (0 skips the token; the CPU code multiplies both factors by the mask, so a token
/// counts m_t² times):
///
/// ∂ℓ_n/∂A = Σ_t m_t² v_t x_tᵀ (r × d_in),   ∂ℓ_n/∂B = scale · Σ_t m_t² δ_t u_tᵀ (d_out × r).
#[derive(Debug, Clone, Copy)]
pub struct LoraInputs<'a> {
    pub shape: LoraShape,
    pub x: &'a [f32],
    pub delta: &'a [f32],
    /// B·T token weights: 1 for real tokens, 0 for padding.
    pub mask: &'a [f32],
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub scale: f32,
    pub products: Option<LoraProducts<'a>>,
}

/// A dense site's inputs: ∂ℓ_n/∂W = Σ_t m_t² δ_t x_tᵀ (d_out × d_in).
#[derive(Debug, Clone, Copy)]
pub struct DenseInputs<'a> {
    pub shape: DenseShape,
    pub x: &'a [f32],
    pub delta: &'a [f32],
    pub mask: &'a [f32],
}

/// Per-sample squared norms and diagonal sums of one LoRA site.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSquares {
    /// ‖∂ℓ_n/∂A‖² per sample.
    pub sq_a: Vec<f32>,
    /// ‖∂ℓ_n/∂B‖² per sample.
    pub sq_b: Vec<f32>,
    /// Σ_n (∂ℓ_n/∂A)², r × d_in row-major.
    pub diag_a: Vec<f32>,
    /// Σ_n (∂ℓ_n/∂B)², d_out × r row-major.
    pub diag_b: Vec<f32>,
}

/// Per-sample squared norms and the diagonal sum of a dense site.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseSquares {
    /// ‖∂ℓ_n/∂W‖² per sample.
    pub sq: Vec<f32>,
    /// Σ_n (∂ℓ_n/∂W)², d_out × d_in row-major.
    pub diag: Vec<f32>,
}

/// `a·b` or a shape error naming what overflowed.
fn mul(a: usize, b: usize, what: &'static str) -> Result<usize, KernelError> {
    a.checked_mul(b)
        .ok_or(KernelError::Shape(ShapeError::Overflow { what, a, b }))
}

fn expect_len(
    buffer: &'static str,
    found: usize,
    expected: usize,
    meaning: &'static str,
) -> Result<(), KernelError> {
    if found == expected {
        Ok(())
    } else {
        Err(KernelError::Shape(ShapeError::Length {
            buffer,
            expected,
            found,
            meaning,
        }))
    }
}

fn dims_fit(dims: &[(&'static str, usize)]) -> Result<(), KernelError> {
    match dims.iter().find(|(_, v)| *v > MAX_DIM) {
        Some(&(dim, value)) => Err(KernelError::Shape(ShapeError::TooLarge {
            dim,
            value,
            limit: MAX_DIM,
        })),
        None => Ok(()),
    }
}

impl LoraShape {
    /// Rows of the batch, B·T.
    pub fn rows(&self) -> Result<usize, KernelError> {
        mul(self.batch, self.seq_len, "batch × seq_len")
    }

    /// True when there is nothing to compute: every output is zeros of its shape.
    pub fn is_empty(&self) -> bool {
        self.zero_dim().is_some()
    }

    /// The first dimension that is 0, if any.
    pub(crate) fn zero_dim(&self) -> Option<&'static str> {
        [
            ("batch", self.batch),
            ("seq_len", self.seq_len),
            ("d_in", self.d_in),
            ("d_out", self.d_out),
            ("rank", self.rank),
        ]
        .into_iter()
        .find_map(|(dim, v)| (v == 0).then_some(dim))
    }

    fn check(&self) -> Result<usize, KernelError> {
        dims_fit(&[
            ("batch", self.batch),
            ("seq_len", self.seq_len),
            ("d_in", self.d_in),
            ("d_out", self.d_out),
            ("rank", self.rank),
        ])?;
        let n = self.rows()?;
        dims_fit(&[("batch × seq_len", n)])?;
        // Every buffer's element count must be representable, in bytes too.
        for (what, a, b) in [
            ("x", n, self.d_in),
            ("δ", n, self.d_out),
            ("products", n, self.rank),
            ("A", self.rank, self.d_in),
            ("B", self.d_out, self.rank),
        ] {
            mul(mul(a, b, what)?, 4, what)?;
        }
        Ok(n)
    }
}

impl DenseShape {
    /// Rows of the batch, B·T.
    pub fn rows(&self) -> Result<usize, KernelError> {
        mul(self.batch, self.seq_len, "batch × seq_len")
    }

    /// True when there is nothing to compute: every output is zeros of its shape.
    pub fn is_empty(&self) -> bool {
        self.zero_dim().is_some()
    }

    /// The first dimension that is 0, if any.
    pub(crate) fn zero_dim(&self) -> Option<&'static str> {
        [
            ("batch", self.batch),
            ("seq_len", self.seq_len),
            ("d_in", self.d_in),
            ("d_out", self.d_out),
        ]
        .into_iter()
        .find_map(|(dim, v)| (v == 0).then_some(dim))
    }

    fn check(&self) -> Result<usize, KernelError> {
        dims_fit(&[
            ("batch", self.batch),
            ("seq_len", self.seq_len),
            ("d_in", self.d_in),
            ("d_out", self.d_out),
        ])?;
        let n = self.rows()?;
        dims_fit(&[("batch × seq_len", n)])?;
        for (what, a, b) in [
            ("x", n, self.d_in),
            ("δ", n, self.d_out),
            ("the weight", self.d_out, self.d_in),
        ] {
            mul(mul(a, b, what)?, 4, what)?;
        }
        Ok(n)
    }
}

impl LoraInputs<'_> {
    /// Every buffer's length against the shape, before any device work.
    pub fn check(&self) -> Result<(), KernelError> {
        let s = &self.shape;
        let n = s.check()?;
        expect_len("x", self.x.len(), n * s.d_in, "batch·seq_len × d_in")?;
        expect_len("δ", self.delta.len(), n * s.d_out, "batch·seq_len × d_out")?;
        expect_len("mask", self.mask.len(), n, "batch·seq_len")?;
        expect_len("A", self.a.len(), s.rank * s.d_in, "rank × d_in")?;
        expect_len("B", self.b.len(), s.d_out * s.rank, "d_out × rank")?;
        if let Some(p) = &self.products {
            expect_len("u = x·Aᵀ", p.u.len(), n * s.rank, "batch·seq_len × rank")?;
            expect_len("δ·B", p.db.len(), n * s.rank, "batch·seq_len × rank")?;
        }
        Ok(())
    }
}

impl DenseInputs<'_> {
    /// Every buffer's length against the shape, before any device work.
    pub fn check(&self) -> Result<(), KernelError> {
        let s = &self.shape;
        let n = s.check()?;
        expect_len("x", self.x.len(), n * s.d_in, "batch·seq_len × d_in")?;
        expect_len("δ", self.delta.len(), n * s.d_out, "batch·seq_len × d_out")?;
        expect_len("mask", self.mask.len(), n, "batch·seq_len")?;
        Ok(())
    }
}

impl LoraSquares {
    /// All zeros, for a batch with nothing to compute.
    pub fn zeros(shape: &LoraShape) -> Self {
        Self {
            sq_a: vec![0.0; shape.batch],
            sq_b: vec![0.0; shape.batch],
            diag_a: vec![0.0; shape.rank * shape.d_in],
            diag_b: vec![0.0; shape.d_out * shape.rank],
        }
    }
}

impl DenseSquares {
    /// All zeros, for a batch with nothing to compute.
    pub fn zeros(shape: &DenseShape) -> Self {
        Self {
            sq: vec![0.0; shape.batch],
            diag: vec![0.0; shape.d_out * shape.d_in],
        }
    }
}
