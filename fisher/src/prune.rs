//! The one-time pruning mask of the authors' code (FIBECFED.md §7): each output
//! neuron j of a LoRA site is scored by mean_i (ΔW_eff[j,i] / lr)² over a local epoch,
//! ΔW_eff the epoch's change of the site's effective weight (a squared update over lr²
//! approximates a squared gradient: an empirical-Fisher proxy), with a momentum over
//! epochs; the lowest ⌈ratio·n⌉ neurons over all of a client's own layers are pruned.

use ndarray::ArrayView2;

use crate::{FisherError, NonFinite, Setting, ceil_fraction};

/// score_j = mean_i (Δ[j,i] / lr)² of one site's change of effective weight Δ
/// (d_out × d_in, row j = output neuron j), in f64.
pub fn delta_scores(delta: &ArrayView2<'_, f64>, lr: f64) -> Vec<f64> {
    let d_in = delta.ncols().max(1) as f64;
    delta
        .rows()
        .into_iter()
        .map(|row| row.iter().map(|&v| (v / lr) * (v / lr)).sum::<f64>() / d_in)
        .collect()
}

/// The per-site neuron scores with their momentum over epochs: the first epoch's
/// scores as they are, then m ← (1−μ)·m + μ·score. Each site keeps its own momentum
/// (the authors' code lets the value site's recurrence read the query site's score, a
/// slip this does not copy).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PruneScores {
    momentum: f64,
    scores: Option<Vec<Vec<f64>>>,
}

impl PruneScores {
    /// μ in [0, 1].
    pub fn new(momentum: f64) -> Result<Self, FisherError> {
        if !(0.0..=1.0).contains(&momentum) {
            return Err(FisherError::Config {
                setting: Setting::Momentum,
                value: momentum,
            });
        }
        Ok(Self {
            momentum,
            scores: None,
        })
    }

    /// Folds in one epoch's scores, one vector per site, the same sites each time.
    pub fn add_epoch(&mut self, epoch: Vec<Vec<f64>>) -> Result<(), FisherError> {
        let mu = self.momentum;
        match &mut self.scores {
            None => self.scores = Some(epoch),
            Some(m) => {
                let same =
                    m.len() == epoch.len() && m.iter().zip(&epoch).all(|(a, b)| a.len() == b.len());
                if !same {
                    return Err(FisherError::Shape {
                        tensor: "an epoch's pruning scores".into(),
                        expected: m.iter().map(Vec::len).collect(),
                        found: epoch.iter().map(Vec::len).collect(),
                        meaning: "one score per output neuron of each site, as in the first epoch",
                    });
                }
                for (ms, es) in m.iter_mut().zip(&epoch) {
                    for (v, &s) in ms.iter_mut().zip(es) {
                        *v = (1.0 - mu) * *v + mu * s;
                    }
                }
            }
        }
        Ok(())
    }

    /// The scores so far (empty before the first epoch).
    pub fn scores(&self) -> &[Vec<f64>] {
        self.scores.as_deref().unwrap_or(&[])
    }
}

/// The neurons to prune: the ⌈ratio·n⌉ lowest of all `scores` (n = every site's
/// neurons together), ties going to the earlier site, then the lower neuron. Per site,
/// its pruned neurons in ascending order. The authors' code prunes every score up to
/// and including the (k+1)-th lowest (so at least k+1, and all ties); this prunes
/// exactly k.
pub fn prune_lowest(scores: &[Vec<f64>], ratio: f64) -> Result<Vec<Vec<usize>>, FisherError> {
    if !(ratio > 0.0 && ratio < 1.0) {
        return Err(FisherError::Config {
            setting: Setting::PruneRatio,
            value: ratio,
        });
    }
    let mut all: Vec<(f64, usize, usize)> = Vec::new();
    for (site, s) in scores.iter().enumerate() {
        for (neuron, &value) in s.iter().enumerate() {
            if !value.is_finite() {
                return Err(NonFinite::PruneScore {
                    site,
                    neuron,
                    value,
                }
                .into());
            }
            all.push((value + 0.0, site, neuron));
        }
    }
    let k = ceil_fraction(ratio, all.len());
    all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let mut out = vec![Vec::new(); scores.len()];
    for &(_, site, neuron) in &all[..k] {
        out[site].push(neuron);
    }
    for o in &mut out {
        o.sort_unstable();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    #[test]
    fn scores_momentum_and_the_lowest_against_brute_force() {
        let delta =
            Array2::from_shape_fn((3, 4), |(j, i)| (j as f64 - 1.0) * 0.01 + i as f64 * 1e-3);
        let lr = 2e-3;
        let s = delta_scores(&delta.view(), lr);
        for j in 0..3 {
            let mut want = 0.0;
            for i in 0..4 {
                want += (delta[[j, i]] / lr).powi(2);
            }
            assert!((s[j] - want / 4.0).abs() <= 1e-12 * want.max(1.0));
        }
        let mut m = PruneScores::new(0.5).unwrap();
        m.add_epoch(vec![vec![4.0, 2.0], vec![1.0]]).unwrap();
        m.add_epoch(vec![vec![0.0, 2.0], vec![3.0]]).unwrap();
        m.add_epoch(vec![vec![2.0, 6.0], vec![1.0]]).unwrap();
        // m3 = 0.25·s1 + 0.25·s2 + 0.5·s3.
        assert_eq!(m.scores(), [vec![2.0, 4.0], vec![1.5]]);
        assert!(m.add_epoch(vec![vec![1.0]]).is_err());
        // 7 neurons, ratio 0.3: ⌈2.1⌉ = 3 pruned, ties to the earlier site.
        let scores = vec![vec![0.5, 0.1, 0.9], vec![0.1, 0.7], vec![0.3, 0.2]];
        let pruned = prune_lowest(&scores, 0.3).unwrap();
        assert_eq!(pruned, [vec![1], vec![0], vec![1]]);
        assert_eq!(pruned.iter().map(Vec::len).sum::<usize>(), 3);
        assert!(prune_lowest(&[vec![f64::NAN]], 0.5).is_err());
        assert!(prune_lowest(&scores, 1.0).is_err());
    }
}
