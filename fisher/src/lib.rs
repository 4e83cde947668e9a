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
//! - sparse update masks ([`site_mask`], [`Granularity`]) keeping the top ⌈ρ·n⌉ units,
//!   and the one-time pruning of the authors' code ([`PruneScores`], [`prune_lowest`]):
//!   the ⌈ratio·n⌉ output neurons with the lowest Fisher proxy (ΔW/lr)².
//!
//! Site squares run on the CPU ([`CpuBackend`]) or, through the fused CUDA kernels of
//! `fibecfed-kernels`, on a GPU ([`CudaBackend`]); both implement [`FisherBackend`] with
//! the same checks and output layout.
//!
//! Every refusal is a [`FisherError`] whose fields name the tensor and its expected and
//! found shapes, the sample or layer whose value is not finite ([`NonFinite`]), the
//! [`Setting`] out of range, or, through [`FisherError::Device`], the GPU's own
//! [`KernelError`].
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
mod prune;
mod score;
mod squares;

pub use cuda::CudaBackend;
pub use diag::{DiagFisher, FisherMomentum, HeadDiag, SiteDiag};
/// The GPU side's errors and precision, re-exported so that callers of [`CudaBackend`]
/// need no direct dependency on `fibecfed-kernels`.
pub use fibecfed_kernels::{KernelError, Mode as GpuMode, ShapeError as KernelShapeError};
pub use importance::{
    AllLayers, ConsensusTopK, FixedLayers, ImportanceReport, LayerSelector, NoLayers,
    PerturbationImportance, RandomLayers, ReportWeighting, SelectEnd, bottom_k, ceil_fraction,
    consensus, gal_count, normalise, top_k,
};
pub use mask::{Granularity, SiteMask, neuron_scores, site_mask};
pub use prune::{PruneScores, delta_scores, prune_lowest};
pub use score::{
    DifficultyScorer, FisherTrace, LabelMode, LossScore, SampleStats, sample_labels, scores,
};
pub use squares::{
    CpuBackend, FisherBackend, HeadSquares, NormMethod, Products, SiteRows, SiteSquares,
    head_fisher, site_fisher, sq_norms,
};

/// Everything this crate can refuse, with the tensor, sample, layer or setting named in
/// fields that callers can match on.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum FisherError {
    /// An input whose shape disagrees with the others: `tensor` has shape `found`
    /// where `meaning` (e.g. "batch·seq_len × d_in of A") makes `expected`.
    #[error("Fisher shapes: {tensor} has shape {found:?}, expected {expected:?} ({meaning})")]
    Shape {
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
        meaning: &'static str,
    },
    /// batch × seq_len, the number of rows of a batch, does not fit in `usize`.
    #[error("Fisher shapes: batch × seq_len overflows ({batch} × {seq_len})")]
    RowsOverflow { batch: usize, seq_len: usize },
    /// An internal array could not be laid out contiguously.
    #[error("Fisher shapes: {tensor} is not contiguous")]
    NotContiguous { tensor: &'static str },
    /// `what` (a site, a config) names a layer the model does not have.
    #[error("{what}: layer {layer} does not exist (the model has layers 0..{n_layers})")]
    NoSuchLayer {
        what: String,
        layer: usize,
        n_layers: usize,
    },
    /// A setting outside its range.
    #[error("Fisher settings: {setting} must be in {}, got {value}", .setting.range())]
    Config { setting: Setting, value: f64 },
    /// Importance reports from `reports` clients, none of them over any sample: there is
    /// nothing to weight a consensus by.
    #[error("no client reported layer importance over any samples ({reports} reports)")]
    NoReportedSamples { reports: usize },
    /// Diagonal Fisher sums whose sample count was left at 0, so no mean can be taken.
    #[error(
        "diagonal Fisher sums with a sample count of 0: set `samples` to the number of samples added"
    )]
    ZeroSampleCount,
    /// A value that must be finite (and, for scores, non-negative) is not.
    #[error("not finite: {0}")]
    NonFinite(#[from] NonFinite),
    /// The GPU backend failed after its inputs passed the shape checks, or refused a
    /// shape its kernels cannot index (dimensions beyond 32-bit indices) that the CPU
    /// backend would take.
    #[error("GPU: {0}")]
    Device(#[from] KernelError),
}

/// A setting that [`FisherError::Config`] refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    /// g, the fraction of layers aggregated globally: [0, 1].
    GlobalFraction,
    /// γ, the Fisher momentum: [0, 1].
    Momentum,
    /// ρ, the fraction of a site's units a sparse mask keeps: (0, 1].
    KeptFraction,
    /// The fraction of a client's local neurons pruned: (0, 1).
    PruneRatio,
}

impl Setting {
    /// The allowed range, as a message writes it.
    pub fn range(self) -> &'static str {
        match self {
            Self::GlobalFraction | Self::Momentum => "[0, 1]",
            Self::KeptFraction => "(0, 1]",
            Self::PruneRatio => "(0, 1)",
        }
    }
}

impl std::fmt::Display for Setting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::GlobalFraction => "the global-layer fraction g",
            Self::Momentum => "Fisher momentum γ",
            Self::KeptFraction => "the kept fraction ρ",
            Self::PruneRatio => "the pruned fraction",
        })
    }
}

/// Which value was not finite ([`FisherError::NonFinite`]), and where. The values are
/// kept as found, so a NaN field compares unequal to itself: match on the indices.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum NonFinite {
    /// A layer importance score given to [`normalise`]: NaN, infinite or negative.
    #[error("layer {layer} has importance score {score}; scores must be finite and non-negative")]
    ImportanceScore { layer: usize, score: f64 },
    /// A perturbation's noise norm ‖ε_i‖ that is not finite and positive.
    #[error(
        "perturbation: sample {sample} has noise norm {norm}; noise norms must be finite and positive"
    )]
    NoiseNorm { sample: usize, norm: f64 },
    /// Layer `layer` of client `client`'s importance report.
    #[error("client report {client}: layer {layer} importance is {value}")]
    ReportedImportance {
        client: usize,
        layer: usize,
        value: f64,
    },
    /// Sample `sample`'s difficulty under the scorer named `scorer`.
    #[error("sample {sample}: {scorer} difficulty is {value}")]
    Difficulty {
        sample: usize,
        scorer: &'static str,
        value: f64,
    },
    /// Sample `sample`'s logits, empty or holding a NaN or infinity: no label can be
    /// drawn from them.
    #[error("sample {sample}: logits {logits:?} cannot be sampled from")]
    Logits { sample: usize, logits: Vec<f64> },
    /// Output neuron `neuron` of site `site` (in the caller's order) of a pruning
    /// score.
    #[error("pruning: neuron {neuron} of site {site} has score {value}")]
    PruneScore {
        site: usize,
        neuron: usize,
        value: f64,
    },
    /// The Fisher entry `at` (row, column) of factor `factor` ("A" or "B") of the site a
    /// mask was asked for.
    #[error("cannot build a mask from a Fisher entry of {value} (factor {factor} at {at:?})")]
    FisherEntry {
        factor: &'static str,
        at: [usize; 2],
        value: f64,
    },
}
