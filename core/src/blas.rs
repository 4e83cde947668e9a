//! OpenBLAS's thread count: one thread by default, because the workspace parallelises
//! above it.
//!
//! The encoder (`fibecfed-transformer`) runs its GEMMs over row blocks on rayon's
//! workers, and the Fisher loops (`fibecfed-fisher`) run one sample per worker, each
//! issuing small GEMMs. If OpenBLAS also starts its own threads inside them, the two
//! pools fight over the cores: its workers busy-wait (sched_yield) between calls and
//! steal cores from everything that is not a GEMM, and a 0.4 ms Fisher site takes 40 ms
//! (measured by the `fisher` bench). `FIBECFED_BLAS_THREADS` set in the environment
//! leaves OpenBLAS's own threads alone.

use std::os::raw::c_int;
use std::sync::Once;

unsafe extern "C" {
    fn openblas_set_num_threads(n: c_int);
}

static SINGLE: Once = Once::new();

/// Once per process: puts OpenBLAS in single-threaded mode, unless
/// `FIBECFED_BLAS_THREADS` is set. Callers run it before their first GEMM; later calls
/// do nothing, so a count chosen by [`set_threads`] stays.
pub fn single_threaded() {
    SINGLE.call_once(|| {
        if std::env::var_os("FIBECFED_BLAS_THREADS").is_none() {
            // SAFETY: a plain setter in libopenblas (linked through openblas-src).
            unsafe { openblas_set_num_threads(1) };
        }
    });
}

/// Sets OpenBLAS's own thread count (at least 1), whatever the environment says
/// (benchmarks use it to measure the BLAS's best sgemm rate). It counts as the
/// [`single_threaded`] call, so no later one resets the count to 1.
pub fn set_threads(n: usize) {
    single_threaded();
    // SAFETY: a plain setter in libopenblas; n is clamped into c_int's range.
    unsafe { openblas_set_num_threads(c_int::try_from(n.max(1)).unwrap_or(c_int::MAX)) };
}

#[cfg(test)]
mod tests {
    use super::*;

    unsafe extern "C" {
        fn openblas_get_num_threads() -> c_int;
    }

    #[test]
    fn set_threads_sticks_and_single_threaded_does_not_undo_it() {
        set_threads(2);
        single_threaded();
        // SAFETY: a plain getter in libopenblas.
        assert_eq!(unsafe { openblas_get_num_threads() }, 2);
        set_threads(0);
        // SAFETY: as above.
        assert_eq!(unsafe { openblas_get_num_threads() }, 1);
    }
}
