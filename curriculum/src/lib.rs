//! Curriculum orderings and pacing functions for FibecFed: which sample ids a client
//! trains on at round t.
//!
//! Owns the easy→hard ordering of a client's samples from per-sample difficulty
//! scores ([`Ordering`]: [`EasyFirst`], [`HardFirst`], [`RandomOrder`]), the pacing
//! function c(t) giving the fraction of data in use at round t ([`Pacing`]:
//! [`Linear`], [`Root`], [`Geometric`], [`Step`], [`Constant`]), and the per-client
//! [`Schedule`] that combines them: at round t the ⌈c(t)·n⌉ easiest samples; or, at the
//! authors' unit, [`BatchOrder`]: batches drawn once, ordered by mean difficulty, the
//! ⌈c(t)·n_b⌉ easiest in use. It knows nothing about models or Fisher: scores arrive
//! as `&[f64]` (the `fibecfed-fisher` crate computes them), and [`PacingConfig`] holds
//! the config-file names of the pacing functions (`[pacing] kind = "root"`).
//!
//! ```
//! use fibecfed_curriculum::{EasyFirst, Linear, Ordering, Schedule};
//! let difficulty = [0.9, 0.1, 0.5, 0.3];
//! let order = EasyFirst.order(&difficulty, 0).unwrap();
//! assert_eq!(order, [1, 3, 2, 0]);
//! // Start with c0 = 0.5 of the data, all of it from round λ·T = 2 on.
//! let schedule = Schedule::new(order, Box::new(Linear::new(0.5, 0.5).unwrap()), 4).unwrap();
//! assert_eq!(schedule.samples_at(0), [1, 3]);
//! assert_eq!(schedule.samples_at(1), [1, 3, 2]);
//! assert_eq!(schedule.samples_at(2), [1, 3, 2, 0]);
//! ```

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CurriculumError {
    #[error("curriculum settings: {0}")]
    Config(String),
    #[error("difficulty of sample {index} is {value}: scores must be finite")]
    NonFinite { index: usize, value: String },
}

fn check_scores(scores: &[f64]) -> Result<(), CurriculumError> {
    match scores.iter().position(|s| !s.is_finite()) {
        Some(index) => Err(CurriculumError::NonFinite {
            index,
            value: scores[index].to_string(),
        }),
        None => Ok(()),
    }
}

/// Ids sorted by score, ascending or (`hardest_first`) descending; ties keep the lower
/// id first, and −0.0 ties with 0.0 (`total_cmp` alone ranks −0.0 first).
fn sorted_ids(scores: &[f64], hardest_first: bool) -> Result<Vec<usize>, CurriculumError> {
    check_scores(scores)?;
    let key = |i: usize| scores[i] + 0.0;
    let mut ids: Vec<usize> = (0..scores.len()).collect();
    ids.sort_by(|&a, &b| {
        let by_score = key(a).total_cmp(&key(b));
        let by_score = if hardest_first {
            by_score.reverse()
        } else {
            by_score
        };
        by_score.then(a.cmp(&b))
    });
    Ok(ids)
}

/// Orders a client's samples for the curriculum: the returned ids go easy → hard in
/// the order they are added to training.
pub trait Ordering: std::fmt::Debug + Send + Sync {
    /// A permutation of `0..scores.len()`; `seed` is for orderings that draw.
    fn order(&self, scores: &[f64], seed: u64) -> Result<Vec<usize>, CurriculumError>;
}

/// Ascending difficulty (the curriculum); ties keep the lower id first.
#[derive(Debug, Clone, Copy, Default)]
pub struct EasyFirst;

impl Ordering for EasyFirst {
    fn order(&self, scores: &[f64], _seed: u64) -> Result<Vec<usize>, CurriculumError> {
        sorted_ids(scores, false)
    }
}

/// Descending difficulty (anti-curriculum); ties keep the lower id first.
#[derive(Debug, Clone, Copy, Default)]
pub struct HardFirst;

