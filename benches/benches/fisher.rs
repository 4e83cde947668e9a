//! Per-sample gradient squares on the CPU.
//!
//! 1. One LoRA site, batch 16, at MiniLM (H = 384) and BERT-base (H = 768) shapes,
//!    r ∈ {8, 16}, T ∈ {32, 128}, for the query projection (H → H) and the intermediate
//!    one (H → 4H): our fused pass (`site_fisher`: one sample's gradient at a time,
//!    squared and summed into the diagonal while it is in cache), the norms alone by
//!    the cost model (`sq_norms`, Gram form where T is small), and
//!    materialise-then-square (every sample's gradient in one (B × r × d) tensor, then
//!    squares and sums: what `vmap(grad)` gives a PyTorch user).
//! 2. The whole Fisher pass over a client's data (MiniLM, 64 samples, batch 16) against
//!    a plain forward + backward over the same batches, interleaved: the cost of
//!    difficulty scores.
//!
//! Ratios only; every time comes from this run on this machine.

use std::path::Path;
use std::time::Instant;

use criterion::Criterion;
use fibecfed_benches::{lora_params, median_seconds, minilm};
use fibecfed_data::{Sample, batch_of, by_length};
use fibecfed_fisher::{CpuBackend, NormMethod, SiteRows, site_fisher, sq_norms};
use fibecfed_lora::LoraConfig;
use fibecfed_sim::fisher::{FisherOptions, fisher_pass};
use fibecfed_transformer::{
    Adapter, BertModel, Encoded, NoHook, Reduction, TextEncoder, cross_entropy,
};
use ndarray::linalg::general_mat_mul;
use ndarray::parallel::prelude::*;
use ndarray::{Array1, Array2, Array3, Axis, s};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const BATCH: usize = 16;

/// Random rows for one site; the last quarter of each sequence is padding.
struct SiteCase {
    x: Array2<f32>,
    delta: Array2<f32>,
    mask: Array1<f32>,
    a: Array2<f32>,
    b: Array2<f32>,
    seq: usize,
}

impl SiteCase {
    fn new(d_in: usize, d_out: usize, r: usize, seq: usize) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let n = BATCH * seq;
        let mut rand2 = |rows, cols| {
            Array2::from_shape_simple_fn((rows, cols), || rng.random_range(-1.0f32..1.0))
        };
        let (x, delta, a, b) = (
            rand2(n, d_in),
            rand2(n, d_out),
            rand2(r, d_in),
            rand2(d_out, r),
        );
        let mask = Array1::from_shape_fn(n, |i| if i % seq < seq * 3 / 4 { 1.0 } else { 0.0 });
        Self {
            x,
            delta,
            mask,
            a,
            b,
            seq,
        }
    }

    fn rows(&self) -> SiteRows<'_, f32> {
        SiteRows {
            x: self.x.view(),
            delta: self.delta.view(),
            mask: self.mask.view(),
            batch: BATCH,
            seq_len: self.seq,
            a: self.a.view(),
            b: self.b.view(),
            scale: 2.0,
            // Self-contained: recompute x·Aᵀ and δ·B like the materialising path does.
            products: None,
        }
    }
}

