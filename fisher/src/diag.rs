//! Diagonal Fisher sums over a client's samples, per site and for the head, and the
//! Fisher momentum that smooths them across rounds.

use std::collections::BTreeMap;

use fibecfed_core::Real;
use ndarray::{Array1, Array2, Zip};

use crate::squares::{HeadSquares, SiteSquares};
use crate::{FisherError, Setting};

/// Σ_i (∂ℓ_i/∂A)² and Σ_i (∂ℓ_i/∂B)² of one site, in f64 (sums over thousands of
/// samples lose digits in f32).
#[derive(Debug, Clone, PartialEq)]
pub struct SiteDiag {
    /// r × d_in
    pub a: Array2<f64>,
    /// d_out × r
    pub b: Array2<f64>,
}

impl SiteDiag {
    pub fn zeros(r: usize, d_in: usize, d_out: usize) -> Self {
        Self {
            a: Array2::zeros((r, d_in)),
            b: Array2::zeros((d_out, r)),
        }
    }

    /// Σ over every entry of A and B.
    pub fn total(&self) -> f64 {
        self.a.sum() + self.b.sum()
    }
}

/// Σ_i (∂ℓ_i/∂W)², Σ_i (∂ℓ_i/∂b)² of the classification head.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadDiag {
    /// labels × hidden
    pub weight: Array2<f64>,
    pub bias: Array1<f64>,
}

/// The diagonal empirical Fisher of an adapter, as sums over `samples` samples;
/// [`DiagFisher::mean`] gives F = (1/n) Σ_i g_i ⊙ g_i. Sites are keyed by whatever
/// the caller uses to name them (the simulator uses `fibecfed_lora::SiteId`).
#[derive(Debug, Clone, PartialEq)]
pub struct DiagFisher<K: Ord> {
    pub sites: BTreeMap<K, SiteDiag>,
    pub head: Option<HeadDiag>,
    pub samples: usize,
}

impl<K: Ord> Default for DiagFisher<K> {
    fn default() -> Self {
        Self {
            sites: BTreeMap::new(),
            head: None,
            samples: 0,
        }
    }
}

fn add_into<F: Real, D: ndarray::Dimension>(
    acc: &mut ndarray::Array<f64, D>,
    add: &ndarray::Array<F, D>,
    what: &str,
) -> Result<(), FisherError> {
    if acc.shape() != add.shape() {
        return Err(FisherError::Shape {
            tensor: what.to_owned(),
            expected: acc.shape().to_vec(),
            found: add.shape().to_vec(),
            meaning: "the shape accumulated from earlier batches",
        });
    }
    Zip::from(acc).and(add).for_each(|s, &v| {
        *s += v.to_f64().unwrap_or(f64::NAN);
    });
    Ok(())
}

impl<K: Ord + Clone + std::fmt::Debug> DiagFisher<K> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one batch's diagonal sums of a site (add the batch's size to `samples`
    /// once per batch).
    pub fn add_site<F: Real>(&mut self, key: &K, sq: &SiteSquares<F>) -> Result<(), FisherError> {
        let (r, d_in) = sq.diag_a.dim();
        let entry = self
            .sites
            .entry(key.clone())
            .or_insert_with(|| SiteDiag::zeros(r, d_in, sq.diag_b.nrows()));
        add_into(&mut entry.a, &sq.diag_a, &format!("site {key:?} A"))?;
        add_into(&mut entry.b, &sq.diag_b, &format!("site {key:?} B"))
    }

    /// Adds one batch's diagonal sums of the head.
    pub fn add_head<F: Real>(&mut self, sq: &HeadSquares<F>) -> Result<(), FisherError> {
        let head = self.head.get_or_insert_with(|| HeadDiag {
            weight: Array2::zeros(sq.diag_weight.raw_dim()),
            bias: Array1::zeros(sq.diag_bias.raw_dim()),
        });
        add_into(&mut head.weight, &sq.diag_weight, "head weight")?;
        add_into(&mut head.bias, &sq.diag_bias, "head bias")
    }

    /// The mean over samples: F = (1/n) Σ_i g_i ⊙ g_i. Sums with `samples` = 0 are an
    /// error (the count is set by whoever adds the batches, e.g. `diag.samples += b`).
    pub fn mean(&self) -> Result<Self, FisherError> {
        let empty = self.sites.is_empty() && self.head.is_none();
        if self.samples == 0 && !empty {
            return Err(FisherError::ZeroSampleCount);
        }
        let w = 1.0 / self.samples.max(1) as f64;
        Ok(Self {
            sites: self
                .sites
                .iter()
                .map(|(k, d)| {
                    (
                        k.clone(),
                        SiteDiag {
                            a: &d.a * w,
                            b: &d.b * w,
                        },
                    )
                })
                .collect(),
            head: self.head.as_ref().map(|h| HeadDiag {
                weight: &h.weight * w,
                bias: &h.bias * w,
            }),
            samples: 1,
        })
    }

    /// Σ_{p∈φ_l} F[p] for each of `n_layers` layers; `layer_of` maps a site to its layer.
    pub fn layer_sums(
        &self,
        n_layers: usize,
        layer_of: impl Fn(&K) -> usize,
    ) -> Result<Vec<f64>, FisherError> {
        let mut sums = vec![0.0; n_layers];
        for (k, d) in &self.sites {
            let l = layer_of(k);
            let slot = sums.get_mut(l).ok_or_else(|| FisherError::NoSuchLayer {
                what: format!("site {k:?}"),
                layer: l,
                n_layers,
            })?;
            *slot += d.total();
        }
        Ok(sums)
    }

    /// The first site or head tensor holding a NaN or infinity, if any.
    pub fn first_non_finite(&self) -> Option<String> {
        let bad = |a: &Array2<f64>| a.iter().any(|v| !v.is_finite());
        self.sites
            .iter()
            .find(|(_, d)| bad(&d.a) || bad(&d.b))
            .map(|(k, _)| format!("site {k:?}"))
            .or_else(|| {
                self.head
                    .as_ref()
                    .filter(|h| bad(&h.weight) || h.bias.iter().any(|v| !v.is_finite()))
                    .map(|_| "head".to_string())
            })
    }
}

