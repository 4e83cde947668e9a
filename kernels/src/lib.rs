//! Handwritten CUDA kernels for per-sample gradient squares, compiled at run time with
//! NVRTC and launched through cudarc.
//!
//! Owns the GPU path of one site's Fisher arithmetic: for a LoRA site (inputs x, output
//! gradients δ, token mask, factors A and B, scale) the per-sample ‖∂ℓ_n/∂A‖²,
//! ‖∂ℓ_n/∂B‖² and the diagonal sums Σ_n (∂ℓ_n/∂A)², Σ_n (∂ℓ_n/∂B)²; for a dense linear
//! site S\[n\] = ‖δ_nᵀX_n‖² and F = Σ_n (δ_nᵀX_n)². The per-sample gradients are never
//! written to memory: each is formed tile by tile in registers and squared in the
//! epilogue ([`GpuFisher`], the CUDA C in `kernels/cuda/`, the design in BENCHMARKS.md).
//! Two precisions: [`Mode::Fp32`] (default, fp32 FMAs) and [`Mode::Tf32`] (tensor cores,
//! inputs rounded to tf32, about 3e-4 relative error on a gradient entry).
//!
//! Does not own: the CPU path and everything above one site (the `fibecfed-fisher`
//! crate, whose `CudaBackend` calls this one), nor any model code. Depends on cudarc
//! alone, which loads libcuda and libnvrtc when first asked, so machines without CUDA
//! build and test everything; [`GpuFisher::new`] then answers with a typed
//! [`KernelError`] (no driver, no NVRTC, no device, …) instead of panicking. Inputs are
//! plain row-major `f32` slices with explicit shapes, checked before any device work: a
//! refusal is a [`KernelError::Shape`] whose [`ShapeError`] names the buffer or
//! dimension with the numbers involved.
//! [`reference`](mod@reference) is an f64 CPU implementation of the same arithmetic for tests and the
//! benchmark's correctness check.
//!
//! ```
//! use fibecfed_kernels::{GpuFisher, LoraInputs, LoraShape, Mode, reference};
//! // One sample of two tokens, d_in = 2, d_out = 1, r = 1 (the example of fibecfed-fisher).
//! let shape = LoraShape { batch: 1, seq_len: 2, d_in: 2, d_out: 1, rank: 1 };
//! let inputs = LoraInputs {
//!     shape,
//!     x: &[1.0, 0.0, 0.0, 1.0],
//!     delta: &[1.0, 2.0],
//!     mask: &[1.0, 1.0],
//!     a: &[1.0, 1.0],
//!     b: &[1.0],
//!     scale: 1.0,
//!     products: None,
//! };
//! // ∂A = 1·(1,0) + 2·(0,1): ‖·‖² = 5; u = (1, 1): ∂B = 1·1 + 2·1 = 3: 9.
//! let exact = reference::lora_site(&inputs).unwrap();
//! assert_eq!((exact.sq_a[0], exact.sq_b[0]), (5.0, 9.0));
//! match GpuFisher::new() {
//!     Ok(gpu) => {
//!         let out = gpu.lora_site(&inputs, Mode::Fp32).unwrap();
//!         assert!((out.sq_a[0] - 5.0).abs() < 1e-5 && (out.sq_b[0] - 9.0).abs() < 1e-5);
//!     }
//!     // A machine without a GPU says why, e.g. "no CUDA driver (libcuda not found)".
//!     Err(why) => eprintln!("CPU only: {why}"),
//! }
//! ```

mod device;
mod error;
pub mod reference;
mod shape;

pub use device::{
    BuildInfo, Compiled, DenseJob, GpuFisher, KERNEL_NAMES, LoraJob, Timing, compile, compile_ptx,
    driver_present, driver_version, nvrtc_present, nvrtc_version,
};
pub use error::{KernelError, ShapeError};
pub use shape::{
    DenseInputs, DenseShape, DenseSquares, LoraInputs, LoraProducts, LoraShape, LoraSquares,
    MAX_DIM,
};

/// The arithmetic of the per-sample products.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Mode {
    /// fp32 FMAs on the CUDA cores: the same rounding class as the CPU code (relative
    /// error around 1e-6, tests allow 1e-5).
    #[default]
    Fp32,
    /// Tensor cores with inputs rounded to tf32 (10-bit mantissa) and fp32 accumulation:
    /// expected relative error ≈ 3e-4 on a gradient entry and ≈ 6e-4 on its square (tests
    /// allow 2e-3). Needs compute capability 8.0 or later.
    Tf32,
}

impl Mode {
    /// "fp32" or "tf32".
    pub fn name(self) -> &'static str {
        match self {
            Self::Fp32 => "fp32",
            Self::Tf32 => "tf32",
        }
    }
}

/// A usable GPU for a test, or `None` after writing `skipped: <test>: <why>` to stderr.
///
/// The line goes straight to the process's stderr, past the test harness's output
/// capture, so that `cargo test` shows every GPU test that did not run: a test without
/// a GPU never passes silently. One GPU per process (compiling the kernels once).
pub fn gpu_for_test(test: &str) -> Option<&'static GpuFisher> {
    use std::io::Write as _;
    use std::sync::OnceLock;
    static GPU: OnceLock<Result<GpuFisher, KernelError>> = OnceLock::new();
    match GPU.get_or_init(GpuFisher::new) {
        Ok(gpu) => Some(gpu),
        Err(why) => {
            // One write of the whole line, so that parallel tests do not interleave it.
            let line = format!("skipped: {test}: {why}\n");
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
            None
        }
    }
}
