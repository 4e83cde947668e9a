//! Selection on top of the Fisher sums against brute-force references: sparse site
//! masks (neuron rows by the documented neuron score, single parameters by value,
//! ⌈ρ·n⌉ of each, ties to the lower index), the server's global-layer choice
//! (consensus top-k, independent of report order; random and all layers), importance
//! normalisation, Fisher momentum, per-layer Fisher sums, sampled labels and
//! difficulty scores, and the refusal of bad settings and non-finite inputs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use fibecfed_fisher::{
    AllLayers, ConsensusTopK, DiagFisher, DifficultyScorer, FisherError, FisherMomentum,
    FisherTrace, Granularity, HeadDiag, ImportanceReport, LayerSelector, LossScore, NonFinite,
    RandomLayers, ReportWeighting, SampleStats, SelectEnd, Setting, SiteDiag, ceil_fraction,
    consensus, gal_count, neuron_scores, normalise, sample_labels, scores, site_mask,
};
use ndarray::{Array1, Array2};
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A fraction with, when it is a/b, its numerator and denominator.
#[derive(Debug, Clone, Copy)]
struct Frac {
    value: f64,
    ratio: Option<(u64, u64)>,
}

impl Frac {
    /// ⌈f·n⌉: in integers for a/b, otherwise by search with float noise (relative
    /// 1e-9) above an integer counting as that integer.
    fn ceil_of(self, n: usize) -> usize {
        if let Some((a, b)) = self.ratio {
            (a * n as u64).div_ceil(b) as usize
        } else {
            let x = self.value * n as f64;
            let target = x - 1e-9 * x.abs().max(1.0);
            (0..=n).find(|&k| k as f64 >= target).unwrap_or(n)
        }
    }
}

fn ratio(lo: u64) -> impl Strategy<Value = Frac> {
    (lo..=20u64, 1u64..=20).prop_map(|(a, b)| {
        let (a, b) = (a.min(b), a.max(b));
        Frac {
            value: a as f64 / b as f64,
            ratio: Some((a, b)),
        }
    })
}

fn any_value(lo: f64) -> impl Strategy<Value = Frac> {
    (lo..=1.0f64).prop_map(|value| Frac { value, ratio: None })
}

/// ρ in (0, 1].
fn rho() -> impl Strategy<Value = Frac> {
    prop_oneof![
        ratio(1),
        any_value(1e-6),
        Just(Frac {
            value: 1.0,
            ratio: Some((1, 1))
        }),
    ]
}

/// g in [0, 1].
fn gal_fraction() -> impl Strategy<Value = Frac> {
    prop_oneof![
        ratio(0),
        any_value(0.0),
        Just(Frac {
            value: 0.0,
            ratio: Some((0, 1))
        }),
        Just(Frac {
            value: 1.0,
            ratio: Some((1, 1))
        }),
    ]
}

/// Non-negative Fisher-like values: either a small integer set (many exact ties, many
/// zeros) or continuous.
fn values(len: usize) -> impl Strategy<Value = Vec<f64>> {
    prop_oneof![
        prop::collection::vec((0u8..4).prop_map(f64::from), len),
        prop::collection::vec(prop_oneof![1 => Just(0.0), 4 => 0.0f64..10.0], len),
    ]
}

fn site_diag() -> impl Strategy<Value = SiteDiag> {
    (1usize..5, 1usize..12, 1usize..12).prop_flat_map(|(r, d_in, d_out)| {
        (values(r * d_in), values(d_out * r)).prop_map(move |(a, b)| SiteDiag {
            a: Array2::from_shape_vec((r, d_in), a).unwrap(),
            b: Array2::from_shape_vec((d_out, r), b).unwrap(),
        })
    })
}

/// The neuron and rank-component scores exactly as `neuron_scores`' documentation
/// defines them, summed term by term.
fn reference_neuron_scores(diag: &SiteDiag) -> (Vec<f64>, Vec<f64>) {
    let (r, d_in) = diag.a.dim();
    let d_out = diag.b.nrows();
    let mut a_mass = vec![0.0; r];
    let mut b_col = vec![0.0; r];
    for c in 0..r {
        for k in 0..d_in {
            a_mass[c] += diag.a[[c, k]];
        }
        for j in 0..d_out {
            b_col[c] += diag.b[[j, c]];
        }
    }
    let mut neurons = vec![0.0; d_out];
    for (j, score) in neurons.iter_mut().enumerate() {
        for c in 0..r {
            let f = diag.b[[j, c]];
            let share = if b_col[c] > 0.0 {
                f / b_col[c]
            } else {
                1.0 / d_out as f64
            };
            *score += f + share * a_mass[c];
        }
    }
    let ranks = (0..r).map(|c| a_mass[c] + b_col[c]).collect();
    (neurons, ranks)
}

/// Checks that `kept` (ascending or not) is a top-`k` set of `scores`: every kept unit
/// scores at least every dropped one, and where two units are exact ties by
/// construction (`same(i, j)`) the lower index is kept. Near ties that differ only by
/// summation-order rounding may go either way.
fn check_top(
    scores: &[f64],
    kept: &[usize],
    k: usize,
    same: impl Fn(usize, usize) -> bool,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(kept.len(), k, "kept {:?} of scores {:?}", kept, scores);
    let mut is_kept = vec![false; scores.len()];
    for &i in kept {
        prop_assert!(i < scores.len() && !is_kept[i], "kept {:?}", kept);
        is_kept[i] = true;
    }
    for i in (0..scores.len()).filter(|&i| is_kept[i]) {
        for d in (0..scores.len()).filter(|&d| !is_kept[d]) {
            let tol = 1e-9 * scores[i].abs().max(scores[d].abs()).max(1.0);
            prop_assert!(
                scores[i] >= scores[d] - tol,
                "kept {i} ({}) but dropped {d} ({}): {:?}",
                scores[i],
                scores[d],
                scores
            );
            if same(i, d) {
                prop_assert!(i < d, "tie between {i} and {d}: the higher index is kept");
            }
        }
    }
    Ok(())
}

