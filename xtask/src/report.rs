//! Turns the simulator's per-run `metrics.jsonl` files into the comparison the
//! paper makes: per method, accuracy, time to a target accuracy, traffic and wall
//! time as means over seeds with 95% Student-t intervals; per baseline, the primary
//! method's paired differences (same seed, so the same partition and data subsets);
//! and a verdict on each of the paper's three claims. Markdown for people, CSV for
//! scripts; the plots are in `plots`.
//!
//! The target is relative to the baselines (95% of the best baseline's plateau)
//! rather than absolute, so that the same report works on MR, its stand-in and the
//! smoke preset, whose reachable accuracies differ a lot.

use std::fmt::Write as _;

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::{Map, Value};

use crate::stats::Stat;

/// How many evaluated rounds the running mean that decides "reached" spans: one
/// lucky evaluation should not count as reaching a plateau.
pub const REACH_WINDOW: usize = 3;

/// One round of one run, as far as the report needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub round: usize,
    /// Whether the simulator evaluated this round (runs may evaluate every few rounds).
    pub evaluated: bool,
    /// Personalised accuracy in [0, 1]; `None` exactly when not evaluated.
    pub accuracy: Option<f64>,
    pub loss: Option<f64>,
    pub cum_sim_seconds: f64,
    pub cum_bytes_up: u64,
    pub cum_bytes_down: u64,
    /// This round's wall time (not cumulative).
    pub wall_seconds: f64,
    /// Samples trained on in this round (0 in files written before the field existed).
    pub train_samples: u64,
}

/// One `metrics.jsonl`: one method, one seed, points in increasing round order.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub method: String,
    pub seed: u64,
    pub points: Vec<Point>,
}

/// Parses a `metrics.jsonl`. Blank lines are skipped; unknown fields are
/// ignored so that the simulator can add fields without breaking old reports.
/// A round with `"evaluated": false` must carry `null` (or nothing) as accuracy and
/// loss; a round without the field is evaluated, as every round of older files is.
pub fn parse_metrics(text: &str) -> Result<Run> {
    let mut run: Option<Run> = None;
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let value: Value =
            serde_json::from_str(line).with_context(|| format!("line {number}: not JSON"))?;
        let object = value
            .as_object()
            .ok_or_else(|| anyhow!("line {number}: expected a JSON object"))?;
        let method = object
            .get("method")
            .ok_or_else(|| anyhow!("line {number}: field `method` is missing"))?
            .as_str()
            .ok_or_else(|| anyhow!("line {number}: field `method` is not a string"))?;
        let seed = integer(object, "seed", number)?;
        let evaluated = match object.get("evaluated") {
            None | Some(Value::Bool(true)) => true,
            Some(Value::Bool(false)) => false,
            Some(other) => {
                bail!("line {number}: field `evaluated` is {other}, not true or false")
            }
        };
        let (accuracy, loss) = if evaluated {
            (
                Some(float(object, "accuracy", number)?),
                Some(float(object, "loss", number)?),
            )
        } else {
            // A number in a round marked unevaluated means the writer is confused
            // about which rounds it evaluated; better to stop than to guess.
            for name in ["accuracy", "loss"] {
                if let Some(v) = object.get(name).filter(|v| !v.is_null()) {
                    bail!(
                        "line {number}: field `{name}` is {v} but `evaluated` is false; \
                         expected null"
                    );
                }
            }
            (None, None)
        };
        let train_samples = if object.get("train_samples").is_some() {
            integer(object, "train_samples", number)?
        } else {
            0
        };
        let point = Point {
            round: usize::try_from(integer(object, "round", number)?)?,
            evaluated,
            accuracy,
            loss,
            cum_sim_seconds: float(object, "cum_sim_seconds", number)?,
            cum_bytes_up: integer(object, "cum_bytes_up", number)?,
            cum_bytes_down: integer(object, "cum_bytes_down", number)?,
            wall_seconds: float(object, "wall_seconds", number)?,
            train_samples,
        };
        let run = run.get_or_insert_with(|| Run {
            method: method.to_owned(),
            seed,
            points: Vec::new(),
        });
        // One file is one run; a mix means files were concatenated by mistake.
        ensure!(
            run.method == method,
            "line {number}: field `method` is {method:?} but earlier lines say {:?}",
            run.method
        );
        ensure!(
            run.seed == seed,
            "line {number}: field `seed` is {seed} but earlier lines say {}",
            run.seed
        );
        if let Some(last) = run.points.last() {
            ensure!(
                point.round > last.round,
                "line {number}: field `round` is {} but the previous line's is {}",
                point.round,
                last.round
            );
        }
        run.points.push(point);
    }
    run.ok_or_else(|| anyhow!("no metrics: the file has no non-blank line"))
}

fn integer(object: &Map<String, Value>, name: &str, line: usize) -> Result<u64> {
    let value = object
        .get(name)
        .ok_or_else(|| anyhow!("line {line}: field `{name}` is missing"))?;
    value.as_u64().ok_or_else(|| {
        anyhow!("line {line}: field `{name}` is {value}, not a non-negative integer")
    })
}

fn float(object: &Map<String, Value>, name: &str, line: usize) -> Result<f64> {
    let value = object
        .get(name)
        .ok_or_else(|| anyhow!("line {line}: field `{name}` is missing"))?;
    value
        .as_f64()
        .ok_or_else(|| anyhow!("line {line}: field `{name}` is {value}, not a number"))
}

impl Run {
    /// The evaluated rounds with their accuracy.
    pub fn evaluated(&self) -> impl Iterator<Item = (&Point, f64)> {
        self.points
            .iter()
            .filter_map(|p| p.accuracy.filter(|_| p.evaluated).map(|a| (p, a)))
    }

    /// Accuracy at the last evaluated round.
    pub fn final_accuracy(&self) -> Option<f64> {
        self.evaluated().last().map(|(_, a)| a)
    }

    /// Mean accuracy over the evaluated rounds with round > T/2, T the run's last
    /// round: less at the mercy of which clients the last round happened to sample.
    /// A run too short to have any (T = 0, or evaluations too sparse) uses its last
    /// evaluated round.
    pub fn late_accuracy(&self) -> Option<f64> {
        let half = self.points.last()?.round / 2;
        let last_evaluated = self.evaluated().last()?.0.round;
        let late: Vec<f64> = self
            .evaluated()
            .filter(|(p, _)| p.round > half || p.round == last_evaluated)
            .map(|(_, a)| a)
            .collect();
        Some(late.iter().sum::<f64>() / late.len() as f64)
    }

    pub fn best_accuracy(&self) -> Option<f64> {
        self.evaluated().map(|(_, a)| a).reduce(f64::max)
    }

    /// The first evaluated round at which the mean of the last [`REACH_WINDOW`]
    /// evaluated accuracies (that round's and the ones evaluated before it) is at
    /// least `target`.
    pub fn reach(&self, target: f64) -> Option<&Point> {
        let evaluated: Vec<(&Point, f64)> = self.evaluated().collect();
        evaluated.windows(REACH_WINDOW).find_map(|w| {
            let mean = w.iter().map(|(_, a)| a).sum::<f64>() / REACH_WINDOW as f64;
            (mean >= target).then(|| w[REACH_WINDOW - 1].0)
        })
    }

