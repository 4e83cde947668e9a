//! Sparse local update masks from the (smoothed) Fisher of a site: which LoRA entries a
//! client updates this round in a non-global layer.

use ndarray::Array2;

use crate::diag::SiteDiag;
use crate::importance::{ceil_fraction, top_k};
use crate::{FisherError, NonFinite, Setting};

/// What a kept "unit" is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    /// Output neurons (rows of B) and rank components (rows of A).
    Neuron,
    /// Single entries of A and of B.
    Parameter,
}

/// `true` where an entry is updated this round; frozen entries keep their value and
/// their optimizer state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteMask {
    /// r × d_in
    pub a: Array2<bool>,
    /// d_out × r
    pub b: Array2<bool>,
}

impl SiteMask {
    /// A mask that updates everything (GAL layers update densely).
    pub fn dense(r: usize, d_in: usize, d_out: usize) -> Self {
        Self {
            a: Array2::from_elem((r, d_in), true),
            b: Array2::from_elem((d_out, r), true),
        }
    }

    /// Number of updated entries of A and of B.
    pub fn kept(&self) -> (usize, usize) {
        let count = |m: &Array2<bool>| m.iter().filter(|&&k| k).count();
        (count(&self.a), count(&self.b))
    }
}

fn check_rho(rho: f64) -> Result<(), FisherError> {
    if rho > 0.0 && rho <= 1.0 {
        Ok(())
    } else {
        Err(FisherError::Config {
            setting: Setting::KeptFraction,
            value: rho,
        })
    }
}

/// Neuron importance of output unit j: Σ_c F[B[j,c]] plus its share of A's Fisher.
/// Rank component c's A mass Σ_k F[A[c,k]] is shared among output units in proportion
/// to F[B[j,c]] (evenly when column c of F_B is all zero), so that a neuron fed by an
/// important rank component counts for more. Rank component c scores
/// Σ_k F[A[c,k]] + Σ_j F[B[j,c]].
pub fn neuron_scores(diag: &SiteDiag) -> (Vec<f64>, Vec<f64>) {
    let (d_out, r) = diag.b.dim();
    let a_mass: Vec<f64> = diag.a.rows().into_iter().map(|row| row.sum()).collect();
    let b_col: Vec<f64> = diag.b.columns().into_iter().map(|col| col.sum()).collect();
    let neurons = (0..d_out)
        .map(|j| {
            (0..r)
                .map(|c| {
                    let f = diag.b[[j, c]];
                    let share = if b_col[c] > 0.0 {
                        f / b_col[c]
                    } else {
                        1.0 / d_out as f64
                    };
                    f + share * a_mass[c]
                })
                .sum()
        })
        .collect();
    let ranks = (0..r).map(|c| a_mass[c] + b_col[c]).collect();
    (neurons, ranks)
}

/// Keeps the top ⌈ρ·n⌉ units of a site by Fisher, ties to the lower index. With
/// `Neuron`, n is d_out for rows of B and r for rows of A; with `Parameter`, n is the
/// entry count of A and of B, each chosen separately.
pub fn site_mask(
    diag: &SiteDiag,
    rho: f64,
    granularity: Granularity,
) -> Result<SiteMask, FisherError> {
    check_rho(rho)?;
    if diag.a.nrows() != diag.b.ncols() {
        return Err(FisherError::Shape {
            tensor: "Fisher of B".into(),
            expected: vec![diag.b.nrows(), diag.a.nrows()],
            found: diag.b.shape().to_vec(),
            meaning: "d_out × the rank of the Fisher of A: ranks differ",
        });
    }
    for (factor, f) in [("A", &diag.a), ("B", &diag.b)] {
        if let Some(((i, j), &value)) = f.indexed_iter().find(|(_, v)| !v.is_finite()) {
            return Err(NonFinite::FisherEntry {
                factor,
                at: [i, j],
                value,
            }
            .into());
        }
    }
    let (r, d_in) = diag.a.dim();
    let d_out = diag.b.nrows();
    let mut mask = SiteMask {
        a: Array2::from_elem((r, d_in), false),
        b: Array2::from_elem((d_out, r), false),
    };
    match granularity {
        Granularity::Neuron => {
            let (neurons, ranks) = neuron_scores(diag);
            for j in top_k(&neurons, ceil_fraction(rho, d_out).max(1)) {
                mask.b.row_mut(j).fill(true);
            }
            for c in top_k(&ranks, ceil_fraction(rho, r).max(1)) {
                mask.a.row_mut(c).fill(true);
            }
        }
        Granularity::Parameter => {
            for (m, f) in [(&mut mask.a, &diag.a), (&mut mask.b, &diag.b)] {
                let scores: Vec<f64> = f.iter().copied().collect();
                let keep = top_k(&scores, ceil_fraction(rho, scores.len()).max(1));
                let flat = m
                    .as_slice_mut()
                    .ok_or(FisherError::NotContiguous { tensor: "mask" })?;
                for i in keep {
                    flat[i] = true;
                }
            }
        }
    }
    Ok(mask)
}
