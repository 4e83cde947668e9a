//! FedAdam and FedYogi against an f64 reference written here from Reddi et al. 2021's
//! formulas (two rounds, a tensor left out of the second round, a new one joining),
//! bit-exact continuation after `state()`/`load_state()`, and refusal of bad settings
//! and bad state, each naming the field or tensor.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use fibecfed_aggregation::{
    AggregationError, Aggregator, FedAdam, FedYogi, ServerOptConfig, Tensors, Update, restrict,
};
use ndarray::{ArrayD, IxDyn};

/// Deterministic, irregular values: no two elements share a magnitude, so Yogi's
/// sign(v − Δ²) is never at a tie where f32 and f64 could disagree.
fn tensor(shape: &[usize], seed: f32) -> ArrayD<f32> {
    let n: usize = shape.iter().product();
    let v = (0..n).map(|i| ((i as f32 + 1.0) * 1.37 + seed).sin() * (0.5 + seed.cos().abs()));
    ArrayD::from_shape_vec(IxDyn(shape), v.collect()).unwrap()
}

fn global() -> Tensors {
    [
        ("l0.lora_A".to_string(), tensor(&[2, 3], 0.1)),
        ("l0.lora_B".to_string(), tensor(&[4], 0.7)),
    ]
    .into()
}

fn updates(global: &Tensors, round: u8) -> Vec<Update> {
    [(4, 10), (1, 25), (2, 3)]
        .iter()
        .map(|&(client, samples)| Update {
            client,
            samples,
            tensors: global
                .iter()
                .map(|(n, t)| {
                    let seed = f32::from(round) * 3.1 + client as f32;
                    (n.clone(), t + &tensor(t.shape(), seed).mapv(|x| 0.3 * x))
                })
                .collect(),
        })
        .collect()
}

/// The paper's server step in f64 throughout, moments per tensor name.
#[derive(Default)]
struct Reference {
    yogi: bool,
    m: BTreeMap<String, Vec<f64>>,
    v: BTreeMap<String, Vec<f64>>,
}

impl Reference {
    fn step(
        &mut self,
        c: ServerOptConfig,
        global: &Tensors,
        ups: &[Update],
    ) -> BTreeMap<String, Vec<f64>> {
        let total: f64 = ups.iter().map(|u| u.samples as f64).sum();
        let mut out = BTreeMap::new();
        for (name, x) in global {
            let m = self
                .m
                .entry(name.clone())
                .or_insert_with(|| vec![0.0; x.len()]);
            let v = self
                .v
                .entry(name.clone())
                .or_insert_with(|| vec![c.tau * c.tau; x.len()]);
            let mut new = Vec::new();
            for (i, &xi) in x.iter().enumerate() {
                let mean: f64 = ups
                    .iter()
                    .map(|u| {
                        u.samples as f64 / total
                            * f64::from(u.tensors[name].iter().nth(i).copied().unwrap())
                    })
                    .sum();
                let d = mean - f64::from(xi);
                m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * d;
                v[i] = if self.yogi {
                    let s = v[i] - d * d;
                    v[i] - (1.0 - c.beta2)
                        * d
                        * d
                        * if s > 0.0 {
                            1.0
                        } else if s < 0.0 {
                            -1.0
                        } else {
                            0.0
                        }
                } else {
                    c.beta2 * v[i] + (1.0 - c.beta2) * d * d
                };
                new.push(f64::from(xi) + c.lr * m[i] / (v[i].sqrt() + c.tau));
            }
            out.insert(name.clone(), new);
        }
        out
    }
}

fn fresh(yogi: bool, c: ServerOptConfig) -> Box<dyn Aggregator> {
    if yogi {
        Box::new(FedYogi::new(c).unwrap())
    } else {
        Box::new(FedAdam::new(c).unwrap())
    }
}

