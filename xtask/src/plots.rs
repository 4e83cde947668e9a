//! The report's PNG charts: accuracy against round, simulated time and traffic (mean
//! over seeds, a ± std band), and the primary method's paired differences against each
//! baseline with their confidence intervals. Only evaluated rounds are drawn.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result, ensure};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::report::{Paired, Run, Table, TimeDifference};
use crate::stats::Stat;

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

/// The curve charts' size and the part of it kept for the legend on the right, so
/// that nine method names never sit on top of the lines.
const SIZE: (u32, u32) = (1400, 800);
const LEGEND_WIDTH: u32 = 330;

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

/// One method's curve: per round evaluated in every seed, the means over seeds of
/// the round, simulated time, MB and accuracy (%), and the accuracy's sample std
/// (`None` for one seed).
struct Curve<'a> {
    method: &'a str,
    points: Vec<CurvePoint>,
}

struct CurvePoint {
    round: f64,
    sim_seconds: f64,
    mb: f64,
    accuracy: f64,
    std: Option<f64>,
}

fn curves(runs: &[Run]) -> Vec<Curve<'_>> {
    let mut methods: Vec<&str> = Vec::new();
    for run in runs {
        if !methods.contains(&run.method.as_str()) {
            methods.push(&run.method);
        }
    }
    methods
        .into_iter()
        .map(|method| {
            let mine: Vec<&Run> = runs.iter().filter(|r| r.method == method).collect();
            // Rounds every seed evaluated: a mean over a changing set of seeds would
            // jump where one drops out.
            let rounds: Vec<usize> = mine.first().map_or_else(Vec::new, |first| {
                first
                    .evaluated()
                    .map(|(p, _)| p.round)
                    .filter(|&t| {
                        mine.iter()
                            .all(|r| r.evaluated().any(|(p, _)| p.round == t))
                    })
                    .collect()
            });
            let points = rounds
                .into_iter()
                .filter_map(|t| {
                    let at: Vec<(&crate::report::Point, f64)> = mine
                        .iter()
                        .filter_map(|r| r.evaluated().find(|(p, _)| p.round == t))
                        .collect();
                    let mean = |f: &dyn Fn(&crate::report::Point) -> f64| {
                        at.iter().map(|(p, _)| f(p)).sum::<f64>() / at.len() as f64
                    };
                    let accuracy =
                        Stat::of(&at.iter().map(|(_, a)| a * 100.0).collect::<Vec<_>>())?;
                    Some(CurvePoint {
                        round: t as f64,
                        sim_seconds: mean(&|p| p.cum_sim_seconds),
                        mb: mean(&|p| (p.cum_bytes_up + p.cum_bytes_down) as f64 / 1e6),
                        accuracy: accuracy.mean,
                        std: accuracy.std,
                    })
                })
                .collect();
            Curve { method, points }
        })
        .collect()
}