fn rows_kept(mask: &Array2<bool>) -> Result<Vec<usize>, TestCaseError> {
    let mut kept = vec![];
    for (j, row) in mask.rows().into_iter().enumerate() {
        let all = row.iter().all(|&m| m);
        prop_assert!(all || row.iter().all(|&m| !m), "row {} is partly kept", j);
        if all {
            kept.push(j);
        }
    }
    Ok(kept)
}

fn bits(v: &[f64]) -> Vec<u64> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn close(got: f64, want: f64) -> bool {
    (got - want).abs() <= 1e-12 * want.abs().max(1.0)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn neuron_masks_keep_the_top_rows(diag in site_diag(), rho in rho()) {
        let (r, _) = diag.a.dim();
        let d_out = diag.b.nrows();
        let (neurons, ranks) = reference_neuron_scores(&diag);
        let (lib_neurons, lib_ranks) = neuron_scores(&diag);
        for (got, want) in lib_neurons.iter().zip(&neurons).chain(lib_ranks.iter().zip(&ranks)) {
            prop_assert!((got - want).abs() <= 1e-9 * want.abs().max(1.0), "{got} vs {want}");
        }
        prop_assert_eq!((lib_neurons.len(), lib_ranks.len()), (d_out, r));

        let mask = site_mask(&diag, rho.value, Granularity::Neuron).unwrap();
        prop_assert_eq!(mask.a.dim(), diag.a.dim());
        prop_assert_eq!(mask.b.dim(), diag.b.dim());
        let kept_b = rows_kept(&mask.b)?;
        let kept_a = rows_kept(&mask.a)?;
        // Rows of B with the same Fisher and column sums score the same, exactly.
        let same_b = |i: usize, j: usize| diag.b.row(i) == diag.b.row(j);
        let same_a = |i: usize, j: usize| {
            diag.a.row(i) == diag.a.row(j) && diag.b.column(i) == diag.b.column(j)
        };
        check_top(&neurons, &kept_b, rho.ceil_of(d_out).max(1), same_b)?;
        check_top(&ranks, &kept_a, rho.ceil_of(r).max(1), same_a)?;
        let (ka, kb) = mask.kept();
        prop_assert_eq!((ka, kb), (kept_a.len() * diag.a.ncols(), kept_b.len() * r));
    }

    #[test]
    fn parameter_masks_keep_the_largest_entries(diag in site_diag(), rho in rho()) {
        let mask = site_mask(&diag, rho.value, Granularity::Parameter).unwrap();
        for (m, f) in [(&mask.a, &diag.a), (&mask.b, &diag.b)] {
            prop_assert_eq!(m.dim(), f.dim());
            // Row-major flat indices.
            let scores: Vec<f64> = f.iter().copied().collect();
            let kept: Vec<usize> = m.iter().enumerate().filter(|(_, k)| **k).map(|(i, _)| i).collect();
            let want = rho.ceil_of(scores.len()).max(1);
            check_top(&scores, &kept, want, |i, j| scores[i] == scores[j])?;
            // Strict: no dropped entry exceeds a kept one, tolerance or not.
            let min_kept = kept.iter().map(|&i| scores[i]).fold(f64::INFINITY, f64::min);
            let max_dropped = (0..scores.len())
                .filter(|i| !kept.contains(i))
                .map(|i| scores[i])
                .fold(f64::NEG_INFINITY, f64::max);
            prop_assert!(min_kept >= max_dropped, "kept {min_kept} < dropped {max_dropped}");
        }
    }

    /// Scaling every Fisher entry by a power of two (exact in floats) changes no mask:
    /// the property momentum's "first estimate taken as it is" relies on.
    #[test]
    fn masks_are_invariant_to_scaling_the_fisher(diag in site_diag(), rho in rho(), e in -8i32..8) {
        let s = 2f64.powi(e);
        let scaled = SiteDiag { a: &diag.a * s, b: &diag.b * s };
        for g in [Granularity::Neuron, Granularity::Parameter] {
            prop_assert_eq!(
                site_mask(&scaled, rho.value, g).unwrap(),
                site_mask(&diag, rho.value, g).unwrap()
            );
        }
    }

    #[test]
    fn bad_mask_inputs_are_refused(
        diag in site_diag(),
        bad_rho in prop_oneof![
            Just(0.0), Just(-0.5), Just(1.0 + 1e-12), Just(2.0), Just(f64::NAN), Just(f64::INFINITY)
        ],
        bad_value in prop_oneof![Just(f64::NAN), Just(f64::INFINITY), Just(f64::NEG_INFINITY)],
        in_a in any::<bool>(),
        at in any::<prop::sample::Index>(),
    ) {
        for g in [Granularity::Neuron, Granularity::Parameter] {
            let r = site_mask(&diag, bad_rho, g);
            prop_assert!(
                matches!(
                    r,
                    Err(FisherError::Config { setting: Setting::KeptFraction, value })
                        if value.to_bits() == bad_rho.to_bits()
                ),
                "{:?}", r
            );
        }
        let mut broken = diag.clone();
        let target = if in_a { &mut broken.a } else { &mut broken.b };
        let cols = target.ncols();
        let i = at.index(target.len());
        *target.iter_mut().nth(i).unwrap() = bad_value;
        let want = (if in_a { "A" } else { "B" }, [i / cols, i % cols]);
        for g in [Granularity::Neuron, Granularity::Parameter] {
            let r = site_mask(&broken, 0.5, g);
            prop_assert!(
                matches!(
                    r,
                    Err(FisherError::NonFinite(NonFinite::FisherEntry { factor, at, value }))
                        if (factor, at) == want && value.to_bits() == bad_value.to_bits()
                ),
                "{:?}", r
            );
        }
    }
}