    fn last(&self) -> Option<&Point> {
        self.points.last()
    }

    fn mb_up(&self) -> f64 {
        self.last().map_or(0.0, |p| p.cum_bytes_up as f64 / 1e6)
    }

    fn mb_total(&self) -> f64 {
        self.last()
            .map_or(0.0, |p| (p.cum_bytes_up + p.cum_bytes_down) as f64 / 1e6)
    }

    fn wall_seconds(&self) -> f64 {
        self.points.iter().map(|p| p.wall_seconds).sum()
    }

    /// Training throughput over the rounds that train (round ≥ 1; round 0 is set-up
    /// and the initial evaluation); `None` when they took no wall time at all.
    fn samples_per_second(&self) -> Option<f64> {
        let rounds = self.points.iter().filter(|p| p.round >= 1);
        let (samples, wall) = rounds.fold((0u64, 0.0f64), |(s, w), p| {
            (s.saturating_add(p.train_samples), w + p.wall_seconds)
        });
        (wall > 0.0).then(|| samples as f64 / wall)
    }
}

/// What a method is in the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The method whose claims are judged (FibecFed).
    Primary,
    Baseline,
    /// Reported, not judged: variants of the primary, ablations.
    Other,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Baseline => "baseline",
            Role::Other => "other",
        }
    }
}

/// One method's line of the comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub method: String,
    pub role: Role,
    pub seeds: Vec<u64>,
    /// Accuracy at the last evaluated round.
    pub final_accuracy: Stat,
    /// Per run, the mean accuracy over the evaluated rounds of the second half.
    pub late_accuracy: Stat,
    pub best_accuracy: Stat,
    /// How many seeds reached the target.
    pub reached: usize,
    /// `None` unless every seed reached the target: a mean over the lucky seeds
    /// alone would flatter the method.
    pub rounds_to_target: Option<Stat>,
    pub sim_seconds_to_target: Option<Stat>,
    pub mb_up: Stat,
    pub mb_total: Stat,
    pub wall_seconds: Stat,
    /// `None` when some run recorded no wall time for its training rounds.
    pub samples_per_second: Option<Stat>,
}

/// The simulated time to the target, primary minus baseline, over the paired seeds.
#[derive(Debug, Clone, PartialEq)]
pub enum TimeDifference {
    /// Both reached the target in every paired seed.
    Paired(Stat),
    /// Some seed did not reach it: a difference would need a made-up time.
    Counts {
        primary: usize,
        baseline: usize,
        pairs: usize,
    },
}

/// The primary method minus one baseline, seed by seed.
#[derive(Debug, Clone, PartialEq)]
pub struct Paired {
    pub baseline: String,
    /// The seeds both ran.
    pub seeds: Vec<u64>,
    pub final_accuracy: Stat,
    pub late_accuracy: Stat,
    pub best_accuracy: Stat,
    pub sim_seconds_to_target: TimeDifference,
    pub mb_total: Stat,
    /// The baseline sent no bytes in any seed (local-only training): "fewer bytes"
    /// against it says nothing about communication efficiency.
    pub baseline_sends_nothing: bool,
}

/// A verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Holds,
    DoesNotHold,
    Inconclusive,
    /// Identical values in every paired seed: a zero-width interval at 0.
    Equal,
}

impl Outcome {
    fn text(self) -> &'static str {
        match self {
            Outcome::Holds => "holds",
            Outcome::DoesNotHold => "does not hold",
            Outcome::Inconclusive => "inconclusive",
            Outcome::Equal => "inconclusive (equal)",
        }
    }
}

/// One baseline's part of a claim, with the numbers behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct Judgement {
    pub baseline: String,
    pub outcome: Outcome,
    pub why: String,
}

/// The paper's claims about the primary method, judged against every baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimKind {
    Accuracy,
    Time,
    Bytes,
}

