//! The GPU backend: [`FisherBackend<f32>`] through the fused CUDA kernels of
//! `fibecfed-kernels`, with the CPU backend's checks, conventions and output layout.

use fibecfed_kernels::{GpuFisher, KernelError, LoraInputs, LoraProducts, LoraShape, Mode};
use ndarray::{Array2, ArrayBase, CowArray, Data, Dimension};

use crate::FisherError;
use crate::squares::{FisherBackend, SiteRows, SiteSquares};

/// Per-sample squares of LoRA sites on a GPU. One per process is enough: it holds the
/// device context and the kernels compiled once by NVRTC.
#[derive(Debug)]
pub struct CudaBackend {
    gpu: GpuFisher,
    mode: Mode,
}

impl CudaBackend {
    /// The first GPU, in `mode` (use [`Mode::Fp32`] unless tf32's documented error is
    /// acceptable). Fails with the reason (no driver, no NVRTC, no device, tf32 on a
    /// device without it, …) so that the caller can fall back to [`crate::CpuBackend`].
    pub fn new(mode: Mode) -> Result<Self, KernelError> {
        let gpu = GpuFisher::new()?;
        gpu.check_mode(mode)?;
        Ok(Self { gpu, mode })
    }

    /// "NVIDIA H200" or whatever the driver calls the device.
    pub fn device_name(&self) -> &str {
        self.gpu.device_name()
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }
}

/// The array's elements in row-major order: a borrow when they already are, else a copy.
fn standard<S: Data<Elem = f32>, D: Dimension>(a: &ArrayBase<S, D>) -> CowArray<'_, f32, D> {
    a.as_standard_layout()
}

fn slice<'a, D: Dimension>(
    a: &'a CowArray<'_, f32, D>,
    tensor: &'static str,
) -> Result<&'a [f32], FisherError> {
    a.as_slice().ok_or(FisherError::NotContiguous { tensor })
}

/// The GPU's r × c diagonal, checked against the shape asked for.
fn diagonal(
    data: Vec<f32>,
    (rows, cols): (usize, usize),
    tensor: &'static str,
    meaning: &'static str,
) -> Result<Array2<f32>, FisherError> {
    let found = data.len();
    Array2::from_shape_vec((rows, cols), data).map_err(|_| FisherError::Shape {
        tensor: tensor.to_owned(),
        expected: vec![rows, cols],
        found: vec![found],
        meaning,
    })
}

impl FisherBackend<f32> for CudaBackend {
    fn site(&self, rows: &SiteRows<'_, f32>) -> Result<SiteSquares<f32>, FisherError> {
        rows.check()?;
        let (rank, d_in) = rows.a.dim();
        let d_out = rows.b.nrows();
        let shape = LoraShape {
            batch: rows.batch,
            seq_len: rows.seq_len,
            d_in,
            d_out,
            rank,
        };
        let (x, delta, mask) = (
            standard(&rows.x),
            standard(&rows.delta),
            standard(&rows.mask),
        );
        let (a, b) = (standard(&rows.a), standard(&rows.b));
        let products = rows
            .products
            .as_ref()
            .map(|p| (standard(&p.u), standard(&p.db)));
        let inputs = LoraInputs {
            shape,
            x: slice(&x, "x")?,
            delta: slice(&delta, "δ")?,
            mask: slice(&mask, "mask")?,
            a: slice(&a, "A")?,
            b: slice(&b, "B")?,
            scale: rows.scale,
            products: match &products {
                Some((u, db)) => Some(LoraProducts {
                    u: slice(u, "products x·Aᵀ")?,
                    db: slice(db, "products δ·B")?,
                }),
                None => None,
            },
        };
        let out = self.gpu.lora_site(&inputs, self.mode)?;
        Ok(SiteSquares {
            sq_a: out.sq_a,
            sq_b: out.sq_b,
            diag_a: diagonal(
                out.diag_a,
                (rank, d_in),
                "the GPU's diagonal of A",
                "rank × d_in: the GPU returned a diagonal of the wrong size",
            )?,
            diag_b: diagonal(
                out.diag_b,
                (d_out, rank),
                "the GPU's diagonal of B",
                "d_out × rank: the GPU returned a diagonal of the wrong size",
            )?,
        })
    }
}
