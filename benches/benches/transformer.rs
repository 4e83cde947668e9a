//! Training-step (forward + backward + AdamW) throughput of the LoRA encoder at
//! MiniLM's shape (batch 16 × 64 tokens, LoRA r = 8), then a table of tokens/s and achieved GFLOP/s
//! as a fraction of the same BLAS's sgemm rate measured in the same run.

use criterion::{Criterion, Throughput};
use fibecfed_benches::{
    median_seconds, minilm, sgemm_gflops, step_flops, synthetic_batch, train_state, train_step,
};
use fibecfed_lora::LoraConfig;

const BATCH: usize = 16;
const SEQ: usize = 64;

fn main() {
    let (model, which) = minilm();
    let configs = [
        (
            "LoRA r=8 query,value",
            LoraConfig::new(8, 16.0, &["query", "value"]),
        ),
        (
            "LoRA r=8 all linear",
            LoraConfig::new(8, 16.0, &["query", "key", "value", "dense"]),
        ),
    ];
    let (batch, labels) = synthetic_batch(&model.config, BATCH, SEQ, 7);

    let mut c = Criterion::default().configure_from_args().sample_size(10);
    let mut group = c.benchmark_group("minilm_train_step");
    group.throughput(Throughput::Elements((BATCH * SEQ) as u64));
    for (name, lora) in &configs {
        let (mut params, mut opt) = train_state(&model, lora);
        group.bench_function(*name, |b| {
            b.iter(|| train_step(&model, &mut params, &mut opt, lora.scale(), &batch, &labels));
        });
    }
    group.finish();
    c.final_summary();

    // `cargo test --all-targets` runs this binary without `--bench` to smoke-test the
    // benchmarks once each; the timed table is only for real bench runs.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    // The table: sgemm measured in this run, then each configuration's step.
    let sgemm = sgemm_gflops(2048, 5);
    println!(
        "\nmodel: {which}; batch {BATCH} × {SEQ} tokens; {} rayon threads, OpenBLAS single-threaded inside them",
        rayon::current_num_threads()
    );
    println!(
        "sgemm 2048³ through the same BLAS (its own threads on every core): {sgemm:.1} GFLOP/s"
    );
    println!("| configuration | step (median) | tokens/s | GFLOP/s | fraction of sgemm |");
    println!("|---|---|---|---|---|");
    for (name, lora) in &configs {
        let (mut params, mut opt) = train_state(&model, lora);
        let secs = median_seconds(10, || {
            std::hint::black_box(train_step(
                &model,
                &mut params,
                &mut opt,
                lora.scale(),
                &batch,
                &labels,
            ));
        });
        let gflops = step_flops(&model.config, lora, BATCH, SEQ) / secs / 1e9;
        println!(
            "| {name} | {:.1} ms | {:.0} | {gflops:.1} | {:.0}% |",
            secs * 1e3,
            (BATCH * SEQ) as f64 / secs,
            100.0 * gflops / sgemm
        );
    }
}
