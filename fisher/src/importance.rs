//! Per-layer importance on a client (Fisher sums, or output sensitivity to a perturbed
//! input) and the server's choice of global aggregation layers (GAL) from the clients'
//! reports.

use fibecfed_core::Real;
use ndarray::ArrayView2;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use std::cmp::Ordering;

use crate::{FisherError, NonFinite, Setting};

/// I_l = s_l / Σ s: importance normalised to sum to one. Scores must be finite and
/// non-negative; when every score is zero (no gradient signal at all) each layer gets
/// 1/L, so that no layer is preferred on no evidence.
pub fn normalise(scores: &[f64]) -> Result<Vec<f64>, FisherError> {
    if let Some((l, s)) = scores
        .iter()
        .enumerate()
        .find(|(_, s)| !s.is_finite() || **s < 0.0)
    {
        return Err(NonFinite::ImportanceScore {
            layer: l,
            score: *s,
        }
        .into());
    }
    let total: f64 = scores.iter().sum();
    if total > 0.0 {
        Ok(scores.iter().map(|s| s / total).collect())
    } else {
        Ok(vec![1.0 / scores.len().max(1) as f64; scores.len()])
    }
}

/// Output sensitivity of each layer to a noise-perturbed input:
/// I_l = mean over samples of ‖h_l(x) − h_l(x+ε)‖ / ‖ε‖, norms over the sample's real
/// tokens. Feed it one layer's clean and perturbed outputs per batch.
#[derive(Debug, Clone)]
pub struct PerturbationImportance {
    sums: Vec<f64>,
    counts: Vec<usize>,
}

impl PerturbationImportance {
    pub fn new(n_layers: usize) -> Self {
        Self {
            sums: vec![0.0; n_layers],
            counts: vec![0; n_layers],
        }
    }

    /// Adds layer `layer`'s outputs for a batch: rows b·T + t, `mask` 1 on real tokens,
    /// `noise_norms[i]` = ‖ε_i‖ over sample i's real tokens.
    // Views are cheap handles; taking them by value matches how callers slice them.
    #[allow(clippy::needless_pass_by_value)]
    pub fn add<F: Real>(
        &mut self,
        layer: usize,
        clean: ArrayView2<'_, F>,
        noisy: ArrayView2<'_, F>,
        mask: &[bool],
        seq_len: usize,
        noise_norms: &[f64],
    ) -> Result<(), FisherError> {
        let n_layers = self.sums.len();
        if layer >= n_layers {
            return Err(FisherError::NoSuchLayer {
                what: "perturbation importance".into(),
                layer,
                n_layers,
            });
        }
        let rows = noise_norms.len() * seq_len;
        let shape =
            |tensor: &str, expected: Vec<usize>, found: Vec<usize>, meaning| FisherError::Shape {
                tensor: format!("perturbation {tensor}"),
                expected,
                found,
                meaning,
            };
        if clean.nrows() != rows {
            return Err(shape(
                "clean outputs",
                vec![rows, clean.ncols()],
                clean.shape().to_vec(),
                "samples·seq_len rows, one per token",
            ));
        }
        if noisy.dim() != clean.dim() {
            return Err(shape(
                "perturbed outputs",
                clean.shape().to_vec(),
                noisy.shape().to_vec(),
                "the clean outputs' shape",
            ));
        }
        if mask.len() != rows {
            return Err(shape(
                "mask",
                vec![rows],
                vec![mask.len()],
                "samples·seq_len",
            ));
        }
        if let Some((i, eps)) = noise_norms
            .iter()
            .enumerate()
            .find(|(_, e)| !(e.is_finite() && **e > 0.0))
        {
            return Err(NonFinite::NoiseNorm {
                sample: i,
                norm: *eps,
            }
            .into());
        }
        for (i, &eps) in noise_norms.iter().enumerate() {
            let mut sq = 0.0;
            for t in (i * seq_len..(i + 1) * seq_len).filter(|&t| mask[t]) {
                for (a, b) in clean.row(t).iter().zip(noisy.row(t)) {
                    let d = (*a - *b).to_f64().unwrap_or(f64::NAN);
                    sq += d * d;
                }
            }
            self.sums[layer] += sq.sqrt() / eps;
            self.counts[layer] += 1;
        }
        Ok(())
    }