/// Writes into `dir` accuracy against round, simulated time and cumulative MB (up +
/// down), with a dashed line at the table's target, and, when the table has
/// baselines, the paired differences. Returns the files in that order.
pub fn draw_plots(runs: &[Run], table: Option<&Table>, dir: &Path) -> Result<Vec<PathBuf>> {
    ensure!(!runs.is_empty(), "no runs to plot into {}", dir.display());
    register_font()?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let curves = curves(runs);
    let target = table.map(|t| t.target * 100.0);
    let primary = table.map(|t| t.primary.as_str());

    let charts: [(&str, &str, &str, Axis); 3] = [
        (
            "accuracy_vs_round.png",
            "Accuracy vs round (mean over seeds, band ± 1 std)",
            "round",
            Axis::Round,
        ),
        (
            "accuracy_vs_sim_time.png",
            "Accuracy vs simulated time (mean over seeds, band ± 1 std)",
            "cumulative simulated time (s)",
            Axis::SimSeconds,
        ),
        (
            "accuracy_vs_mb.png",
            "Accuracy vs traffic (mean over seeds, band ± 1 std)",
            "cumulative traffic, up + down (MB)",
            Axis::Mb,
        ),
    ];
    let mut written = Vec::new();
    for (file, title, x_label, axis) in charts {
        let path = dir.join(file);
        curve_chart(&path, title, x_label, axis, &curves, target, primary)
            .with_context(|| format!("cannot draw {}", path.display()))?;
        written.push(path);
    }
    if let Some(table) = table.filter(|t| !t.paired.is_empty()) {
        let path = dir.join("paired_differences.png");
        paired_chart(&path, table).with_context(|| format!("cannot draw {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Axis {
    Round,
    SimSeconds,
    Mb,
}

impl Axis {
    fn of(self, p: &CurvePoint) -> f64 {
        match self {
            Axis::Round => p.round,
            Axis::SimSeconds => p.sim_seconds,
            Axis::Mb => p.mb,
        }
    }
}

fn curve_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    axis: Axis,
    curves: &[Curve<'_>],
    target: Option<f64>,
    primary: Option<&str>,
) -> Result<()> {
    let all = || curves.iter().flat_map(|c| c.points.iter());
    let x_max = all().map(|p| axis.of(p)).fold(0.0, f64::max);
    let x_max = match axis {
        // Whole rounds only: the axis ends at the last round.
        Axis::Round => x_max.max(1.0),
        _ if x_max > 0.0 => x_max * 1.02,
        _ => 1.0,
    };
    let ys = all()
        .flat_map(|p| {
            let s = p.std.unwrap_or(0.0);
            [p.accuracy - s, p.accuracy + s]
        })
        .chain(target);
    let (y_min, y_max) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), y| {
        (lo.min(y), hi.max(y))
    });
    // A little headroom, but never outside what an accuracy can be.
    let (y_min, y_max) = if y_min.is_finite() {
        ((y_min - 2.0).max(0.0), (y_max + 2.0).min(100.0))
    } else {
        (0.0, 100.0)
    };

    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let (plot_area, legend_area) = root.split_horizontally(SIZE.0 - LEGEND_WIDTH);
    let mut chart = ChartBuilder::on(&plot_area)
        .caption(title, ("sans-serif", 26))
        .margin(20)
        .x_label_area_size(60)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..x_max, y_min..y_max.max(y_min + 1.0))?;
    let rounds = x_max.round() as usize;
    let x_formatter = |x: &f64| -> String {
        match axis {
            // plotters may put ticks between whole rounds; those stay unlabelled.
            Axis::Round if (x - x.round()).abs() < 1e-6 => format!("{}", x.round() as i64),
            Axis::Round => String::new(),
            Axis::SimSeconds => format!("{x:.0}"),
            Axis::Mb if x_max >= 5.0 => format!("{x:.0}"),
            Axis::Mb => format!("{x:.1}"),
        }
    };
    let x_labels = match axis {
        Axis::Round => (rounds + 1).min(16),
        _ => 10,
    };
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc("personalised accuracy (%)")
        .x_labels(x_labels)
        .y_labels(10)
        .x_label_formatter(&x_formatter)
        .y_label_formatter(&|y: &f64| format!("{y:.0}"))
        .label_style(("sans-serif", 18))
        .axis_desc_style(("sans-serif", 20))
        .light_line_style(WHITE.mix(0.0))
        .bold_line_style(BLACK.mix(0.12))
        .draw()?;
    // Bands first, every one of them, so that no band covers another method's line.
    for (i, curve) in curves.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let banded: Vec<(f64, f64, f64)> = curve
            .points
            .iter()
            .filter_map(|p| p.std.map(|s| (axis.of(p), p.accuracy - s, p.accuracy + s)))
            .collect();
        if banded.len() >= 2 {
            let outline: Vec<(f64, f64)> = banded
                .iter()
                .map(|&(x, _, hi)| (x, hi.min(100.0)))
                .chain(banded.iter().rev().map(|&(x, lo, _)| (x, lo.max(0.0))))
                .collect();
            chart.draw_series(std::iter::once(Polygon::new(
                outline,
                colour.mix(0.08).filled(),
            )))?;
        }
    }
    for (i, curve) in curves.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let width = if Some(curve.method) == primary { 4 } else { 2 };
        let pts: Vec<(f64, f64)> = curve
            .points
            .iter()
            .map(|p| (axis.of(p), p.accuracy))
            .collect();
        chart.draw_series(LineSeries::new(
            pts.iter().copied(),
            colour.stroke_width(width),
        ))?;
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, colour.filled())))?;
    }
    if let Some(t) = target {
        chart.draw_series(DashedLineSeries::new(
            [(0.0, t), (x_max, t)],
            10,
            6,
            BLACK.stroke_width(2),
        ))?;
    }
    legend(&legend_area, curves, target, primary)?;
    root.present()?;
    Ok(())
}

