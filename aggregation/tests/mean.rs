//! FedAvg weights and the weighted mean against f64 references computed here: weights
//! sum to one and follow n_k, identical updates are the identity (bitwise for FedAvg,
//! including −0), arrival order does not change a bit, and every malformed update is
//! refused with a message naming the client and tensor.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fibecfed_aggregation::{
    AggregationError, Aggregator, FedAdam, FedAvg, FedYogi, ServerOptConfig, Tensors, Update,
    restrict, weighted_mean, weights,
};
use ndarray::{ArrayD, IxDyn};
use proptest::prelude::*;

/// Any finite f32 of either sign, subnormals and zeros included.
fn finite() -> impl Strategy<Value = f32> + Clone {
    use proptest::num::f32::{NEGATIVE, NORMAL, POSITIVE, SUBNORMAL, ZERO};
    POSITIVE | NEGATIVE | NORMAL | SUBNORMAL | ZERO
}

/// One to three named tensors of one to three dimensions, each dimension 1..=3.
fn tensors(values: impl Strategy<Value = f32> + Clone) -> impl Strategy<Value = Tensors> {
    prop::collection::btree_map(
        "[a-c]\\.lora_[AB]",
        prop::collection::vec(1usize..=3, 1..=3).prop_flat_map(move |shape| {
            let n: usize = shape.iter().product();
            prop::collection::vec(values.clone(), n)
                .prop_map(move |v| ArrayD::from_shape_vec(IxDyn(&shape), v).unwrap())
        }),
        1..=3,
    )
}

/// `clients` updates shaped like `template`, values in [-10, 10].
fn updates_like(template: &Tensors, clients: usize) -> impl Strategy<Value = Vec<Update>> + use<> {
    let one = template
        .iter()
        .map(|(name, t)| {
            let (name, dim) = (name.clone(), t.raw_dim());
            prop::collection::vec(-10.0_f32..10.0, t.len()).prop_map(move |v| {
                (
                    name.clone(),
                    ArrayD::from_shape_vec(dim.clone(), v).unwrap(),
                )
            })
        })
        .collect::<Vec<_>>();
    prop::collection::vec((0usize..1000, one), clients).prop_map(|ups| {
        ups.into_iter()
            .enumerate()
            .map(|(client, (samples, named))| Update {
                client,
                samples: samples + usize::from(client == 0),
                tensors: named.into_iter().collect(),
            })
            .collect()
    })
}

/// [`updates_like`] with a client count drawn from `clients`.
fn updates_like_range(
    template: &Tensors,
    clients: std::ops::RangeInclusive<usize>,
) -> impl Strategy<Value = Vec<Update>> + use<> {
    let template = template.clone();
    clients.prop_flat_map(move |n| updates_like(&template, n))
}

fn bits(t: &Tensors) -> Vec<(String, Vec<u32>)> {
    t.iter()
        .map(|(n, a)| (n.clone(), a.iter().map(|x| x.to_bits()).collect()))
        .collect()
}

fn named(pairs: &[(&str, &[usize], &[f32])]) -> Tensors {
    pairs
        .iter()
        .map(|(n, s, v)| {
            let t = ArrayD::from_shape_vec(IxDyn(s), v.to_vec()).unwrap();
            ((*n).to_string(), t)
        })
        .collect()
}