#[derive(Debug, Clone)]
struct ReportSet {
    n_layers: usize,
    reports: Vec<ImportanceReport>,
    shuffled: Vec<ImportanceReport>,
}

fn reports() -> impl Strategy<Value = ReportSet> {
    (1usize..40, 1usize..6)
        .prop_flat_map(|(n_layers, k)| {
            let one =
                (0usize..50, values(n_layers)).prop_map(|(samples, importance)| ImportanceReport {
                    samples,
                    importance,
                });
            (Just(n_layers), prop::collection::vec(one, k))
        })
        .prop_flat_map(|(n_layers, mut reports)| {
            if reports.iter().all(|r| r.samples == 0) {
                reports[0].samples = 1;
            }
            (
                Just(n_layers),
                Just(reports.clone()),
                Just(reports).prop_shuffle(),
            )
        })
        .prop_map(|(n_layers, reports, shuffled)| ReportSet {
            n_layers,
            reports,
            shuffled,
        })
}

fn reference_consensus(reports: &[ImportanceReport], n_layers: usize) -> Vec<f64> {
    let total: usize = reports.iter().map(|r| r.samples).sum();
    let mut c = vec![0.0; n_layers];
    for r in reports {
        for (l, v) in r.importance.iter().enumerate() {
            c[l] += r.samples as f64 / total as f64 * v;
        }
    }
    c
}

