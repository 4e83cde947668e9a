//! OpenBLAS in single-threaded mode before the parallel per-sample loops, and the
//! AVX2 + FMA build of those loops where the CPU has it.
//!
//! [`crate::site_fisher`] runs its samples on rayon's workers, each issuing small
//! GEMMs. If OpenBLAS also starts its own threads inside them, the two pools fight over
//! the cores and a 0.4 ms site takes 40 ms (measured by the `fisher` bench). The
//! encoder (`fibecfed-transformer`) makes the same choice for the same reason;
//! `FIBECFED_BLAS_THREADS` set leaves OpenBLAS's threads alone in both.

use std::os::raw::c_int;
use std::sync::Once;

unsafe extern "C" {
    fn openblas_set_num_threads(n: c_int);
}

static ONCE: Once = Once::new();

pub(crate) fn single_threaded() {
    ONCE.call_once(|| {
        if std::env::var_os("FIBECFED_BLAS_THREADS").is_none() {
            // SAFETY: a plain setter in libopenblas (linked through openblas-src).
            unsafe { openblas_set_num_threads(1) };
        }
    });
}

/// Runs `f` compiled for AVX2 + FMA when the CPU has them, else for the baseline
/// target, chosen at run time so that a release build runs on any x86-64 machine (the
/// encoder's `ops::simd` does the same for its elementwise loops).
#[allow(clippy::inline_always)]
#[inline(always)]
pub(crate) fn simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: both features were detected on this CPU just above.
            return unsafe { with_avx2(f) };
        }
    }
    f()
}
