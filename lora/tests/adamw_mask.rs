//! AdamW's masked step against the dense step: kept entries move exactly as a dense
//! step moves them, frozen entries keep their value and both moments, and the saved
//! state continues bit-exactly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fibecfed_lora::{AdamW, AdamWConfig, LoraConfig, LoraParams, SiteId, SiteKind, SiteShape};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn params(seed: u64) -> LoraParams<f32> {
    let config = LoraConfig::new(2, 4.0, &["query"]);
    let shapes = [SiteShape {
        site: SiteId::new(0, SiteKind::Query),
        d_in: 5,
        d_out: 3,
    }];
    let mut p = LoraParams::init(&config, &shapes, 5, 2, &mut ChaCha8Rng::seed_from_u64(seed));
    // B starts at zero under PEFT's init; give it values so decay and updates show.
    for (i, v) in p.slices_mut()[1].iter_mut().enumerate() {
        *v = 0.1 * i as f32 - 0.2;
    }
    p
}

#[test]
fn masked_step_freezes_exactly_the_masked_entries() {
    let config = AdamWConfig {
        lr: 1e-2,
        ..AdamWConfig::default()
    };
    let (p0, g) = (params(1), params(2));
    let mut dense_p = p0.clone();
    let mut dense = AdamW::new(config, &dense_p);
    let mut masked_p = p0.clone();
    let mut masked = AdamW::new(config, &masked_p);
    // Freeze every other entry of A and all of B; the head is left dense (None).
    let mask_a: Vec<bool> = (0..p0.slices()[0].len()).map(|i| i % 2 == 0).collect();
    let mask_b = vec![false; p0.slices()[1].len()];
    for _ in 0..3 {
        dense.step(&mut dense_p, &g).unwrap();
        masked
            .step_masked(&mut masked_p, &g, &[Some(&mask_a), Some(&mask_b), None])
            .unwrap();
    }
    let (m, v, steps) = masked.state();
    assert_eq!(steps, 3);
    for (t, mask) in [(0, Some(&mask_a)), (1, Some(&mask_b)), (2, None), (3, None)] {
        for i in 0..p0.slices()[t].len() {
            let kept = mask.is_none_or(|k| k[i]);
            let got = masked_p.slices()[t][i];
            if kept {
                assert_eq!(got, dense_p.slices()[t][i], "tensor {t} entry {i}");
            } else {
                assert_eq!(got, p0.slices()[t][i], "frozen tensor {t} entry {i} moved");
                assert_eq!(m.slices()[t][i], 0.0);
                assert_eq!(v.slices()[t][i], 0.0);
            }
        }
    }
}

#[test]
fn state_round_trip_continues_bit_exactly() {
    let config = AdamWConfig::default();
    let g = params(3);
    let mut a_p = params(4);
    let mut a = AdamW::new(config, &a_p);
    a.step(&mut a_p, &g).unwrap();
    let (m, v, steps) = a.state();
    let mut b = AdamW::from_state(config, m.clone(), v.clone(), steps).unwrap();
    let mut b_p = a_p.clone();
    a.step(&mut a_p, &g).unwrap();
    b.step(&mut b_p, &g).unwrap();
    assert_eq!(a_p.slices(), b_p.slices());
}

#[test]
fn masks_of_the_wrong_length_are_refused() {
    let mut p = params(5);
    let g = params(6);
    let mut opt = AdamW::new(AdamWConfig::default(), &p);
    let short = vec![true; 2];
    let err = opt.step_masked(&mut p, &g, &[Some(&short)]).unwrap_err();
    assert!(err.to_string().contains("mask of tensor 0"), "{err}");
}