fn check_layers(layers: &[usize], n_layers: usize, count: usize) -> Result<(), TestCaseError> {
    prop_assert_eq!(layers.len(), count, "{:?}", layers);
    prop_assert!(
        layers.windows(2).all(|w| w[0] < w[1]),
        "not ascending: {:?}",
        layers
    );
    prop_assert!(layers.iter().all(|&l| l < n_layers), "{:?}", layers);
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    /// `end = "least"` with `weighting = "equal"` (the authors' rule) against an f64
    /// plain mean of the reports: the kept layers are the lowest, ties to the lower index.
    #[test]
    fn consensus_least_equal_keeps_the_lowest_plain_mean(rs in reports(), g in gal_fraction()) {
        let n_layers = rs.n_layers;
        let mut mean = vec![0.0f64; n_layers];
        for r in &rs.reports {
            for (l, v) in r.importance.iter().enumerate() {
                mean[l] += v / rs.reports.len() as f64;
            }
        }
        let selector = ConsensusTopK {
            fraction: g.value,
            end: SelectEnd::Least,
            weighting: ReportWeighting::Equal,
        };
        let layers = selector.select(&rs.reports, n_layers).unwrap();
        let count = g.ceil_of(n_layers);
        check_layers(&layers, n_layers, count)?;
        let same = |i: usize, j: usize| {
            rs.reports.iter().all(|r| r.importance[i].to_bits() == r.importance[j].to_bits())
        };
        let negated: Vec<f64> = mean.iter().map(|v| -v).collect();
        check_top(&negated, &layers, count, same)?;
    }

    #[test]
    fn consensus_top_k_picks_the_weighted_top_layers(rs in reports(), g in gal_fraction()) {
        let n_layers = rs.n_layers;
        let want = reference_consensus(&rs.reports, n_layers);
        let got = consensus(&rs.reports, n_layers).unwrap();
        prop_assert_eq!(got.len(), n_layers);
        for (a, b) in got.iter().zip(&want) {
            prop_assert!((a - b).abs() <= 1e-12 * b.abs().max(1.0), "{a} vs {b}");
        }
        let selector = ConsensusTopK::most(g.value);
        let layers = selector.select(&rs.reports, n_layers).unwrap();
        let count = g.ceil_of(n_layers);
        check_layers(&layers, n_layers, count)?;
        // Layers every client scores identically are exact ties.
        let same = |i: usize, j: usize| {
            rs.reports.iter().all(|r| r.importance[i].to_bits() == r.importance[j].to_bits())
        };
        check_top(&want, &layers, count, same)?;

        // The order the reports arrive in changes nothing, bit for bit.
        prop_assert_eq!(selector.select(&rs.shuffled, n_layers).unwrap(), layers);
        prop_assert_eq!(bits(&consensus(&rs.shuffled, n_layers).unwrap()), bits(&got));
    }

    #[test]
    fn random_and_all_layers(rs in reports(), g in gal_fraction(), seed in any::<u64>()) {
        let n_layers = rs.n_layers;
        let selector = RandomLayers { fraction: g.value, seed };
        let layers = selector.select(&rs.reports, n_layers).unwrap();
        check_layers(&layers, n_layers, g.ceil_of(n_layers))?;
        prop_assert_eq!(selector.select(&rs.reports, n_layers).unwrap(), layers.clone());
        prop_assert_eq!(selector.select(&[], n_layers).unwrap(), layers);
        prop_assert_eq!(
            AllLayers.select(&rs.reports, n_layers).unwrap(),
            (0..n_layers).collect::<Vec<_>>()
        );
        prop_assert_eq!(AllLayers.select(&[], n_layers).unwrap(), (0..n_layers).collect::<Vec<_>>());
    }

    #[test]
    fn bad_reports_are_refused(rs in reports(), at in any::<prop::sample::Index>(), layer in any::<prop::sample::Index>()) {
        let n_layers = rs.n_layers;
        let selector = ConsensusTopK::most(0.5);
        let k = at.index(rs.reports.len());

        let report = format!("client report {k}'s importance");
        let mut short = rs.reports.clone();
        short[k].importance.pop();
        let r = selector.select(&short, n_layers);
        prop_assert!(
            matches!(&r, Err(FisherError::Shape { tensor, expected, found, .. })
                if *tensor == report && *expected == [n_layers] && *found == [n_layers - 1]),
            "{:?}", r
        );
        let mut long = rs.reports.clone();
        long[k].importance.push(0.0);
        let r = selector.select(&long, n_layers);
        prop_assert!(
            matches!(&r, Err(FisherError::Shape { tensor, expected, found, .. })
                if *tensor == report && *expected == [n_layers] && *found == [n_layers + 1]),
            "{:?}", r
        );

        let l = layer.index(n_layers);
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let mut broken = rs.reports.clone();
            broken[k].importance[l] = bad;
            let r = selector.select(&broken, n_layers);
            prop_assert!(
                matches!(
                    r,
                    Err(FisherError::NonFinite(NonFinite::ReportedImportance { client, layer, .. }))
                        if client == k && layer == l
                ),
                "{:?}", r
            );
        }

        let mut empty = rs.reports.clone();
        for r in &mut empty {
            r.samples = 0;
        }
        let count = empty.len();
        let r = selector.select(&empty, n_layers);
        prop_assert!(
            matches!(r, Err(FisherError::NoReportedSamples { reports }) if reports == count),
            "{:?}", r
        );
        let r = selector.select(&[], n_layers);
        prop_assert!(
            matches!(r, Err(FisherError::NoReportedSamples { reports: 0 })),
            "{:?}", r
        );

        for g in [-1e-12, -0.5, 1.0 + 1e-12, 2.0, f64::NAN, f64::INFINITY] {
            let refused = |r: &Result<Vec<usize>, FisherError>| matches!(
                r,
                Err(FisherError::Config { setting: Setting::GlobalFraction, value })
                    if value.to_bits() == g.to_bits()
            );
            let top = ConsensusTopK::most(g).select(&rs.reports, n_layers);
            prop_assert!(refused(&top), "g = {}: {:?}", g, top);
            let random = RandomLayers { fraction: g, seed: 1 }.select(&rs.reports, n_layers);
            prop_assert!(refused(&random), "g = {}: {:?}", g, random);
        }
    }

    #[test]
    fn normalise_is_proportional_and_sums_to_one(
        scores in (0usize..40).prop_flat_map(values),
    ) {
        let out = normalise(&scores).unwrap();
        prop_assert_eq!(out.len(), scores.len());
        let total: f64 = scores.iter().sum();
        if scores.is_empty() {
            return Ok(());
        }
        let sum: f64 = out.iter().sum();
        prop_assert!((sum - 1.0).abs() <= 1e-12, "sums to {sum}");
        if total > 0.0 {
            for (o, s) in out.iter().zip(&scores) {
                prop_assert!(close(*o, s / total), "{o} vs {}", s / total);
                prop_assert!(*o >= 0.0);
                prop_assert_eq!(*o == 0.0, *s == 0.0);
            }
        } else {
            let uniform = 1.0 / scores.len() as f64;
            prop_assert!(out.iter().all(|&o| close(o, uniform)), "{:?}", out);
        }
    }

    #[test]
    fn normalise_refuses_negative_and_non_finite(
        mut scores in (1usize..40).prop_flat_map(values),
        at in any::<prop::sample::Index>(),
        bad in prop_oneof![Just(-1.0), Just(-1e-300), Just(f64::NAN), Just(f64::INFINITY), Just(f64::NEG_INFINITY)],
    ) {
        let l = at.index(scores.len());
        scores[l] = bad;
        match normalise(&scores) {
            Err(FisherError::NonFinite(NonFinite::ImportanceScore { layer, score })) => {
                prop_assert_eq!(layer, l);
                prop_assert_eq!(score.to_bits(), bad.to_bits());
            }
            other => prop_assert!(false, "{bad} at {l}: {other:?}"),
        }
    }
}

/// For every fraction i/100 (as a config writes `0.07`) of every size up to 100, the
/// number of kept layers and mask entries is ⌈i·n/100⌉ in integers, also where i/100·n
/// in floats lands a hair above the integer.
#[test]
fn counts_of_decimal_fractions_are_integer_ceilings() {
    let mut noisy = 0;
    for i in 0u64..=100 {
        let f = i as f64 / 100.0;
        for n in 1u64..=100 {
            let want = (i * n).div_ceil(100) as usize;
            if (i * n) % 100 == 0 && f * n as f64 > (i * n / 100) as f64 {
                noisy += 1;
            }
            let n = n as usize;
            assert_eq!(gal_count(f, n).unwrap(), want, "g = {f}, L = {n}");
            assert_eq!(ceil_fraction(f, n), want, "{f}·{n}");
            let report = ImportanceReport {
                samples: 1,
                importance: (0..n).map(|l| l as f64).collect(),
            };
            let top = ConsensusTopK::most(f)
                .select(std::slice::from_ref(&report), n)
                .unwrap();
            // Importance grows with the index: the top layers are the last ones.
            assert_eq!(top, (n - want..n).collect::<Vec<_>>(), "g = {f}, L = {n}");
            let random = RandomLayers {
                fraction: f,
                seed: i,
            }
            .select(&[], n)
            .unwrap();
            assert_eq!(random.len(), want, "g = {f}, L = {n}");
            if i > 0 {
                let diag = SiteDiag {
                    a: Array2::from_shape_fn((1, n), |(_, k)| k as f64),
                    b: Array2::from_shape_fn((n, 1), |(j, _)| j as f64),
                };
                let mask = site_mask(&diag, f, Granularity::Parameter).unwrap();
                assert_eq!(mask.kept(), (want, want), "ρ = {f}, n = {n}");
                let mask = site_mask(&diag, f, Granularity::Neuron).unwrap();
                assert_eq!(mask.kept(), (n, want), "ρ = {f}, d_out = {n}");
            }
        }
    }
    assert!(noisy > 0, "no fraction·n landed above an integer");
}

