//! Turns the simulator's per-run `metrics.jsonl` files into the comparison the
//! paper makes: a table (Markdown for people, CSV for scripts) of accuracy,
//! rounds and simulated time to a target accuracy, traffic and wall time per
//! method, and three accuracy curves as PNG.
//!
//! The target is relative to a baseline (e.g. 95% of FedAvg-LoRA's final
//! accuracy) rather than absolute, so that the same report works on MR, its
//! stand-in and the smoke preset, whose reachable accuracies differ a lot.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow, bail, ensure};
use plotters::prelude::*;
use serde_json::{Map, Value};

/// One round of one run, as far as the report needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub round: usize,
    /// Personalised accuracy in [0, 1].
    pub accuracy: f64,
    pub loss: f64,
    pub cum_sim_seconds: f64,
    pub cum_bytes_up: u64,
    pub cum_bytes_down: u64,
    /// This round's wall time (not cumulative).
    pub wall_seconds: f64,
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
        let field = |name: &str| {
            object
                .get(name)
                .ok_or_else(|| anyhow!("line {number}: field `{name}` is missing"))
        };
        let method = field("method")?
            .as_str()
            .ok_or_else(|| anyhow!("line {number}: field `method` is not a string"))?;
        let seed = integer(object, "seed", number)?;
        let point = Point {
            round: usize::try_from(integer(object, "round", number)?)?,
            accuracy: float(object, "accuracy", number)?,
            loss: float(object, "loss", number)?,
            cum_sim_seconds: float(object, "cum_sim_seconds", number)?,
            cum_bytes_up: integer(object, "cum_bytes_up", number)?,
            cum_bytes_down: integer(object, "cum_bytes_down", number)?,
            wall_seconds: float(object, "wall_seconds", number)?,
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

/// A run's last point; `summarise` has checked that there is one.
fn last(run: &Run) -> &Point {
    &run.points[run.points.len() - 1]
}

/// Mean and sample standard deviation over seeds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stat {
    pub mean: f64,
    /// Sample (n − 1) standard deviation; 0 for a single seed.
    pub std: f64,
}

impl Stat {
    fn of(values: &[f64]) -> Self {
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let std = if values.len() < 2 {
            0.0
        } else {
            (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
        };
        Self { mean, std }
    }
}

/// One method's line of the comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub method: String,
    pub seeds: usize,
    pub final_accuracy: Stat,
    /// Per run, the mean accuracy over the second half of its rounds (round > T/2):
    /// less at the mercy of which clients the last round happened to sample.
    pub late_accuracy: Stat,
    /// `None` unless every seed reached the target: a mean over the lucky
    /// seeds alone would flatter the method.
    pub rounds_to_target: Option<Stat>,
    pub sim_seconds_to_target: Option<Stat>,
    pub mb_up: Stat,
    pub mb_total: Stat,
    pub wall_seconds: Stat,
    /// How many seeds reached the target.
    pub reached: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub baseline: String,
    /// The fraction of the baseline's final accuracy that defines the target.
    pub target_fraction: f64,
    /// The target accuracy, in [0, 1].
    pub target: f64,
    pub rows: Vec<Row>,
}

/// target = `target_fraction` × mean final accuracy of the baseline method's
/// runs. A run reaches it at its first point with accuracy ≥ target (that
/// point's round and `cum_sim_seconds`). MB = cumulative bytes at the last
/// point / 1e6; wall = sum of the rounds' wall seconds. Rows follow the order
/// in which methods first appear in `runs`.
pub fn summarise(runs: &[Run], baseline: &str, target_fraction: f64) -> Result<Table> {
    let mut methods: Vec<&str> = Vec::new();
    for run in runs {
        ensure!(
            !run.points.is_empty(),
            "run {} seed {} has no points",
            run.method,
            run.seed
        );
        if !methods.contains(&run.method.as_str()) {
            methods.push(&run.method);
        }
    }
    let baseline_final: Vec<f64> = runs
        .iter()
        .filter(|run| run.method == baseline)
        .map(|run| last(run).accuracy)
        .collect();
    if baseline_final.is_empty() {
        bail!("baseline {baseline:?} has no runs (methods present: {methods:?})");
    }
    let target = target_fraction * Stat::of(&baseline_final).mean;

    let rows = methods
        .into_iter()
        .map(|method| {
            let mine: Vec<&Run> = runs.iter().filter(|run| run.method == method).collect();
            let stat =
                |f: &dyn Fn(&Run) -> f64| Stat::of(&mine.iter().map(|r| f(r)).collect::<Vec<_>>());
            let hits: Vec<&Point> = mine
                .iter()
                .filter_map(|run| run.points.iter().find(|p| p.accuracy >= target))
                .collect();
            let all_reached = hits.len() == mine.len();
            let hit_stat = |f: fn(&Point) -> f64| {
                all_reached.then(|| Stat::of(&hits.iter().map(|p| f(p)).collect::<Vec<_>>()))
            };
            Row {
                method: method.to_owned(),
                seeds: mine.len(),
                final_accuracy: stat(&|r| last(r).accuracy),
                late_accuracy: stat(&late_mean),
                rounds_to_target: hit_stat(|p| p.round as f64),
                sim_seconds_to_target: hit_stat(|p| p.cum_sim_seconds),
                mb_up: stat(&|r| last(r).cum_bytes_up as f64 / 1e6),
                mb_total: stat(&|r| (last(r).cum_bytes_up + last(r).cum_bytes_down) as f64 / 1e6),
                wall_seconds: stat(&|r| r.points.iter().map(|p| p.wall_seconds).sum()),
                reached: hits.len(),
            }
        })
        .collect();
    Ok(Table {
        baseline: baseline.to_owned(),
        target_fraction,
        target,
        rows,
    })
}

