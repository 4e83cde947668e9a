//! Shared setup for the criterion benches and `cargo xtask bench`: the MiniLM-shaped
//! model (real weights when present, random otherwise: speed depends on shapes only),
//! synthetic batches, FLOP counts of a LoRA training step, and the machine's sgemm
//! rate through the same BLAS, so that results are reported as ratios.

use std::time::{Duration, Instant};

use fibecfed_lora::{AdamW, AdamWConfig, LoraConfig, LoraParams};
use fibecfed_transformer::{
    Adapter, Batch, BertConfig, BertModel, NoHook, Reduction, cross_entropy,
};
use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// MiniLM (real if available) and a label describing which.
pub fn minilm() -> (BertModel<f32>, &'static str) {
    if let Some(dir) = fibecfed_transformer::cached_default_model()
        && let Ok(m) = BertModel::<f32>::load(&dir)
    {
        return (m, "all-MiniLM-L6-v2 (real weights)");
    }
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let model = BertModel::random(BertConfig::minilm_l6(), &mut rng)
        .unwrap_or_else(|e| panic!("MiniLM shape: {e}"));
    (model, "MiniLM-L6 shape (random weights)")
}

/// A full-length batch (no padding) of random token ids and binary labels.
pub fn synthetic_batch(
    config: &BertConfig,
    batch: usize,
    seq_len: usize,
    seed: u64,
) -> (Batch, Vec<usize>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = batch * seq_len;
    let ids = (0..n)
        .map(|_| rng.random_range(1000..config.vocab_size as u32))
        .collect();
    let labels = (0..batch).map(|_| rng.random_range(0..2)).collect();
    let b = Batch::from_parts(batch, seq_len, ids, vec![0; n], vec![true; n]);
    (b.unwrap_or_else(|e| panic!("synthetic batch: {e}")), labels)
}

/// LoRA parameters with non-zero B, so every path does real work.
pub fn lora_params(model: &BertModel<f32>, config: &LoraConfig) -> LoraParams<f32> {
    let sites = config
        .resolve_sites(model.config.num_hidden_layers)
        .unwrap_or_default();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut p = LoraParams::init(
        config,
        &model.site_shapes(&sites),
        model.config.hidden_size,
        2,
        &mut rng,
    );
    for w in p.sites.values_mut() {
        w.b.mapv_inplace(|_| rng.random_range(-0.01..0.01));
    }
    p
}

/// One training step's arithmetic: forward, backward to the lowest LoRA layer (no
/// base weight gradients), LoRA factor gradients. Counts multiply-adds as 2 FLOPs.
pub fn step_flops(c: &BertConfig, lora: &LoraConfig, batch: usize, seq_len: usize) -> f64 {
    let (n, h, i) = (
        (batch * seq_len) as f64,
        c.hidden_size as f64,
        c.intermediate_size as f64,
    );
    let t = seq_len as f64;
    let b = batch as f64;
    let sites = lora.resolve_sites(c.num_hidden_layers).unwrap_or_default();
    let r = lora.r as f64;
    let lowest = sites
        .iter()
        .map(|s| s.layer)
        .min()
        .unwrap_or(c.num_hidden_layers);
    let linear = 2.0 * n * (4.0 * h * h + 2.0 * h * i);
    let attention = 4.0 * b * t * t * h;
    let mut total = c.num_hidden_layers as f64 * (linear + attention);
    for l in lowest..c.num_hidden_layers {
        // dX through every base linear map and attention (twice the forward's work).
        total += linear + 2.0 * attention;
        if l == lowest {
            total -= 2.0 * n * 3.0 * h * h; // no dX through q, k, v below the lowest sites
        }
    }
    for s in &sites {
        let (din, dout) = match s.kind {
            fibecfed_lora::SiteKind::Intermediate | fibecfed_lora::SiteKind::Gate => (h, i),
            fibecfed_lora::SiteKind::Output => (i, h),
            _ => (h, h),
        };
        total += 2.0 * n * r * (din + dout); // forward
        total += 2.0 * n * r * (2.0 * din + 2.0 * dout); // dA, dB, dy·B, (dy·B)·A
    }
    total
}

/// Best-of-`reps` rate of an n×n×n sgemm through ndarray + the linked BLAS, with
/// OpenBLAS's own threads on every core (its best case on this machine); the
/// encoder's single-threaded BLAS mode is restored afterwards.
pub fn sgemm_gflops(n: usize, reps: usize) -> f64 {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    fibecfed_core::blas::set_threads(cores);
    let rate = sgemm_gflops_inner(n, reps);
    fibecfed_core::blas::set_threads(1);
    rate
}

fn sgemm_gflops_inner(n: usize, reps: usize) -> f64 {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let a = Array2::<f32>::from_shape_simple_fn((n, n), || rng.random_range(-1.0..1.0));
    let b = Array2::<f32>::from_shape_simple_fn((n, n), || rng.random_range(-1.0..1.0));
    let mut c = Array2::<f32>::zeros((n, n));
    let mut best = Duration::MAX;
    for _ in 0..reps.max(1) {
        let start = Instant::now();
        ndarray::linalg::general_mat_mul(1.0, &a, &b, 0.0, &mut c);
        best = best.min(start.elapsed());
        std::hint::black_box(&c);
    }
    2.0 * (n as f64).powi(3) / best.as_secs_f64() / 1e9
}

/// One training step as a PyTorch user runs it: forward, backward, AdamW update.
/// Returns the loss so the work cannot be optimised away.
pub fn train_step(
    model: &BertModel<f32>,
    params: &mut LoraParams<f32>,
    opt: &mut AdamW<f32>,
    scale: f32,
    batch: &Batch,
    labels: &[usize],
) -> f64 {
    let adapter = Adapter { params, scale };
    let fwd = model
        .forward(batch, adapter, None)
        .unwrap_or_else(|e| panic!("forward: {e}"));
    let (losses, dlogits) =
        cross_entropy(&fwd.logits, labels, Reduction::Mean).unwrap_or_else(|e| panic!("loss: {e}"));
    let grads = model
        .backward(batch, adapter, &fwd, &dlogits, &mut NoHook)
        .unwrap_or_else(|e| panic!("backward: {e}"));
    opt.step(params, &grads)
        .unwrap_or_else(|e| panic!("AdamW: {e}"));
    losses.sum()
}

/// Median seconds of `reps` calls after one warm-up.
pub fn median_seconds(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut times: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Fresh parameters and optimiser for one benchmark configuration.
pub fn train_state(model: &BertModel<f32>, config: &LoraConfig) -> (LoraParams<f32>, AdamW<f32>) {
    let params = lora_params(model, config);
    let opt = AdamW::new(
        AdamWConfig {
            lr: 1e-4,
            ..AdamWConfig::default()
        },
        &params,
    );
    (params, opt)
}