impl ClaimKind {
    fn statement(self) -> &'static str {
        match self {
            ClaimKind::Accuracy => {
                "(a) higher accuracy than every baseline (judged on the last-half accuracy)"
            }
            ClaimKind::Time => "(b) less simulated time to the target than every baseline",
            ClaimKind::Bytes => "(c) fewer bytes (MB up + down) than every baseline",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    pub kind: ClaimKind,
    pub outcome: Outcome,
    /// Why the overall outcome, when the per-baseline lines do not say it alone.
    pub note: Option<String>,
    pub per_baseline: Vec<Judgement>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub primary: String,
    pub baselines: Vec<String>,
    /// The fraction of the best baseline's plateau that defines the target.
    pub target_fraction: f64,
    /// The method whose plateau set the target: the best baseline, or the primary
    /// itself when there are no baselines.
    pub target_method: String,
    /// That method's plateau (mean over seeds of the last-half accuracy), in [0, 1].
    pub plateau: f64,
    /// The target accuracy, in [0, 1].
    pub target: f64,
    pub rows: Vec<Row>,
    /// One per baseline, in the baselines' order.
    pub paired: Vec<Paired>,
    pub claims: Vec<Claim>,
}

/// Builds the comparison; see the module doc and [`definitions`] for the rules.
/// Rows follow the order in which methods first appear in `runs`.
pub fn summarise(
    runs: &[Run],
    primary: &str,
    baselines: &[String],
    target_fraction: f64,
) -> Result<Table> {
    let mut methods: Vec<&str> = Vec::new();
    for (i, run) in runs.iter().enumerate() {
        ensure!(
            run.evaluated().next().is_some(),
            "run {} seed {} has no evaluated round",
            run.method,
            run.seed
        );
        if runs[..i]
            .iter()
            .any(|r| r.method == run.method && r.seed == run.seed)
        {
            bail!("run {} seed {} is given twice", run.method, run.seed);
        }
        if !methods.contains(&run.method.as_str()) {
            methods.push(&run.method);
        }
    }
    let of = |method: &str| -> Vec<&Run> { runs.iter().filter(|r| r.method == method).collect() };
    for method in std::iter::once(primary).chain(baselines.iter().map(String::as_str)) {
        if of(method).is_empty() {
            bail!("method {method:?} has no runs (methods present: {methods:?})");
        }
    }
    let plateau = |method: &str| -> Result<f64> { Ok(stat(&of(method), Run::late_accuracy)?.mean) };
    // The best baseline: the target should be hard for the primary to reach, not
    // set by the weakest competitor.
    let (target_method, plateau) = if baselines.is_empty() {
        (primary.to_owned(), plateau(primary)?)
    } else {
        let mut best: Option<(String, f64)> = None;
        for b in baselines {
            let p = plateau(b)?;
            if best.as_ref().is_none_or(|(_, q)| p > *q) {
                best = Some((b.clone(), p));
            }
        }
        best.context("no baseline plateau")?
    };
    let target = target_fraction * plateau;

    let rows = methods
        .iter()
        .map(|&method| {
            let mine = of(method);
            let role = if method == primary {
                Role::Primary
            } else if baselines.iter().any(|b| b == method) {
                Role::Baseline
            } else {
                Role::Other
            };
            let hits: Vec<&Point> = mine.iter().filter_map(|r| r.reach(target)).collect();
            let all_reached = hits.len() == mine.len();
            let hit_stat = |f: fn(&Point) -> f64| {
                if all_reached {
                    Stat::of(&hits.iter().map(|p| f(p)).collect::<Vec<_>>())
                } else {
                    None
                }
            };
            Ok(Row {
                method: method.to_owned(),
                role,
                seeds: mine.iter().map(|r| r.seed).collect(),
                final_accuracy: stat(&mine, Run::final_accuracy)?,
                late_accuracy: stat(&mine, Run::late_accuracy)?,
                best_accuracy: stat(&mine, Run::best_accuracy)?,
                reached: hits.len(),
                rounds_to_target: hit_stat(|p| p.round as f64),
                sim_seconds_to_target: hit_stat(|p| p.cum_sim_seconds),
                mb_up: stat(&mine, |r| Some(r.mb_up()))?,
                mb_total: stat(&mine, |r| Some(r.mb_total()))?,
                wall_seconds: stat(&mine, |r| Some(r.wall_seconds()))?,
                samples_per_second: stat(&mine, Run::samples_per_second).ok(),
            })
        })
        .collect::<Result<Vec<Row>>>()?;

    let paired = baselines
        .iter()
        .map(|b| pair(&of(primary), &of(b), b, target))
        .collect::<Result<Vec<_>>>()?;
    let claims = [ClaimKind::Accuracy, ClaimKind::Time, ClaimKind::Bytes]
        .into_iter()
        .map(|kind| judge(kind, &paired))
        .collect();
    Ok(Table {
        primary: primary.to_owned(),
        baselines: baselines.to_vec(),
        target_fraction,
        target_method,
        plateau,
        target,
        rows,
        paired,
        claims,
    })
}

/// The statistic of `f` over runs; every run must have the value.
fn stat(runs: &[&Run], f: impl Fn(&Run) -> Option<f64>) -> Result<Stat> {
    let values = runs
        .iter()
        .map(|r| f(r).with_context(|| format!("run {} seed {}: no value", r.method, r.seed)))
        .collect::<Result<Vec<f64>>>()?;
    Stat::of(&values).context("no runs")
}

fn pair(primary: &[&Run], baseline: &[&Run], name: &str, target: f64) -> Result<Paired> {
    let pairs: Vec<(&Run, &Run)> = primary
        .iter()
        .filter_map(|p| baseline.iter().find(|b| b.seed == p.seed).map(|b| (*p, *b)))
        .collect();
    if pairs.is_empty() {
        bail!(
            "baseline {name:?} shares no seed with the primary method {:?}; a paired \
             comparison needs the same seeds",
            primary.first().map_or("", |r| r.method.as_str())
        );
    }
    let diff = |f: fn(&Run) -> Option<f64>| -> Result<Stat> {
        let d = pairs
            .iter()
            .map(|(p, b)| Ok(f(p).context("no value")? - f(b).context("no value")?))
            .collect::<Result<Vec<f64>>>()?;
        Stat::of(&d).context("no pairs")
    };
    let reached: Vec<(Option<f64>, Option<f64>)> = pairs
        .iter()
        .map(|(p, b)| {
            (
                p.reach(target).map(|x| x.cum_sim_seconds),
                b.reach(target).map(|x| x.cum_sim_seconds),
            )
        })
        .collect();
    let both: Vec<f64> = reached
        .iter()
        .filter_map(|(p, b)| Some((*p)? - (*b)?))
        .collect();
    let sim_seconds_to_target = match Stat::of(&both).filter(|_| both.len() == pairs.len()) {
        Some(s) => TimeDifference::Paired(s),
        None => TimeDifference::Counts {
            primary: reached.iter().filter(|r| r.0.is_some()).count(),
            baseline: reached.iter().filter(|r| r.1.is_some()).count(),
            pairs: pairs.len(),
        },
    };
    Ok(Paired {
        baseline: name.to_owned(),
        seeds: pairs.iter().map(|(p, _)| p.seed).collect(),
        final_accuracy: diff(Run::final_accuracy)?,
        late_accuracy: diff(Run::late_accuracy)?,
        best_accuracy: diff(Run::best_accuracy)?,
        sim_seconds_to_target,
        mb_total: diff(|r| Some(r.mb_total()))?,
        baseline_sends_nothing: pairs.iter().all(|(_, b)| b.mb_total() == 0.0),
    })
}

/// Which side of 0 the primary wants a difference on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Better {
    Higher,
    Lower,
}

/// How a difference reads as a number in the verdicts.
struct Unit {
    scale: f64,
    decimals: usize,
    suffix: &'static str,
}

const POINTS: Unit = Unit {
    scale: 100.0,
    decimals: 2,
    suffix: " points",
};
const SECONDS: Unit = Unit {
    scale: 1.0,
    decimals: 1,
    suffix: " s",
};
const MB: Unit = Unit {
    scale: 1.0,
    decimals: 3,
    suffix: " MB",
};

/// "+1.23 points, 95% CI [+0.50, +1.96]" or, with one pair, "+1.23 points (one seed,
/// no CI)".
fn describe(d: &Stat, unit: &Unit) -> String {
    let dec = unit.decimals;
    let v = |x: f64| format!("{:+.dec$}", x * unit.scale);
    match d.interval() {
        Some((lo, hi)) => format!(
            "{}{}, 95% CI [{}, {}]",
            v(d.mean),
            unit.suffix,
            v(lo),
            v(hi)
        ),
        None => format!("{}{} (one seed, no CI)", v(d.mean), unit.suffix),
    }
}

/// The interval rule: wholly on the good side of 0 holds, wholly on the bad side does
/// not, a zero-width interval at 0 is a tie, anything else (0 inside) is inconclusive.
fn by_interval(d: &Stat, better: Better) -> Outcome {
    let Some((lo, hi)) = d.interval() else {
        return Outcome::Inconclusive;
    };
    let (good, bad) = match better {
        Better::Higher => (lo > 0.0, hi < 0.0),
        Better::Lower => (hi < 0.0, lo > 0.0),
    };
    if lo == 0.0 && hi == 0.0 {
        Outcome::Equal
    } else if good {
        Outcome::Holds
    } else if bad {
        Outcome::DoesNotHold
    } else {
        Outcome::Inconclusive
    }
}

const ONE_SEED: &str = "one paired seed, so no confidence interval: run two or more seeds";