/// Mean accuracy over the points with round > (last round) / 2.
fn late_mean(run: &Run) -> f64 {
    let half = last(run).round / 2;
    let late: Vec<f64> = run
        .points
        .iter()
        .filter(|p| p.round > half || p.round == last(run).round)
        .map(|p| p.accuracy)
        .collect();
    late.iter().sum::<f64>() / late.len() as f64
}

/// "mean ± std" with `decimals`, the "± std" left out for a single seed
/// (where it would be a meaningless 0).
fn pm(stat: Stat, seeds: usize, scale: f64, decimals: usize, unit: &str) -> String {
    let mean = stat.mean * scale;
    if seeds < 2 {
        format!("{mean:.decimals$}{unit}")
    } else {
        format!(
            "{mean:.decimals$}{unit} ± {:.decimals$}{unit}",
            stat.std * scale
        )
    }
}

/// A GitHub-flavoured Markdown table, preceded by a line stating the target.
pub fn markdown(table: &Table) -> String {
    let mut out = String::new();
    // `{:.2}` then trimming turns 0.95 into "95", not "95.00000000000001".
    let fraction = format!("{:.2}", table.target_fraction * 100.0);
    let fraction = fraction.trim_end_matches('0').trim_end_matches('.');
    let _ = writeln!(
        out,
        "target: {fraction}% of {}'s final accuracy = {:.2}%\n",
        table.baseline,
        table.target * 100.0
    );
    out.push_str("| method | seeds | final accuracy | mean accuracy, last half of rounds | rounds to target | simulated s to target | MB up | MB total | wall s |\n");
    out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for row in &table.rows {
        let n = row.seeds;
        let to_target = |stat: Option<Stat>, decimals| {
            stat.map_or_else(
                || format!("not reached ({}/{n})", row.reached),
                |s| pm(s, n, 1.0, decimals, ""),
            )
        };
        let _ = writeln!(
            out,
            "| {} | {n} | {} | {} | {} | {} | {} | {} | {} |",
            row.method.replace('|', "\\|"),
            pm(row.final_accuracy, n, 100.0, 2, "%"),
            pm(row.late_accuracy, n, 100.0, 2, "%"),
            to_target(row.rounds_to_target, 1),
            to_target(row.sim_seconds_to_target, 1),
            pm(row.mb_up, n, 1.0, 2, ""),
            pm(row.mb_total, n, 1.0, 2, ""),
            pm(row.wall_seconds, n, 1.0, 1, ""),
        );
    }
    out
}

/// Header plus one line per method; accuracy stays a fraction in [0, 1];
/// "not reached" is an empty cell so that spreadsheets read it as missing.
pub fn csv(table: &Table) -> String {
    let mut out = String::from(
        "method,seeds,reached,final_accuracy_mean,final_accuracy_std,\
         late_accuracy_mean,late_accuracy_std,rounds_to_target_mean,rounds_to_target_std,sim_seconds_to_target_mean,\
         sim_seconds_to_target_std,mb_up_mean,mb_up_std,mb_total_mean,mb_total_std,\
         wall_seconds_mean,wall_seconds_std\n",
    );
    let both = |s: Stat| format!("{},{}", s.mean, s.std);
    let maybe = |s: Option<Stat>| s.map_or_else(|| ",".to_owned(), both);
    for row in &table.rows {
        let method = if row.method.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", row.method.replace('"', "\"\""))
        } else {
            row.method.clone()
        };
        let _ = writeln!(
            out,
            "{method},{},{},{},{},{},{},{},{},{}",
            row.seeds,
            row.reached,
            both(row.final_accuracy),
            both(row.late_accuracy),
            maybe(row.rounds_to_target),
            maybe(row.sim_seconds_to_target),
            both(row.mb_up),
            both(row.mb_total),
            both(row.wall_seconds),
        );
    }
    out
}