#[test]
fn consensus_by_hand() {
    // n = 1 + 3: 1/4·(1, 0, 0.5) + 3/4·(0, 1, 0.5) = (0.25, 0.75, 0.5).
    let reports = [
        ImportanceReport {
            samples: 1,
            importance: vec![1.0, 0.0, 0.5],
        },
        ImportanceReport {
            samples: 3,
            importance: vec![0.0, 1.0, 0.5],
        },
    ];
    assert_eq!(consensus(&reports, 3).unwrap(), [0.25, 0.75, 0.5]);
    let pick = |g| ConsensusTopK::most(g).select(&reports, 3).unwrap();
    assert_eq!(pick(0.0), Vec::<usize>::new());
    assert_eq!(pick(0.2), [1]);
    assert_eq!(pick(0.5), [1, 2]);
    assert_eq!(pick(1.0), [0, 1, 2]);
    // A client with no samples carries no weight.
    let mut with_idle = reports.to_vec();
    with_idle.push(ImportanceReport {
        samples: 0,
        importance: vec![100.0, 0.0, 0.0],
    });
    assert_eq!(consensus(&with_idle, 3).unwrap(), [0.25, 0.75, 0.5]);
}

type Key = (usize, &'static str);

const NAMES: [&str; 4] = ["q", "k", "v", "o"];

#[derive(Debug, Clone)]
struct Estimates {
    shapes: BTreeMap<Key, (usize, usize, usize)>,
    head: Option<(usize, usize)>,
    first: DiagFisher<Key>,
    second: DiagFisher<Key>,
}

fn diag_with(
    shapes: &BTreeMap<Key, (usize, usize, usize)>,
    head: Option<(usize, usize)>,
    samples: usize,
) -> impl Strategy<Value = DiagFisher<Key>> + use<> {
    let site_strats: Vec<_> = shapes
        .iter()
        .map(|(&key, &(r, d_in, d_out))| {
            (
                prop::collection::vec(0.0f64..10.0, r * d_in),
                prop::collection::vec(0.0f64..10.0, d_out * r),
            )
                .prop_map(move |(a, b)| {
                    (
                        key,
                        SiteDiag {
                            a: Array2::from_shape_vec((r, d_in), a).unwrap(),
                            b: Array2::from_shape_vec((d_out, r), b).unwrap(),
                        },
                    )
                })
        })
        .collect();
    let (labels, hidden) = head.unwrap_or((0, 0));
    (
        site_strats,
        prop::collection::vec(0.0f64..10.0, labels * hidden),
        prop::collection::vec(0.0f64..10.0, labels),
    )
        .prop_map(move |(sites, w, b)| DiagFisher {
            sites: sites.into_iter().collect(),
            head: head.map(|(l, h)| HeadDiag {
                weight: Array2::from_shape_vec((l, h), w).unwrap(),
                bias: Array1::from_vec(b),
            }),
            samples,
        })
}

fn estimates() -> impl Strategy<Value = Estimates> {
    (
        prop::collection::btree_map(
            (0usize..4, prop::sample::select(NAMES.to_vec())),
            (1usize..4, 1usize..6, 1usize..6),
            1..5,
        ),
        prop::option::of((1usize..4, 1usize..6)),
        1usize..50,
        1usize..50,
    )
        .prop_flat_map(|(shapes, head, n1, n2)| {
            (
                Just(shapes.clone()),
                Just(head),
                diag_with(&shapes, head, n1),
                diag_with(&shapes, head, n2),
            )
        })
        .prop_map(|(shapes, head, first, second)| Estimates {
            shapes,
            head,
            first,
            second,
        })
}

/// Elementwise `want(first, second)` of every site and the head, against `got`.
fn check_blend(
    got: &DiagFisher<Key>,
    e: &Estimates,
    want: impl Fn(f64, f64) -> f64,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.sites.len(), e.shapes.len());
    for (key, d) in &got.sites {
        let (f, s) = (&e.first.sites[key], &e.second.sites[key]);
        for (g, (x, y)) in d.a.iter().zip(f.a.iter().zip(s.a.iter())) {
            prop_assert!(
                close(*g, want(*x, *y)),
                "{key:?} A: {g} vs {}",
                want(*x, *y)
            );
        }
        for (g, (x, y)) in d.b.iter().zip(f.b.iter().zip(s.b.iter())) {
            prop_assert!(
                close(*g, want(*x, *y)),
                "{key:?} B: {g} vs {}",
                want(*x, *y)
            );
        }
        prop_assert_eq!(d.a.dim(), f.a.dim());
        prop_assert_eq!(d.b.dim(), f.b.dim());
    }
    prop_assert_eq!(got.head.is_some(), e.head.is_some());
    if let (Some(h), Some(f), Some(s)) = (&got.head, &e.first.head, &e.second.head) {
        prop_assert_eq!(h.weight.dim(), f.weight.dim());
        prop_assert_eq!(h.bias.len(), f.bias.len());
        for (g, (x, y)) in h.weight.iter().zip(f.weight.iter().zip(s.weight.iter())) {
            prop_assert!(
                close(*g, want(*x, *y)),
                "head weight: {g} vs {}",
                want(*x, *y)
            );
        }
        for (g, (x, y)) in h.bias.iter().zip(f.bias.iter().zip(s.bias.iter())) {
            prop_assert!(
                close(*g, want(*x, *y)),
                "head bias: {g} vs {}",
                want(*x, *y)
            );
        }
    }
    Ok(())
}

