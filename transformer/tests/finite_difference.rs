//! The hand-written backward pass against central finite differences in f64 on a
//! tiny random BERT, for every LoRA site kind, the head, each activation, padding
//! and LoRA dropout; and the per-site hook against the gradients it must reproduce.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::fixtures;
use fibecfed_lora::{LoraConfig, LoraParams, SiteId};
use fibecfed_transformer::{
    Activation, Adapter, Batch, BertModel, Dropout, NoHook, Reduction, SiteHook, SiteTrace,
    cross_entropy,
};
use ndarray::{Array2, Axis};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn tiny_f64(act: Activation) -> BertModel<f64> {
    let mut m = BertModel::<f32>::load(&fixtures().join("tiny-bert"))
        .expect("tiny model")
        .cast::<f64>();
    m.config.hidden_act = act;
    m
}

fn random_batch(rng: &mut ChaCha8Rng, vocab: u32) -> (Batch, Vec<usize>) {
    let lengths = [7usize, 3, 5, 1];
    let t = 7;
    let mut ids = vec![0u32; lengths.len() * t];
    let mut types = vec![0u32; lengths.len() * t];
    let mut mask = vec![false; lengths.len() * t];
    for (b, &len) in lengths.iter().enumerate() {
        for i in 0..len {
            ids[b * t + i] = rng.random_range(1..vocab);
            types[b * t + i] = u32::from(i >= len / 2 && len > 2);
            mask[b * t + i] = true;
        }
    }
    let batch = Batch::from_parts(lengths.len(), t, ids, types, mask).expect("batch");
    (batch, vec![0, 2, 1, 2])
}

fn random_params(
    model: &BertModel<f64>,
    config: &LoraConfig,
    rng: &mut ChaCha8Rng,
) -> LoraParams<f64> {
    let sites = config
        .resolve_sites(model.config.num_hidden_layers)
        .expect("sites");
    let mut p = LoraParams::<f64>::init(
        config,
        &model.site_shapes(&sites),
        model.config.hidden_size,
        3,
        rng,
    );
    // B = 0 at init would make ∂/∂A vanish and hide errors in that path.
    for s in p.slices_mut() {
        for v in s.iter_mut() {
            *v += rng.random_range(-0.3..0.3);
        }
    }
    p
}

const DROPOUT_SEED: u64 = 99;

fn loss(
    model: &BertModel<f64>,
    batch: &Batch,
    labels: &[usize],
    params: &LoraParams<f64>,
    scale: f64,
    p_drop: f32,
) -> f64 {
    // Same seed every evaluation: the dropout mask is a constant of the function.
    let mut rng = ChaCha8Rng::seed_from_u64(DROPOUT_SEED);
    let fwd = model
        .forward(
            batch,
            Adapter { params, scale },
            Some(Dropout {
                p: p_drop,
                rng: &mut rng,
            }),
        )
        .expect("forward");
    let (losses, _) = cross_entropy(&fwd.logits, labels, Reduction::Mean).expect("loss");
    losses.mean().expect("batch")
}

fn check(act: Activation, targets: &[&str], p_drop: f32) {
    let model = tiny_f64(act);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let (batch, labels) = random_batch(&mut rng, model.config.vocab_size as u32);
    let mut config = LoraConfig::new(3, 6.0, targets);
    config.dropout = p_drop;
    let params = random_params(&model, &config, &mut rng);
    let scale = f64::from(config.scale());

    let mut drop_rng = ChaCha8Rng::seed_from_u64(DROPOUT_SEED);
    let adapter = Adapter {
        params: &params,
        scale,
    };
    let fwd = model
        .forward(
            &batch,
            adapter,
            Some(Dropout {
                p: p_drop,
                rng: &mut drop_rng,
            }),
        )
        .expect("forward");
    let (_, dlogits) = cross_entropy(&fwd.logits, &labels, Reduction::Mean).expect("loss");
    let grads = model
        .backward(&batch, adapter, &fwd, &dlogits, &mut NoHook)
        .expect("backward");

    let h = 1e-5;
    let n_tensors = params.slices().len();
    let (mut worst_diff, mut scale_max) = (0.0_f64, 0.0_f64);
    for t in 0..n_tensors {
        let len = params.slices()[t].len();
        for _ in 0..8 {
            let i = rng.random_range(0..len);
            let mut plus = params.clone();
            plus.slices_mut()[t][i] += h;
            let mut minus = params.clone();
            minus.slices_mut()[t][i] -= h;
            let fd = (loss(&model, &batch, &labels, &plus, scale, p_drop)
                - loss(&model, &batch, &labels, &minus, scale, p_drop))
                / (2.0 * h);
            let an = grads.slices()[t][i];
            worst_diff = worst_diff.max((fd - an).abs());
            scale_max = scale_max.max(an.abs());
        }
    }
    // Central differences at h = 1e-5 in f64: truncation ~h²·|f'''| ≈ 1e-10, round-off
    // ~1e-16/h ≈ 1e-11. A wrong term in the backward shows up at the 1e-2 level.
    let rel = worst_diff / scale_max;
    assert!(
        rel < 1e-6,
        "{act:?} {targets:?} dropout {p_drop}: finite-difference rel err {rel:e}"
    );
}