fn judge(kind: ClaimKind, paired: &[Paired]) -> Claim {
    let mut per_baseline = Vec::new();
    let mut excluded = Vec::new();
    for p in paired {
        let single = p.seeds.len() < 2;
        let (outcome, why) = match kind {
            ClaimKind::Accuracy => (
                by_interval(&p.late_accuracy, Better::Higher),
                format!(
                    "last-half accuracy {}; final accuracy {}",
                    describe(&p.late_accuracy, &POINTS),
                    describe(&p.final_accuracy, &POINTS)
                ),
            ),
            ClaimKind::Time => match &p.sim_seconds_to_target {
                TimeDifference::Paired(d) => (
                    by_interval(d, Better::Lower),
                    format!("simulated time to target {}", describe(d, &SECONDS)),
                ),
                TimeDifference::Counts {
                    primary,
                    baseline,
                    pairs,
                } => {
                    let outcome = if *primary == *pairs && *baseline == 0 {
                        Outcome::Holds
                    } else if *baseline == *pairs && *primary == 0 {
                        Outcome::DoesNotHold
                    } else {
                        Outcome::Inconclusive
                    };
                    (
                        outcome,
                        format!(
                            "primary reached the target in {primary}/{pairs} seeds, \
                             the baseline in {baseline}/{pairs}"
                        ),
                    )
                }
            },
            ClaimKind::Bytes => {
                if p.baseline_sends_nothing {
                    excluded.push(p.baseline.clone());
                    continue;
                }
                (
                    by_interval(&p.mb_total, Better::Lower),
                    format!("MB total {}", describe(&p.mb_total, &MB)),
                )
            }
        };
        // One seed: even a counting rule ("reached in all, the baseline in none")
        // rests on a single draw of partition and sampling.
        let (outcome, why) = if single {
            (Outcome::Inconclusive, format!("{why}; {ONE_SEED}"))
        } else {
            (outcome, why)
        };
        per_baseline.push(Judgement {
            baseline: p.baseline.clone(),
            outcome,
            why,
        });
    }
    let outcomes: Vec<Outcome> = per_baseline.iter().map(|j| j.outcome).collect();
    let outcome = if outcomes.is_empty() {
        Outcome::Inconclusive
    } else if outcomes.contains(&Outcome::DoesNotHold) {
        Outcome::DoesNotHold
    } else if outcomes.iter().all(|o| *o == Outcome::Holds) {
        Outcome::Holds
    } else if outcomes.iter().all(|o| *o == Outcome::Equal) {
        Outcome::Equal
    } else {
        Outcome::Inconclusive
    };
    let mut notes = Vec::new();
    if paired.is_empty() {
        notes.push("no baselines to compare against".to_owned());
    } else if outcomes.is_empty() {
        notes.push("every baseline sends no bytes".to_owned());
    }
    if !excluded.is_empty() {
        notes.push(format!(
            "excluded: {} (sends no bytes at all, trains locally only)",
            excluded.join(", ")
        ));
    }
    if paired.iter().any(|p| p.seeds.len() < 2) && outcome == Outcome::Inconclusive {
        notes.push(ONE_SEED.to_owned());
    }
    Claim {
        kind,
        outcome,
        note: (!notes.is_empty()).then(|| notes.join("; ")),
        per_baseline,
    }
}

/// "mean ± CI half-width" scaled, or the mean alone for one seed.
fn pm(stat: &Stat, scale: f64, decimals: usize) -> String {
    let mean = stat.mean * scale;
    match stat.ci {
        Some(ci) => format!("{mean:.decimals$} ± {:.decimals$}", ci * scale),
        None => format!("{mean:.decimals$}"),
    }
}

/// The same with a sign, for differences.
fn pm_signed(stat: &Stat, scale: f64, decimals: usize) -> String {
    let mean = stat.mean * scale;
    match stat.ci {
        Some(ci) => format!("{mean:+.decimals$} ± {:.decimals$}", ci * scale),
        None => format!("{mean:+.decimals$}"),
    }
}

/// `0.95` as "95", not "95.00000000000001".
fn percent(fraction: f64) -> String {
    let s = format!("{:.2}", fraction * 100.0);
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}

/// The per-method table, the paired differences, the verdicts and the definitions
/// they rest on, as GitHub-flavoured Markdown.
pub fn markdown(table: &Table) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Target: {}% of {} = {}% × {:.2}% = **{:.2}%** accuracy.\n",
        percent(table.target_fraction),
        if table.baselines.is_empty() {
            format!(
                "the plateau of {} itself (no baselines)",
                table.target_method
            )
        } else {
            format!("the best baseline plateau ({})", table.target_method)
        },
        percent(table.target_fraction),
        table.plateau * 100.0,
        table.target * 100.0
    );
    out.push_str(
        "Cells are mean ± half-width of the 95% Student-t confidence interval over seeds \
         (a bare mean when n = 1: no interval from one seed). Accuracies in %.\n\n",
    );
    out.push_str(
        "| method | role | n | final accuracy | last-half accuracy | best accuracy | \
         rounds to target | simulated s to target | MB up | MB total | wall s | \
         train samples / wall s |\n",
    );
    out.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for row in &table.rows {
        let n = row.seeds.len();
        let to_target = |stat: &Option<Stat>, decimals| {
            stat.as_ref().map_or_else(
                || format!("not reached ({}/{n} reached)", row.reached),
                |s| pm(s, 1.0, decimals),
            )
        };
        let _ = writeln!(
            out,
            "| {} | {} | {n} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            cell(&row.method),
            row.role.name(),
            pm(&row.final_accuracy, 100.0, 2),
            pm(&row.late_accuracy, 100.0, 2),
            pm(&row.best_accuracy, 100.0, 2),
            to_target(&row.rounds_to_target, 1),
            to_target(&row.sim_seconds_to_target, 1),
            pm(&row.mb_up, 1.0, 2),
            pm(&row.mb_total, 1.0, 2),
            pm(&row.wall_seconds, 1.0, 1),
            row.samples_per_second
                .as_ref()
                .map_or_else(|| "n/a".to_owned(), |s| pm(s, 1.0, 1)),
        );
    }
    if !table.paired.is_empty() {
        let _ = writeln!(
            out,
            "\nPaired differences, {} − baseline, seed by seed (mean ± 95% CI half-width \
             over the paired seeds; accuracy in points):\n",
            table.primary
        );
        out.push_str(
            "| baseline | paired seeds | final accuracy | last-half accuracy | best accuracy \
             | simulated s to target | MB total |\n",
        );
        out.push_str("|---|---:|---:|---:|---:|---:|---:|\n");
        for p in &table.paired {
            let time = match &p.sim_seconds_to_target {
                TimeDifference::Paired(d) => pm_signed(d, 1.0, 1),
                TimeDifference::Counts {
                    primary,
                    baseline,
                    pairs,
                } => format!("primary reached {primary}/{pairs}, baseline {baseline}/{pairs}"),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {time} | {} |",
                cell(&p.baseline),
                p.seeds.len(),
                pm_signed(&p.final_accuracy, 100.0, 2),
                pm_signed(&p.late_accuracy, 100.0, 2),
                pm_signed(&p.best_accuracy, 100.0, 2),
                pm_signed(&p.mb_total, 1.0, 3),
            );
        }
    }
    let _ = writeln!(
        out,
        "\nClaims ({} against {}):\n",
        table.primary,
        if table.baselines.is_empty() {
            "no baselines".to_owned()
        } else {
            table.baselines.join(", ")
        }
    );
    for claim in &table.claims {
        let note = claim
            .note
            .as_ref()
            .map_or(String::new(), |n| format!(" ({n})"));
        let _ = writeln!(
            out,
            "- {}: **{}**{note}",
            claim.kind.statement(),
            claim.outcome.text()
        );
        for j in &claim.per_baseline {
            let _ = writeln!(
                out,
                "  - against {}: {}: {}",
                cell(&j.baseline),
                j.outcome.text(),
                j.why
            );
        }
    }
    out.push('\n');
    out.push_str(&definitions(table));
    out
}