/// The legend in its own column: one swatch and name per method, then the target.
fn legend(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    curves: &[Curve<'_>],
    target: Option<f64>,
    primary: Option<&str>,
) -> Result<()> {
    let font = ("sans-serif", 18).into_font();
    let mut y = 80;
    for (i, curve) in curves.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let width = if Some(curve.method) == primary { 4 } else { 2 };
        area.draw(&PathElement::new(
            [(10, y), (44, y)],
            colour.stroke_width(width),
        ))?;
        area.draw(&Circle::new((27, y), 3, colour.filled()))?;
        let name = if Some(curve.method) == primary {
            format!("{} (primary)", curve.method)
        } else {
            curve.method.to_owned()
        };
        area.draw(&Text::new(name, (52, y - 10), font.clone()))?;
        y += 30;
    }
    if let Some(t) = target {
        y += 10;
        let mut x = 10;
        while x < 44 {
            area.draw(&PathElement::new(
                [(x, y), ((x + 6).min(44), y)],
                BLACK.stroke_width(2),
            ))?;
            x += 10;
        }
        area.draw(&Text::new(
            format!("target {t:.2}%"),
            (52, y - 10),
            font.clone(),
        ))?;
    }
    Ok(())
}

/// Three panels (last-half accuracy in points, simulated s to target, MB total), one
/// point per baseline at the mean paired difference with its 95% CI as a whisker.
fn paired_chart(path: &Path, table: &Table) -> Result<()> {
    let size = (1500, 700);
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        &format!(
            "{} − baseline, paired by seed: mean and 95% CI (a point without whisker: one seed)",
            table.primary
        ),
        ("sans-serif", 24),
    )?;
    let panels = root.split_evenly((1, 3));
    let accuracy: Vec<Option<Stat>> = table
        .paired
        .iter()
        .map(|p| Some(scaled(p.late_accuracy, 100.0)))
        .collect();
    let time: Vec<Option<Stat>> = table
        .paired
        .iter()
        .map(|p| match p.sim_seconds_to_target {
            TimeDifference::Paired(d) => Some(d),
            TimeDifference::Counts { .. } => None,
        })
        .collect();
    let mb: Vec<Option<Stat>> = table.paired.iter().map(|p| Some(p.mb_total)).collect();
    let specs: [(&str, &str, &[Option<Stat>]); 3] = [
        (
            "last-half accuracy (higher is better)",
            "difference (points)",
            &accuracy,
        ),
        (
            "simulated time to target (lower is better)",
            "difference (s)",
            &time,
        ),
        (
            "traffic, up + down (lower is better)",
            "difference (MB)",
            &mb,
        ),
    ];
    for (panel, (title, y_desc, values)) in panels.iter().zip(specs) {
        panel_chart(panel, title, y_desc, &table.paired, values)?;
    }
    root.present()?;
    Ok(())
}

fn scaled(s: Stat, k: f64) -> Stat {
    Stat {
        n: s.n,
        mean: s.mean * k,
        std: s.std.map(|x| x * k),
        ci: s.ci.map(|x| x * k),
    }
}