proptest! {
    #[test]
    fn weights_sum_to_one_and_follow_samples(samples in prop::collection::vec(0usize..1_000_000, 1..20)) {
        let total: usize = samples.iter().sum();
        match weights(&samples) {
            Err(e) => prop_assert!(total == 0 && e == AggregationError::NoSamples),
            Ok(w) => {
                prop_assert_eq!(w.len(), samples.len());
                prop_assert!((w.iter().sum::<f64>() - 1.0).abs() <= 1e-12);
                // Proportional: w_k · Σn = n_k, to f64 rounding.
                for (wk, &n) in w.iter().zip(&samples) {
                    prop_assert!((wk * total as f64 - n as f64).abs() <= 1e-9 * total as f64);
                }
            }
        }
    }

    #[test]
    fn identical_updates_are_the_identity(
        x in tensors(finite()),
        samples in prop::collection::vec(0usize..1 << 20, 1..8),
    ) {
        let mut samples = samples;
        samples[0] += 1;
        let ups: Vec<Update> = samples
            .iter()
            .enumerate()
            .map(|(client, &s)| Update { client, samples: s, tensors: x.clone() })
            .collect();
        let avg = FedAvg.aggregate(&x, &ups).unwrap();
        prop_assert_eq!(bits(&avg), bits(&x));
        // Adaptive rules: Δ = 0, so a fresh optimiser leaves the global where it is
        // (compared as values: −0 + 0 is +0).
        let adam: Box<dyn Aggregator> = Box::new(FedAdam::new(ServerOptConfig::default()).unwrap());
        let yogi: Box<dyn Aggregator> = Box::new(FedYogi::new(ServerOptConfig::default()).unwrap());
        for mut rule in [adam, yogi] {
            prop_assert_eq!(&rule.aggregate(&x, &ups).unwrap(), &x, "{}", rule.name());
        }
    }

    #[test]
    fn mean_matches_f64_reference_in_any_order(
        (global, ups, order) in tensors(-10.0_f32..10.0)
            .prop_flat_map(|g| (Just(g.clone()), updates_like_range(&g, 1..=6)))
            .prop_flat_map(|(g, u)| {
                let idx: Vec<usize> = (0..u.len()).collect();
                (Just(g), Just(u), Just(idx).prop_shuffle())
            }),
    ) {
        let mean = weighted_mean(&global, &ups).unwrap();
        let total: f64 = ups.iter().map(|u| u.samples as f64).sum();
        for (name, got) in &mean {
            for (i, &g) in got.iter().enumerate() {
                let (mut want, mut scale) = (0.0_f64, 0.0_f64);
                for u in &ups {
                    let x = f64::from(u.tensors[name].iter().nth(i).copied().unwrap());
                    want += u.samples as f64 / total * x;
                    scale += u.samples as f64 / total * x.abs();
                }
                // One f32 rounding of the result (2^-24 relative) dominates; the f64
                // sums add ~1e-15. 1e-6 of Σ w|x| leaves ample room, plus an absolute
                // floor for exact cancellations.
                prop_assert!((f64::from(g) - want).abs() <= 1e-6 * scale + 1e-30, "{name}[{i}]: {g} vs {want}");
            }
        }
        let shuffled: Vec<Update> = order.iter().map(|&i| ups[i].clone()).collect();
        prop_assert_eq!(bits(&weighted_mean(&global, &shuffled).unwrap()), bits(&mean));
    }
}

#[test]
fn restrict_keeps_the_chosen_names() {
    let t = named(&[
        ("l0.A", &[1], &[1.0]),
        ("l1.A", &[1], &[2.0]),
        ("l1.B", &[1], &[3.0]),
    ]);
    let kept = restrict(&t, |n| n.starts_with("l1."));
    assert_eq!(kept.keys().collect::<Vec<_>>(), ["l1.A", "l1.B"]);
    assert_eq!(kept["l1.B"], t["l1.B"]);
}

#[test]
fn aggregator_names_and_stateless_fedavg() {
    let config = ServerOptConfig::default();
    assert_eq!(FedAvg.name(), "fedavg");
    assert_eq!(FedAdam::new(config).unwrap().name(), "fedadam");
    assert_eq!(FedYogi::new(config).unwrap().name(), "fedyogi");
    assert!(FedAvg.state().is_empty());
    assert!(FedAvg.load_state(&Tensors::new()).is_ok());
    assert!(matches!(
        FedAvg.load_state(&named(&[("m/x", &[1], &[0.0])])),
        Err(AggregationError::State(_))
    ));
}