#[test]
fn every_site_kind_with_exact_gelu() {
    check(Activation::Gelu, &["query", "key", "value", "dense"], 0.0);
}

#[test]
fn tanh_gelu_and_relu() {
    check(
        Activation::GeluTanh,
        &["query", "key", "value", "dense"],
        0.0,
    );
    check(Activation::Relu, &["value", "intermediate.dense"], 0.0);
}

#[test]
fn lora_dropout() {
    check(Activation::Gelu, &["query", "value", "output.dense"], 0.3);
}

#[test]
fn single_site_in_the_top_layer_only() {
    // Backward must stop early yet still be right for the one site.
    check(
        Activation::Gelu,
        &["encoder.layer.1.attention.self.key"],
        0.0,
    );
    check(Activation::Gelu, &["encoder.layer.0.output.dense"], 0.0);
}

/// Rebuilds ∂L/∂A = s·Σ_t (Bᵀδ_t) x_tᵀ and ∂L/∂B = s·Σ_t δ_t (A x_t)ᵀ from what the
/// hook sees, and checks padding rows of δ are exactly zero.
#[derive(Default)]
struct Rebuild {
    a: std::collections::BTreeMap<SiteId, Array2<f64>>,
    b: std::collections::BTreeMap<SiteId, Array2<f64>>,
    pad_rows_nonzero: usize,
    head_calls: usize,
}

impl SiteHook<f64> for Rebuild {
    fn site(&mut self, t: &SiteTrace<'_, f64>) {
        let u = t.x.dot(&t.weights.a.t());
        let v = t.delta.dot(&t.weights.b);
        // The products the trace hands out are those very products.
        let diff = |p: &ndarray::ArrayView2<'_, f64>, q: &ndarray::Array2<f64>| {
            p.iter()
                .zip(q)
                .fold(0.0_f64, |m, (a, b)| m.max((a - b).abs()))
        };
        assert!(
            diff(&t.u, &u) < 1e-12 && diff(&t.db, &v) < 1e-12,
            "site {}",
            t.site
        );
        self.a.insert(t.site, v.t().dot(&t.x) * t.scale);
        self.b.insert(t.site, t.delta.t().dot(&u) * t.scale);
        for (row, &m) in t.delta.axis_iter(Axis(0)).zip(t.mask.iter()) {
            if m == 0.0 && row.iter().any(|&d| d != 0.0) {
                self.pad_rows_nonzero += 1;
            }
        }
        assert_eq!(t.x.nrows(), t.batch * t.seq_len);
    }
    fn head(
        &mut self,
        pooled: ndarray::ArrayView2<'_, f64>,
        dlogits: ndarray::ArrayView2<'_, f64>,
    ) {
        assert_eq!(pooled.nrows(), dlogits.nrows());
        self.head_calls += 1;
    }
}