#[test]
fn two_rounds_match_the_f64_reference() {
    let configs = [
        ServerOptConfig::default(),
        ServerOptConfig {
            lr: 0.3,
            beta1: 0.5,
            beta2: 0.9,
            tau: 1e-2,
        },
    ];
    for yogi in [false, true] {
        for c in configs {
            let mut agg = fresh(yogi, c);
            let mut reference = Reference {
                yogi,
                ..Reference::default()
            };
            let g0 = global();
            let g1 = agg.aggregate(&g0, &updates(&g0, 0)).unwrap();
            let r1 = reference.step(c, &g0, &updates(&g0, 0));
            // Round two: only lora_B, plus a tensor that is new this round.
            let mut g1b = restrict(&g1, |n| n.ends_with("lora_B"));
            g1b.insert("l1.lora_A".into(), tensor(&[3, 2], 2.2));
            let g2 = agg.aggregate(&g1b, &updates(&g1b, 1)).unwrap();
            let r2 = reference.step(c, &g1b, &updates(&g1b, 1));
            // The reference takes the f32 global the server handed out, so differences
            // come from the f32 moments (2^-24 relative each) and the f32 output; a
            // step is at most about η (1−β1)/√(1−β2) ≤ 2η here, so 1e-6·(|x| + η) bounds
            // them with room to spare.
            for (got, want) in [(&g1, &r1), (&g2, &r2)] {
                assert_eq!(
                    got.keys().collect::<Vec<_>>(),
                    want.keys().collect::<Vec<_>>()
                );
                for (name, t) in got {
                    for (&g, &w) in t.iter().zip(&want[name]) {
                        let tol = 1e-6 * (w.abs() + c.lr);
                        assert!(
                            (f64::from(g) - w).abs() <= tol,
                            "{} {name}: {g} vs {w}",
                            agg.name()
                        );
                    }
                }
            }
            // The steps really moved something, and by the order of η.
            let moved = g1["l0.lora_A"]
                .iter()
                .zip(&g0["l0.lora_A"])
                .map(|(a, b)| (a - b).abs());
            assert!(moved.fold(0.0_f32, f32::max) > 0.1 * c.lr as f32);
            // The left-out tensor kept its moments; the new one has its own.
            let state = agg.state();
            let keys: Vec<_> = state.keys().map(String::as_str).collect();
            assert_eq!(
                keys,
                [
                    "m/l0.lora_A",
                    "m/l0.lora_B",
                    "m/l1.lora_A",
                    "v/l0.lora_A",
                    "v/l0.lora_B",
                    "v/l1.lora_A"
                ]
            );
            let m_a: Vec<f64> = state["m/l0.lora_A"].iter().map(|&x| f64::from(x)).collect();
            for (g, w) in m_a.iter().zip(&reference.m["l0.lora_A"]) {
                assert!((g - w).abs() <= 1e-7 * w.abs() + 1e-12);
            }
        }
    }
}

#[test]
fn state_round_trip_continues_bit_exactly() {
    for yogi in [false, true] {
        let c = ServerOptConfig::default();
        let mut a = fresh(yogi, c);
        let g0 = global();
        let g1 = a.aggregate(&g0, &updates(&g0, 0)).unwrap();
        let mut b = fresh(yogi, c);
        b.load_state(&a.state()).unwrap();
        assert_eq!(b.state(), a.state());
        let from_a = a.aggregate(&g1, &updates(&g1, 1)).unwrap();
        let from_b = b.aggregate(&g1, &updates(&g1, 1)).unwrap();
        let bits = |t: &Tensors| {
            t.values()
                .flat_map(|a| a.iter().map(|x| x.to_bits()))
                .collect::<Vec<_>>()
        };
        assert_eq!(bits(&from_a), bits(&from_b));
        assert_eq!(bits(&a.state()), bits(&b.state()));
    }
}

