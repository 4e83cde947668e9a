//! Training-step (forward + backward + AdamW) throughput of the LoRA decoder on
//! SmolLM2-135M (FIBECFED_SMOLLM2_GGUF; a random model of its shape without it), at the
//! SmolLM2 preset's shape: batch 8 × 48 tokens, LoRA r = 8 on q_proj/v_proj, the
//! verbalizer's 2 label words read at the last token. `benches/pytorch/llama_step.py`
//! times the same step with PyTorch + PEFT.

use std::path::PathBuf;

use criterion::{Criterion, Throughput};
use fibecfed_benches::{median_seconds, sgemm_gflops};
use fibecfed_lora::{AdamW, AdamWConfig, LoraConfig, LoraParams};
use fibecfed_transformer::{
    Adapter, Batch, LlamaConfig, LlamaModel, NoHook, Reduction, cross_entropy,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const BATCH: usize = 8;
const SEQ: usize = 48;
/// " terrible", " great" in SmolLM2's vocabulary.
const LABELS: [u32; 2] = [13321, 1109];

fn model() -> (LlamaModel<f32>, String) {
    let why = match std::env::var_os("FIBECFED_SMOLLM2_GGUF").map(PathBuf::from) {
        Some(file) => match LlamaModel::<f32>::load(&file) {
            Ok(m) => return (m, format!("SmolLM2-135M-Instruct ({})", file.display())),
            Err(e) => format!("{} did not load: {e}", file.display()),
        },
        None => "FIBECFED_SMOLLM2_GGUF not set".to_owned(),
    };
    let config = LlamaConfig {
        vocab_size: 49_152,
        hidden_size: 576,
        layers: 30,
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
        ffn_size: 1536,
        rms_eps: 1e-5,
        rope_theta: 100_000.0,
    };
    (
        LlamaModel::random(config, 3),
        format!("a random model of SmolLM2-135M's shape ({why})"),
    )
}

fn state(model: &LlamaModel<f32>, lora: &LoraConfig) -> (LoraParams<f32>, AdamW<f32>) {
    let sites = lora
        .resolve_llama_sites(model.config.layers)
        .unwrap_or_default();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut p = LoraParams::init(lora, &model.site_shapes(&sites), 0, 0, &mut rng);
    // Non-zero B, so that every path does real work.
    for w in p.sites.values_mut() {
        w.b.mapv_inplace(|_| rng.random_range(-0.01..0.01));
    }
    let opt = AdamW::new(
        AdamWConfig {
            lr: 1e-4,
            ..AdamWConfig::default()
        },
        &p,
    );
    (p, opt)
}

fn step(
    model: &LlamaModel<f32>,
    params: &mut LoraParams<f32>,
    opt: &mut AdamW<f32>,
    scale: f32,
    batch: &Batch,
    labels: &[usize],
) -> f64 {
    let adapter = Adapter { params, scale };
    let fwd = model
        .forward(batch, adapter, None, &LABELS)
        .unwrap_or_else(|e| panic!("forward: {e}"));
    let (losses, d) =
        cross_entropy(&fwd.logits, labels, Reduction::Mean).unwrap_or_else(|e| panic!("loss: {e}"));
    let grads = model
        .backward(batch, adapter, &fwd, &d, &mut NoHook)
        .unwrap_or_else(|e| panic!("backward: {e}"));
    opt.step(params, &grads)
        .unwrap_or_else(|e| panic!("AdamW: {e}"));
    losses.sum()
}

fn main() {
    let (model, which) = model();
    let lora = LoraConfig::new(8, 16.0, &["q_proj", "v_proj"]);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let n = BATCH * SEQ;
    let ids = (0..n).map(|_| rng.random_range(1000..49_000)).collect();
    let labels: Vec<usize> = (0..BATCH).map(|_| rng.random_range(0..2)).collect();
    let batch = Batch::from_parts(BATCH, SEQ, ids, vec![0; n], vec![true; n])
        .unwrap_or_else(|e| panic!("batch: {e}"));

    let mut c = Criterion::default().configure_from_args().sample_size(10);
    let mut group = c.benchmark_group("smollm2_train_step");
    group.throughput(Throughput::Elements(n as u64));
    let (mut params, mut opt) = state(&model, &lora);
    group.bench_function("LoRA r=8 q_proj,v_proj", |b| {
        b.iter(|| step(&model, &mut params, &mut opt, lora.scale(), &batch, &labels));
    });
    group.finish();
    c.final_summary();
    // `cargo test --all-targets` runs this binary without `--bench` once as a smoke
    // test; the timed table is only for real bench runs.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let sgemm = sgemm_gflops(2048, 5);
    let (mut params, mut opt) = state(&model, &lora);
    let secs = median_seconds(5, || {
        std::hint::black_box(step(
            &model,
            &mut params,
            &mut opt,
            lora.scale(),
            &batch,
            &labels,
        ));
    });
    println!(
        "\nmodel: {which}; batch {BATCH} × {SEQ} tokens; {} rayon threads",
        rayon::current_num_threads()
    );
    println!("sgemm 2048³ through the same BLAS: {sgemm:.1} GFLOP/s");
    println!("| configuration | step (median of 5) | tokens/s |");
    println!("|---|---|---|");
    println!(
        "| LoRA r=8 q_proj,v_proj | {:.0} ms | {:.0} |",
        secs * 1e3,
        n as f64 / secs
    );
}
