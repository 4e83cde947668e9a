//! FedProx's gradient and penalty against hand computation and an f64 formula (μ = 0
//! is an exact no-op), and message sizes against safetensors' own serialiser.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fibecfed_aggregation::{AggregationError, FedProx, Tensors, message_bytes, payload_bytes};
use ndarray::{ArrayD, IxDyn};
use proptest::prelude::*;
use safetensors::{Dtype, tensor::TensorView};

#[test]
fn prox_by_hand() {
    let prox = FedProx::new(0.5).unwrap();
    let mut grad = [1.0_f32, -1.0, 0.0];
    let param = [3.0_f32, 0.0, -2.0];
    let anchor = [1.0_f32, 4.0, -2.0];
    prox.add_gradient(&mut grad, &param, &anchor).unwrap();
    // 1 + 0.5·2, −1 + 0.5·(−4), 0 + 0.
    assert_eq!(grad, [2.0, -3.0, 0.0]);
    // 0.5/2 · (4 + 16 + 0).
    assert_eq!(prox.penalty(&param, &anchor).unwrap(), 5.0);
}

#[test]
fn mu_zero_is_a_no_op() {
    let prox = FedProx::new(0.0).unwrap();
    let mut grad = [-0.0_f32, 1.5, f32::MIN_POSITIVE];
    let before = grad.map(f32::to_bits);
    prox.add_gradient(&mut grad, &[1.0, f32::INFINITY, 3.0], &[0.0, 0.0, -3.0])
        .unwrap();
    assert_eq!(grad.map(f32::to_bits), before);
    assert_eq!(prox.penalty(&[f32::INFINITY], &[0.0]).unwrap(), 0.0);
}

#[test]
fn prox_refuses_bad_mu_and_lengths() {
    for mu in [-1.0, f32::NAN, f32::INFINITY] {
        let err = FedProx::new(mu).unwrap_err();
        assert!(
            matches!(err, AggregationError::Config(_)) && err.to_string().contains("`mu`"),
            "{err}"
        );
    }
    let prox = FedProx::new(0.1).unwrap();
    let err = prox
        .add_gradient(&mut [0.0; 2], &[0.0; 3], &[0.0; 3])
        .unwrap_err();
    assert!(err.to_string().contains("grad has 2"), "{err}");
    let err = prox.penalty(&[0.0; 3], &[0.0; 4]).unwrap_err();
    assert!(err.to_string().contains("anchor (global) has 4"), "{err}");
}

proptest! {
    #[test]
    fn prox_matches_f64_formula(
        mu in 0.0_f32..10.0,
        pa in prop::collection::vec((-100.0_f32..100.0, -100.0_f32..100.0, -10.0_f32..10.0), 0..50),
    ) {
        let prox = FedProx::new(mu).unwrap();
        let (param, anchor): (Vec<f32>, Vec<f32>) = pa.iter().map(|&(p, a, _)| (p, a)).unzip();
        let mut grad: Vec<f32> = pa.iter().map(|t| t.2).collect();
        prox.add_gradient(&mut grad, &param, &anchor).unwrap();
        let mut sq = 0.0_f64;
        for (i, &(p, a, g0)) in pa.iter().enumerate() {
            let d = f64::from(p) - f64::from(a);
            let want = f64::from(g0) + f64::from(mu) * d;
            // Three f32 roundings (difference, product, sum) on values up to ~2000.
            prop_assert!((f64::from(grad[i]) - want).abs() <= 1e-6 * (f64::from(g0).abs() + f64::from(mu) * d.abs()) + 1e-6);
            sq += d * d;
        }
        let want = 0.5 * f64::from(mu) * sq;
        prop_assert!((prox.penalty(&param, &anchor).unwrap() - want).abs() <= 1e-12 * want);
    }

    #[test]
    fn message_bytes_match_safetensors(
        shapes in prop::collection::btree_map("[a-z.]{1,30}", prop::collection::vec(0usize..5, 0..4), 0..6),
    ) {
        let tensors: Tensors = shapes
            .iter()
            .map(|(n, s)| {
                let len: usize = s.iter().product();
                (n.clone(), ArrayD::from_shape_vec(IxDyn(s), (0..len).map(|i| i as f32).collect()).unwrap())
            })
            .collect();
        let data: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.iter().flat_map(|x| x.to_le_bytes()).collect(), t.shape().to_vec()))
            .collect();
        let views: Vec<(String, TensorView<'_>)> = data
            .iter()
            .map(|(n, bytes, shape)| (n.clone(), TensorView::new(Dtype::F32, shape.clone(), bytes).unwrap()))
            .collect();
        let file = safetensors::serialize(views, None).unwrap();
        prop_assert_eq!(message_bytes(&tensors).unwrap(), file.len() as u64);
        let elements: usize = tensors.values().map(ndarray::ArrayBase::len).sum();
        prop_assert_eq!(payload_bytes(&tensors), 4 * elements as u64);
        // The header is what message_bytes adds to the payload.
        let header = u64::from_le_bytes(file[..8].try_into().unwrap());
        prop_assert_eq!(8 + header + payload_bytes(&tensors), file.len() as u64);
    }
}

#[test]
fn empty_message_is_exact_too() {
    let none: Vec<(String, TensorView<'_>)> = Vec::new();
    let file = safetensors::serialize(none, None).unwrap();
    assert_eq!(message_bytes(&Tensors::new()).unwrap(), file.len() as u64);
    assert_eq!(payload_bytes(&Tensors::new()), 0);
}

#[test]
fn transposed_layout_costs_the_same() {
    let t = ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![0.0_f32; 6]).unwrap();
    let a: Tensors = [("x".to_string(), t.clone())].into();
    let b: Tensors = [(
        "x".to_string(),
        t.reversed_axes()
            .as_standard_layout()
            .reversed_axes()
            .to_owned(),
    )]
    .into();
    assert_eq!(message_bytes(&a).unwrap(), message_bytes(&b).unwrap());
}
