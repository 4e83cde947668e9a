//! The floating-point element type of the encoder, its adapters and the Fisher
//! arithmetic.
//!
//! Training runs in `f32`; tests run the same code in `f64` so that finite differences
//! check the hand-written backward pass without round-off drowning the signal.

use std::fmt::{Debug, Display};
use std::iter::Sum;
use std::ops::{AddAssign, DivAssign, MulAssign, SubAssign};

use ndarray::{LinalgScalar, ScalarOperand};
use num_traits::Float;

/// A float the workspace computes in: `f32` (production) or `f64` (reference checks).
///
/// The supertraits are what ndarray's products ([`LinalgScalar`], [`ScalarOperand`])
/// and generic numeric code ([`Float`], [`Sum`], the assigning operators) need; the
/// methods are the conversions and the encoder's activation functions.
pub trait Real:
    Float
    + LinalgScalar
    + ScalarOperand
    + Sum
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + Default
    + Send
    + Sync
    + Debug
    + Display
    + 'static
{
    /// Lossless for f32 inputs in both implementations.
    fn from_f32(x: f32) -> Self;
    /// Rounds to nearest for `f32`; the identity for `f64`.
    fn from_f64(x: f64) -> Self;
    /// Rounds to nearest for `f64`; the identity for `f32`.
    fn as_f32(self) -> f32;
    /// Lossless in both implementations.
    fn as_f64(self) -> f64;
    /// `exp` for the hot loops (softmax, GELU). `f32` uses a branch-free polynomial that
    /// the compiler vectorises (≤ 2 ulp on the range that matters); `f64` uses libm so
    /// the reference path stays exact.
    fn fast_exp(self) -> Self;
    /// The error function, accurate to the type's precision for the GELU of BERT.
    fn erf(self) -> Self;
    /// Exact GELU x·Φ(x) and its derivative Φ(x) + x·φ(x).
    fn gelu_with_grad(self) -> (Self, Self) {
        let half = Self::from_f64(0.5);
        let cdf =
            half * (Self::one() + (self * Self::from_f64(std::f64::consts::FRAC_1_SQRT_2)).erf());
        let pdf = Self::from_f64(1.0 / (2.0 * std::f64::consts::PI).sqrt())
            * (-half * self * self).fast_exp();
        (self * cdf, cdf + self * pdf)
    }
}

impl Real for f32 {
    #[inline]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    #[inline]
    fn as_f32(self) -> f32 {
        self
    }
    #[inline]
    fn as_f64(self) -> f64 {
        f64::from(self)
    }
    #[inline]
    fn fast_exp(self) -> Self {
        exp_f32(self)
    }
    #[inline]
    fn erf(self) -> Self {
        erf_f32(self)
    }
    #[inline]
    fn gelu_with_grad(self) -> (Self, Self) {
        gelu_f32(self)
    }
}

impl Real for f64 {
    #[inline]
    fn from_f32(x: f32) -> Self {
        f64::from(x)
    }
    #[inline]
    fn from_f64(x: f64) -> Self {
        x
    }
    #[inline]
    fn as_f32(self) -> f32 {
        self as f32
    }
    #[inline]
    fn as_f64(self) -> f64 {
        self
    }
    #[inline]
    fn fast_exp(self) -> Self {
        self.exp()
    }
    #[inline]
    fn erf(self) -> Self {
        libm::erf(self)
    }
}

/// `exp(x)` in f32 by range reduction x = k·ln2 + r, |r| ≤ ln2/2, and a degree-6
/// polynomial for e^r (Cephes' coefficients); ≤ 2 ulp. Inputs below −87.3 flush to 0
/// (softmax relies on exp(−∞) = 0) and inputs above 88 saturate at e^88 (callers here
/// only pass x ≤ 0). Branch-free and free of float→int casts, whose saturating
/// semantics would stop the loop from vectorising.
#[inline]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5·2²³ rounds to an integer and leaves it in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    // Plain multiply-adds, not `mul_add`: without a target FMA unit that becomes a
    // libm call per element.
    let xc = x.clamp(-87.336_54, 88.0);
    let kb = xc * LOG2E + MAGIC;
    let k = kb - MAGIC;
    let r = xc - k * LN2_HI - k * LN2_LO;
    let r2 = r * r;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e = p * r2 + r + 1.0;
    // 2^k from k's two's-complement bits; k is in [-126, 127] after the clamp.
    let k_bits = kb.to_bits().wrapping_sub(MAGIC.to_bits());
    let scale = f32::from_bits(k_bits.wrapping_add(127) << 23);
    let y = e * scale;
    if x < -87.336_54 { 0.0 } else { y }
}

