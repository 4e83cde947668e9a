//! Run-time choice between the AVX2 + FMA build of a loop and the baseline one.

/// Runs `f` compiled for AVX2 + FMA when the CPU has them, else for the baseline
/// target. The hot elementwise loops (exp in softmax and GELU, the Fisher squares) run
/// 3–4× faster with 8-wide vectors, and a release build must still run on any x86-64
/// machine, so the choice is made at run time (std caches the CPUID result).
///
/// Why `#[inline(always)]` and generic: `f`'s body is compiled with the features only
/// where it is inlined into `with_avx2`'s instance, which is generated in the caller's
/// crate for each closure. Code that `f` calls must inline into it too (`#[inline]`
/// helpers, generic functions) to get the wide instructions. The features change how
/// the loop is vectorised, never what it computes: Rust does not contract `a * b + c`
/// into an FMA, so the results are the same bits on either path.
///
/// ```
/// let sum = fibecfed_core::simd(|| (1..=4).map(|i| i as f32).sum::<f32>());
/// assert_eq!(sum, 10.0);
/// ```
#[allow(clippy::inline_always)]
#[inline(always)]
pub fn simd<R>(f: impl FnOnce() -> R) -> R {
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

#[cfg(test)]
mod tests {
    use super::simd;

    #[test]
    fn runs_the_closure_once_and_returns_its_value() {
        let mut calls = 0;
        let v = simd(|| {
            calls += 1;
            vec![1.5_f32, 2.5]
        });
        assert_eq!(calls, 1);
        assert_eq!(v, [1.5, 2.5]);
    }

    #[test]
    fn same_bits_as_the_plain_loop() {
        let x: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
        let plain: Vec<f32> = x.iter().map(|&v| v * 1.25 + 0.5).collect();
        let wide = simd(|| x.iter().map(|&v| v * 1.25 + 0.5).collect::<Vec<f32>>());
        assert_eq!(plain, wide);
    }
}
