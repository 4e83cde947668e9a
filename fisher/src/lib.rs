//! Diagonal empirical Fisher information for FibecFed: per-sample gradient squares of
//! LoRA sites and of the classification head, and their diagonal sums.
//!
//! Owns the arithmetic on arrays only: it knows nothing about transformers. A site is
//! described by its input rows x, output-gradient rows δ, token mask, factors A and B
//! and scale ([`SiteRows`]), which is exactly what `fibecfed-transformer`'s backward
//! hook hands out. Per sample i (rows t of that sequence), with u_t = A·x_t and
//! v_t = scale·Bᵀ·δ_t:
//!
//! ∂ℓ_i/∂A = Σ_t v_t x_tᵀ,   ∂ℓ_i/∂B = scale · Σ_t δ_t u_tᵀ.
//!
//! [`sq_norms`] gives ‖∂ℓ_i/∂A‖² and ‖∂ℓ_i/∂B‖² per sample, by the Gram ("ghost") form
//! Σ_{t,t'} (v_t·v_t')(x_t·x_t') or by forming one sample's gradient at a time
//! ([`NormMethod::Auto`] picks by cost: Gram when T·(r+d) < r·d, which for a LoRA
//! factor means fewer tokens than about r; at LoRA ranks forming the small r×d
//! gradient is usually cheaper, while the Gram form is what pays for wide dense
//! gradients); [`site_fisher`] also sums the squared gradients over samples (the diagonal
//! Fisher F_A, F_B) one sample at a time, never holding a (batch × r × d) tensor.
//!
//! Built on those squares, still on arrays and scores only:
//! - [`DiagFisher`]: the diagonal sums of a whole adapter keyed by the caller's site
//!   names, [`FisherMomentum`] (F_t = γ·F_{t−1} + (1−γ)·F̂_t);
//! - [`SampleStats`] and the [`DifficultyScorer`] trait ([`FisherTrace`], [`LossScore`]),
//!   [`LabelMode`] and [`sample_labels`] for the sampled-label Fisher;
//! - layer importance ([`normalise`]d Fisher sums, or [`PerturbationImportance`]) and
//!   the server's [`LayerSelector`] ([`ConsensusTopK`], [`RandomLayers`], [`AllLayers`]);
//! - sparse update masks ([`site_mask`], [`Granularity`]) keeping the top ⌈ρ·n⌉ units.
//!
//! Site squares run on the CPU ([`CpuBackend`]) or, through the fused CUDA kernels of
//! `fibecfed-kernels`, on a GPU ([`CudaBackend`]); both implement [`FisherBackend`] with
//! the same checks and output layout.
//!
//! What it does not do: run a model. The simulator (`fibecfed-sim`) feeds the
//! transformer's backward hook into [`FisherBackend::site`] and [`head_fisher`].
//!
//! ```
//! use fibecfed_fisher::{NormMethod, SiteRows, sq_norms};
//! use ndarray::array;
//! // One sample of two tokens, d_in = 2, d_out = 1, r = 1.
//! let x = array![[1.0_f64, 0.0], [0.0, 1.0]];
//! let delta = array![[1.0_f64], [2.0]];
//! let mask = array![1.0_f64, 1.0];
//! let (a, b) = (array![[1.0_f64, 1.0]], array![[1.0_f64]]);
//! let rows = SiteRows { x: x.view(), delta: delta.view(), mask: mask.view(), batch: 1, seq_len: 2, a: a.view(), b: b.view(), scale: 1.0, products: None };
//! let (sq_a, sq_b) = sq_norms(&rows, NormMethod::Auto).unwrap();
//! // ∂A = [1·(1,0) + 2·(0,1)] = (1, 2): ‖·‖² = 5. u = (1, 1): ∂B = 1·1 + 2·1 = 3: 9.
//! assert_eq!((sq_a[0], sq_b[0]), (5.0, 9.0));
//! ```

mod cuda;
mod diag;
mod importance;
mod mask;
mod score;
mod squares;

pub use cuda::CudaBackend;
pub use diag::{DiagFisher, FisherMomentum, HeadDiag, SiteDiag};
/// The GPU side's error and precision, re-exported so that callers of [`CudaBackend`]
/// need no direct dependency on `fibecfed-kernels`.
pub use fibecfed_kernels::{KernelError, Mode as GpuMode};
pub use importance::{
    AllLayers, ConsensusTopK, ImportanceReport, LayerSelector, PerturbationImportance,
    RandomLayers, ceil_fraction, consensus, gal_count, normalise, top_k,
};
pub use mask::{Granularity, SiteMask, neuron_scores, site_mask};
pub use score::{
    DifficultyScorer, FisherTrace, LabelMode, LossScore, SampleStats, sample_labels, scores,
};
pub use squares::{
    CpuBackend, FisherBackend, HeadSquares, NormMethod, Products, SiteRows, SiteSquares,
    head_fisher, site_fisher, sq_norms,
};

/// Everything this crate can refuse: the message names the tensor, sample or setting.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FisherError {
    #[error("Fisher shapes: {0}")]
    Shape(String),
    #[error("Fisher settings: {0}")]
    Config(String),
    #[error("not finite: {0}")]
    NonFinite(String),
    /// The GPU backend failed after its inputs passed the shape checks.
    #[error("GPU: {0}")]
    Device(String),
}