/// Fisher momentum across rounds, F_t = γ·F_{t−1} + (1−γ)·F̂_t, on per-sample means
/// (so that rounds with different subset sizes weigh alike). [`FisherMomentum::new`]
/// starts from F_0 = 0, the bare recurrence; [`FisherMomentum::seeded`] starts from a
/// given estimate, e.g. the initialisation pass's Fisher. A site absent from a round's
/// estimate counts as zero there (it decays by γ); a new site starts from zero.
#[derive(Debug, Clone)]
pub struct FisherMomentum<K: Ord> {
    gamma: f64,
    state: DiagFisher<K>,
}

fn check_gamma(gamma: f64) -> Result<(), FisherError> {
    if (0.0..=1.0).contains(&gamma) {
        Ok(())
    } else {
        Err(FisherError::Config {
            setting: Setting::Momentum,
            value: gamma,
        })
    }
}

fn same_dim<D: ndarray::Dimension>(
    old: &ndarray::Array<f64, D>,
    new: &ndarray::Array<f64, D>,
    what: &str,
) -> Result<(), FisherError> {
    if old.shape() == new.shape() {
        Ok(())
    } else {
        Err(FisherError::Shape {
            tensor: what.to_owned(),
            expected: old.shape().to_vec(),
            found: new.shape().to_vec(),
            meaning: "the shape the momentum holds",
        })
    }
}

impl<K: Ord + Clone + std::fmt::Debug> FisherMomentum<K> {
    /// γ in [0, 1], F_0 = 0: 0 keeps only the newest estimate, 1 never moves.
    pub fn new(gamma: f64) -> Result<Self, FisherError> {
        check_gamma(gamma)?;
        Ok(Self {
            gamma,
            state: DiagFisher::new(),
        })
    }

    /// γ in [0, 1], F_0 = the per-sample mean of `initial`.
    pub fn seeded(gamma: f64, initial: &DiagFisher<K>) -> Result<Self, FisherError> {
        check_gamma(gamma)?;
        Ok(Self {
            gamma,
            state: initial.mean()?,
        })
    }

    pub fn gamma(&self) -> f64 {
        self.gamma
    }

    /// The smoothed per-sample Fisher.
    pub fn current(&self) -> &DiagFisher<K> {
        &self.state
    }

    /// Folds in a round's sums (divided by their sample count first). Every shape is
    /// checked before anything changes, so an error leaves the momentum as it was.
    pub fn update(&mut self, fresh: &DiagFisher<K>) -> Result<(), FisherError> {
        let fresh = fresh.mean()?;
        for (k, d) in &fresh.sites {
            if let Some(old) = self.state.sites.get(k) {
                same_dim(&old.a, &d.a, &format!("site {k:?} A"))?;
                same_dim(&old.b, &d.b, &format!("site {k:?} B"))?;
            }
        }
        if let (Some(old), Some(new)) = (&self.state.head, &fresh.head) {
            same_dim(&old.weight, &new.weight, "head weight")?;
            same_dim(&old.bias, &new.bias, "head bias")?;
        }
        let (g, h) = (self.gamma, 1.0 - self.gamma);
        let blend = |old: &mut Array2<f64>, new: &Array2<f64>| {
            Zip::from(old)
                .and(new)
                .for_each(|o, &n| *o = g * *o + h * n);
        };
        for (k, old) in &mut self.state.sites {
            if !fresh.sites.contains_key(k) {
                old.a *= g;
                old.b *= g;
            }
        }
        for (k, d) in fresh.sites {
            match self.state.sites.get_mut(&k) {
                Some(old) => {
                    blend(&mut old.a, &d.a);
                    blend(&mut old.b, &d.b);
                }
                None => {
                    self.state.sites.insert(
                        k,
                        SiteDiag {
                            a: d.a * h,
                            b: d.b * h,
                        },
                    );
                }
            }
        }
        match (&mut self.state.head, fresh.head) {
            (Some(old), Some(new)) => {
                blend(&mut old.weight, &new.weight);
                Zip::from(&mut old.bias)
                    .and(&new.bias)
                    .for_each(|o, &n| *o = g * *o + h * n);
            }
            (old @ None, Some(new)) => {
                *old = Some(HeadDiag {
                    weight: new.weight * h,
                    bias: new.bias * h,
                });
            }
            (Some(old), None) => {
                old.weight *= g;
                old.bias *= g;
            }
            (None, None) => {}
        }
        self.state.samples = 1;
        Ok(())
    }
}