impl Ordering for HardFirst {
    fn order(&self, scores: &[f64], _seed: u64) -> Result<Vec<usize>, CurriculumError> {
        sorted_ids(scores, true)
    }
}

/// A seeded random order that ignores the scores (the random-curriculum ablation).
#[derive(Debug, Clone, Copy, Default)]
pub struct RandomOrder;

impl Ordering for RandomOrder {
    fn order(&self, scores: &[f64], seed: u64) -> Result<Vec<usize>, CurriculumError> {
        let mut ids: Vec<usize> = (0..scores.len()).collect();
        ids.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        Ok(ids)
    }
}

/// The fraction c(t) ∈ (0, 1] of a client's data in use at round t of T (t from 0).
/// Implementations are non-decreasing in t and reach 1 by round ⌈λ·T⌉.
pub trait Pacing: std::fmt::Debug + Send + Sync {
    fn fraction(&self, round: usize, total_rounds: usize) -> f64;
}

/// What the ramped pacings share: the start fraction c0 and the share λ of the rounds
/// after which all data is in use.
#[derive(Debug, Clone, Copy)]
struct Ramp {
    c0: f64,
    lambda: f64,
}

impl Ramp {
    fn new(c0: f64, lambda: f64) -> Result<Self, CurriculumError> {
        if !(c0 > 0.0 && c0 <= 1.0) {
            return Err(CurriculumError::Config(format!(
                "pacing start fraction c0 must be in (0, 1], got {c0}"
            )));
        }
        if !(lambda > 0.0 && lambda <= 1.0) {
            return Err(CurriculumError::Config(format!(
                "pacing λ (the share of rounds until all data is used) must be in (0, 1], got {lambda}"
            )));
        }
        Ok(Self { c0, lambda })
    }

    /// `shape(c0, p)` at progress p = t/(λ·T), capped at 1; exactly 1 from round ⌈λ·T⌉
    /// on, even when float rounding leaves λ·T a hair above an integer.
    fn at(self, round: usize, total_rounds: usize, shape: impl Fn(f64, f64) -> f64) -> f64 {
        let end = self.lambda * total_rounds as f64;
        let t = round as f64;
        if t >= end - 1e-9 * end.max(1.0) {
            1.0
        } else {
            shape(self.c0, (t / end).clamp(0.0, 1.0)).min(1.0)
        }
    }
}

/// c(t) = min(1, c0 + (1−c0)·t/(λT)).
#[derive(Debug, Clone, Copy)]
pub struct Linear(Ramp);

impl Linear {
    pub fn new(c0: f64, lambda: f64) -> Result<Self, CurriculumError> {
        Ok(Self(Ramp::new(c0, lambda)?))
    }
}

impl Pacing for Linear {
    fn fraction(&self, round: usize, total_rounds: usize) -> f64 {
        self.0.at(round, total_rounds, |c0, p| c0 + (1.0 - c0) * p)
    }
}

/// c(t) = min(1, sqrt(c0² + (1−c0²)·t/(λT))): fast early growth.
#[derive(Debug, Clone, Copy)]
pub struct Root(Ramp);

impl Root {
    pub fn new(c0: f64, lambda: f64) -> Result<Self, CurriculumError> {
        Ok(Self(Ramp::new(c0, lambda)?))
    }
}

impl Pacing for Root {
    fn fraction(&self, round: usize, total_rounds: usize) -> f64 {
        self.0.at(round, total_rounds, |c0, p| {
            (c0 * c0 + (1.0 - c0 * c0) * p).sqrt()
        })
    }
}

/// c(t) = min(1, c0^(1 − t/(λT))): grows by the same factor every round, slowly at
/// first.
#[derive(Debug, Clone, Copy)]
pub struct Geometric(Ramp);

impl Geometric {
    pub fn new(c0: f64, lambda: f64) -> Result<Self, CurriculumError> {
        Ok(Self(Ramp::new(c0, lambda)?))
    }
}