/// Every per-sample gradient in one tensor, then squares: (Σ‖g_A‖², Σ‖g_B‖², diagonals).
fn materialise_then_square(c: &SiteCase) -> (Vec<f32>, Vec<f32>, Array2<f32>, Array2<f32>) {
    let (r, d_in) = c.a.dim();
    let d_out = c.b.nrows();
    let m = c.mask.view().insert_axis(Axis(1));
    let x = &c.x * &m;
    let d = &c.delta * &m;
    let u = x.dot(&c.a.t());
    let v = d.dot(&c.b) * 2.0;
    let mut ga = Array3::<f32>::zeros((BATCH, r, d_in));
    let mut gb = Array3::<f32>::zeros((BATCH, d_out, r));
    // Parallel over samples like the fused path, so the comparison is of memory
    // traffic, not of thread counts.
    (ga.axis_iter_mut(Axis(0)), gb.axis_iter_mut(Axis(0)))
        .into_par_iter()
        .enumerate()
        .for_each(|(i, (mut ga_i, mut gb_i))| {
            let rows = s![i * c.seq..(i + 1) * c.seq, ..];
            general_mat_mul(1.0, &v.slice(rows).t(), &x.slice(rows), 0.0, &mut ga_i);
            general_mat_mul(2.0, &d.slice(rows).t(), &u.slice(rows), 0.0, &mut gb_i);
        });
    let ga2 = ga.mapv(|g| g * g);
    let gb2 = gb.mapv(|g| g * g);
    let per = |t: &Array3<f32>| -> Vec<f32> { t.axis_iter(Axis(0)).map(|s| s.sum()).collect() };
    (
        per(&ga2),
        per(&gb2),
        ga2.sum_axis(Axis(0)),
        gb2.sum_axis(Axis(0)),
    )
}

/// 64 samples of MR's training file when the data and tokenizer are present, else
/// random token ids with MR-like lengths (8..48 tokens).
fn client_samples(model: &BertModel<f32>) -> (Vec<Sample>, &'static str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mr = root.join("shared/data/mr/train.tsv");
    if let (Some(dir), true) = (fibecfed_transformer::cached_default_model(), mr.exists())
        && let (Ok(tok), Ok(data)) = (
            TextEncoder::from_file(&dir.join("tokenizer.json"), 128),
            fibecfed_data::read_tsv(&mr),
        )
        && let Ok(samples) = fibecfed_data::tokenize(&tok, &data, &mr)
    {
        return (
            samples.into_iter().take(64).collect(),
            "the first 64 sentences of MR train",
        );
    }
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let vocab = model.config.vocab_size as u32;
    let samples = (0..64)
        .map(|_| {
            let len = rng.random_range(8..48);
            Sample {
                encoded: Encoded {
                    ids: (0..len).map(|_| rng.random_range(1000..vocab)).collect(),
                    type_ids: vec![0; len],
                },
                label: rng.random_range(0..2),
            }
        })
        .collect();
    (samples, "64 random-token samples of 8..48 tokens")
}

/// Forward + backward over the same length-sorted batches as the Fisher pass, no hook.
fn plain_pass(model: &BertModel<f32>, adapter: Adapter<'_, f32>, samples: &[Sample]) -> f64 {
    let mut total = 0.0;
    for chunk in by_length(samples).chunks(BATCH) {
        let labels: Vec<usize> = chunk.iter().map(|&i| samples[i].label).collect();
        let batch = batch_of(samples, chunk, model.config.pad_token_id)
            .unwrap_or_else(|e| panic!("batch: {e}"));
        let fwd = model
            .forward(&batch, adapter, None)
            .unwrap_or_else(|e| panic!("forward: {e}"));
        let (losses, dlogits) = cross_entropy(&fwd.logits, &labels, Reduction::Sum)
            .unwrap_or_else(|e| panic!("loss: {e}"));
        let grads = model
            .backward(&batch, adapter, &fwd, &dlogits, &mut NoHook)
            .unwrap_or_else(|e| panic!("backward: {e}"));
        total += losses.sum() + f64::from(grads.head.bias[0]);
    }
    total
}