/// erf(x) in f32 via Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5e-7), the same
/// approximation PyTorch's vectorised CPU GELU uses, so our GELU agrees with it to
/// round-off.
#[inline]
pub fn erf_f32(x: f32) -> f32 {
    let ax = x.abs();
    (1.0 - erfc_poly(ax) * exp_f32(-ax * ax)).copysign(x)
}

/// The A&S 7.1.26 factor: erf(z) = 1 − poly(z)·e^(−z²) for z ≥ 0.
#[inline]
fn erfc_poly(z: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A1: f32 = 0.254_829_6;
    const A2: f32 = -0.284_496_74;
    const A3: f32 = 1.421_413_7;
    const A4: f32 = -1.453_152_1;
    const A5: f32 = 1.061_405_4;
    let t = 1.0 / (P * z + 1.0);
    ((((A5 * t + A4) * t + A3) * t + A2) * t + A1) * t
}

/// GELU and its derivative with one exponential: A&S 7.1.26 writes erf(z) through
/// e^(−z²), and at z = x/√2 that is e^(−x²/2), which is also √(2π)·φ(x).
#[inline]
pub fn gelu_f32(x: f32) -> (f32, f32) {
    const INV_SQRT2: f32 = std::f32::consts::FRAC_1_SQRT_2;
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    let e = exp_f32(-0.5 * x * x);
    let erf = (1.0 - erfc_poly((x * INV_SQRT2).abs()) * e).copysign(x);
    let cdf = 0.5 * (1.0 + erf);
    (x * cdf, cdf + x * INV_SQRT_2PI * e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_round_trip() {
        for x in [
            0.0_f32,
            -0.0,
            1.0,
            -2.5,
            1.0e-30,
            3.4e38,
            f32::MIN_POSITIVE,
            0.1,
        ] {
            assert_eq!(f32::from_f32(x).to_bits(), x.to_bits());
            assert_eq!(f64::from_f32(x).as_f32().to_bits(), x.to_bits());
            assert_eq!(f32::from_f64(x.as_f64()).to_bits(), x.to_bits());
            assert_eq!(f64::from_f64(f64::from(x)).as_f64(), f64::from(x));
        }
        // f64 → f32 rounds to nearest.
        assert_eq!(f32::from_f64(0.1), 0.1_f32);
        assert_eq!(0.1_f64.as_f32(), 0.1_f32);
        assert!(f32::from_f64(f64::NAN).is_nan());
    }

    #[test]
    fn exp_matches_std_to_a_few_ulp() {
        let mut worst = 0.0_f64;
        let mut x = -87.0_f32;
        while x < 88.0 {
            let want = f64::from(x).exp();
            let got = f64::from(exp_f32(x));
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 3.0e-7, "worst relative error {worst}");
        assert_eq!(exp_f32(-1.0e30), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn fused_gelu_matches_f64() {
        let mut x = -8.0_f32;
        while x < 8.0 {
            let (y, dy) = gelu_f32(x);
            let (wy, wdy) = f64::from(x).gelu_with_grad();
            assert!(
                (f64::from(y) - wy).abs() < 2e-6 * (1.0 + wy.abs()),
                "gelu({x})"
            );
            assert!((f64::from(dy) - wdy).abs() < 2e-6, "gelu'({x})");
            x += 0.0071;
        }
    }

    #[test]
    fn erf_matches_libm_within_a_s_bound() {
        let mut worst = 0.0_f64;
        let mut x = -6.0_f64;
        while x < 6.0 {
            let got = f64::from(erf_f32(x as f32));
            worst = worst.max((got - libm::erf(f64::from(x as f32))).abs());
            x += 0.001;
        }
        // A&S 7.1.26's own bound is 1.5e-7; evaluating the Horner chain, the exp and
        // 1 − poly·exp in f32 adds a few ulp of values near 1 (6e-8 each).
        assert!(worst < 1.0e-6, "worst absolute error {worst}");
    }
}
