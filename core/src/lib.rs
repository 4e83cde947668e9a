//! The vocabulary every FibecFed crate shares, each word defined once.
//!
//! Owns:
//! - [`NamedTensors`], the map (PEFT tensor name → f32 array) that travels between
//!   crates: adapter files, client uploads, aggregation, checkpoints;
//! - [`Real`], the float trait the encoder, the adapters and the Fisher arithmetic are
//!   generic over (`f32` in training, `f64` in reference tests), with the `f32`
//!   activation kernels behind it ([`real`]);
//! - [`simd`], the run-time AVX2 + FMA dispatch of hot loops;
//! - [`fsio`], atomic file writes (a unique temporary file, fsync, rename);
//! - [`blas`], OpenBLAS's thread count, and the link to OpenBLAS itself (ndarray's
//!   `blas` feature routes matrix products through cblas; this crate names the
//!   provider, so every crate above gets it by depending on this one).
//!
//! Does not own any algorithm: LoRA, the encoder, Fisher information and aggregation
//! live in their own crates, which depend on this one; it depends on none of ours.
//!
//! ```
//! use fibecfed_core::{NamedTensors, Real, simd};
//! use ndarray::arr1;
//!
//! fn halve<F: Real>(x: F) -> F {
//!     x * F::from_f64(0.5)
//! }
//!
//! let mut tensors = NamedTensors::new();
//! tensors.insert("lora_A.weight".into(), arr1(&[2.0_f32, 4.0]).into_dyn());
//! let halved = simd(|| tensors["lora_A.weight"].mapv(halve));
//! assert_eq!(halved.as_slice().unwrap(), &[1.0, 2.0]);
//! assert_eq!(halve(3.0_f64).as_f32(), 1.5);
//!
//! fibecfed_core::blas::single_threaded();
//! ```

// ndarray's matrix products go to BLAS; this links the OpenBLAS provider.
extern crate blas_src;

pub mod blas;
pub mod fsio;
pub mod real;
mod simd;

use std::collections::BTreeMap;

use ndarray::ArrayD;

pub use real::Real;
pub use simd::simd;

/// Named f32 tensors: PEFT/HF tensor names → arrays, in name order. The currency
/// between crates.
pub type NamedTensors = BTreeMap<String, ArrayD<f32>>;

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{ArrayD, IxDyn, arr2};

    #[test]
    fn named_tensors_iterate_in_name_order_and_keep_shapes() {
        let mut t = NamedTensors::new();
        t.insert("b.lora_B.weight".into(), ArrayD::zeros(IxDyn(&[4, 2])));
        t.insert(
            "a.lora_A.weight".into(),
            arr2(&[[1.0_f32, 2.0, 3.0]]).into_dyn(),
        );
        let names: Vec<&str> = t.keys().map(String::as_str).collect();
        assert_eq!(names, ["a.lora_A.weight", "b.lora_B.weight"]);
        assert_eq!(t["a.lora_A.weight"].shape(), &[1, 3]);
        assert_eq!(t["b.lora_B.weight"].shape(), &[4, 2]);
        assert_eq!(t.clone(), t);
    }
}