#[test]
fn bad_state_is_refused_naming_the_tensor() {
    let mut agg = FedAdam::new(ServerOptConfig::default()).unwrap();
    let g0 = global();
    agg.aggregate(&g0, &updates(&g0, 0)).unwrap();
    let good = agg.state();
    let refuse = |agg: &mut FedAdam, state: Tensors, needle: &str| {
        let before = agg.state();
        let err = agg.load_state(&state).unwrap_err();
        assert!(matches!(err, AggregationError::State(_)));
        assert!(err.to_string().contains(needle), "{err} lacks {needle}");
        assert_eq!(
            agg.state(),
            before,
            "a refused load must not change the state"
        );
    };
    let mut s = good.clone();
    s.insert("step".into(), ArrayD::zeros(IxDyn(&[1])));
    refuse(&mut agg, s, "`step`");
    let mut s = good.clone();
    s.remove("v/l0.lora_B");
    refuse(&mut agg, s, "v/l0.lora_B");
    let mut s = good.clone();
    s.remove("m/l0.lora_A");
    refuse(&mut agg, s, "m/l0.lora_A");
    let mut s = good.clone();
    s.insert("v/l0.lora_A".into(), ArrayD::ones(IxDyn(&[6])));
    refuse(&mut agg, s, "m/l0.lora_A");
    let mut s = good.clone();
    s.get_mut("m/l0.lora_B").unwrap()[[0]] = f32::NAN;
    refuse(&mut agg, s, "m/l0.lora_B");
    let mut s = good.clone();
    s.get_mut("v/l0.lora_B").unwrap()[[0]] = -1.0;
    refuse(&mut agg, s, "v/l0.lora_B");

    // Moments that no longer fit the tensor of that name: refused, state untouched.
    let mut reshaped = g0.clone();
    reshaped.insert("l0.lora_B".into(), ArrayD::zeros(IxDyn(&[2, 2])));
    let before = agg.state();
    let err = agg
        .aggregate(&reshaped, &updates(&reshaped, 1))
        .unwrap_err();
    assert!(
        matches!(err, AggregationError::State(_)) && err.to_string().contains("l0.lora_B"),
        "{err}"
    );
    assert_eq!(agg.state(), before);
}

#[test]
fn bad_settings_are_refused_naming_the_field() {
    let d = ServerOptConfig::default();
    assert_eq!((d.lr, d.beta1, d.beta2, d.tau), (1e-2, 0.9, 0.99, 1e-3));
    let cases = [
        ("lr", ServerOptConfig { lr: 0.0, ..d }),
        ("lr", ServerOptConfig { lr: f64::NAN, ..d }),
        (
            "lr",
            ServerOptConfig {
                lr: f64::INFINITY,
                ..d
            },
        ),
        ("beta1", ServerOptConfig { beta1: 1.0, ..d }),
        ("beta1", ServerOptConfig { beta1: -0.1, ..d }),
        (
            "beta2",
            ServerOptConfig {
                beta2: f64::NAN,
                ..d
            },
        ),
        ("tau", ServerOptConfig { tau: 0.0, ..d }),
        (
            "tau",
            ServerOptConfig {
                tau: f64::INFINITY,
                ..d
            },
        ),
    ];
    for (field, c) in cases {
        let err = FedYogi::new(c).unwrap_err();
        assert!(matches!(err, AggregationError::Config(_)));
        assert!(err.to_string().contains(&format!("`{field}`")), "{err}");
        assert_eq!(FedAdam::new(c).unwrap_err(), err);
    }
    assert!(
        ServerOptConfig {
            beta1: 0.0,
            beta2: 0.0,
            ..d
        }
        .validate()
        .is_ok()
    );
}

#[test]
fn config_reads_with_defaults_and_rejects_unknown_fields() {
    let c: ServerOptConfig = serde_json::from_str(r#"{"lr": 0.5}"#).unwrap();
    assert_eq!(
        c,
        ServerOptConfig {
            lr: 0.5,
            ..ServerOptConfig::default()
        }
    );
    let err = serde_json::from_str::<ServerOptConfig>(r#"{"beta3": 0.5}"#).unwrap_err();
    assert!(err.to_string().contains("beta3"), "{err}");
}