#[test]
fn hook_sees_what_the_gradients_are_made_of() {
    let model = tiny_f64(Activation::Gelu);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (batch, labels) = random_batch(&mut rng, model.config.vocab_size as u32);
    let config = LoraConfig::new(3, 6.0, &["query", "key", "value", "dense"]);
    let params = random_params(&model, &config, &mut rng);
    let adapter = Adapter {
        params: &params,
        scale: f64::from(config.scale()),
    };
    let fwd = model.forward(&batch, adapter, None).expect("forward");
    let (_, dlogits) = cross_entropy(&fwd.logits, &labels, Reduction::Mean).expect("loss");
    let mut hook = Rebuild::default();
    let grads = model
        .backward(&batch, adapter, &fwd, &dlogits, &mut hook)
        .expect("backward");
    assert_eq!(hook.a.len(), params.sites.len());
    assert_eq!(hook.pad_rows_nonzero, 0, "δ must vanish on padding rows");
    assert_eq!(hook.head_calls, 1);
    for (site, g) in &grads.sites {
        let ea = (&hook.a[site] - &g.a)
            .iter()
            .fold(0.0_f64, |m, d| m.max(d.abs()));
        let eb = (&hook.b[site] - &g.b)
            .iter()
            .fold(0.0_f64, |m, d| m.max(d.abs()));
        assert!(ea < 1e-12 && eb < 1e-12, "{site}: {ea:e} {eb:e}");
    }
}

/// The mean loss with `noise` added to the embeddings the first layer reads, through
/// `layer_outputs` (no dropout): the function whose gradient `embedding_gradient` is.
fn loss_at_embeddings(
    model: &BertModel<f64>,
    batch: &Batch,
    labels: &[usize],
    params: &LoraParams<f64>,
    scale: f64,
    noise: &Array2<f64>,
) -> f64 {
    let outs = model
        .layer_outputs(batch, Some(Adapter { params, scale }), Some(noise))
        .expect("layer outputs");
    let pooled = fibecfed_transformer::mean_pool(outs.last().expect("a layer"), batch);
    let logits = pooled.dot(&params.head.weight.t()) + &params.head.bias;
    let (losses, _) = cross_entropy(&logits, labels, Reduction::Mean).expect("loss");
    losses.mean().expect("batch")
}

/// ∂L/∂(embeddings) against central differences, with adapters in both layers and with
/// one in the top layer only (the pass must still go down to the embeddings); padding
/// rows get exactly zero.
#[test]
fn the_embedding_gradient_matches_finite_differences() {
    for targets in [
        &["query", "value"][..],
        &["encoder.layer.1.attention.self.key"][..],
    ] {
        let model = tiny_f64(Activation::Gelu);
        let mut rng = ChaCha8Rng::seed_from_u64(17);
        let (batch, labels) = random_batch(&mut rng, model.config.vocab_size as u32);
        let config = LoraConfig::new(3, 6.0, targets);
        let params = random_params(&model, &config, &mut rng);
        let scale = f64::from(config.scale());
        let adapter = Adapter {
            params: &params,
            scale,
        };
        let fwd = model.forward(&batch, adapter, None).expect("forward");
        let (_, dlogits) = cross_entropy(&fwd.logits, &labels, Reduction::Mean).expect("loss");
        let g = model
            .embedding_gradient(&batch, adapter, &fwd, &dlogits)
            .expect("gradient");
        let rows = batch.batch * batch.seq_len;
        assert_eq!(g.dim(), (rows, model.config.hidden_size));
        for (r, &real) in batch.mask.iter().enumerate() {
            if !real {
                assert!(g.row(r).iter().all(|&v| v == 0.0), "padding row {r}");
            }
        }
        let h = 1e-5;
        let (mut worst, mut biggest) = (0.0_f64, 0.0_f64);
        for _ in 0..40 {
            let r = rng.random_range(0..rows);
            let c = rng.random_range(0..model.config.hidden_size);
            let mut plus = Array2::zeros(g.dim());
            plus[[r, c]] = h;
            let minus = -&plus;
            let fd = (loss_at_embeddings(&model, &batch, &labels, &params, scale, &plus)
                - loss_at_embeddings(&model, &batch, &labels, &params, scale, &minus))
                / (2.0 * h);
            worst = worst.max((fd - g[[r, c]]).abs());
            biggest = biggest.max(g[[r, c]].abs());
        }
        assert!(biggest > 0.0);
        assert!(
            worst / biggest < 1e-6,
            "{targets:?}: finite-difference rel err {:e}",
            worst / biggest
        );
    }
}