/// Tableau 10: distinct and readable by most colour-blind people.
const COLOURS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// plotters' ab_glyph backend has no system fonts; it only knows what is
/// registered, and registration is process-wide, hence once.
fn register_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
            .is_ok()
    });
    ensure!(ok, "the embedded DejaVu Sans font could not be loaded");
    Ok(())
}

/// Writes accuracy against round, simulated time and cumulative MB (up + down)
/// as three 1000×700 PNGs into `dir`, one line per method (mean over seeds at
/// each round index), and a dashed line at `target` (in [0, 1]) if given.
pub fn draw_plots(runs: &[Run], target: Option<f64>, dir: &Path) -> Result<Vec<PathBuf>> {
    ensure!(!runs.is_empty(), "no runs to plot into {}", dir.display());
    register_font()?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;

    let mut methods: Vec<&str> = Vec::new();
    for run in runs {
        if !methods.contains(&run.method.as_str()) {
            methods.push(&run.method);
        }
    }
    // (method, [(round, sim seconds, MB, accuracy %)]), averaged over seeds.
    let curves: Vec<(&str, Vec<[f64; 4]>)> = methods
        .iter()
        .map(|&method| {
            let mine: Vec<&Run> = runs.iter().filter(|r| r.method == method).collect();
            // A seed that stopped early would make the mean jump where it
            // drops out, so the curve ends with the shortest run.
            let len = mine.iter().map(|r| r.points.len()).min().unwrap_or(0);
            let n = mine.len() as f64;
            let mean = |i: usize, f: fn(&Point) -> f64| {
                mine.iter().map(|r| f(&r.points[i])).sum::<f64>() / n
            };
            let points = (0..len)
                .map(|i| {
                    [
                        mean(i, |p| p.round as f64),
                        mean(i, |p| p.cum_sim_seconds),
                        mean(i, |p| (p.cum_bytes_up + p.cum_bytes_down) as f64 / 1e6),
                        mean(i, |p| p.accuracy * 100.0),
                    ]
                })
                .collect();
            (method, points)
        })
        .collect();

    let plots = [
        ("accuracy_vs_round.png", "Accuracy vs round", "round"),
        (
            "accuracy_vs_sim_time.png",
            "Accuracy vs simulated time",
            "simulated time (s)",
        ),
        (
            "accuracy_vs_mb.png",
            "Accuracy vs traffic",
            "cumulative traffic, up + down (MB)",
        ),
    ];
    let mut written = Vec::new();
    for (axis, (file, title, x_label)) in plots.into_iter().enumerate() {
        let path = dir.join(file);
        let series: Vec<(&str, Vec<(f64, f64)>)> = curves
            .iter()
            .map(|(m, pts)| (*m, pts.iter().map(|p| (p[axis], p[3])).collect()))
            .collect();
        plot(&path, title, x_label, &series, target.map(|t| t * 100.0))
            .with_context(|| format!("cannot draw {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

fn plot(
    path: &Path,
    title: &str,
    x_label: &str,
    series: &[(&str, Vec<(f64, f64)>)],
    target: Option<f64>,
) -> Result<()> {
    let all = || series.iter().flat_map(|(_, pts)| pts.iter().copied());
    let x_max = all().map(|p| p.0).fold(0.0, f64::max);
    let x_max = if x_max > 0.0 { x_max * 1.02 } else { 1.0 };
    let ys = all().map(|p| p.1).chain(target);
    let (y_min, y_max) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), y| {
        (lo.min(y), hi.max(y))
    });
    // A little headroom, but never outside what an accuracy can be.
    let (y_min, y_max) = if y_min.is_finite() {
        ((y_min - 2.0).max(0.0), (y_max + 2.0).min(100.0))
    } else {
        (0.0, 100.0)
    };

    let root = BitMapBackend::new(path, (1000, 700)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 28))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, y_min..y_max.max(y_min + 1.0))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc("personalised accuracy (%)")
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .draw()?;
    for (i, (method, pts)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), colour.stroke_width(2)))?
            .label(*method)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], colour.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, colour.filled())))?;
    }
    if let Some(t) = target {
        chart
            .draw_series(DashedLineSeries::new(
                [(0.0, t), (x_max, t)],
                10,
                6,
                BLACK.stroke_width(1),
            ))?
            .label(format!("target {t:.2}%"))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 24, y)], BLACK));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const LINE: &str = r#"{"round": 0, "method": "fibecfed", "seed": 42, "accuracy": 0.51, "loss": 0.69, "bytes_up": 1, "cum_bytes_up": 123, "cum_bytes_down": 456, "cum_sim_seconds": 1.5, "wall_seconds": 3.2, "extra": [1]}"#;

    #[test]
    fn parses_good_lines_and_skips_blank_ones() {
        let second = LINE.replace("\"round\": 0", "\"round\": 1");
        let run = parse_metrics(&format!("{LINE}\n\n{second}\n")).unwrap();
        assert_eq!(
            (run.method.as_str(), run.seed, run.points.len()),
            ("fibecfed", 42, 2)
        );
        let p = &run.points[0];
        assert_eq!((p.round, p.cum_bytes_up, p.cum_bytes_down), (0, 123, 456));
        assert!((p.accuracy - 0.51).abs() < 1e-12 && (p.wall_seconds - 3.2).abs() < 1e-12);
        assert_eq!(run.points[1].round, 1);
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
            round1.replace("\"seed\": 42", "\"seed\": -1"),
            &["line 2", "`seed`"],
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

    /// `(accuracy, cum_sim_seconds, cum_bytes_up, cum_bytes_down, wall_seconds)` per round.
    fn run(method: &str, seed: u64, rounds: &[(f64, f64, u64, u64, f64)]) -> Run {
        let points = rounds
            .iter()
            .enumerate()
            .map(|(round, &(accuracy, sim, up, down, wall))| Point {
                round,
                accuracy,
                loss: 0.0,
                cum_sim_seconds: sim,
                cum_bytes_up: up,
                cum_bytes_down: down,
                wall_seconds: wall,
            })
            .collect();
        Run {
            method: method.into(),
            seed,
            points,
        }
    }

    /// Baseline finals 0.8 and 0.9 → target 0.9 × 0.85 = 0.765. FedAvg reaches
    /// it at rounds 2 and 1 (sim 3 s both); fibecfed's seed 2 never does.
    fn runs() -> Vec<Run> {
        vec![
            run(
                "fibecfed",
                1,
                &[
                    (0.5, 1.0, 0, 0, 0.5),
                    (0.78, 2.0, 100_000, 100_000, 1.0),
                    (0.79, 3.0, 200_000, 200_000, 1.0),
                ],
            ),
            run(
                "fedavg-lora",
                1,
                &[
                    (0.5, 1.0, 0, 0, 0.5),
                    (0.7, 2.0, 1_000_000, 500_000, 1.0),
                    (0.8, 3.0, 2_000_000, 1_000_000, 1.0),
                ],
            ),
            run(
                "fibecfed",
                2,
                &[
                    (0.5, 1.0, 0, 0, 0.5),
                    (0.6, 2.0, 100_000, 100_000, 1.0),
                    (0.7, 3.0, 200_000, 200_000, 1.0),
                ],
            ),
            run(
                "fedavg-lora",
                2,
                &[
                    (0.5, 1.0, 0, 0, 0.5),
                    (0.8, 3.0, 2_000_000, 1_000_000, 1.5),
                    (0.9, 5.0, 4_000_000, 2_000_000, 1.5),
                ],
            ),
        ]
    }

    fn close(stat: Stat, mean: f64, std: f64) {
        assert!(
            (stat.mean - mean).abs() < 1e-9 && (stat.std - std).abs() < 1e-9,
            "{stat:?} vs {mean} ± {std}"
        );
    }

    #[test]
    fn summarise_matches_hand_computed_values() {
        let table = summarise(&runs(), "fedavg-lora", 0.9).unwrap();
        assert!((table.target - 0.765).abs() < 1e-12);
        let methods: Vec<&str> = table.rows.iter().map(|r| r.method.as_str()).collect();
        assert_eq!(methods, ["fibecfed", "fedavg-lora"]);

        let fib = &table.rows[0];
        assert_eq!((fib.seeds, fib.reached), (2, 1));
        assert_eq!(
            (fib.rounds_to_target, fib.sim_seconds_to_target),
            (None, None)
        );
        close(fib.final_accuracy, 0.745, 0.045 * 2f64.sqrt());
        close(fib.mb_up, 0.2, 0.0);
        close(fib.mb_total, 0.4, 0.0);
        close(fib.wall_seconds, 2.5, 0.0);

        let base = &table.rows[1];
        assert_eq!((base.seeds, base.reached), (2, 2));
        close(base.final_accuracy, 0.85, 0.05 * 2f64.sqrt());
        close(base.rounds_to_target.unwrap(), 1.5, 0.5f64.sqrt());
        close(base.sim_seconds_to_target.unwrap(), 3.0, 0.0);
        close(base.mb_up, 3.0, 2f64.sqrt());
        close(base.mb_total, 4.5, 4.5f64.sqrt());
        close(base.wall_seconds, 3.0, 0.5f64.sqrt());

        assert!(
            summarise(&runs(), "nope", 0.9)
                .unwrap_err()
                .to_string()
                .contains("nope")
        );
    }

    /// The last half of rounds 0..=4 is rounds 3 and 4; of 0..=1, round 1.
    #[test]
    fn late_accuracy_averages_the_second_half_of_the_rounds() {
        let five = run(
            "m",
            1,
            &[
                (0.5, 0.0, 0, 0, 0.0),
                (0.6, 0.0, 0, 0, 0.0),
                (0.7, 0.0, 0, 0, 0.0),
                (0.8, 0.0, 0, 0, 0.0),
                (1.0, 0.0, 0, 0, 0.0),
            ],
        );
        assert!((late_mean(&five) - 0.9).abs() < 1e-12);
        let two = run("m", 1, &[(0.5, 0.0, 0, 0, 0.0), (0.75, 0.0, 0, 0, 0.0)]);
        assert!((late_mean(&two) - 0.75).abs() < 1e-12);
        let one = run("m", 1, &[(0.5, 0.0, 0, 0, 0.0)]);
        assert!((late_mean(&one) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn markdown_and_csv_hold_the_expected_cells() {
        let table = summarise(&runs(), "fedavg-lora", 0.9).unwrap();
        let md = markdown(&table);
        assert!(
            md.starts_with("target: 90% of fedavg-lora's final accuracy = 76.50%\n"),
            "{md}"
        );
        assert!(md.contains("| fibecfed | 2 | 74.50% ± 6.36% | 74.50% ± 6.36% | not reached (1/2) | not reached (1/2) | 0.20 ± 0.00 | 0.40 ± 0.00 | 2.5 ± 0.0 |"), "{md}");
        assert!(
            md.contains(
                "| fedavg-lora | 2 | 85.00% ± 7.07% | 85.00% ± 7.07% | 1.5 ± 0.7 | 3.0 ± 0.0 | 3.00 ± 1.41 |"
            ),
            "{md}"
        );
        let single = summarise(&runs()[1..2], "fedavg-lora", 0.95).unwrap();
        assert!(
            markdown(&single)
                .contains("| fedavg-lora | 1 | 80.00% | 80.00% | 2.0 | 3.0 | 2.00 | 3.00 | 2.5 |")
        );

        let text = csv(&table);
        let lines: Vec<Vec<&str>> = text.lines().map(|l| l.split(',').collect()).collect();
        assert_eq!(lines.len(), 3);
        assert!(lines.iter().all(|l| l.len() == lines[0].len()));
        assert_eq!(lines[1][..3], ["fibecfed", "2", "1"]);
        assert_eq!(lines[1][7..11], ["", "", "", ""]);
        assert_eq!(
            lines[2][7..11],
            ["1.5", &0.5f64.sqrt().to_string(), "3", "0"]
        );

        let mut odd = single;
        odd.rows[0].method = "a,\"b\"".into();
        assert!(csv(&odd).contains("\n\"a,\"\"b\"\"\",1,1,"));
    }

    #[test]
    fn draws_three_pngs_and_names_a_bad_folder() {
        let dir = tempfile::tempdir().unwrap();
        let paths = draw_plots(&runs(), Some(0.765), dir.path()).unwrap();
        let names: Vec<_> = paths
            .iter()
            .map(|p| p.file_name().unwrap().to_owned())
            .collect();
        assert_eq!(
            names,
            [
                "accuracy_vs_round.png",
                "accuracy_vs_sim_time.png",
                "accuracy_vs_mb.png"
            ]
        );
        for path in &paths {
            let bytes = fs::read(path).unwrap();
            assert!(
                bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 10_000,
                "{}",
                path.display()
            );
        }

        let file = dir.path().join("not-a-folder");
        fs::write(&file, "").unwrap();
        let message = format!("{:#}", draw_plots(&runs(), None, &file).unwrap_err());
        assert!(message.contains("not-a-folder"), "{message}");
        assert!(draw_plots(&[], None, dir.path()).is_err());
    }
}
