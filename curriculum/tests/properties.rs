//! Properties of the curriculum against brute-force references: every pacing function
//! stays in (0, 1], never decreases, starts at c0 and is exactly 1 from round ⌈λ·T⌉
//! on; the closed forms of the pacing functions; schedules are nested prefixes of the
//! order holding ⌈c(t)·n⌉ samples (counted by search, and by integer arithmetic for
//! rational fractions); the easy-first, hard-first and random orderings; the refusal
//! of bad settings and non-finite scores; and the config-file names (JSON).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fibecfed_curriculum::{
    Constant, CurriculumError, EasyFirst, Geometric, HardFirst, Linear, Ordering, Pacing,
    PacingConfig, RandomOrder, Root, Schedule, Step, sample_count,
};
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// ⌈x⌉ by search over the integers, treating x a hair above an integer (float noise,
/// relative 1e-9) as that integer.
fn robust_ceil(x: f64) -> usize {
    let target = x - 1e-9 * x.abs().max(1.0);
    (0usize..=usize::MAX).find(|&k| k as f64 >= target).unwrap()
}

/// The first round at which all data is in use: ⌈λ·T⌉.
fn full_round(lambda: f64, total: usize) -> usize {
    robust_ceil(lambda * total as f64)
}

/// ⌈c·n⌉ clamped to [1, n] (0 for n = 0), by search.
fn brute_count(c: f64, n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    robust_ceil(c * n as f64).clamp(1, n)
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Linear,
    Root,
    Geometric,
    Step(usize),
    Constant,
}

fn build(kind: Kind, c0: f64, lambda: f64) -> Box<dyn Pacing> {
    match kind {
        Kind::Linear => Box::new(Linear::new(c0, lambda).unwrap()),
        Kind::Root => Box::new(Root::new(c0, lambda).unwrap()),
        Kind::Geometric => Box::new(Geometric::new(c0, lambda).unwrap()),
        Kind::Step(s) => Box::new(Step::new(c0, lambda, s).unwrap()),
        Kind::Constant => Box::new(Constant),
    }
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::Linear),
        Just(Kind::Root),
        Just(Kind::Geometric),
        (1usize..6).prop_map(Kind::Step),
        Just(Kind::Constant),
    ]
}