impl Pacing for Geometric {
    fn fraction(&self, round: usize, total_rounds: usize) -> f64 {
        self.0.at(round, total_rounds, |c0, p| c0.powf(1.0 - p))
    }
}

/// c(t) = c0 + (1−c0)·⌊s·t/(λT)⌋/s: `steps` equal jumps, the last at λT.
#[derive(Debug, Clone, Copy)]
pub struct Step {
    ramp: Ramp,
    steps: usize,
}

impl Step {
    pub fn new(c0: f64, lambda: f64, steps: usize) -> Result<Self, CurriculumError> {
        let ramp = Ramp::new(c0, lambda)?;
        if steps == 0 {
            return Err(CurriculumError::Config(
                "step pacing needs at least 1 step".into(),
            ));
        }
        Ok(Self { ramp, steps })
    }
}

impl Pacing for Step {
    fn fraction(&self, round: usize, total_rounds: usize) -> f64 {
        let s = self.steps as f64;
        self.ramp.at(round, total_rounds, |c0, p| {
            c0 + (1.0 - c0) * (p * s).floor() / s
        })
    }
}

/// c(t) = 1: no curriculum.
#[derive(Debug, Clone, Copy, Default)]
pub struct Constant;

impl Pacing for Constant {
    fn fraction(&self, _round: usize, _total_rounds: usize) -> f64 {
        1.0
    }
}

fn default_c0() -> f64 {
    0.3
}
fn default_lambda() -> f64 {
    0.6
}
fn default_steps() -> usize {
    3
}

/// A pacing function as a config file names it (`kind = "linear"`, with `c0` and
/// `lambda`, defaults 0.3 and 0.6; `steps` for `step`, default 3).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum PacingConfig {
    Linear {
        #[serde(default = "default_c0")]
        c0: f64,
        #[serde(default = "default_lambda")]
        lambda: f64,
    },
    Root {
        #[serde(default = "default_c0")]
        c0: f64,
        #[serde(default = "default_lambda")]
        lambda: f64,
    },
    Geometric {
        #[serde(default = "default_c0")]
        c0: f64,
        #[serde(default = "default_lambda")]
        lambda: f64,
    },
    Step {
        #[serde(default = "default_c0")]
        c0: f64,
        #[serde(default = "default_lambda")]
        lambda: f64,
        #[serde(default = "default_steps")]
        steps: usize,
    },
    /// Written `Constant {}` so that a stray `c0` next to `kind = "constant"` is an
    /// error rather than silently ignored (serde cannot refuse fields of a unit variant).
    Constant {},
}

impl Default for PacingConfig {
    fn default() -> Self {
        Self::Linear {
            c0: default_c0(),
            lambda: default_lambda(),
        }
    }
}

impl PacingConfig {
    /// The pacing function, its parameters checked.
    pub fn build(self) -> Result<Box<dyn Pacing>, CurriculumError> {
        Ok(match self {
            Self::Linear { c0, lambda } => Box::new(Linear::new(c0, lambda)?),
            Self::Root { c0, lambda } => Box::new(Root::new(c0, lambda)?),
            Self::Geometric { c0, lambda } => Box::new(Geometric::new(c0, lambda)?),
            Self::Step { c0, lambda, steps } => Box::new(Step::new(c0, lambda, steps)?),
            Self::Constant {} => Box::new(Constant),
        })
    }
}

/// ⌈c·n⌉ clamped to [1, n] for n > 0, immune to the float noise of c·n
/// (0.07·100 is 7.000000000000001 and must count as 7).
pub fn sample_count(fraction: f64, n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    let exact = fraction.clamp(0.0, 1.0) * n as f64;
    let k = (exact - 1e-9 * exact.max(1.0)).ceil();
    (k.max(1.0) as usize).min(n)
}