fn gamma() -> impl Strategy<Value = f64> {
    prop_oneof![Just(0.0), Just(1.0), 0.0f64..=1.0]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn momentum_blends_per_sample_means(e in estimates(), gamma in gamma()) {
        let (n1, n2) = (e.first.samples as f64, e.second.samples as f64);
        // F_0 = 0: F_1 = (1−γ)·F̂_1, F_2 = γ·F_1 + (1−γ)·F̂_2.
        let mut m = FisherMomentum::new(gamma).unwrap();
        prop_assert_eq!(m.gamma(), gamma);
        m.update(&e.first).unwrap();
        check_blend(m.current(), &e, |x, _| (1.0 - gamma) * x / n1)?;
        m.update(&e.second).unwrap();
        check_blend(m.current(), &e, |x, y| gamma * (1.0 - gamma) * (x / n1) + (1.0 - gamma) * (y / n2))?;
        // Seeded with F_0 = F̂_1 (e.g. the initialisation pass).
        let mut m = FisherMomentum::seeded(gamma, &e.first).unwrap();
        check_blend(m.current(), &e, |x, _| x / n1)?;
        for (key, d) in &e.first.mean().unwrap().sites {
            let c = &m.current().sites[key];
            prop_assert!(c.a.iter().zip(d.a.iter()).all(|(g, w)| close(*g, *w)));
            prop_assert!(c.b.iter().zip(d.b.iter()).all(|(g, w)| close(*g, *w)));
        }
        m.update(&e.second).unwrap();
        check_blend(m.current(), &e, |x, y| gamma * (x / n1) + (1.0 - gamma) * (y / n2))?;
    }

    #[test]
    fn momentum_starts_a_new_site_from_zero(e in estimates(), gamma in gamma()) {
        let mut m = FisherMomentum::new(gamma).unwrap();
        let mut first = e.first.clone();
        let new_key = *e.shapes.keys().next().unwrap();
        first.sites.remove(&new_key);
        m.update(&first).unwrap();
        prop_assert!(!m.current().sites.contains_key(&new_key));
        m.update(&e.second).unwrap();
        let n2 = e.second.samples as f64;
        let got = &m.current().sites[&new_key];
        let fresh = &e.second.sites[&new_key];
        prop_assert!(got.a.iter().zip(fresh.a.iter()).all(|(g, y)| close(*g, (1.0 - gamma) * y / n2)));
        prop_assert!(got.b.iter().zip(fresh.b.iter()).all(|(g, y)| close(*g, (1.0 - gamma) * y / n2)));
    }

    #[test]
    fn momentum_refuses_a_changed_shape_and_changes_nothing(e in estimates()) {
        let mut m = FisherMomentum::new(0.5).unwrap();
        m.update(&e.first).unwrap();
        let before = m.current().clone();
        let mut second = e.second.clone();
        let key = *e.shapes.keys().last().unwrap();
        let (r, d_in, _) = e.shapes[&key];
        second.sites.get_mut(&key).unwrap().a = Array2::zeros((r, d_in + 1));
        let refused = m.update(&second);
        prop_assert!(
            matches!(&refused, Err(FisherError::Shape { expected, found, .. })
                if *expected == [r, d_in] && *found == [r, d_in + 1]),
            "{:?}", refused
        );
        prop_assert_eq!(m.current(), &before);
    }

    #[test]
    fn layer_sums_add_each_site_to_its_layer(e in estimates(), extra in 0usize..3) {
        let fisher = &e.first;
        let used = fisher.sites.keys().map(|k| k.0).max().unwrap() + 1;
        let n_layers = used + extra;
        let mut want = vec![0.0; n_layers];
        for ((layer, _), d) in &fisher.sites {
            for v in d.a.iter().chain(d.b.iter()) {
                want[*layer] += v;
            }
        }
        let got = fisher.layer_sums(n_layers, |k| k.0).unwrap();
        prop_assert_eq!(got.len(), n_layers);
        for (g, w) in got.iter().zip(&want) {
            prop_assert!((g - w).abs() <= 1e-9 * w.abs().max(1.0), "{got:?} vs {want:?}");
        }
        prop_assert!(got[used..].iter().all(|&g| g == 0.0));
        // One layer too few leaves a site without a slot.
        let r = fisher.layer_sums(used - 1, |k| k.0);
        prop_assert!(
            matches!(r, Err(FisherError::NoSuchLayer { layer, n_layers, .. })
                if layer == used - 1 && n_layers == used - 1),
            "{:?}", r
        );
        // Everything mapped to one layer gives the grand total.
        let all = fisher.layer_sums(1, |_| 0).unwrap();
        let total: f64 = fisher.sites.values().map(SiteDiag::total).sum();
        prop_assert!((all[0] - total).abs() <= 1e-9 * total.max(1.0));
    }
}