/// The rules the table and the verdicts follow, in words, with this table's numbers.
pub fn definitions(table: &Table) -> String {
    format!(
        "Definitions. *Evaluated rounds*: only rounds the simulator evaluated count \
         (runs may evaluate every few rounds); the summary and the plots ignore the others. \
         *Final accuracy*: at the last evaluated round. *Last-half accuracy*: a run's mean \
         over its evaluated rounds with round > T/2, T its last round (its last evaluated \
         round when none is). *Best accuracy*: the maximum over evaluated rounds. \
         *Plateau* of a method: the mean over seeds of its last-half accuracy. *Target*: \
         {}% of the highest plateau among the baselines ({}). *Reaching the target*: a run \
         reaches it at the first evaluated round where the mean of its last {REACH_WINDOW} \
         evaluated accuracies (that round's and the {} evaluated before it) is at least the \
         target; rounds to target is that round's number and simulated s to target its \
         cumulative simulated time. A run that never does is \"not reached\", never a number; \
         a mean over seeds is given only when every seed reached it. *MB*: cumulative bytes \
         of the exact messages at the last round / 10^6; MB total is up + down. *Wall s* \
         and *train samples / wall s* (training samples over the wall time of rounds ≥ 1) \
         are the only columns that depend on the machine. *CI*: mean ± t(0.975, n − 1) · \
         s / √n, s the sample standard deviation, n the number of seeds (of paired seeds for \
         a difference). *Paired difference*: primary − baseline for each seed both ran (the \
         same seed gives both the same data subsets and partition). *Verdicts*: a claim holds \
         against a baseline when the 95% CI of the paired difference lies wholly on the \
         claimed side of 0, does not hold when it lies wholly on the other side, and is \
         inconclusive otherwise (\"equal\" when every paired value is identical). For time \
         to target, when some seed did not reach the target: holds if the primary reached it \
         in every seed and the baseline in none, does not hold in the reverse case, \
         inconclusive otherwise. Overall, a claim holds when it holds against every \
         baseline, does not hold when it fails against some baseline, and is inconclusive \
         otherwise. Baselines that send no bytes at all (local-only training) are left out \
         of the bytes claim only. With one seed nothing is decided: every verdict is \
         inconclusive.\n",
        percent(table.target_fraction),
        table.target_method,
        REACH_WINDOW - 1
    )
}

/// The CSV's statistics, in column order; the last two are the only ones that depend
/// on the machine (wall time).
const CSV_STATS: [&str; 9] = [
    "final_accuracy",
    "late_accuracy",
    "best_accuracy",
    "rounds_to_target",
    "sim_seconds_to_target",
    "mb_up",
    "mb_total",
    "wall_seconds",
    "samples_per_second",
];

/// One rectangular table, so that any CSV reader takes it whole:
///
/// - `kind` is `method` (one row per method: its statistics over seeds) or `paired`
///   (one row per baseline: `method` − `baseline`, seed by seed, over the paired seeds).
/// - `role` is primary, baseline or other for method rows, empty for paired rows.
/// - `n`: seeds (method rows) or paired seeds (paired rows).
/// - `reached`: seeds that reached the target (method rows), or the primary's count over
///   the paired seeds (paired rows); `baseline_reached`: the baseline's, paired rows only.
/// - For each statistic, `<stat>_mean`, `<stat>_std` (sample) and `<stat>_ci95` (the 95%
///   Student-t half-width). Accuracies are fractions in [0, 1], times seconds, sizes MB.
///   Paired rows fill final, late and best accuracy, sim seconds to target (only when
///   both reached the target in every paired seed) and MB total.
/// - An empty cell is a missing value: no interval for n = 1, "not reached", n/a.
/// - Numbers are Rust's shortest round-trip form of the f64: deterministic.
pub fn csv(table: &Table) -> String {
    let mut out = String::from("kind,method,baseline,role,n,reached,baseline_reached");
    for s in CSV_STATS {
        let _ = write!(out, ",{s}_mean,{s}_std,{s}_ci95");
    }
    out.push('\n');
    for row in &table.rows {
        let stats = [
            Some(row.final_accuracy),
            Some(row.late_accuracy),
            Some(row.best_accuracy),
            row.rounds_to_target,
            row.sim_seconds_to_target,
            Some(row.mb_up),
            Some(row.mb_total),
            Some(row.wall_seconds),
            row.samples_per_second,
        ];
        let _ = write!(
            out,
            "method,{},,{},{},{},",
            csv_field(&row.method),
            row.role.name(),
            row.seeds.len(),
            row.reached
        );
        push_stats(&mut out, &stats);
    }
    for p in &table.paired {
        let (time, primary, baseline) = match &p.sim_seconds_to_target {
            TimeDifference::Paired(d) => (Some(*d), p.seeds.len(), p.seeds.len()),
            TimeDifference::Counts {
                primary, baseline, ..
            } => (None, *primary, *baseline),
        };
        let stats = [
            Some(p.final_accuracy),
            Some(p.late_accuracy),
            Some(p.best_accuracy),
            None,
            time,
            None,
            Some(p.mb_total),
            None,
            None,
        ];
        let _ = write!(
            out,
            "paired,{},{},,{},{primary},{baseline}",
            csv_field(&table.primary),
            csv_field(&p.baseline),
            p.seeds.len()
        );
        push_stats(&mut out, &stats);
    }
    out
}

fn push_stats(out: &mut String, stats: &[Option<Stat>]) {
    let num = |x: Option<f64>| {
        x.filter(|v| v.is_finite())
            .map_or(String::new(), |v| v.to_string())
    };
    for s in stats {
        let _ = write!(
            out,
            ",{},{},{}",
            num(s.map(|s| s.mean)),
            num(s.and_then(|s| s.std)),
            num(s.and_then(|s| s.ci))
        );
    }
    out.push('\n');
}

