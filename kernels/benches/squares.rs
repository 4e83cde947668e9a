//! Criterion benches of the GPU kernels: a dense site, a LoRA A product and a whole LoRA
//! site at BERT-base widths, fp32 and tf32. Device time only: each sample is the CUDA
//! event time around `iters` queued runs (`iter_custom`), with the device synchronised
//! before the time is read. Throughput is the bytes the site must move at least (inputs
//! once, outputs once), so criterion's GB/s reads against the copy bandwidth.
//!
//! Without a usable GPU it prints "skipped: <why>" and returns at once, so that
//! `cargo test --all-targets` (which runs benches once in test mode) stays instant.
//! `cargo xtask gpu-bench` is the side-by-side comparison with PyTorch.
#![allow(clippy::expect_used)]

use std::time::Duration;

use criterion::{Criterion, Throughput};
use fibecfed_kernels::reference::{DenseData, LoraData, MaskKind, SplitMix64};
use fibecfed_kernels::{DenseShape, GpuFisher, LoraShape, Mode};

fn device_time(gpu: &GpuFisher, iters: u64, mut run: impl FnMut()) -> Duration {
    let (us, _clock) = gpu
        .time_us(|| {
            for _ in 0..iters {
                run();
            }
            Ok(())
        })
        .expect("timing events");
    Duration::from_secs_f64(us * 1e-6)
}

fn bench(c: &mut Criterion, gpu: &GpuFisher) {
    let mut rng = SplitMix64::new(42);
    let modes: Vec<Mode> = [Mode::Fp32, Mode::Tf32]
        .into_iter()
        .filter(|&m| gpu.supports(m))
        .collect();
    let mut group = c.benchmark_group("gpu_squares");
    group.sample_size(20);

    for (name, b, t, d_in, d_out) in [
        ("dense_bert_768x768", 32, 128, 768, 768),
        ("lora_a_bert_r8", 32, 128, 768, 8),
    ] {
        let shape = DenseShape {
            batch: b,
            seq_len: t,
            d_in,
            d_out,
        };
        let data = DenseData::random(shape, MaskKind::Full, &mut rng);
        let mut job = gpu.dense_job(&data.inputs()).expect("upload");
        let bytes = 4 * (b * t * (d_in + d_out) + d_in * d_out + b);
        group.throughput(Throughput::Bytes(bytes as u64));
        for &mode in &modes {
            group.bench_function(format!("{name}/{}", mode.name()), |bencher| {
                bencher.iter_custom(|iters| {
                    device_time(gpu, iters, || {
                        gpu.run_dense(&mut job, mode).expect("launch");
                    })
                });
            });
        }
    }

    let shape = LoraShape {
        batch: 32,
        seq_len: 128,
        d_in: 768,
        d_out: 768,
        rank: 8,
    };
    let data = LoraData::random(shape, MaskKind::Padded, &mut rng);
    let n = shape.batch * shape.seq_len;
    for products in [true, false] {
        let mut job = gpu.lora_job(&data.inputs(products)).expect("upload");
        let read = n * (shape.d_in + shape.d_out + if products { 2 * shape.rank } else { 0 });
        let bytes = 4 * (read + 2 * shape.rank * (shape.d_in + shape.d_out) + 2 * shape.batch);
        group.throughput(Throughput::Bytes(bytes as u64));
        let label = if products { "given" } else { "formed" };
        for &mode in &modes {
            group.bench_function(
                format!("lora_site_bert_r8_products_{label}/{}", mode.name()),
                |bencher| {
                    bencher.iter_custom(|iters| {
                        device_time(gpu, iters, || {
                            gpu.run_lora(&mut job, mode).expect("launch");
                        })
                    });
                },
            );
        }
    }
    group.finish();
}

fn main() {
    let gpu = match GpuFisher::new() {
        Ok(gpu) => gpu,
        Err(why) => {
            eprintln!("skipped: kernels/benches/squares: {why}");
            return;
        }
    };
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c, &gpu);
    c.final_summary();
}