    /// Mean sensitivities, normalised to sum to one.
    pub fn finish(&self) -> Result<Vec<f64>, FisherError> {
        let means: Vec<f64> = self
            .sums
            .iter()
            .zip(&self.counts)
            .map(|(s, &c)| s / c.max(1) as f64)
            .collect();
        normalise(&means)
    }
}

/// One client's importance report to the server.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportanceReport {
    /// n_k, the client's number of training samples.
    pub samples: usize,
    /// I_l^k per layer, summing to one.
    pub importance: Vec<f64>,
}

/// N = ⌈g·L⌉ layers, g in [0, 1].
pub fn gal_count(fraction: f64, n_layers: usize) -> Result<usize, FisherError> {
    if !(0.0..=1.0).contains(&fraction) {
        return Err(FisherError::Config {
            setting: Setting::GlobalFraction,
            value: fraction,
        });
    }
    Ok(ceil_fraction(fraction, n_layers))
}

/// ⌈f·n⌉ for f in [0, 1], immune to the float noise of f·n (0.07·100 is
/// 7.000000000000001 and must count as 7); at least 1 when f·n > 0, 0 for NaN.
pub fn ceil_fraction(fraction: f64, n: usize) -> usize {
    let exact = fraction * n as f64;
    let k = (exact - 1e-9 * exact.abs().max(1.0)).ceil();
    let floor = if exact > 0.0 { 1.0 } else { 0.0 };
    (k.max(floor) as usize).min(n)
}

/// The consensus I_l = Σ_k (n_k/n)·I_l^k. Each layer's terms are summed in sorted
/// order, so the result is bitwise the same whatever order the reports arrive in.
pub fn consensus(reports: &[ImportanceReport], n_layers: usize) -> Result<Vec<f64>, FisherError> {
    let total: usize = reports.iter().map(|r| r.samples).sum();
    if total == 0 {
        return Err(FisherError::NoReportedSamples {
            reports: reports.len(),
        });
    }
    for (k, r) in reports.iter().enumerate() {
        if r.importance.len() != n_layers {
            return Err(FisherError::Shape {
                tensor: format!("client report {k}'s importance"),
                expected: vec![n_layers],
                found: vec![r.importance.len()],
                meaning: "one score per layer of the model",
            });
        }
        if let Some((l, v)) = r
            .importance
            .iter()
            .enumerate()
            .find(|(_, v)| !v.is_finite())
        {
            return Err(NonFinite::ReportedImportance {
                client: k,
                layer: l,
                value: *v,
            }
            .into());
        }
    }
    Ok((0..n_layers)
        .map(|l| {
            let mut terms: Vec<f64> = reports
                .iter()
                .map(|r| r.samples as f64 / total as f64 * r.importance[l])
                .collect();
            terms.sort_by(f64::total_cmp);
            terms.iter().sum()
        })
        .collect())
}

/// Indices of the k largest scores (all of them when k ≥ n), ties to the lower index,
/// returned ascending.
pub fn top_k(scores: &[f64], k: usize) -> Vec<usize> {
    first_k(scores, k, |a, b| b.total_cmp(a))
}

/// The indices of the first k scores in `order` (ties: the lower index first),
/// ascending.
fn first_k(scores: &[f64], k: usize, order: impl Fn(&f64, &f64) -> Ordering) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| order(&scores[a], &scores[b]).then(a.cmp(&b)));
    idx.truncate(k);
    idx.sort_unstable();
    idx
}

/// Which layers are shared globally, from the clients' importance reports.
pub trait LayerSelector: std::fmt::Debug + Send + Sync {
    /// Ascending layer indices.
    fn select(
        &self,
        reports: &[ImportanceReport],
        n_layers: usize,
    ) -> Result<Vec<usize>, FisherError>;

    /// Whether [`LayerSelector::select`] reads the reports: when it does not, clients
    /// need not run an importance pass for it.
    fn needs_reports(&self) -> bool {
        true
    }
}

/// The k lowest scores' indices, ascending (ties: the lower index first, as in
/// [`top_k`]).
pub fn bottom_k(scores: &[f64], k: usize) -> Vec<usize> {
    first_k(scores, k, f64::total_cmp)
}