fn panel_chart(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    title: &str,
    y_desc: &str,
    paired: &[Paired],
    values: &[Option<Stat>],
) -> Result<()> {
    let k = paired.len();
    let ends = values.iter().flatten().flat_map(|s| {
        let h = s.ci.unwrap_or(0.0);
        [s.mean - h, s.mean + h]
    });
    let (lo, hi) = ends
        .chain([0.0])
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| {
            (a.min(y), b.max(y))
        });
    // No difference to draw (no seed pair reached the target in both): a plain
    // band around 0 without ticks, for the counts alone.
    let empty = values.iter().all(Option::is_none);
    let pad = if empty {
        1.0
    } else {
        ((hi - lo) * 0.12).max(1e-3)
    };
    let names: Vec<String> = paired.iter().map(|p| p.baseline.clone()).collect();
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(100)
        // One unit per baseline, centred on 0, 1, ...; the names are drawn under
        // their points by hand (a lone category gets no tick from plotters).
        .build_cartesian_2d(-0.5..(k as f64 - 0.5), (lo - pad)..(hi + pad))?;
    let span = hi - lo + 2.0 * pad;
    let decimals = if span >= 20.0 {
        0
    } else if span >= 2.0 {
        1
    } else {
        2
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc(y_desc)
        .y_labels(if empty { 0 } else { 8 })
        .y_label_formatter(&|y: &f64| format!("{y:.decimals$}"))
        .label_style(("sans-serif", 17))
        .axis_desc_style(("sans-serif", 18))
        .bold_line_style(BLACK.mix(0.12))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    chart.draw_series(std::iter::once(PathElement::new(
        vec![(-0.5, 0.0), (k as f64 - 0.5, 0.0)],
        BLACK.stroke_width(1),
    )))?;
    let name_style = ("sans-serif", 18)
        .into_font()
        .into_text_style(area)
        .pos(Pos::new(HPos::Center, VPos::Top));
    for (i, name) in names.iter().enumerate() {
        chart.draw_series(std::iter::once(
            EmptyElement::at((i as f64, lo - pad))
                + Text::new(name.clone(), (0, 10), name_style.clone()),
        ))?;
    }
    for (i, value) in values.iter().enumerate() {
        let colour = COLOURS[(i + 1) % COLOURS.len()];
        let x = i as f64;
        let Some(s) = value else {
            // Some seed did not reach the target: no difference to draw, only counts.
            if let TimeDifference::Counts {
                primary,
                baseline,
                pairs,
            } = &paired[i].sim_seconds_to_target
            {
                // Two short lines: a panel holds one column per baseline.
                let small = ("sans-serif", 15)
                    .into_font()
                    .into_text_style(area)
                    .pos(Pos::new(HPos::Center, VPos::Bottom));
                chart.draw_series(std::iter::once(
                    EmptyElement::at((x, 0.0))
                        + Text::new("reached in".to_owned(), (0, -28), small.clone())
                        + Text::new(
                            format!("{primary}/{pairs} vs {baseline}/{pairs}"),
                            (0, -8),
                            small,
                        ),
                ))?;
            }
            continue;
        };
        if let Some(h) = s.ci {
            let (a, b) = (s.mean - h, s.mean + h);
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(x, a), (x, b)],
                colour.stroke_width(3),
            )))?;
            for end in [a, b] {
                chart.draw_series(std::iter::once(
                    EmptyElement::at((x, end))
                        + PathElement::new([(-12, 0), (12, 0)], colour.stroke_width(3)),
                ))?;
            }
        }
        chart.draw_series(std::iter::once(Circle::new(
            (x, s.mean),
            7,
            colour.filled(),
        )))?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::report::{Point, summarise};

    fn run(method: &str, seed: u64, accuracies: &[Option<f64>]) -> Run {
        let points = accuracies
            .iter()
            .enumerate()
            .map(|(round, &accuracy)| Point {
                round,
                evaluated: accuracy.is_some(),
                accuracy,
                loss: accuracy,
                cum_sim_seconds: round as f64 * 1.5,
                cum_bytes_up: round as u64 * 100_000,
                cum_bytes_down: round as u64 * 100_000,
                wall_seconds: 1.0,
                train_samples: 10,
            })
            .collect();
        Run {
            method: method.into(),
            seed,
            points,
        }
    }

    fn runs() -> Vec<Run> {
        let mut runs = Vec::new();
        for seed in [1, 2, 3] {
            let d = seed as f64 * 0.02;
            runs.push(run(
                "p",
                seed,
                &[Some(0.5), None, Some(0.7 + d), None, Some(0.8 + d)],
            ));
            runs.push(run(
                "b",
                seed,
                &[Some(0.5), None, Some(0.6), None, Some(0.7 - d)],
            ));
        }
        runs
    }

    #[test]
    fn draws_four_pngs_and_names_a_bad_folder() {
        let dir = tempfile::tempdir().unwrap();
        let runs = runs();
        let table = summarise(&runs, "p", &["b".to_owned()], 0.9).unwrap();
        let paths = draw_plots(&runs, Some(&table), dir.path()).unwrap();
        let names: Vec<_> = paths
            .iter()
            .map(|p| p.file_name().unwrap().to_owned())
            .collect();
        assert_eq!(
            names,
            [
                "accuracy_vs_round.png",
                "accuracy_vs_sim_time.png",
                "accuracy_vs_mb.png",
                "paired_differences.png"
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
        // Only rounds every seed evaluated make the curve.
        let c = curves(&runs);
        let rounds: Vec<f64> = c[0].points.iter().map(|p| p.round).collect();
        assert_eq!(rounds, [0.0, 2.0, 4.0]);
        assert!(c[0].points[0].std.is_some());
        // One seed: no band, still a chart; no table: no paired chart.
        let one: Vec<Run> = runs.iter().filter(|r| r.seed == 1).cloned().collect();
        assert!(curves(&one)[0].points.iter().all(|p| p.std.is_none()));
        assert_eq!(draw_plots(&one, None, dir.path()).unwrap().len(), 3);

        let file = dir.path().join("not-a-folder");
        fs::write(&file, "").unwrap();
        let message = format!("{:#}", draw_plots(&runs, None, &file).unwrap_err());
        assert!(message.contains("not-a-folder"), "{message}");
        assert!(draw_plots(&[], None, dir.path()).is_err());
    }
}