#[test]
fn momentum_gamma_outside_the_unit_interval_is_refused() {
    for g in [-1e-12, -1.0, 1.0 + 1e-12, 2.0, f64::NAN, f64::INFINITY] {
        assert!(
            matches!(
                FisherMomentum::<Key>::new(g),
                Err(FisherError::Config { setting: Setting::Momentum, value })
                    if value.to_bits() == g.to_bits()
            ),
            "γ = {g}"
        );
    }
    assert!(FisherMomentum::<Key>::new(0.0).is_ok());
    assert!(FisherMomentum::<Key>::new(1.0).is_ok());
    // Sums whose sample count was never set cannot be averaged.
    let mut d = DiagFisher::<Key>::new();
    d.head = Some(HeadDiag {
        weight: Array2::ones((2, 3)),
        bias: Array1::ones(2),
    });
    assert_eq!(d.mean().unwrap_err(), FisherError::ZeroSampleCount);
    assert!(FisherMomentum::new(0.5).unwrap().update(&d).is_err());
    assert!(DiagFisher::<Key>::new().mean().is_ok());
}

fn rows(logits: &[f64], n: usize) -> Array2<f64> {
    Array2::from_shape_fn((n, logits.len()), |(_, c)| logits[c])
}

#[test]
fn sample_labels_follow_the_softmax() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let certain = sample_labels(rows(&[0.0, 30.0], 2000).view(), &mut rng).unwrap();
    assert!(certain.iter().all(|&y| y == 1));
    let certain = sample_labels(rows(&[30.0, 0.0, -5.0], 2000).view(), &mut rng).unwrap();
    assert!(certain.iter().all(|&y| y == 0));
    let f32_rows = Array2::from_shape_fn((500, 2), |(_, c)| if c == 1 { 30.0f32 } else { 0.0 });
    let certain = sample_labels(f32_rows.view(), &mut rng).unwrap();
    assert!(certain.iter().all(|&y| y == 1));

    let n = 20_000;
    // p(1) = 3/(1+3); shifting all logits by 1000 changes nothing.
    for (shift, seed) in [(0.0, 1), (0.0, 2), (1000.0, 3), (-1000.0, 4)] {
        let logits = rows(&[shift, shift + 3f64.ln()], n);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let labels = sample_labels(logits.view(), &mut rng).unwrap();
        let ones = labels.iter().filter(|&&y| y == 1).count() as f64 / n as f64;
        assert!(labels.iter().all(|&y| y < 2));
        assert!((ones - 0.75).abs() < 0.02, "shift {shift}: p(1) ≈ {ones}");
    }
    // Three classes, p = (1, 2, 5)/8.
    let logits = rows(&[0.0, 2f64.ln(), 5f64.ln()], n);
    let labels = sample_labels(logits.view(), &mut ChaCha8Rng::seed_from_u64(5)).unwrap();
    for (c, p) in [(0, 0.125), (1, 0.25), (2, 0.625)] {
        let f = labels.iter().filter(|&&y| y == c).count() as f64 / n as f64;
        assert!((f - p).abs() < 0.02, "class {c}: {f} vs {p}");
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn sample_labels_are_seeded_and_in_range(
        (n, classes, logits) in (1usize..20, 1usize..6).prop_flat_map(|(n, c)| {
            (Just(n), Just(c), prop::collection::vec(-20.0f64..20.0, n * c))
        }),
        seed in any::<u64>(),
    ) {
        let logits = Array2::from_shape_vec((n, classes), logits).unwrap();
        let a = sample_labels(logits.view(), &mut ChaCha8Rng::seed_from_u64(seed)).unwrap();
        let b = sample_labels(logits.view(), &mut ChaCha8Rng::seed_from_u64(seed)).unwrap();
        prop_assert_eq!(a.len(), n);
        prop_assert!(a.iter().all(|&y| y < classes));
        prop_assert_eq!(a, b);
    }

    #[test]
    fn sample_labels_name_the_first_bad_row(
        (n, classes, logits) in (1usize..20, 1usize..6).prop_flat_map(|(n, c)| {
            (Just(n), Just(c), prop::collection::vec(-20.0f64..20.0, n * c))
        }),
        bad in prop::collection::vec(
            (any::<prop::sample::Index>(), prop_oneof![
                Just(f64::NAN), Just(f64::INFINITY), Just(f64::NEG_INFINITY)
            ]),
            1..3,
        ),
    ) {
        let mut logits = Array2::from_shape_vec((n, classes), logits).unwrap();
        for (at, v) in &bad {
            let i = at.index(n * classes);
            logits[[i / classes, i % classes]] = *v;
        }
        let first = (0..n).find(|&i| logits.row(i).iter().any(|v| !v.is_finite())).unwrap();
        match sample_labels(logits.view(), &mut ChaCha8Rng::seed_from_u64(0)) {
            Err(FisherError::NonFinite(NonFinite::Logits { sample, logits: row })) => {
                prop_assert_eq!(sample, first);
                prop_assert_eq!(row.len(), classes);
                prop_assert!(row.iter().any(|v| !v.is_finite()));
            }
            other => prop_assert!(false, "{other:?}"),
        }
    }

    #[test]
    fn scores_pick_the_scorer_field(
        stats in prop::collection::vec((-5.0f64..5.0, 0.0f64..100.0, 0.0f64..1.0), 0..30),
    ) {
        let samples: Vec<SampleStats> = stats
            .iter()
            .map(|&(loss, fisher, head)| SampleStats { loss, fisher, per_layer: vec![fisher - head], head })
            .collect();
        let by_fisher = scores(&FisherTrace, &samples).unwrap();
        let by_loss = scores(&LossScore, &samples).unwrap();
        prop_assert_eq!(by_fisher, stats.iter().map(|s| s.1).collect::<Vec<_>>());
        prop_assert_eq!(by_loss, stats.iter().map(|s| s.0).collect::<Vec<_>>());
        prop_assert_eq!(FisherTrace.name(), "fisher");
        prop_assert_eq!(LossScore.name(), "loss");
    }

    #[test]
    fn scores_name_the_first_non_finite_sample(
        stats in prop::collection::vec((-5.0f64..5.0, 0.0f64..100.0), 1..30),
        bad in prop::collection::vec(
            (any::<prop::sample::Index>(), prop_oneof![
                Just(f64::NAN), Just(f64::INFINITY), Just(f64::NEG_INFINITY)
            ]),
            1..3,
        ),
        in_loss in any::<bool>(),
    ) {
        let mut samples: Vec<SampleStats> = stats
            .iter()
            .map(|&(loss, fisher)| SampleStats { loss, fisher, per_layer: vec![], head: 0.0 })
            .collect();
        for (at, v) in &bad {
            let s = &mut samples[at.index(stats.len())];
            if in_loss { s.loss = *v } else { s.fisher = *v }
        }
        let (broken, intact): (&dyn DifficultyScorer, &dyn DifficultyScorer) =
            if in_loss { (&LossScore, &FisherTrace) } else { (&FisherTrace, &LossScore) };
        let value = |s: &SampleStats| if in_loss { s.loss } else { s.fisher };
        let first = samples.iter().position(|s| !value(s).is_finite()).unwrap();
        match scores(broken, &samples) {
            Err(e @ FisherError::NonFinite(NonFinite::Difficulty { sample, scorer, .. })) => {
                prop_assert_eq!(sample, first);
                prop_assert_eq!(scorer, broken.name());
                let prefix = format!("not finite: sample {first}: {scorer} difficulty is ");
                prop_assert!(e.to_string().starts_with(&prefix), "{}", e);
            }
            other => prop_assert!(false, "{other:?}"),
        }
        prop_assert!(scores(intact, &samples).is_ok());
    }
}

