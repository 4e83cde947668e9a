//! The LLaMA decoder's forward pass against transformers' LlamaForCausalLM on
//! SmolLM2-135M-Instruct loaded from the same GGUF (float32, dequantised):
//! tests/fixtures/smollm2.logits.json, made by make_llama_fixture.py. Needs the file
//! (FIBECFED_SMOLLM2_GGUF, which `cargo xtask test` sets); prints "skipped" without it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use fibecfed_transformer::{LlamaModel, ModelError};

fn model_file(test: &str) -> Option<PathBuf> {
    use std::io::Write as _;
    let file = std::env::var_os("FIBECFED_SMOLLM2_GGUF").map(PathBuf::from);
    if file.is_none() {
        let line = format!("skipped: {test}: FIBECFED_SMOLLM2_GGUF is not set\n");
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }
    file
}

/// Logits within 1e-4 of the reference: normwise over every sampled entry of every
/// position of 8 sentences, and each row's norm and sum over the whole vocabulary; the
/// last position's arg-max the same where it is not a near-tie.
#[test]
fn smollm2_logits_match_transformers() {
    let Some(file) = model_file("smollm2_logits_match_transformers") else {
        return;
    };
    let model = LlamaModel::load(&file).unwrap();
    assert_eq!(model.config.layers, 30);
    assert_eq!((model.config.heads, model.config.kv_heads), (9, 3));
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2.logits.json");
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();
    let stride = want["stride"].as_u64().unwrap() as usize;
    let rows = want["rows"].as_array().unwrap();
    assert!(rows.len() >= 8);
    let (mut diff2, mut ref2) = (0.0f64, 0.0f64);
    for row in rows {
        let text = row["text"].as_str().unwrap();
        let ids: Vec<u32> = row["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let logits = model.logits(&ids).unwrap();
        assert_eq!(logits.nrows(), ids.len(), "{text:?}");
        let vocab = logits.ncols();
        for (p, sampled) in row["sampled"].as_array().unwrap().iter().enumerate() {
            let got = logits.row(p);
            for (i, w) in sampled.as_array().unwrap().iter().enumerate() {
                let (g, w) = (f64::from(got[i * stride]), w.as_f64().unwrap());
                diff2 += (g - w) * (g - w);
                ref2 += w * w;
            }
            let norm: f64 = got
                .iter()
                .map(|&v| f64::from(v).powi(2))
                .sum::<f64>()
                .sqrt();
            let sum: f64 = got.iter().map(|&v| f64::from(v)).sum();
            let want_norm = row["row_norm"][p].as_f64().unwrap();
            let want_sum = row["row_sum"][p].as_f64().unwrap();
            assert!(
                (norm - want_norm).abs() <= 1e-4 * want_norm,
                "{text:?} position {p}: norm {norm} vs {want_norm}"
            );
            assert!(
                (sum - want_sum).abs() <= 1e-4 * want_norm * (vocab as f64).sqrt(),
                "{text:?} position {p}: sum {sum} vs {want_sum}"
            );
        }
        let last = logits.row(ids.len() - 1);
        let mut order: Vec<usize> = (0..vocab).collect();
        order.sort_by(|&a, &b| last[b].total_cmp(&last[a]));
        let want_top = row["argmax_last"].as_u64().unwrap() as usize;
        if last[order[0]] - last[order[1]] > 1e-3 {
            assert_eq!(order[0], want_top, "{text:?}: arg-max at the last position");
        }
    }
    let rel = (diff2 / ref2).sqrt();
    eprintln!("smollm2 logits: normwise relative error {rel:.2e} over the sampled entries");
    assert!(rel <= 1e-4, "normwise relative error {rel:e}");
}

#[test]
fn bad_inputs_are_errors() {
    let Some(file) = model_file("bad_inputs_are_errors") else {
        return;
    };
    let model = LlamaModel::load(&file).unwrap();
    assert!(matches!(model.logits(&[]), Err(ModelError::Input(_))));
    let e = model.logits(&[1, 49152]).unwrap_err();
    assert!(
        e.to_string().contains("token id 49152 at position 1"),
        "{e}"
    );
    // A file that is not a model: its missing keys are named.
    let small = Path::new(env!("CARGO_MANIFEST_DIR")).join("../gguf/tests/fixtures/small.gguf");
    let e = LlamaModel::load(&small).unwrap_err();
    assert!(e.to_string().contains("llama.embedding_length"), "{e}");
}
