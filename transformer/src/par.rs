//! Parallelism of the encoder: rayon over row blocks, with OpenBLAS kept to one thread.
//!
//! Why not OpenBLAS's own threads: most of a step is many medium GEMMs interleaved
//! with row-wise work. OpenBLAS's workers busy-wait (sched_yield) between calls and so
//! steal the second core from everything that is not a GEMM, and its small-GEMM
//! threading is poor. One level of parallelism (ours) over independent row blocks keeps
//! both cores on useful work. The thread setting itself is `fibecfed_core::blas`.

use std::os::raw::c_int;
use std::sync::Once;

use fibecfed_core::Real;
use ndarray::linalg::general_mat_mul;
use ndarray::parallel::prelude::*;
use ndarray::{Array1, Array2, ArrayView2, ArrayViewMut2, Axis};

static MALLOPT: Once = Once::new();

/// Before the encoder's first GEMM: puts OpenBLAS in single-threaded mode (the encoder
/// parallelises above it; `FIBECFED_BLAS_THREADS` set keeps OpenBLAS's own threads) and,
/// once per process, tells glibc to keep freed memory ([`keep_freed_memory`]).
pub(crate) fn init() {
    fibecfed_core::blas::single_threaded();
    MALLOPT.call_once(keep_freed_memory);
}

/// A training step allocates and frees ~170 MB of activations. glibc's defaults hand
/// large blocks back to the kernel on free (mmap threshold, heap trimming), so every
/// step page-faults and zeroes them again: a third of a forward pass on MiniLM. Keeping
/// freed memory in the heap removes that cost; the process's peak memory is unchanged.
/// `FIBECFED_NO_MALLOPT` set leaves glibc's defaults alone.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn mallopt(param: c_int, value: c_int) -> c_int;
        }
        const M_TRIM_THRESHOLD: c_int = -1;
        const M_TOP_PAD: c_int = -2;
        const M_MMAP_THRESHOLD: c_int = -3;
        if std::env::var_os("FIBECFED_NO_MALLOPT").is_none() {
            // SAFETY: mallopt only changes glibc's allocation policy; the values are in
            // the documented ranges (the mmap threshold's maximum is 32 MiB on 64-bit).
            unsafe {
                mallopt(M_MMAP_THRESHOLD, 32 << 20);
                mallopt(M_TRIM_THRESHOLD, c_int::MAX);
                mallopt(M_TOP_PAD, 256 << 20);
            }
        }
    }
}

/// Rows per block handed to one GEMM call. A constant, never derived from the pool
/// size: OpenBLAS's bits for a row depend on the height of the block it sits in (its
/// kernels pick their unrolling and edge paths from M), so a height that followed
/// `rayon::current_num_threads()` made results depend on the thread count (seen on
/// AVX-512 and on AVX2 kernels alike). 64 rows keep the packing of the weight matrix
/// a few percent of a block's work and give 2 or 3 workers balanced shares of the
/// 200–400-row batches a step sees.
const BLOCK_ROWS: usize = 64;

/// Runs `f` on matching row blocks of `a` and `c` in parallel (or once on the whole
/// when one block covers it).
fn row_blocks<F: Real>(
    a: &ArrayView2<'_, F>,
    c: &mut ArrayViewMut2<'_, F>,
    f: impl Fn(ArrayView2<'_, F>, ArrayViewMut2<'_, F>) + Sync + Send,
) {
    // The last block holds the remainder: the split depends on the row count alone.
    let rows = BLOCK_ROWS;
    if rows >= a.nrows() {
        f(a.view(), c.view_mut());
        return;
    }
    c.axis_chunks_iter_mut(Axis(0), rows)
        .into_par_iter()
        .zip(a.axis_chunks_iter(Axis(0), rows).into_par_iter())
        .for_each(|(cb, ab)| f(ab, cb));
}

/// c ← alpha·a·b + beta·c, split over row blocks of a and c.
pub(crate) fn gemm<F: Real>(
    alpha: F,
    a: &ArrayView2<'_, F>,
    b: &ArrayView2<'_, F>,
    beta: F,
    c: &mut ArrayViewMut2<'_, F>,
) {
    row_blocks(a, c, |ab, mut cb| {
        general_mat_mul(alpha, &ab, b, beta, &mut cb);
    });
}

/// x·Wᵀ + b with W stored out×in; the bias is added inside each row block while it is
/// still in cache.
pub(crate) fn linear<F: Real>(
    x: &ArrayView2<'_, F>,
    weight: &Array2<F>,
    bias: &Array1<F>,
) -> Array2<F> {
    let mut y = Array2::zeros((x.nrows(), weight.nrows()));
    row_blocks(x, &mut y.view_mut(), |xb, mut yb| {
        general_mat_mul(F::one(), &xb, &weight.t(), F::zero(), &mut yb);
        yb += bias;
    });
    y
}