#[test]
fn empty_logit_rows_are_refused() {
    let logits = Array2::<f64>::zeros((3, 0));
    let r = sample_labels(logits.view(), &mut ChaCha8Rng::seed_from_u64(0));
    assert!(
        matches!(
            &r,
            Err(FisherError::NonFinite(NonFinite::Logits { sample: 0, logits })) if logits.is_empty()
        ),
        "{r:?}"
    );
    let none = Array2::<f64>::zeros((0, 4));
    assert_eq!(
        sample_labels(none.view(), &mut ChaCha8Rng::seed_from_u64(0)).unwrap(),
        Vec::<usize>::new()
    );
}

#[test]
fn perturbation_importance_is_the_mean_output_change_per_unit_noise() {
    use fibecfed_fisher::PerturbationImportance;
    // Two samples of 2 tokens (the second has one padding row), hidden 2, 2 layers.
    let clean = ndarray::array![[0.0f64, 0.0], [1.0, 1.0], [2.0, 2.0], [9.0, 9.0]];
    let l0 = ndarray::array![[3.0f64, 4.0], [1.0, 1.0], [2.0, 2.0], [0.0, 0.0]];
    let l1 = ndarray::array![[0.0f64, 0.0], [1.0, 1.0], [2.0, 3.0], [9.0, 9.0]];
    let mask = [true, true, true, false];
    let norms = [2.0, 0.5];
    let mut p = PerturbationImportance::new(2);
    p.add(0, clean.view(), l0.view(), &mask, 2, &norms).unwrap();
    p.add(1, clean.view(), l1.view(), &mask, 2, &norms).unwrap();
    // Layer 0: sample 0 moves by 5 per noise 2, sample 1 by 0 (padding ignored): 1.25.
    // Layer 1: sample 0 by 0, sample 1 by 1 per noise 0.5: mean 1.0.
    let got = p.finish().unwrap();
    let want = [1.25 / 2.25, 1.0 / 2.25];
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-12, "{got:?}");
    }
    assert!(matches!(
        p.add(2, clean.view(), l0.view(), &mask, 2, &norms),
        Err(FisherError::NoSuchLayer {
            layer: 2,
            n_layers: 2,
            ..
        })
    ));
    assert_eq!(
        p.add(0, clean.view(), l0.view(), &mask, 2, &[1.0, 0.0]),
        Err(NonFinite::NoiseNorm {
            sample: 1,
            norm: 0.0
        }
        .into())
    );
    assert_eq!(
        p.add(0, clean.view(), l0.view(), &mask[..3], 2, &norms),
        Err(FisherError::Shape {
            tensor: "perturbation mask".into(),
            expected: vec![4],
            found: vec![3],
            meaning: "samples·seq_len",
        })
    );
    let short = l0.slice(ndarray::s![..3, ..]);
    assert!(matches!(
        p.add(0, clean.view(), short, &mask, 2, &norms),
        Err(FisherError::Shape { tensor, expected, found, .. })
            if tensor == "perturbation perturbed outputs" && expected == [4, 2] && found == [3, 2]
    ));
}

#[test]
fn tiny_positive_fractions_keep_one_unit_and_rank_mismatches_are_refused() {
    assert_eq!(gal_count(1e-10, 6).unwrap(), 1);
    assert_eq!(ceil_fraction(0.0, 6), 0);
    assert_eq!(ceil_fraction(f64::NAN, 6), 0);
    let diag = SiteDiag {
        a: Array2::zeros((2, 3)),
        b: Array2::zeros((4, 3)),
    };
    for g in [Granularity::Neuron, Granularity::Parameter] {
        let err = site_mask(&diag, 0.5, g).unwrap_err();
        assert!(
            matches!(&err, FisherError::Shape { tensor, expected, found, .. }
                if tensor == "Fisher of B" && *expected == [4, 2] && *found == [4, 3]),
            "{err:?}"
        );
        assert!(err.to_string().contains("ranks differ"), "{err}");
    }
}