/// A method name as a CSV field: quoted when it holds a separator or a quote.
pub fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const LINE: &str = r#"{"round": 0, "method": "fibecfed", "seed": 42, "accuracy": 0.51, "loss": 0.69, "bytes_up": 1, "cum_bytes_up": 123, "cum_bytes_down": 456, "cum_sim_seconds": 1.5, "wall_seconds": 3.2, "extra": [1]}"#;

    #[test]
    fn parses_good_lines_and_skips_blank_ones() {
        let second = LINE.replace("\"round\": 0", "\"round\": 1").replace(
            "\"extra\"",
            "\"train_samples\": 208, \"evaluated\": true, \"x\"",
        );
        let run = parse_metrics(&format!("{LINE}\n\n{second}\n")).unwrap();
        assert_eq!(
            (run.method.as_str(), run.seed, run.points.len()),
            ("fibecfed", 42, 2)
        );
        let p = &run.points[0];
        assert_eq!((p.round, p.cum_bytes_up, p.cum_bytes_down), (0, 123, 456));
        assert_eq!(
            (p.evaluated, p.accuracy, p.train_samples),
            (true, Some(0.51), 0)
        );
        assert!((p.wall_seconds - 3.2).abs() < 1e-12);
        assert_eq!((run.points[1].round, run.points[1].train_samples), (1, 208));
    }

    /// Rounds the simulator did not evaluate carry nulls and count for nothing but
    /// time and bytes.
    #[test]
    fn unevaluated_rounds_are_kept_but_not_evaluated() {
        let skipped = LINE
            .replace("\"round\": 0", "\"round\": 1")
            .replace("0.51", "null")
            .replace("0.69", "null")
            .replace("\"extra\"", "\"evaluated\": false, \"x\"");
        let third = LINE
            .replace("\"round\": 0", "\"round\": 2")
            .replace("0.51", "0.7");
        let run = parse_metrics(&format!("{LINE}\n{skipped}\n{third}\n")).unwrap();
        let p = &run.points[1];
        assert_eq!((p.evaluated, p.accuracy, p.loss), (false, None, None));
        let rounds: Vec<usize> = run.evaluated().map(|(p, _)| p.round).collect();
        assert_eq!(rounds, [0, 2]);
        assert_eq!(run.final_accuracy(), Some(0.7));
        assert_eq!(run.best_accuracy(), Some(0.7));
        // Rounds > 1 of 0..=2: round 2 alone; the unevaluated round 1 is not a zero.
        assert_eq!(run.late_accuracy(), Some(0.7));
        // A number in an unevaluated round is refused, as is a non-boolean flag.
        let bad = skipped.replace("\"accuracy\": null", "\"accuracy\": 0.5");
        let message = format!(
            "{:#}",
            parse_metrics(&format!("{LINE}\n{bad}")).unwrap_err()
        );
        assert!(
            message.contains("line 2") && message.contains("`accuracy`"),
            "{message}"
        );
        let bad = skipped.replace("\"evaluated\": false", "\"evaluated\": 0");
        assert!(parse_metrics(&format!("{LINE}\n{bad}")).is_err());
        // Every round unevaluated: nothing to summarise, and the error says which run.
        let only = skipped.replace("\"round\": 1", "\"round\": 0");
        let err = summarise(&[parse_metrics(&only).unwrap()], "fibecfed", &[], 0.9).unwrap_err();
        assert!(err.to_string().contains("no evaluated round"), "{err}");
    }

    #[test]
    fn bad_lines_name_the_line_and_the_field() {
        let bad = |second: String, expected: &[&str]| {
            let message = format!(
                "{:#}",
                parse_metrics(&format!("{LINE}\n{second}")).unwrap_err()
            );
            for part in expected {
                assert!(message.contains(part), "{message:?} lacks {part:?}");
            }
        };
        let round1 = LINE.replace("\"round\": 0", "\"round\": 1");
        bad(
            round1.replace("\"accuracy\": 0.51, ", ""),
            &["line 2", "`accuracy`", "missing"],
        );
        bad(
            round1.replace("0.51", "\"high\""),
            &["line 2", "`accuracy`", "not a number"],
        );
        bad(
            round1.replace("0.51", "null"),
            &["line 2", "`accuracy`", "not a number"],
        );
        bad(
            round1.replace("\"seed\": 42", "\"seed\": -1"),
            &["line 2", "`seed`"],
        );
        bad(
            round1.replace("\"extra\"", "\"train_samples\": -3, \"x\""),
            &["line 2", "`train_samples`"],
        );
        bad(
            round1.replace("fibecfed", "fedavg"),
            &["line 2", "`method`"],
        );
        bad(
            round1.replace("\"seed\": 42", "\"seed\": 7"),
            &["line 2", "`seed`"],
        );
        bad(LINE.to_owned(), &["line 2", "`round`"]);
        bad("{oops".to_owned(), &["line 2", "not JSON"]);
        assert!(parse_metrics("\n  \n").is_err());
    }

    /// One point per entry: `(accuracy or None, cum_sim_seconds, cum MB up, cum MB
    /// down, wall seconds)`, rounds 0, 1, ...; 100 train samples a round after round 0.
    fn run(method: &str, seed: u64, rounds: &[(Option<f64>, f64, f64, f64, f64)]) -> Run {
        let points = rounds
            .iter()
            .enumerate()
            .map(|(round, &(accuracy, sim, up, down, wall))| Point {
                round,
                evaluated: accuracy.is_some(),
                accuracy,
                loss: accuracy.map(|_| 0.5),
                cum_sim_seconds: sim,
                cum_bytes_up: (up * 1e6) as u64,
                cum_bytes_down: (down * 1e6) as u64,
                wall_seconds: wall,
                train_samples: if round == 0 { 0 } else { 100 },
            })
            .collect();
        Run {
            method: method.into(),
            seed,
            points,
        }
    }

    /// Accuracies only, one simulated second, 1 MB up and down and 1 wall second a round.
    fn acc(method: &str, seed: u64, accuracies: &[f64]) -> Run {
        let rounds: Vec<_> = accuracies
            .iter()
            .enumerate()
            .map(|(i, &a)| (Some(a), i as f64, i as f64, i as f64, 1.0))
            .collect();
        run(method, seed, &rounds)
    }

    fn close(x: f64, y: f64) {
        assert!((x - y).abs() < 1e-9, "{x} vs {y}");
    }

    /// The running mean of three evaluated rounds decides, skipping unevaluated ones.
    #[test]
    fn target_is_reached_on_a_running_mean_of_three_evaluated_rounds() {
        // Means of (0.5, 0.9, 0.6) = 0.667, then (0.9, 0.6, 0.9) = 0.8, then 0.567.
        let r = acc("m", 1, &[0.5, 0.9, 0.6, 0.9, 0.2]);
        assert_eq!(r.reach(0.79).map(|p| p.round), Some(3));
        assert_eq!(r.reach(0.6).map(|p| p.round), Some(2));
        // One evaluation of 0.9 is not enough; neither are two.
        assert_eq!(acc("m", 1, &[0.9, 0.9]).reach(0.5), None);
        assert_eq!(r.reach(0.81), None);
        // Evaluated at rounds 0, 2, 4 only: reached at round 4, the third evaluation.
        let sparse = run(
            "m",
            1,
            &[
                (Some(0.8), 0.0, 0.0, 0.0, 1.0),
                (None, 1.0, 0.0, 0.0, 1.0),
                (Some(0.8), 2.0, 0.0, 0.0, 1.0),
                (None, 3.0, 0.0, 0.0, 1.0),
                (Some(0.8), 4.0, 0.0, 0.0, 1.0),
            ],
        );
        let hit = sparse.reach(0.8).unwrap();
        assert_eq!((hit.round, hit.cum_sim_seconds), (4, 4.0));
    }

    /// The last half of rounds 0..=4 is rounds 3 and 4; of 0..=1, round 1.
    #[test]
    fn late_accuracy_averages_the_second_half_of_the_rounds() {
        close(
            acc("m", 1, &[0.5, 0.6, 0.7, 0.8, 1.0])
                .late_accuracy()
                .unwrap(),
            0.9,
        );
        close(acc("m", 1, &[0.5, 0.75]).late_accuracy().unwrap(), 0.75);
        close(acc("m", 1, &[0.5]).late_accuracy().unwrap(), 0.5);
    }

    /// Baseline b's seeds have last-half means 0.7, 0.8, 0.9 (rounds 2 and 3 of
    /// 0..=3) → plateau 0.8; c's plateau 0.6 is lower, so b sets the target:
    /// 0.9 × 0.8 = 0.72. The primary p beats b by 0.1, 0.2, 0.3 on last half.
    fn three_seeds() -> Vec<Run> {
        let mut runs = Vec::new();
        for (i, seed) in [1u64, 2, 3].into_iter().enumerate() {
            let d = 0.1 * i as f64;
            runs.push(acc(
                "p",
                seed,
                &[0.5, 0.8, 0.8 + 2.0 * d + 0.1, 0.8 + 2.0 * d + 0.1],
            ));
            runs.push(acc("b", seed, &[0.5, 0.6, 0.7 + d, 0.7 + d]));
            runs.push(acc("c", seed, &[0.5, 0.5, 0.6, 0.6]));
            runs.push(acc("v", seed, &[0.5, 0.5, 0.5, 0.5]));
        }
        runs
    }

    fn baselines(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn summarise_matches_hand_computed_values() {
        let table = summarise(&three_seeds(), "p", &baselines(&["b", "c"]), 0.9).unwrap();
        assert_eq!(table.target_method, "b");
        close(table.plateau, 0.8);
        close(table.target, 0.72);
        let roles: Vec<(&str, Role)> = table
            .rows
            .iter()
            .map(|r| (r.method.as_str(), r.role))
            .collect();
        assert_eq!(
            roles,
            [
                ("p", Role::Primary),
                ("b", Role::Baseline),
                ("c", Role::Baseline),
                ("v", Role::Other)
            ]
        );
        let b = &table.rows[1];
        // Last half 0.7, 0.8, 0.9: std 0.1, half-width 4.303 · 0.1 / √3.
        close(b.late_accuracy.mean, 0.8);
        close(b.late_accuracy.std.unwrap(), 0.1);
        close(b.late_accuracy.ci.unwrap(), 4.303 * 0.1 / 3f64.sqrt());
        // Running means (0.5, 0.6, 0.7+d) reach 0.72 only with the round-3 window
        // (0.6, 0.7+d, 0.7+d) when 2(0.7+d) + 0.6 ≥ 2.16: d ≥ 0.08, seeds 2 and 3.
        assert_eq!(b.reached, 2);
        assert_eq!((b.rounds_to_target, b.sim_seconds_to_target), (None, None));
        // The primary: window (0.8, 0.9+2d, 0.9+2d)... reached at round 2 for d = 0
        // already ((0.5 + 0.8 + 0.9) / 3 = 0.733 ≥ 0.72).
        let p = &table.rows[0];
        assert_eq!(p.reached, 3);
        close(p.rounds_to_target.unwrap().mean, 2.0);
        close(p.rounds_to_target.unwrap().std.unwrap(), 0.0);
        close(p.sim_seconds_to_target.unwrap().mean, 2.0);
        close(p.mb_up.mean, 3.0);
        close(p.mb_total.mean, 6.0);
        close(p.wall_seconds.mean, 4.0);
        // 300 samples over the 3 wall seconds of rounds 1..=3.
        close(p.samples_per_second.unwrap().mean, 100.0);

        let pb = &table.paired[0];
        assert_eq!(pb.seeds, [1, 2, 3]);
        // Last-half differences (0.9+2d) − (0.7+d) = 0.2 + d: 0.2, 0.3, 0.4.
        close(pb.late_accuracy.mean, 0.3);
        close(pb.late_accuracy.ci.unwrap(), 4.303 * 0.1 / 3f64.sqrt());
        assert_eq!(
            pb.sim_seconds_to_target,
            TimeDifference::Counts {
                primary: 3,
                baseline: 2,
                pairs: 3
            }
        );
        close(pb.mb_total.mean, 0.0);
        assert_eq!(pb.mb_total.ci, Some(0.0));
        assert!(!pb.baseline_sends_nothing);

        let missing = summarise(&three_seeds(), "p", &baselines(&["nope"]), 0.9).unwrap_err();
        assert!(missing.to_string().contains("nope"), "{missing}");
        let mut twice = three_seeds();
        twice.push(acc("p", 1, &[0.5]));
        assert!(
            summarise(&twice, "p", &[], 0.9)
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
        // No baselines: the target is the primary's own plateau.
        let alone = summarise(&three_seeds(), "p", &[], 0.5).unwrap();
        assert_eq!(alone.target_method, "p");
        assert!(alone.paired.is_empty());
        assert!(
            alone
                .claims
                .iter()
                .all(|c| c.outcome == Outcome::Inconclusive)
        );
    }

    fn claim(table: &Table, kind: ClaimKind) -> &Claim {
        table.claims.iter().find(|c| c.kind == kind).unwrap()
    }

    /// Every verdict branch, on runs built to land in it.
    #[test]
    fn verdicts_follow_the_interval_rule() {
        let table = summarise(&three_seeds(), "p", &baselines(&["b", "c"]), 0.9).unwrap();
        // Accuracy: the CI of 0.2, 0.3, 0.4 is wholly above 0 (and against c too).
        let a = claim(&table, ClaimKind::Accuracy);
        assert_eq!(a.outcome, Outcome::Holds);
        assert!(a.per_baseline.iter().all(|j| j.outcome == Outcome::Holds));
        // Time against b: primary 3/3, b 2/3 → mixed, inconclusive; against c, which
        // never reaches 0.72: holds by counts. Overall inconclusive.
        let t = claim(&table, ClaimKind::Time);
        let outcomes: Vec<Outcome> = t.per_baseline.iter().map(|j| j.outcome).collect();
        assert_eq!(outcomes, [Outcome::Inconclusive, Outcome::Holds]);
        assert_eq!(t.outcome, Outcome::Inconclusive);
        // Bytes: identical traffic in every seed → a zero-width CI at 0: equal.
        let c = claim(&table, ClaimKind::Bytes);
        assert!(c.per_baseline.iter().all(|j| j.outcome == Outcome::Equal));
        assert_eq!(c.outcome, Outcome::Equal);

        // Reversed roles: b as primary against p does not hold on accuracy, and p
        // reaching everywhere while b does not… is mixed for b's reaching (2/3).
        let reversed = summarise(&three_seeds(), "b", &baselines(&["p"]), 0.9).unwrap();
        assert_eq!(
            claim(&reversed, ClaimKind::Accuracy).outcome,
            Outcome::DoesNotHold
        );
        // c as primary: target 0.6 × p's plateau 1.1 = 0.66; c's running means (0.533,
        // 0.567) never reach it, p's (0.733 at round 2) always do: does not hold.
        let never = summarise(&three_seeds(), "c", &baselines(&["p"]), 0.6).unwrap();
        assert_eq!(claim(&never, ClaimKind::Time).outcome, Outcome::DoesNotHold);

        // Bytes and time by interval: the primary sends less and is faster every seed
        // (by 1, 1.5, 2 simulated s; 2, 3, 4 MB); an inconclusive accuracy (last-half
        // differences −0.05, 0, +0.1).
        let mut runs = Vec::new();
        for (seed, (extra, acc_p)) in [(1.0, 0.7), (1.5, 0.8), (2.0, 1.0)].into_iter().enumerate() {
            let seed = seed as u64;
            let r = |a: f64, sim: f64, mb: f64| (Some(a), sim, mb, mb, 1.0);
            runs.push(run(
                "p",
                seed,
                &[
                    r(0.9, 1.0, 1.0),
                    r(0.9, 2.0, 2.0),
                    r(0.9, 3.0, 3.0),
                    r(acc_p, 4.0, 4.0),
                ],
            ));
            runs.push(run(
                "b",
                seed,
                &[
                    r(0.9, 1.0 + extra, 1.0 + extra),
                    r(0.9, 2.0 + extra, 2.0 + extra),
                    r(0.9, 3.0 + extra, 3.0 + extra),
                    r(0.8, 4.0 + extra, 4.0 + extra),
                ],
            ));
            // Local-only: no bytes at all, excluded from the bytes claim.
            runs.push(run(
                "l",
                seed,
                &[
                    r(0.9, 1.0, 0.0),
                    r(0.9, 2.0, 0.0),
                    r(0.9, 3.0, 0.0),
                    r(0.8, 4.0, 0.0),
                ],
            ));
        }
        let table = summarise(&runs, "p", &baselines(&["b", "l"]), 0.5).unwrap();
        let a = claim(&table, ClaimKind::Accuracy);
        assert_eq!(a.per_baseline[0].outcome, Outcome::Inconclusive);
        let t = claim(&table, ClaimKind::Time);
        // Both reach at round 2: times 3 vs 3 + extra → CI of −1, −1.5, −2 is
        // [−2.74, −0.26]: holds against b;
        // against l the same time every seed → equal.
        assert_eq!(t.per_baseline[0].outcome, Outcome::Holds);
        assert_eq!(t.per_baseline[1].outcome, Outcome::Equal);
        assert_eq!(t.outcome, Outcome::Inconclusive);
        let c = claim(&table, ClaimKind::Bytes);
        assert_eq!(c.outcome, Outcome::Holds);
        assert_eq!(c.per_baseline.len(), 1);
        assert!(
            c.note.as_deref().unwrap_or("").contains("excluded: l"),
            "{c:?}"
        );
        assert!(table.paired[1].baseline_sends_nothing);
        // The primary sending more than b: does not hold.
        let more = summarise(&runs, "b", &baselines(&["p"]), 0.5).unwrap();
        assert_eq!(claim(&more, ClaimKind::Bytes).outcome, Outcome::DoesNotHold);
        assert_eq!(claim(&more, ClaimKind::Time).outcome, Outcome::DoesNotHold);

        // One seed: no interval, nothing decided, and the summary says why.
        let one: Vec<Run> = runs.iter().filter(|r| r.seed == 0).cloned().collect();
        let single = summarise(&one, "p", &baselines(&["b"]), 0.5).unwrap();
        for c in &single.claims {
            assert_eq!(c.outcome, Outcome::Inconclusive, "{c:?}");
            assert!(
                c.note.as_deref().unwrap_or("").contains("one paired seed"),
                "{c:?}"
            );
        }
        assert!(markdown(&single).contains("one seed, no CI"));
    }

    #[test]
    fn markdown_holds_the_tables_verdicts_and_definitions() {
        let table = summarise(&three_seeds(), "p", &baselines(&["b", "c"]), 0.9).unwrap();
        let md = markdown(&table);
        assert!(
            md.starts_with(
                "Target: 90% of the best baseline plateau (b) = 90% × 80.00% = **72.00%** accuracy."
            ),
            "{md}"
        );
        // b: final 0.7, 0.8, 0.9 → 80.00 ± 24.84 (4.303 · 10 / √3 = 24.844).
        assert!(
            md.contains("| b | baseline | 3 | 80.00 ± 24.84 | 80.00 ± 24.84 | 80.00 ± 24.84 | not reached (2/3 reached) | not reached (2/3 reached) | 3.00 ± 0.00 | 6.00 ± 0.00 | 4.0 ± 0.0 | 100.0 ± 0.0 |"),
            "{md}"
        );
        assert!(
            md.contains("| b | 3 | +30.00 ± 24.84 | +30.00 ± 24.84 |"),
            "{md}"
        );
        assert!(md.contains("primary reached 3/3, baseline 2/3"), "{md}");
        assert!(md.contains("- (a) higher accuracy than every baseline (judged on the last-half accuracy): **holds**"), "{md}");
        assert!(
            md.contains(
                "  - against b: holds: last-half accuracy +30.00 points, 95% CI [+5.16, +54.84]"
            ),
            "{md}"
        );
        assert!(md.contains("**inconclusive (equal)**"), "{md}");
        assert!(
            md.contains("Definitions.") && md.contains("t(0.975, n − 1)"),
            "{md}"
        );
    }

    /// Only the wall-clock columns may change when only wall time does.
    #[test]
    fn csv_is_deterministic_but_for_the_wall_clock_columns() {
        const WALL_CLOCK: [&str; 6] = [
            "wall_seconds_mean",
            "wall_seconds_std",
            "wall_seconds_ci95",
            "samples_per_second_mean",
            "samples_per_second_std",
            "samples_per_second_ci95",
        ];
        let runs = three_seeds();
        let mut slower = runs.clone();
        for (i, r) in slower.iter_mut().enumerate() {
            for p in &mut r.points {
                p.wall_seconds = p.wall_seconds * 1.7 + 0.013 * i as f64;
            }
        }
        let bl = baselines(&["b", "c"]);
        let a = csv(&summarise(&runs, "p", &bl, 0.9).unwrap());
        let b = csv(&summarise(&slower, "p", &bl, 0.9).unwrap());
        assert_eq!(a, csv(&summarise(&runs, "p", &bl, 0.9).unwrap()));
        let rows = |t: &str| -> Vec<Vec<String>> {
            t.lines()
                .map(|l| l.split(',').map(str::to_owned).collect())
                .collect()
        };
        let (ra, rb) = (rows(&a), rows(&b));
        let header = &ra[0];
        assert_eq!(header, &rb[0]);
        assert_eq!(ra.len(), 4 + 2 + 1);
        assert!(ra.iter().all(|r| r.len() == header.len()));
        let wall: Vec<usize> = header
            .iter()
            .enumerate()
            .filter(|(_, h)| WALL_CLOCK.contains(&h.as_str()))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(wall.len(), 6);
        let mut changed = false;
        for (x, y) in ra.iter().zip(&rb) {
            for (i, (u, v)) in x.iter().zip(y).enumerate() {
                if wall.contains(&i) {
                    changed |= u != v;
                } else {
                    assert_eq!(u, v, "column {}", header[i]);
                }
            }
        }
        assert!(changed, "the perturbation changed no wall-clock cell");
        // Cells by name: b's row and the paired row against b.
        let col = |name: &str| header.iter().position(|h| h == name).unwrap();
        let b_row = ra.iter().find(|r| r[0] == "method" && r[1] == "b").unwrap();
        assert_eq!(b_row[col("role")], "baseline");
        assert_eq!(
            (b_row[col("n")].as_str(), b_row[col("reached")].as_str()),
            ("3", "2")
        );
        assert_eq!(b_row[col("sim_seconds_to_target_mean")], "");
        let paired = ra.iter().find(|r| r[0] == "paired" && r[2] == "b").unwrap();
        assert_eq!(
            (
                paired[col("reached")].as_str(),
                paired[col("baseline_reached")].as_str()
            ),
            ("3", "2")
        );
        assert_eq!(paired[col("wall_seconds_mean")], "");
        assert_eq!(csv_field("a,\"b\""), "\"a,\"\"b\"\"\"");
    }
}