/// One client's curriculum: its easy→hard order and pacing over T rounds.
#[derive(Debug)]
pub struct Schedule {
    order: Vec<usize>,
    pacing: Box<dyn Pacing>,
    total_rounds: usize,
}

impl Schedule {
    /// `order` must be a permutation of 0..n (as [`Ordering::order`] returns).
    pub fn new(
        order: Vec<usize>,
        pacing: Box<dyn Pacing>,
        total_rounds: usize,
    ) -> Result<Self, CurriculumError> {
        if total_rounds == 0 {
            return Err(CurriculumError::Config(
                "a schedule needs at least 1 round".into(),
            ));
        }
        let mut seen = vec![false; order.len()];
        for &i in &order {
            match seen.get_mut(i) {
                Some(s) if !*s => *s = true,
                _ => {
                    return Err(CurriculumError::Config(format!(
                        "the order is not a permutation of 0..{}: id {i} is out of range or repeated",
                        order.len()
                    )));
                }
            }
        }
        Ok(Self {
            order,
            pacing,
            total_rounds,
        })
    }

    /// The full easy→hard order.
    pub fn order(&self) -> &[usize] {
        &self.order
    }

    /// Number of samples in use at round t.
    pub fn count_at(&self, round: usize) -> usize {
        sample_count(
            self.pacing.fraction(round, self.total_rounds),
            self.order.len(),
        )
    }

    /// The sample ids to train on at round t: the ⌈c(t)·n⌉ easiest. Subsets are
    /// nested: every id of round t is in round t+1's.
    pub fn samples_at(&self, round: usize) -> &[usize] {
        &self.order[..self.count_at(round)]
    }
}

/// A batch-level curriculum (the unit of the authors' code, FIBECFED.md §7): the
/// samples are grouped once into batches by a seeded draw, the batches are ordered by
/// their mean difficulty, and the pacing counts batches. Batches stay intact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchOrder {
    /// The batches, easy → hard; each holds sample ids.
    pub batches: Vec<Vec<usize>>,
}

impl BatchOrder {
    /// Draws batches of `batch_size` from a seeded shuffle of `0..scores.len()` (the
    /// last may be shorter), scores each by the mean of its samples' scores, and
    /// orders them with `ordering` (`seed` is passed on to orderings that draw).
    pub fn new(
        scores: &[f64],
        batch_size: usize,
        ordering: &dyn Ordering,
        draw_seed: u64,
        order_seed: u64,
    ) -> Result<Self, CurriculumError> {
        check_scores(scores)?;
        if batch_size == 0 {
            return Err(CurriculumError::Config(
                "the curriculum batch size must be at least 1".into(),
            ));
        }
        let mut ids: Vec<usize> = (0..scores.len()).collect();
        ids.shuffle(&mut ChaCha8Rng::seed_from_u64(draw_seed));
        let drawn: Vec<Vec<usize>> = ids.chunks(batch_size).map(<[usize]>::to_vec).collect();
        // Summed in f64 in the batch's own order, then divided: the mean the authors'
        // code forms (a sum over the batch divided by its size).
        let means: Vec<f64> = drawn
            .iter()
            .map(|b| b.iter().map(|&i| scores[i]).sum::<f64>() / b.len() as f64)
            .collect();
        let order = ordering.order(&means, order_seed)?;
        let mut slots: Vec<Option<Vec<usize>>> = drawn.into_iter().map(Some).collect();
        let mut batches = Vec::with_capacity(slots.len());
        for i in order {
            let batch = slots.get_mut(i).and_then(Option::take).ok_or_else(|| {
                CurriculumError::Config(format!(
                    "the ordering returned batch {i} twice or out of range"
                ))
            })?;
            batches.push(batch);
        }
        if batches.len() != slots.len() {
            return Err(CurriculumError::Config(
                "the ordering did not return every batch".into(),
            ));
        }
        Ok(Self { batches })
    }

