//! The LLaMA decoder's hand-written backward pass against central finite differences
//! in f64 on a tiny random model (every site kind, grouped-query heads, right padding,
//! the verbalizer's label logits), its per-site hook against the per-sample gradients
//! of each sequence run alone, and its refusal of bad input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fibecfed_lora::{LoraConfig, LoraParams, LoraWeights, SiteId};
use fibecfed_transformer::{
    Adapter, Batch, Dropout, LlamaConfig, LlamaModel, NoHook, Reduction, SiteHook, SiteTrace,
    cross_entropy,
};
use ndarray::{Array2, s};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const LABELS: [u32; 3] = [3, 17, 29];

fn tiny() -> LlamaModel<f64> {
    LlamaModel::random(
        LlamaConfig {
            vocab_size: 40,
            hidden_size: 16,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 4,
            ffn_size: 24,
            rms_eps: 1e-5,
            rope_theta: 10_000.0,
        },
        7,
    )
}

/// Every site of every layer, with B non-zero so that every path carries gradient.
fn adapter(model: &LlamaModel<f64>, targets: &[&str], rng: &mut ChaCha8Rng) -> LoraParams<f64> {
    let cfg = LoraConfig::new(2, 4.0, targets);
    let sites = cfg.resolve_llama_sites(model.config.layers).unwrap();
    let mut p = LoraParams::init(&cfg, &model.site_shapes(&sites), 16, 0, rng);
    for w in p.sites.values_mut() {
        w.b.mapv_inplace(|_| rng.random_range(-0.3..0.3));
    }
    p
}

fn batch(rng: &mut ChaCha8Rng, lengths: &[usize]) -> Batch {
    let t = *lengths.iter().max().unwrap();
    let n = lengths.len() * t;
    let (mut ids, mut mask) = (vec![0u32; n], vec![false; n]);
    for (b, &len) in lengths.iter().enumerate() {
        for i in 0..len {
            ids[b * t + i] = rng.random_range(1..40);
            mask[b * t + i] = true;
        }
        // Padding ids are real tokens: nothing may read them.
        for i in len..t {
            ids[b * t + i] = rng.random_range(1..40);
        }
    }
    Batch::from_parts(lengths.len(), t, ids, vec![0; n], mask).unwrap()
}

fn loss(model: &LlamaModel<f64>, b: &Batch, p: &LoraParams<f64>, y: &[usize]) -> f64 {
    let a = Adapter {
        params: p,
        scale: 2.0,
    };
    let logits = model.label_logits(b, Some(a), &LABELS).unwrap();
    cross_entropy(&logits, y, Reduction::Mean)
        .unwrap()
        .0
        .mean()
        .unwrap()
}

fn grads(model: &LlamaModel<f64>, b: &Batch, p: &LoraParams<f64>, y: &[usize]) -> LoraParams<f64> {
    let a = Adapter {
        params: p,
        scale: 2.0,
    };
    let fwd = model.forward(b, a, None, &LABELS).unwrap();
    let (_, d) = cross_entropy(&fwd.logits, y, Reduction::Mean).unwrap();
    model.backward(b, a, &fwd, &d, &mut NoHook).unwrap()
}

fn entry(p: &mut LoraParams<f64>, site: SiteId, factor: usize, i: usize) -> &mut f64 {
    let w: &mut LoraWeights<f64> = p.sites.get_mut(&site).unwrap();
    let m = if factor == 0 { &mut w.a } else { &mut w.b };
    &mut m.as_slice_mut().unwrap()[i]
}

/// Every LoRA entry of every kind against central differences (h = 1e-5: truncation
/// ~1e-10, rounding ~1e-11 of a loss near 1).
#[test]
fn backward_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let model = tiny();
    let all = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ];
    let mut p = adapter(&model, &all, &mut rng);
    assert_eq!(p.sites.len(), 14);
    let b = batch(&mut rng, &[6, 3, 5]);
    let y = [2usize, 0, 1];
    let mut g = grads(&model, &b, &p, &y);
    let h = 1e-5;
    let sites: Vec<SiteId> = p.sites.keys().copied().collect();
    for site in sites {
        for factor in 0..2 {
            let len = {
                let w = &p.sites[&site];
                if factor == 0 { w.a.len() } else { w.b.len() }
            };
            let (mut d2, mut r2) = (0.0f64, 0.0f64);
            for i in 0..len {
                let x0 = *entry(&mut p, site, factor, i);
                *entry(&mut p, site, factor, i) = x0 + h;
                let up = loss(&model, &b, &p, &y);
                *entry(&mut p, site, factor, i) = x0 - h;
                let down = loss(&model, &b, &p, &y);
                *entry(&mut p, site, factor, i) = x0;
                let fd = (up - down) / (2.0 * h);
                let an = *entry(&mut g, site, factor, i);
                d2 += (an - fd) * (an - fd);
                r2 += fd * fd;
            }
            let rel = (d2 / r2).sqrt();
            assert!(
                r2 > 1e-12 && rel < 1e-6,
                "{} factor {}: relative error {rel:e} (|fd| {})",
                site.llama_module_path(),
                ["A", "B"][factor],
                r2.sqrt()
            );
        }
    }
}