/// Which end of the consensus ranking travels (`end = "most" | "least"` in a config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SelectEnd {
    /// The highest scores (the paper's text: the most important layers are global).
    #[default]
    Most,
    /// The lowest scores (the authors' code: the layers least sensitive to an
    /// adversarial nudge are shared, the most sensitive stay local; FIBECFED.md §7).
    Least,
}

/// How clients' reports are combined (`weighting = "samples" | "equal"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportWeighting {
    /// Σ_k (n_k/n)·I_l^k.
    #[default]
    Samples,
    /// Every report counts alike (the authors' code sums the reports; the ranking is
    /// that of the plain mean).
    Equal,
}

/// FibecFed's rule: ⌈g·L⌉ layers from one end of the clients' consensus.
#[derive(Debug, Clone, Copy)]
pub struct ConsensusTopK {
    pub fraction: f64,
    pub end: SelectEnd,
    pub weighting: ReportWeighting,
}

impl ConsensusTopK {
    /// The highest ⌈g·L⌉ layers of the n_k-weighted consensus (the default settings).
    pub fn most(fraction: f64) -> Self {
        Self {
            fraction,
            end: SelectEnd::Most,
            weighting: ReportWeighting::Samples,
        }
    }
}

impl LayerSelector for ConsensusTopK {
    fn select(
        &self,
        reports: &[ImportanceReport],
        n_layers: usize,
    ) -> Result<Vec<usize>, FisherError> {
        let n = gal_count(self.fraction, n_layers)?;
        let scores = match self.weighting {
            ReportWeighting::Samples => consensus(reports, n_layers)?,
            ReportWeighting::Equal => {
                let equal: Vec<ImportanceReport> = reports
                    .iter()
                    .map(|r| ImportanceReport {
                        samples: 1,
                        importance: r.importance.clone(),
                    })
                    .collect();
                consensus(&equal, n_layers)?
            }
        };
        Ok(match self.end {
            SelectEnd::Most => top_k(&scores, n),
            SelectEnd::Least => bottom_k(&scores, n),
        })
    }
}

/// The random-GAL baseline: ⌈g·L⌉ layers drawn uniformly from a seed, ignoring the reports.
#[derive(Debug, Clone, Copy)]
pub struct RandomLayers {
    pub fraction: f64,
    pub seed: u64,
}

impl LayerSelector for RandomLayers {
    fn select(
        &self,
        _reports: &[ImportanceReport],
        n_layers: usize,
    ) -> Result<Vec<usize>, FisherError> {
        let n = gal_count(self.fraction, n_layers)?;
        let mut layers: Vec<usize> = (0..n_layers).collect();
        layers.shuffle(&mut ChaCha8Rng::seed_from_u64(self.seed));
        layers.truncate(n);
        layers.sort_unstable();
        Ok(layers)
    }

    fn needs_reports(&self) -> bool {
        false
    }
}

/// Every layer is global (the g = 1 ablation and the FedAvg-style baselines).
#[derive(Debug, Clone, Copy, Default)]
pub struct AllLayers;

impl LayerSelector for AllLayers {
    fn select(
        &self,
        _reports: &[ImportanceReport],
        n_layers: usize,
    ) -> Result<Vec<usize>, FisherError> {
        Ok((0..n_layers).collect())
    }

    fn needs_reports(&self) -> bool {
        false
    }
}

/// Nothing is global: the local-only baseline.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoLayers;

impl LayerSelector for NoLayers {
    fn select(
        &self,
        _reports: &[ImportanceReport],
        _n_layers: usize,
    ) -> Result<Vec<usize>, FisherError> {
        Ok(Vec::new())
    }

    fn needs_reports(&self) -> bool {
        false
    }
}

/// The global layers named in the config: what participants that never meet at a
/// server-side selection (separate Flower clients) agree on.
#[derive(Debug, Clone, Default)]
pub struct FixedLayers {
    pub layers: Vec<usize>,
}

impl LayerSelector for FixedLayers {
    fn select(&self, _: &[ImportanceReport], layers: usize) -> Result<Vec<usize>, FisherError> {
        if let Some(&layer) = self.layers.iter().find(|&&l| l >= layers) {
            return Err(FisherError::NoSuchLayer {
                what: "the fixed global layers".into(),
                layer,
                n_layers: layers,
            });
        }
        let mut out = self.layers.clone();
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    fn needs_reports(&self) -> bool {
        false
    }
}
