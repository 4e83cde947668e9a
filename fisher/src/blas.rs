//! OpenBLAS in single-threaded mode before the parallel per-sample loops.
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