/// The gradient at the embeddings (where the layer choice adds its noise) against
/// central differences of the layer-0 input.
#[test]
fn embedding_gradient_matches_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let model = tiny();
    let p = adapter(&model, &["q_proj", "v_proj"], &mut rng);
    let b = batch(&mut rng, &[4, 2]);
    let y = [1usize, 2];
    let a = Adapter {
        params: &p,
        scale: 2.0,
    };
    let fwd = model.forward(&b, a, None, &LABELS).unwrap();
    let (_, d) = cross_entropy(&fwd.logits, &y, Reduction::Mean).unwrap();
    let g = model.embedding_gradient(&b, a, &fwd, &d).unwrap();
    // layer_outputs with no noise equals with zero noise, and has one entry a layer.
    let outs = model.layer_outputs(&b, Some(a), None).unwrap();
    assert_eq!(outs.len(), 2);
    assert_eq!(
        outs,
        model
            .layer_outputs(&b, Some(a), Some(&Array2::zeros(g.raw_dim())))
            .unwrap()
    );
    let h = 1e-5;
    let mut checked = 0;
    for row in [0usize, 2, 3, 4, 5] {
        for col in [0usize, 5, 15] {
            let mut noise = Array2::zeros(g.raw_dim());
            noise[[row, col]] = h;
            let up = model
                .label_logits_with_noise(&b, Some(a), &LABELS, &noise)
                .unwrap();
            noise[[row, col]] = -h;
            let down = model
                .label_logits_with_noise(&b, Some(a), &LABELS, &noise)
                .unwrap();
            let l = |z: &Array2<f64>| {
                cross_entropy(z, &y, Reduction::Mean)
                    .unwrap()
                    .0
                    .mean()
                    .unwrap()
            };
            let fd = (l(&up) - l(&down)) / (2.0 * h);
            let an = g[[row, col]];
            assert!(
                (an - fd).abs() <= 1e-8 + 1e-6 * fd.abs(),
                "row {row} col {col}: {an} vs {fd}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 15);
    // Padding rows (sequence 1 has 2 of 4) get exactly zero.
    assert!(g.slice(s![6..8, ..]).iter().all(|&v| v == 0.0));
}

/// Per-sample gradients formed from the hook's traces, as the Fisher pass forms them.
struct PerSample {
    scale: f64,
    grads: Vec<LoraParams<f64>>,
}

impl SiteHook<f64> for PerSample {
    fn site(&mut self, t: &SiteTrace<'_, f64>) {
        assert_eq!(t.scale, self.scale);
        for (b, g) in self.grads.iter_mut().enumerate() {
            let rows = s![b * t.seq_len..(b + 1) * t.seq_len, ..];
            let w = g.sites.get_mut(&t.site).unwrap();
            w.a += &(t.db.slice(rows).t().dot(&t.x.slice(rows)) * t.scale);
            w.b += &(t.delta.slice(rows).t().dot(&t.u.slice(rows)) * t.scale);
            // δ is exactly zero on padding rows.
            for (i, &m) in t
                .mask
                .slice(s![b * t.seq_len..(b + 1) * t.seq_len])
                .iter()
                .enumerate()
            {
                if m == 0.0 {
                    assert!(t.delta.row(b * t.seq_len + i).iter().all(|&v| v == 0.0));
                }
            }
        }
    }
}

/// The hook's per-sample gradients of a padded batch equal each sequence's gradient
/// computed alone (batch of one, no padding), and sum to the batch gradient; label
/// logits do not depend on the batch either.
#[test]
fn hook_gives_each_sequence_its_own_gradient() {
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let model = tiny();
    let p = adapter(
        &model,
        &["q_proj", "v_proj", "down_proj", "gate_proj"],
        &mut rng,
    );
    let lengths = [5usize, 2, 4];
    let b = batch(&mut rng, &lengths);
    let y = [0usize, 2, 1];
    let a = Adapter {
        params: &p,
        scale: 2.0,
    };
    let fwd = model.forward(&b, a, None, &LABELS).unwrap();
    let (_, d) = cross_entropy(&fwd.logits, &y, Reduction::Sum).unwrap();
    let mut hook = PerSample {
        scale: 2.0,
        grads: vec![p.zeros_like(); 3],
    };
    let total = model.backward(&b, a, &fwd, &d, &mut hook).unwrap();
    for (i, &len) in lengths.iter().enumerate() {
        let t = b.seq_len;
        let ids = b.input_ids[i * t..i * t + len].to_vec();
        let alone = Batch::from_parts(1, len, ids, vec![0; len], vec![true; len]).unwrap();
        let f1 = model.forward(&alone, a, None, &LABELS).unwrap();
        for c in 0..LABELS.len() {
            let (x, z) = (f1.logits[[0, c]], fwd.logits[[i, c]]);
            assert!(
                (x - z).abs() <= 1e-12 * x.abs().max(1.0),
                "logit {i},{c}: {x} vs {z}"
            );
        }
        let (_, d1) = cross_entropy(&f1.logits, &y[i..=i], Reduction::Sum).unwrap();
        let g1 = model.backward(&alone, a, &f1, &d1, &mut NoHook).unwrap();
        for (site, w) in &g1.sites {
            let h = &hook.grads[i].sites[site];
            let err = (&w.a - &h.a).mapv(f64::abs).sum() + (&w.b - &h.b).mapv(f64::abs).sum();
            let size = w.a.mapv(f64::abs).sum() + w.b.mapv(f64::abs).sum();
            assert!(
                size > 0.0 && err <= 1e-10 * size,
                "sequence {i} {}: {err} of {size}",
                site.llama_module_path()
            );
        }
    }
    for (site, w) in &total.sites {
        let mut sum = w.a.clone() * 0.0;
        for g in &hook.grads {
            sum += &g.sites[site].a;
        }
        assert!((&sum - &w.a).mapv(f64::abs).sum() <= 1e-10 * w.a.mapv(f64::abs).sum());
    }
}

/// LoRA dropout draws from the caller's generator: the same seed gives the same
/// gradient, and dropout changes it.
#[test]
fn dropout_is_seeded() {
    let mut rng = ChaCha8Rng::seed_from_u64(14);
    let model = tiny();
    let p = adapter(&model, &["q_proj", "v_proj"], &mut rng);
    let b = batch(&mut rng, &[4, 3]);
    let a = Adapter {
        params: &p,
        scale: 2.0,
    };
    let run = |seed: u64, prob: f32| {
        let mut r = ChaCha8Rng::seed_from_u64(seed);
        let fwd = model
            .forward(
                &b,
                a,
                Some(Dropout {
                    p: prob,
                    rng: &mut r,
                }),
                &LABELS,
            )
            .unwrap();
        let (_, d) = cross_entropy(&fwd.logits, &[0, 1], Reduction::Mean).unwrap();
        model.backward(&b, a, &fwd, &d, &mut NoHook).unwrap()
    };
    assert_eq!(run(5, 0.3), run(5, 0.3));
    assert_ne!(run(5, 0.3), run(5, 0.0));
}

#[test]
fn bad_input_is_an_error() {
    let mut rng = ChaCha8Rng::seed_from_u64(15);
    let model = tiny();
    let p = adapter(&model, &["q_proj"], &mut rng);
    let a = Adapter {
        params: &p,
        scale: 2.0,
    };
    // Left padding.
    let left = Batch::from_parts(1, 3, vec![1, 2, 3], vec![0; 3], vec![true, false, true]).unwrap();
    let e = model.label_logits(&left, Some(a), &LABELS).unwrap_err();
    assert!(e.to_string().contains("not right-padded"), "{e}");
    let ok = Batch::from_parts(1, 2, vec![1, 2], vec![0; 2], vec![true; 2]).unwrap();
    let e = model.label_logits(&ok, Some(a), &[40]).unwrap_err();
    assert!(e.to_string().contains("label word id 40"), "{e}");
    assert!(model.label_logits(&ok, Some(a), &[]).is_err());
    let e = model
        .label_logits(
            &Batch::from_parts(1, 1, vec![40], vec![0], vec![true]).unwrap(),
            None,
            &LABELS,
        )
        .unwrap_err();
    assert!(e.to_string().contains("token id 40"), "{e}");
    // An adapter of another shape, or a site beyond the model, is named.
    let mut bad = p.clone();
    let w = bad.sites.values_mut().next().unwrap();
    w.a = Array2::zeros((2, 15));
    let e = model
        .label_logits(
            &ok,
            Some(Adapter {
                params: &bad,
                scale: 2.0,
            }),
            &LABELS,
        )
        .unwrap_err();
    assert!(
        e.to_string().contains("model.layers.0.self_attn.q_proj"),
        "{e}"
    );
    let cfg = LoraConfig::new(2, 4.0, &["q_proj"]);
    assert!(cfg.resolve_llama_sites(2).unwrap().len() == 2);
    assert!(
        LoraConfig::new(2, 4.0, &["query"])
            .resolve_llama_sites(2)
            .is_err()
    );
}