#[test]
fn malformed_updates_are_refused_naming_client_and_tensor() {
    let global = named(&[("a", &[2], &[0.0, 0.0]), ("b", &[1, 2], &[0.0, 0.0])]);
    let good = |client| Update {
        client,
        samples: 1,
        tensors: global.clone(),
    };
    let with = |client, tensors| Update {
        client,
        samples: 2,
        tensors,
    };
    let refuse = |ups: &[Update]| {
        let e = weighted_mean(&global, ups).unwrap_err();
        // Every aggregator refuses the same way, before touching its state.
        let mut adam = FedAdam::new(ServerOptConfig::default()).unwrap();
        assert_eq!(adam.aggregate(&global, ups).unwrap_err(), e);
        assert!(adam.state().is_empty());
        (e.clone(), e.to_string())
    };

    let missing = named(&[("a", &[2], &[1.0, 1.0])]);
    let (e, msg) = refuse(&[good(0), with(7, missing)]);
    assert!(matches!(e, AggregationError::Mismatch { client: 7, ref tensor, .. } if tensor == "b"));
    assert!(
        msg.contains("client 7") && msg.contains("`b`") && msg.contains("missing"),
        "{msg}"
    );

    let mut extra = global.clone();
    extra.insert("c".into(), ArrayD::zeros(IxDyn(&[1])));
    let (_, msg) = refuse(&[with(3, extra), good(0)]);
    assert!(msg.contains("client 3") && msg.contains("`c`"), "{msg}");

    let mut reshaped = global.clone();
    reshaped.insert("b".into(), ArrayD::zeros(IxDyn(&[2, 1])));
    let (_, msg) = refuse(&[good(0), with(4, reshaped)]);
    assert!(
        msg.contains("client 4") && msg.contains("`b`") && msg.contains("[2, 1]"),
        "{msg}"
    );

    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut poisoned = global.clone();
        poisoned.get_mut("a").unwrap()[[1]] = bad;
        let (e, msg) = refuse(&[good(0), with(5, poisoned)]);
        assert_eq!(
            e,
            AggregationError::NonFinite {
                client: 5,
                tensor: "a".into()
            }
        );
        assert!(msg.contains("client 5") && msg.contains("`a`"), "{msg}");
    }

    assert_eq!(refuse(&[]).0, AggregationError::Empty);
    assert_eq!(
        refuse(&[good(2), good(2)]).0,
        AggregationError::DuplicateClient(2)
    );
    let zero = |client| Update {
        samples: 0,
        ..good(client)
    };
    assert_eq!(refuse(&[zero(0), zero(1)]).0, AggregationError::NoSamples);
    assert_eq!(weights(&[]), Err(AggregationError::Empty));
    assert_eq!(weights(&[0, 0]), Err(AggregationError::NoSamples));
}

#[test]
fn mean_by_hand() {
    let global = named(&[("w", &[3], &[9.0, 9.0, 9.0])]);
    let up = |client, samples, v: &[f32]| Update {
        client,
        samples,
        tensors: named(&[("w", &[3], v)]),
    };
    // Weights 1/6, 2/6, 3/6; a client with no samples counts for nothing.
    let ups = [
        up(2, 3, &[2.0, 0.0, -1.0]),
        up(0, 1, &[2.0, 6.0, 1.0]),
        up(9, 0, &[1e6, 1e6, 1e6]),
        up(1, 2, &[-1.0, 3.0, 1.0]),
    ];
    let mean = weighted_mean(&global, &ups).unwrap();
    assert_eq!(mean["w"].as_slice().unwrap(), &[1.0, 2.0, 0.0]);
}

#[test]
fn arrival_order_cannot_change_a_cancellation() {
    // In f64, (1e17 − 1e17) + 1 = 1 but (1e17 + 1) − 1e17 = 0: summation order shows.
    // Ascending client ids fix it to the first, whatever order the uploads arrive in.
    let global = named(&[("w", &[1], &[0.0])]);
    let up = |client, v: f32| Update {
        client,
        samples: 1,
        tensors: named(&[("w", &[1], &[v])]),
    };
    let ups = [up(0, 1e17), up(1, -1e17), up(2, 1.0)];
    for order in [
        [0, 1, 2],
        [0, 2, 1],
        [1, 0, 2],
        [1, 2, 0],
        [2, 0, 1],
        [2, 1, 0],
    ] {
        let arrived: Vec<Update> = order.iter().map(|&i| ups[i].clone()).collect();
        let mean = weighted_mean(&global, &arrived).unwrap();
        assert_eq!(
            mean["w"][[0]].to_bits(),
            ((1.0_f64 / 3.0) as f32).to_bits(),
            "{order:?}"
        );
    }
}