/// A value in (0, 1]: often a round rational (the float-noise cases), sometimes
/// exactly 1, sometimes tiny, otherwise anything.
fn unit_open() -> impl Strategy<Value = f64> {
    prop_oneof![
        (1u32..=20, 1u32..=20).prop_map(|(a, b)| f64::from(a.min(b)) / f64::from(a.max(b))),
        Just(1.0),
        1e-6f64..1e-3,
        (1e-6f64..=1.0),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn pacing_is_a_monotone_fraction_reaching_one_at_lambda_t(
        kind in kind(),
        c0 in unit_open(),
        lambda in unit_open(),
        total in 1usize..300,
    ) {
        let pacing = build(kind, c0, lambda);
        let full = full_round(lambda, total);
        prop_assert!(full >= 1 && full <= total);
        let mut prev = 0.0;
        for t in 0..total + 5 {
            let c = pacing.fraction(t, total);
            prop_assert!(c > 0.0 && c <= 1.0, "c({t}) = {c}");
            prop_assert!(c >= prev, "c({t}) = {c} < c({}) = {prev}", t - 1);
            prev = c;
            if t >= full {
                prop_assert_eq!(c, 1.0, "round {} of {} (full from {})", t, total, full);
            } else if c0 <= 0.99 && !matches!(kind, Kind::Constant) {
                // Before ⌈λT⌉ the closed forms are all below 1.
                prop_assert!(c < 1.0, "c({t}) = {c} before round {full}");
            }
        }
        let expected_start = if matches!(kind, Kind::Constant) { 1.0 } else { c0 };
        prop_assert_eq!(pacing.fraction(0, total), expected_start);
    }

    #[test]
    fn pacing_closed_forms_before_full(
        kind in kind(),
        c0 in unit_open(),
        lambda in unit_open(),
        total in 1usize..300,
    ) {
        let pacing = build(kind, c0, lambda);
        let end = lambda * total as f64;
        for t in 0..full_round(lambda, total) {
            let p = t as f64 / end;
            let got = pacing.fraction(t, total);
            match kind {
                Kind::Linear => {
                    let want = (c0 + (1.0 - c0) * t as f64 / end).min(1.0);
                    prop_assert!((got - want).abs() <= 1e-12, "t={t}: {got} vs {want}");
                }
                Kind::Root => {
                    let want = (c0 * c0 + (1.0 - c0 * c0) * p).sqrt().min(1.0);
                    prop_assert!((got - want).abs() <= 1e-12, "t={t}: {got} vs {want}");
                }
                Kind::Geometric => {
                    let want = c0.powf(1.0 - p).min(1.0);
                    prop_assert!((got - want).abs() <= 1e-12, "t={t}: {got} vs {want}");
                }
                Kind::Step(s) => {
                    // ⌊s·t/(λT)⌋, either side of an integer within float noise.
                    let x = s as f64 * t as f64 / end;
                    let lo = (x - 1e-9 * x.max(1.0)).floor();
                    let hi = (x + 1e-9 * x.max(1.0)).floor();
                    let ok = [lo, hi].iter().any(|k| {
                        let want = c0 + (1.0 - c0) * k / s as f64;
                        (got - want).abs() <= 1e-12
                    });
                    prop_assert!(ok, "t={t}, s={s}: {got}, x={x}");
                }
                Kind::Constant => prop_assert_eq!(got, 1.0),
            }
        }
    }

    #[test]
    fn schedule_subsets_are_nested_prefixes_of_the_right_size(
        kind in kind(),
        c0 in unit_open(),
        lambda in unit_open(),
        total in 1usize..300,
        n in 1usize..500,
        seed in any::<u64>(),
    ) {
        let pacing = build(kind, c0, lambda);
        let scores: Vec<f64> = (0..n).map(|i| ((i as u64 ^ seed) % 97) as f64).collect();
        let order = EasyFirst.order(&scores, 0).unwrap();
        let schedule = Schedule::new(order.clone(), build(kind, c0, lambda), total).unwrap();
        prop_assert_eq!(schedule.order(), &order[..]);
        let full = full_round(lambda, total);
        let mut prev: &[usize] = &[];
        for t in 0..total + 3 {
            let ids = schedule.samples_at(t);
            let want = brute_count(pacing.fraction(t, total), n);
            prop_assert_eq!(ids.len(), want, "round {}", t);
            prop_assert_eq!(schedule.count_at(t), want);
            prop_assert!(ids.len() >= prev.len());
            prop_assert_eq!(&ids[..prev.len()], prev, "round {} drops an id", t);
            prop_assert_eq!(ids, &order[..ids.len()]);
            let mut seen = vec![false; n];
            for &i in ids {
                prop_assert!(i < n);
                prop_assert!(!seen[i], "id {} twice", i);
                seen[i] = true;
            }
            if t >= full {
                prop_assert_eq!(ids.len(), n);
            }
            prev = ids;
        }
    }

    #[test]
    fn sample_count_is_a_noise_free_clamped_ceiling(
        c in prop_oneof![unit_open(), (0u32..=100).prop_map(|i| f64::from(i) / 100.0)],
        n in 0usize..2000,
    ) {
        prop_assert_eq!(sample_count(c, n), brute_count(c, n));
    }

    #[test]
    fn sample_count_clamps_out_of_range_fractions(c in -10.0f64..10.0, n in 1usize..100) {
        let k = sample_count(c, n);
        prop_assert!(k >= 1 && k <= n);
        if c >= 1.0 {
            prop_assert_eq!(k, n);
        }
        if c <= 0.0 {
            prop_assert_eq!(k, 1);
        }
    }

    #[test]
    fn easy_first_and_hard_first_sort_with_ties_by_id(
        scores in prop::collection::vec(
            prop_oneof![(-3i32..4).prop_map(f64::from), -1e6f64..1e6],
            0..60,
        ),
    ) {
        let n = scores.len();
        let easy = EasyFirst.order(&scores, 7).unwrap();
        let hard = HardFirst.order(&scores, 7).unwrap();
        for order in [&easy, &hard] {
            let mut sorted = order.clone();
            sorted.sort_unstable();
            prop_assert_eq!(sorted, (0..n).collect::<Vec<_>>());
        }
        for w in easy.windows(2) {
            let (a, b) = (w[0], w[1]);
            prop_assert!(
                scores[a] < scores[b] || (scores[a] == scores[b] && a < b),
                "easy-first puts {a} ({}) before {b} ({})", scores[a], scores[b]
            );
        }
        for w in hard.windows(2) {
            let (a, b) = (w[0], w[1]);
            prop_assert!(
                scores[a] > scores[b] || (scores[a] == scores[b] && a < b),
                "hard-first puts {a} ({}) before {b} ({})", scores[a], scores[b]
            );
        }
        // The seed does not matter to a deterministic ordering.
        prop_assert_eq!(EasyFirst.order(&scores, 8).unwrap(), easy);
        prop_assert_eq!(HardFirst.order(&scores, 8).unwrap(), hard);
    }

    #[test]
    fn random_order_is_a_seeded_permutation(n in 0usize..200, seed in any::<u64>()) {
        let scores = vec![0.5; n];
        let order = RandomOrder.order(&scores, seed).unwrap();
        let mut sorted = order.clone();
        sorted.sort_unstable();
        prop_assert_eq!(sorted, (0..n).collect::<Vec<_>>());
        prop_assert_eq!(RandomOrder.order(&scores, seed).unwrap(), order.clone());
        // It ignores the scores.
        let other: Vec<f64> = (0..n).map(|i| i as f64).collect();
        prop_assert_eq!(RandomOrder.order(&other, seed).unwrap(), order);
    }

    #[test]
    fn non_finite_scores_name_the_first_bad_index(
        mut scores in prop::collection::vec(-10.0f64..10.0, 1..40),
        bad in prop::collection::vec(
            (any::<prop::sample::Index>(), prop_oneof![
                Just(f64::NAN), Just(f64::INFINITY), Just(f64::NEG_INFINITY)
            ]),
            1..4,
        ),
    ) {
        for (i, v) in &bad {
            let i = i.index(scores.len());
            scores[i] = *v;
        }
        let first = scores.iter().position(|s| !s.is_finite()).unwrap();
        for ordering in [&EasyFirst as &dyn Ordering, &HardFirst] {
            match ordering.order(&scores, 0) {
                Err(CurriculumError::NonFinite { index, .. }) => prop_assert_eq!(index, first),
                other => prop_assert!(false, "{ordering:?} gave {other:?}"),
            }
        }
    }
}

#[test]
fn random_order_depends_on_the_seed() {
    let scores = vec![0.0; 50];
    let a = RandomOrder.order(&scores, 1).unwrap();
    let b = RandomOrder.order(&scores, 2).unwrap();
    assert_ne!(a, b);
    assert_ne!(
        a,
        (0..50).collect::<Vec<_>>(),
        "seed 1 left the order unshuffled"
    );
}

/// For every λ = i/100 (a config's `lambda = 0.07`) and T ≤ 300, every pacing is
/// exactly 1 from round ⌈i·T/100⌉ (in integers) and below 1 the round before, even
/// where λ·T in floats lands a hair above the integer.
#[test]
fn pacing_is_full_exactly_from_the_integer_ceiling_of_lambda_t() {
    let mut noisy = 0;
    for i in 1u64..=100 {
        let lambda = i as f64 / 100.0;
        for total in 1u64..=300 {
            let full = (i * total).div_ceil(100) as usize;
            if (i * total) % 100 == 0 && lambda * total as f64 > (i * total / 100) as f64 {
                noisy += 1;
            }
            for kind in [
                Kind::Linear,
                Kind::Root,
                Kind::Geometric,
                Kind::Step(1),
                Kind::Step(4),
            ] {
                let pacing = build(kind, 0.5, lambda);
                let total = total as usize;
                assert_eq!(
                    pacing.fraction(full, total),
                    1.0,
                    "{kind:?} λ={lambda} T={total}"
                );
                assert!(
                    pacing.fraction(full - 1, total) < 1.0,
                    "{kind:?} λ={lambda} T={total}: full before round {full}"
                );
            }
        }
    }
    assert!(noisy > 0, "no λ·T landed above an integer");
}

/// Every a/b with 0 ≤ a ≤ b ≤ 100 (as the nearest float, like a config's `0.07`) of
/// every n up to 100 against ⌈a·n/b⌉ in integers.
#[test]
fn sample_count_of_a_rational_is_the_integer_ceiling() {
    let mut noisy = 0;
    for b in 1u64..=100 {
        for a in 0..=b {
            let c = a as f64 / b as f64;
            for n in 1u64..=100 {
                let exact = (a * n).div_ceil(b).clamp(1, n);
                assert_eq!(sample_count(c, n as usize) as u64, exact, "{a}/{b} of {n}");
                if (a * n) % b == 0 && c * n as f64 > (a * n / b) as f64 {
                    noisy += 1;
                }
            }
        }
    }
    assert!(noisy > 0, "no case exercised float noise above an integer");
}

#[test]
fn sample_count_ignores_float_noise() {
    assert_eq!(sample_count(0.3, 10), 3);
    assert_eq!(sample_count(0.1, 30), 3);
    // Products that really land a hair above an integer.
    for (c, n, k) in [
        (0.07, 100, 7),
        (0.14, 50, 7),
        (0.28, 75, 21),
        (0.55, 100, 55),
    ] {
        assert!(c * n as f64 > k as f64, "the premise: {c}·{n} is above {k}");
        assert_eq!(sample_count(c, n), k, "{c}·{n}");
    }
    assert_eq!(sample_count(0.31, 10), 4);
    assert_eq!(sample_count(0.0, 10), 1);
    assert_eq!(sample_count(1.0, 10), 10);
    assert_eq!(sample_count(0.5, 0), 0);
}

#[test]
fn bad_pacing_settings_are_refused() {
    let bad = [
        (0.0, 0.5),
        (-0.1, 0.5),
        (1.0 + 1e-12, 0.5),
        (2.0, 0.5),
        (f64::NAN, 0.5),
        (f64::INFINITY, 0.5),
        (0.5, 0.0),
        (0.5, -0.5),
        (0.5, 1.0 + 1e-12),
        (0.5, f64::NAN),
        (0.5, f64::INFINITY),
    ];
    for (c0, lambda) in bad {
        let results = [
            Linear::new(c0, lambda).err(),
            Root::new(c0, lambda).err(),
            Geometric::new(c0, lambda).err(),
            Step::new(c0, lambda, 3).err(),
        ];
        for r in results {
            assert!(
                matches!(r, Some(CurriculumError::Config(_))),
                "c0 = {c0}, λ = {lambda}: {r:?}"
            );
        }
        for cfg in [
            PacingConfig::Linear { c0, lambda },
            PacingConfig::Root { c0, lambda },
            PacingConfig::Geometric { c0, lambda },
            PacingConfig::Step {
                c0,
                lambda,
                steps: 3,
            },
        ] {
            assert!(cfg.build().is_err(), "{cfg:?} built");
        }
    }
    assert!(Step::new(0.5, 0.5, 0).is_err());
    assert!(
        PacingConfig::Step {
            c0: 0.5,
            lambda: 0.5,
            steps: 0
        }
        .build()
        .is_err()
    );
    // The edges of the ranges are accepted.
    assert!(Linear::new(1.0, 1.0).is_ok());
    assert!(Step::new(1e-300, 1e-300, 1).is_ok());
    assert!(PacingConfig::Constant {}.build().is_ok());
}

#[test]
fn bad_schedules_are_refused() {
    let pacing = || -> Box<dyn Pacing> { Box::new(Constant) };
    let bad_orders: [Vec<usize>; 4] = [vec![0, 0], vec![1, 2], vec![0, 1, 3], vec![2, 0, 2]];
    for order in bad_orders {
        assert!(
            matches!(
                Schedule::new(order.clone(), pacing(), 5),
                Err(CurriculumError::Config(_))
            ),
            "{order:?}"
        );
    }
    assert!(matches!(
        Schedule::new(vec![0, 1], pacing(), 0),
        Err(CurriculumError::Config(_))
    ));
    assert!(Schedule::new(vec![1, 0, 2], pacing(), 1).is_ok());
    // An empty client trains on nothing.
    let empty = Schedule::new(vec![], pacing(), 3).unwrap();
    assert!(empty.samples_at(0).is_empty());
}

#[test]
fn pacing_config_reads_json_with_defaults() {
    let parse = |s: &str| serde_json::from_str::<PacingConfig>(s);
    assert_eq!(
        parse(r#"{"kind":"root","c0":0.2}"#).unwrap(),
        PacingConfig::Root {
            c0: 0.2,
            lambda: 0.6
        }
    );
    assert_eq!(
        parse(r#"{"kind":"linear","lambda":0.25}"#).unwrap(),
        PacingConfig::Linear {
            c0: 0.3,
            lambda: 0.25
        }
    );
    assert_eq!(
        parse(r#"{"kind":"geometric"}"#).unwrap(),
        PacingConfig::Geometric {
            c0: 0.3,
            lambda: 0.6
        }
    );
    assert_eq!(
        parse(r#"{"kind":"step","steps":5}"#).unwrap(),
        PacingConfig::Step {
            c0: 0.3,
            lambda: 0.6,
            steps: 5
        }
    );
    assert_eq!(
        parse(r#"{"kind":"step"}"#).unwrap(),
        PacingConfig::Step {
            c0: 0.3,
            lambda: 0.6,
            steps: 3
        }
    );
    assert_eq!(
        parse(r#"{"kind":"constant"}"#).unwrap(),
        PacingConfig::Constant {}
    );
    assert!(parse(r#"{"kind":"linear","c0":0.2,"gamma":1}"#).is_err());
    assert!(parse(r#"{"kind":"root","steps":2}"#).is_err());
    assert!(parse(r#"{"kind":"cosine"}"#).is_err());
    assert!(parse(r#"{"c0":0.2}"#).is_err());
    assert_eq!(
        PacingConfig::default(),
        PacingConfig::Linear {
            c0: 0.3,
            lambda: 0.6
        }
    );
    // Round trip.
    for cfg in [
        PacingConfig::default(),
        PacingConfig::Step {
            c0: 0.1,
            lambda: 0.9,
            steps: 4,
        },
        PacingConfig::Constant {},
    ] {
        let text = serde_json::to_string(&cfg).unwrap();
        assert_eq!(parse(&text).unwrap(), cfg, "{text}");
    }
    // The built function is the named one: linear c0 = 0.3, λ = 0.6, T = 10 is
    // 0.3 + 0.7·3/6 = 0.65 at round 3.
    let linear = PacingConfig::default().build().unwrap();
    assert!((linear.fraction(3, 10) - 0.65).abs() < 1e-12);
    assert_eq!(linear.fraction(6, 10), 1.0);
}

// serde's `deny_unknown_fields` does not reach a unit variant of an internally tagged
// enum, which is why the variant is `Constant {}`: a stray setting must not vanish.
#[test]
fn unit_pacing_variant_refuses_unknown_fields() {
    let r = serde_json::from_str::<PacingConfig>(r#"{"kind":"constant","c0":0.2}"#);
    assert!(r.is_err(), "{{kind: constant, c0: 0.2}} parsed as {r:?}");
}
