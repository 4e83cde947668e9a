//! `fibecfed fisher` on the real all-MiniLM-L6-v2 against per-sample gradients from
//! PyTorch + PEFT (a loop of `torch.autograd.grad`, one sample at a time), for the
//! adapters PEFT saved with non-zero B on query/value and on every linear module.
//! Fixture and script: `tests/fixtures/fisher/` (make_fisher_fixture.py).
//!
//! Tolerance 1e-3 relative per sample (the bound): our f32 pass over padded
//! batches against PyTorch's f32 model with f64 squares; the observed worst is 9e-7.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const TOL: f64 = 1e-3;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn minilm() -> Option<PathBuf> {
    let dir = fibecfed_transformer::cached_default_model();
    if dir.is_none() {
        eprintln!(
            "skipped: the real all-MiniLM-L6-v2 model was not found (set FIBECFED_MODEL_DIR or run `cargo xtask assets`)"
        );
    }
    dir
}

fn floats(v: &Value, key: &str) -> Vec<f64> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("{key} missing"))
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn check_case(case: &str, batch_size: &str) {
    let Some(model) = minilm() else { return };
    let fx_path = root().join(format!("fed-sim/tests/fixtures/fisher/{case}.json"));
    let fx: Value = serde_json::from_str(&std::fs::read_to_string(&fx_path).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (out, imp) = (dir.path().join("d.jsonl"), dir.path().join("layers.json"));
    let status = Command::new(env!("CARGO_BIN_EXE_fibecfed"))
        .args(["fisher", "--model-dir"])
        .arg(&model)
        .arg("--data")
        .arg(root().join(fx["data"].as_str().unwrap()))
        .arg("--adapter")
        .arg(root().join(fx["adapter"].as_str().unwrap()))
        .args(["--max-len", &fx["max_len"].to_string()])
        .args(["--batch-size", batch_size])
        .arg("--output")
        .arg(&out)
        .arg("--layer-importance")
        .arg(&imp)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let lines: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let want_d = floats(&fx, "difficulty");
    let want_loss = floats(&fx, "loss");
    assert_eq!(lines.len(), want_d.len());
    let mut worst = 0.0_f64;
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["index"].as_u64(), Some(i as u64));
        let d = line["difficulty"].as_f64().unwrap();
        let e = (d - want_d[i]).abs() / want_d[i];
        worst = worst.max(e);
        assert!(
            e < TOL,
            "{case} sample {i}: difficulty {d} vs PyTorch {} (rel {e:.2e})",
            want_d[i]
        );
        let l = line["loss"].as_f64().unwrap();
        assert!(
            (l - want_loss[i]).abs() < TOL * want_loss[i].abs().max(1.0),
            "{case} sample {i}: loss {l} vs {}",
            want_loss[i]
        );
    }
    let layers: Value = serde_json::from_str(&std::fs::read_to_string(&imp).unwrap()).unwrap();
    let got = floats(&layers, "layers");
    let want = floats(&fx, "layer_importance");
    assert_eq!(got.len(), want.len());
    for (l, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() < TOL * w,
            "{case} layer {l}: importance {g} vs {w}"
        );
    }
    assert!((got.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    eprintln!("{case} (batch {batch_size}): worst per-sample relative error {worst:.2e}");
}

#[test]
fn query_value_adapter_matches_pytorch_per_sample_gradients() {
    check_case("qv", "4");
}

#[test]
fn every_linear_module_adapter_matches_pytorch_per_sample_gradients() {
    check_case("all_linear", "3");
}

#[test]
fn one_sample_per_batch_gives_the_same_scores() {
    check_case("qv", "1");
}
