//! `fibecfed fisher --device auto|cpu|cuda` on the tiny BERT fixture (no download).
//!
//! - Every run says on stderr where the squares were computed; `auto` without a usable
//!   GPU says why it fell back to the CPU.
//! - `auto` and the default are the same path and give byte-identical files (the GPU
//!   kernels reduce in a fixed order, so this holds with a GPU too); `cpu` gives the same
//!   bytes as the default when no GPU is usable, and agrees within 1e-4 relative when
//!   the default ran on a GPU (f32 GPU vs f32 CPU with different summation orders).
//! - `cuda` without a usable GPU fails with exit code 2, a message naming the flag and
//!   the reason, and writes nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::path::Path;
use std::process::Output;

use common::{Setup, assert_refused, assert_success, fibecfed, s, setup};
use fibecfed_fisher::{CudaBackend, GpuMode};

/// Runs `fibecfed fisher` with the given extra flags, writing `name`.jsonl and its layer
/// importance beside it; returns the run and the two files' text.
fn fisher(su: &Setup, name: &str, extra: &[&str]) -> (Output, Option<(String, String)>) {
    let out = su.root.join(format!("{name}.jsonl"));
    let layers = su.root.join(format!("{name}.layers.json"));
    let mut args = vec![
        "fisher",
        "--model-dir",
        s(&su.model),
        "--data",
        s(&su.train),
        "--output",
        s(&out),
        "--layer-importance",
        s(&layers),
        "--max-len",
        "32",
        "--batch-size",
        "5",
        "--targets",
        "query,value,dense",
    ];
    args.extend_from_slice(extra);
    let run = fibecfed(&args);
    let files = out.exists().then(|| (read(&out), read(&layers)));
    (run, files)
}

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap()
}

fn stderr(run: &Output) -> String {
    String::from_utf8_lossy(&run.stderr).into_owned()
}

/// Why this machine has no usable GPU (as the CLI will say it), or `None` when it has one.
fn no_gpu() -> Option<String> {
    CudaBackend::new(GpuMode::Fp32).err().map(|e| e.to_string())
}

fn difficulties(jsonl: &str) -> Vec<f64> {
    jsonl
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["difficulty"].as_f64().unwrap()
        })
        .collect()
}

#[test]
fn cpu_and_auto_give_the_default_output_and_say_where_they_ran() {
    let su = setup(16, 4);
    let (default, default_files) = fisher(&su, "default", &[]);
    let (auto, auto_files) = fisher(&su, "auto", &["--device", "auto"]);
    let (cpu, cpu_files) = fisher(&su, "cpu", &["--device", "cpu"]);
    for run in [&default, &auto, &cpu] {
        assert_success(run);
    }
    let (default_files, auto_files, cpu_files) = (
        default_files.unwrap(),
        auto_files.unwrap(),
        cpu_files.unwrap(),
    );
    assert!(
        stderr(&cpu).contains("Fisher squares on the CPU (--device cpu)"),
        "{}",
        stderr(&cpu)
    );
    assert_eq!(default_files, auto_files, "auto is the default");
    if let Some(why) = no_gpu() {
        for run in [&default, &auto] {
            let err = stderr(run);
            assert!(
                err.contains(&format!(
                    "Fisher squares on the CPU: no usable CUDA GPU ({why})"
                )),
                "{err}"
            );
            assert_eq!(
                err.lines().filter(|l| l.contains("Fisher squares")).count(),
                1,
                "one notice line: {err}"
            );
        }
        assert_eq!(cpu_files, default_files, "no GPU: auto is the CPU path");
    } else {
        assert!(stderr(&auto).contains("Fisher squares on the GPU"));
        let (g, c) = (difficulties(&auto_files.0), difficulties(&cpu_files.0));
        assert_eq!(g.len(), c.len());
        for (i, (g, c)) in g.iter().zip(&c).enumerate() {
            assert!(
                (g - c).abs() <= 1e-4 * c.abs(),
                "sample {i}: GPU {g}, CPU {c}"
            );
        }
    }
}

#[test]
fn cuda_without_a_usable_gpu_is_refused() {
    let su = setup(6, 2);
    let (run, files) = fisher(&su, "cuda", &["--device", "cuda"]);
    if let Some(why) = no_gpu() {
        assert_refused(&run, &["--device cuda: no usable CUDA GPU", &why]);
        assert!(files.is_none(), "nothing is written");
    } else {
        assert_success(&run);
        assert!(stderr(&run).contains("Fisher squares on the GPU"));
        let (_, cpu) = fisher(&su, "cpu", &["--device", "cpu"]);
        let (g, c) = (
            difficulties(&files.unwrap().0),
            difficulties(&cpu.unwrap().0),
        );
        for (i, (g, c)) in g.iter().zip(&c).enumerate() {
            assert!(
                (g - c).abs() <= 1e-4 * c.abs(),
                "sample {i}: GPU {g}, CPU {c}"
            );
        }
    }
}

#[test]
fn an_unknown_device_is_a_usage_error() {
    let su = setup(6, 2);
    let (run, files) = fisher(&su, "tpu", &["--device", "tpu"]);
    assert_refused(&run, &["--device", "tpu"]);
    assert!(files.is_none());
}