fn main() {
    // Every path here parallelises over samples with rayon; OpenBLAS's own threads
    // inside those workers would only fight them (see core/src/blas.rs).
    fibecfed_core::blas::set_threads(1);
    let (model, which) = minilm();
    let (samples, data) = client_samples(&model);
    let adapters = [
        ("q,v r=8", LoraConfig::new(8, 16.0, &["query", "value"])),
        (
            "all linear r=8",
            LoraConfig::new(8, 16.0, &["query", "key", "value", "dense"]),
        ),
    ];
    let options = FisherOptions {
        batch_size: BATCH,
        ..FisherOptions::default()
    };

    let classifier = fibecfed_transformer::Classifier::Bert(model.clone());
    let mut c = Criterion::default().configure_from_args().sample_size(10);
    let mut group = c.benchmark_group("fisher_site_minilm_query_r8_t128");
    let case = SiteCase::new(384, 384, 8, 128);
    group.bench_function("fused", |b| b.iter(|| site_fisher(&case.rows())));
    group.bench_function("materialise_then_square", |b| {
        b.iter(|| materialise_then_square(&case));
    });
    group.finish();
    let mut group = c.benchmark_group("fisher_pass_minilm_64_samples");
    for (name, lora) in &adapters {
        let params = lora_params(&model, lora);
        let adapter = Adapter {
            params: &params,
            scale: lora.scale(),
        };
        group.bench_function(format!("fisher pass {name}"), |b| {
            b.iter(|| fisher_pass(&classifier, adapter, &samples, options, &CpuBackend));
        });
        group.bench_function(format!("forward+backward {name}"), |b| {
            b.iter(|| plain_pass(&model, adapter, &samples));
        });
    }
    group.finish();
    c.final_summary();

    // `cargo test --all-targets` runs this binary once without `--bench` as a smoke
    // test; the tables are for real bench runs only.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    println!(
        "\nOne LoRA site, batch {BATCH} (last quarter of each sequence padding); median of 7; ratios to materialise-then-square"
    );
    println!(
        "| shape | site | r | T | materialise | fused (squares + diagonal) | norms only (cost model) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (shape, h) in [("MiniLM", 384), ("BERT-base", 768)] {
        for (site, d_out) in [("query", h), ("intermediate", 4 * h)] {
            for r in [8, 16] {
                for t in [32, 128] {
                    let case = SiteCase::new(h, d_out, r, t);
                    let mat = median_seconds(7, || {
                        std::hint::black_box(materialise_then_square(&case));
                    });
                    let fused = median_seconds(7, || {
                        std::hint::black_box(
                            site_fisher(&case.rows()).unwrap_or_else(|e| panic!("{e}")),
                        );
                    });
                    let norms = median_seconds(7, || {
                        std::hint::black_box(
                            sq_norms(&case.rows(), NormMethod::Auto)
                                .unwrap_or_else(|e| panic!("{e}")),
                        );
                    });
                    println!(
                        "| {shape} | {site} {h}→{d_out} | {r} | {t} | {:.2} ms | {:.2} ms ({:.2}×) | {:.2} ms ({:.2}×) |",
                        mat * 1e3,
                        fused * 1e3,
                        mat / fused,
                        norms * 1e3,
                        mat / norms
                    );
                }
            }
        }
    }
    println!(
        "\nWhole pass over {data}, model {which}, batch {BATCH}; 7 interleaved pairs (plain, Fisher), medians"
    );
    println!(
        "| adapter | forward+backward | Fisher pass | median of the 7 pair ratios (target ≤ 1.3) |"
    );
    println!("|---|---|---|---|");
    for (name, lora) in &adapters {
        let params = lora_params(&model, lora);
        let adapter = Adapter {
            params: &params,
            scale: lora.scale(),
        };
        // Interleaving puts both sides under the same background load; the machine's
        // speed drifts by more than the difference being measured.
        let (mut plain, mut fisher, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        std::hint::black_box(plain_pass(&model, adapter, &samples));
        for _ in 0..7 {
            let start = Instant::now();
            std::hint::black_box(plain_pass(&model, adapter, &samples));
            let p = start.elapsed().as_secs_f64();
            let start = Instant::now();
            std::hint::black_box(
                fisher_pass(&classifier, adapter, &samples, options, &CpuBackend)
                    .unwrap_or_else(|e| panic!("Fisher pass: {e:#}")),
            );
            let f = start.elapsed().as_secs_f64();
            plain.push(p);
            fisher.push(f);
            ratios.push(f / p);
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        println!(
            "| {name} | {:.0} ms | {:.0} ms | {:.2} |",
            median(&mut plain) * 1e3,
            median(&mut fisher) * 1e3,
            median(&mut ratios)
        );
    }
}