    /// Rebuilds the batches from a flat easy → hard order and the batch lengths (what
    /// a checkpoint keeps).
    pub fn from_parts(order: &[usize], lens: &[usize]) -> Result<Self, CurriculumError> {
        let total = lens.iter().try_fold(0usize, |a, &l| a.checked_add(l));
        if total != Some(order.len()) || lens.contains(&0) {
            return Err(CurriculumError::Config(format!(
                "batch lengths {lens:?} do not cut an order of {} samples into non-empty batches",
                order.len()
            )));
        }
        let mut rest = order;
        let mut batches = Vec::with_capacity(lens.len());
        for &n in lens {
            let (head, tail) = rest.split_at(n);
            batches.push(head.to_vec());
            rest = tail;
        }
        Ok(Self { batches })
    }

    /// The flat easy → hard sample order and the batch lengths.
    pub fn to_parts(&self) -> (Vec<usize>, Vec<usize>) {
        (
            self.batches.concat(),
            self.batches.iter().map(Vec::len).collect(),
        )
    }

    /// Batches in use at pacing fraction c: the ⌈c·n_batches⌉ easiest (at least one).
    /// Nested: a larger c keeps every batch of a smaller one, in the same order.
    pub fn count_at(&self, fraction: f64) -> usize {
        sample_count(fraction, self.batches.len())
    }

    /// The batches in use at pacing fraction c.
    pub fn batches_at(&self, fraction: f64) -> &[Vec<usize>] {
        &self.batches[..self.count_at(fraction)]
    }
}

#[cfg(test)]
mod batch_tests {
    use super::*;

    /// Brute force: every batch's mean recomputed, and the order checked pairwise.
    #[test]
    fn batches_are_ordered_by_mean_difficulty_and_nested() {
        let scores: Vec<f64> = (0..23)
            .map(|i| ((i * 37) % 23) as f64 * 0.5 + 0.1)
            .collect();
        let order = BatchOrder::new(&scores, 4, &EasyFirst, 7, 0).unwrap();
        assert_eq!(order.batches.len(), 6);
        let mut seen: Vec<usize> = order.batches.concat();
        seen.sort_unstable();
        assert_eq!(seen, (0..23).collect::<Vec<_>>());
        assert_eq!(
            order.batches.iter().filter(|b| b.len() == 4).count(),
            5,
            "five full batches and one of 3"
        );
        let mean = |b: &Vec<usize>| b.iter().map(|&i| scores[i]).sum::<f64>() / b.len() as f64;
        for w in order.batches.windows(2) {
            assert!(mean(&w[0]) <= mean(&w[1]), "{w:?}");
        }
        let linear = Linear::new(0.3, 0.6).unwrap();
        let mut prev: Vec<Vec<usize>> = Vec::new();
        for t in 0..10 {
            let c = linear.fraction(t, 10);
            let now = order.batches_at(c).to_vec();
            assert_eq!(now.len(), (c * 6.0 - 1e-9).ceil().max(1.0) as usize);
            assert_eq!(
                &now[..prev.len()],
                &prev[..],
                "round {t} keeps earlier batches"
            );
            prev = now;
        }
        assert_eq!(prev.len(), 6);
        let (flat, lens) = order.to_parts();
        assert_eq!(BatchOrder::from_parts(&flat, &lens).unwrap(), order);
        assert!(BatchOrder::from_parts(&flat, &[4, 4]).is_err());
        // The draw is seeded: the same seed, the same batches; another seed, others.
        assert_eq!(
            BatchOrder::new(&scores, 4, &EasyFirst, 7, 0).unwrap(),
            order
        );
        assert_ne!(
            BatchOrder::new(&scores, 4, &EasyFirst, 8, 0).unwrap(),
            order
        );
        let hard = BatchOrder::new(&scores, 4, &HardFirst, 7, 0).unwrap();
        for w in hard.batches.windows(2) {
            assert!(mean(&w[0]) >= mean(&w[1]));
        }
    }
}
