//! Shared helpers for the transformer tests: fixture paths, the optional real model,
//! and the error measure every comparison uses.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use fibecfed_core::NamedTensors;
use fibecfed_lora::io::read_i64_tensor;
use fibecfed_transformer::Batch;
use ndarray::ArrayD;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The real all-MiniLM-L6-v2 folder, if present: `FIBECFED_MODEL_DIR`, else the cache
/// folder `cargo xtask assets` fills. Tests that need it print why they skip.
pub fn minilm_dir() -> Option<PathBuf> {
    let dir = fibecfed_transformer::cached_default_model();
    if dir.is_none() {
        eprintln!(
            "skipped: the real all-MiniLM-L6-v2 model was not found (set FIBECFED_MODEL_DIR or run `cargo xtask assets`)"
        );
    }
    dir
}

/// Normwise relative error max|a−b| / max|b|: elementwise relative error is
/// meaningless where the reference crosses zero, and this is what "agrees to the
/// fourth digit" means for a tensor.
pub fn rel_err(got: &ArrayD<f64>, want: &ArrayD<f64>) -> f64 {
    assert_eq!(got.shape(), want.shape(), "shapes differ");
    let diff = got
        .iter()
        .zip(want.iter())
        .fold(0.0_f64, |m, (a, b)| m.max((a - b).abs()));
    let scale = want.iter().fold(0.0_f64, |m, b| m.max(b.abs()));
    if scale == 0.0 { diff } else { diff / scale }
}

pub fn f64d(a: &ArrayD<f32>) -> ArrayD<f64> {
    a.mapv(f64::from)
}

pub fn get<'a>(t: &'a NamedTensors, name: &str) -> &'a ArrayD<f32> {
    t.get(name)
        .unwrap_or_else(|| panic!("fixture has no tensor {name}"))
}

pub fn ints(path: &Path, name: &str) -> (Vec<usize>, Vec<i64>) {
    read_i64_tensor(path, name).unwrap_or_else(|e| panic!("{e}"))
}

/// A batch from the fixture's `input_ids`, `token_type_ids`, `attention_mask`.
pub fn batch_from(path: &Path, prefix: &str) -> Batch {
    let (shape, ids) = ints(path, &format!("{prefix}input_ids"));
    let (_, types) = ints(path, &format!("{prefix}token_type_ids"));
    let (_, mask) = ints(path, &format!("{prefix}attention_mask"));
    Batch::from_parts(
        shape[0],
        shape[1],
        ids.iter().map(|&v| v as u32).collect(),
        types.iter().map(|&v| v as u32).collect(),
        mask.iter().map(|&v| v != 0).collect(),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

pub fn labels(path: &Path) -> Vec<usize> {
    ints(path, "labels").1.iter().map(|&v| v as usize).collect()
}

/// The float tensors of a fixture (token ids and labels are I64 and read by [`ints`]).
pub fn floats(path: &Path) -> NamedTensors {
    const INTS: [&str; 4] = ["input_ids", "token_type_ids", "attention_mask", "labels"];
    fibecfed_lora::io::read_safetensors_filtered(path, |n| !INTS.iter().any(|i| n.ends_with(i)))
        .unwrap_or_else(|e| panic!("{e}"))
}
