//! Per-sample difficulty: what a Fisher pass records about each sample, the scorers
//! that turn it into one number, and the labels the Fisher is taken at.

use fibecfed_core::Real;
use ndarray::ArrayView2;
use rand::Rng;

use crate::{FisherError, NonFinite};

/// What one pass over a client's data records about a sample.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleStats {
    /// ℓ_i, natural-log cross-entropy at the label the Fisher was taken at.
    pub loss: f64,
    /// Σ_p (∂ℓ_i/∂p)² over every LoRA A, LoRA B and head parameter: the trace of the
    /// sample's empirical Fisher.
    pub fisher: f64,
    /// The same sum restricted to each layer's LoRA parameters.
    pub per_layer: Vec<f64>,
    /// The head's part of `fisher`.
    pub head: f64,
}

impl SampleStats {
    /// All sums zero, for `layers` layers: what a pass starts each sample from.
    pub fn zeros(layers: usize) -> Self {
        Self {
            loss: 0.0,
            fisher: 0.0,
            per_layer: vec![0.0; layers],
            head: 0.0,
        }
    }
}

/// Turns a sample's statistics into a difficulty (larger = harder).
pub trait DifficultyScorer: std::fmt::Debug + Send + Sync {
    fn name(&self) -> &'static str;
    fn score(&self, sample: &SampleStats) -> f64;
}

/// FibecFed's difficulty: the trace of the sample's empirical Fisher.
#[derive(Debug, Clone, Copy, Default)]
pub struct FisherTrace;

impl DifficultyScorer for FisherTrace {
    fn name(&self) -> &'static str {
        "fisher"
    }
    fn score(&self, sample: &SampleStats) -> f64 {
        sample.fisher
    }
}

/// The loss-based curriculum's difficulty.
#[derive(Debug, Clone, Copy, Default)]
pub struct LossScore;

impl DifficultyScorer for LossScore {
    fn name(&self) -> &'static str {
        "loss"
    }
    fn score(&self, sample: &SampleStats) -> f64 {
        sample.loss
    }
}

/// Scores every sample, failing on the first that is not finite.
pub fn scores(
    scorer: &dyn DifficultyScorer,
    samples: &[SampleStats],
) -> Result<Vec<f64>, FisherError> {
    samples
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let v = scorer.score(s);
            if v.is_finite() {
                Ok(v)
            } else {
                Err(NonFinite::Difficulty {
                    sample: i,
                    scorer: scorer.name(),
                    value: v,
                }
                .into())
            }
        })
        .collect()
}

/// Which label the per-sample gradient is taken at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LabelMode {
    /// The sample's true label: the empirical Fisher.
    #[default]
    True,
    /// y ~ p(·|x) from the model itself, drawn from a seeded generator.
    Sampled,
}

/// Draws y_i ~ softmax(logits_i) for every row.
// A view is a cheap handle, passed by value like the encoder hands it out.
#[allow(clippy::needless_pass_by_value)]
pub fn sample_labels<F: Real>(
    logits: ArrayView2<'_, F>,
    rng: &mut impl Rng,
) -> Result<Vec<usize>, FisherError> {
    logits
        .rows()
        .into_iter()
        .enumerate()
        .map(|(i, row)| {
            let row: Vec<f64> = row.iter().map(|v| v.to_f64().unwrap_or(f64::NAN)).collect();
            if row.is_empty() || row.iter().any(|v| !v.is_finite()) {
                return Err(NonFinite::Logits {
                    sample: i,
                    logits: row,
                }
                .into());
            }
            let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = row.iter().map(|v| (v - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            let mut u = rng.random::<f64>() * total;
            for (c, w) in weights.iter().enumerate() {
                if u < *w {
                    return Ok(c);
                }
                u -= w;
            }
            Ok(row.len() - 1)
        })
        .collect()
}
