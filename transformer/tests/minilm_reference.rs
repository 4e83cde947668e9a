//! The encoder on the real all-MiniLM-L6-v2 against transformers and PEFT (fixtures
//! from `fixtures/make_fixtures.py`). Skips, saying why, when the model is absent;
//! `cargo xtask test` fetches it first so CI runs these.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use fibecfed_lora::{LoraParams, read_adapter, write_adapter};
use fibecfed_transformer::{
    Adapter, Batch, BertModel, Encoded, NoHook, Reduction, TextEncoder, cross_entropy, mean_pool,
};

/// Relative (normwise) tolerance the issue sets: agreement to the fourth digit.
const TOL: f64 = 1e-4;

#[test]
fn tokenizer_hidden_states_and_pooling_match_transformers() {
    let Some(dir) = minilm_dir() else { return };
    let model = BertModel::<f32>::load(&dir).expect("MiniLM loads");
    let tok = TextEncoder::from_file(&dir.join("tokenizer.json"), 128).expect("tokenizer");
    let path = fixtures().join("minilm_forward.safetensors");
    let fx = floats(&path);
    let (_, meta) = fibecfed_lora::io::read_safetensors_with_metadata_filtered(&path, |_| false)
        .expect("metadata");

    for (prefix, key, hidden_key) in [
        ("", "sentences", "last_hidden_state"),
        ("pair_", "pairs", "pair_last_hidden_state"),
    ] {
        let want_batch = batch_from(&path, prefix);
        // Our tokenizer must produce exactly the ids transformers used.
        let texts: serde_json::Value = serde_json::from_str(&meta[key]).expect("json");
        let encoded: Vec<Encoded> = texts
            .as_array()
            .expect("list")
            .iter()
            .map(|t| match t {
                serde_json::Value::String(s) => tok.encode(s, None).expect("encode"),
                serde_json::Value::Array(p) => tok
                    .encode(p[0].as_str().expect("a"), Some(p[1].as_str().expect("b")))
                    .expect("encode"),
                other => panic!("unexpected fixture text {other}"),
            })
            .collect();
        let batch = Batch::from_encoded(&encoded.iter().collect::<Vec<_>>(), 0).expect("batch");
        assert_eq!(
            batch, want_batch,
            "{key}: token ids differ from transformers'"
        );
        assert!(
            batch.batch >= 3
                && batch
                    .lengths()
                    .iter()
                    .collect::<std::collections::BTreeSet<_>>()
                    .len()
                    >= 3
        );

        let h = model.encode(&batch, None).expect("forward");
        let want = f64d(get(&fx, hidden_key));
        let got = f64d(&h.clone().into_dyn())
            .into_shape_with_order(want.raw_dim())
            .expect("shape");
        let e = rel_err(&got, &want);
        eprintln!("{key}: last hidden state rel err {e:.2e}");
        assert!(e < TOL, "{key}: last hidden state rel err {e}");
        if prefix.is_empty() {
            let pooled = mean_pool(&h, &batch);
            let e = rel_err(&f64d(&pooled.into_dyn()), &f64d(get(&fx, "mean_pooled")));
            eprintln!("mean pooled rel err {e:.2e}");
            assert!(e < TOL, "mean pooled rel err {e}");
        }
    }
}

/// Loads the adapter PEFT itself wrote, runs forward/backward on the fixture batch and
/// compares logits, loss and every gradient with PyTorch autograd.
fn check_peft_gradients(adapter_dir: &str, grads_file: &str) {
    let Some(dir) = minilm_dir() else { return };
    let model = BertModel::<f32>::load(&dir).expect("MiniLM loads");
    let (config, tensors) =
        read_adapter(&fixtures().join(adapter_dir)).expect("PEFT adapter reads");
    let sites = config
        .resolve_sites(model.config.num_hidden_layers)
        .expect("targets");
    let shapes = model.site_shapes(&sites);
    let (params, ignored) = LoraParams::<f32>::from_named(
        &tensors,
        config.r,
        &shapes,
        model.config.hidden_size,
        adapter_dir,
    )
    .expect("adapter");
    assert!(ignored.is_empty(), "{ignored:?}");
    let path = fixtures().join(grads_file);
    let fx = floats(&path);
    let batch = batch_from(&path, "");
    let adapter = Adapter {
        params: &params,
        scale: config.scale(),
    };
    let fwd = model.forward(&batch, adapter, None).expect("forward");
    let e = rel_err(
        &f64d(&fwd.logits.clone().into_dyn()),
        &f64d(get(&fx, "logits")),
    );
    assert!(e < TOL, "{adapter_dir}: logits rel err {e}");
    let (losses, dlogits) =
        cross_entropy(&fwd.logits, &labels(&path), Reduction::Mean).expect("loss");
    let (loss, want) = (
        losses.mean().expect("batch"),
        f64::from(get(&fx, "loss")[[0]]),
    );
    assert!(
        (loss - want).abs() < TOL * want.abs(),
        "{adapter_dir}: loss {loss} vs {want}"
    );
    let grads = model
        .backward(&batch, adapter, &fwd, &dlogits, &mut NoHook)
        .expect("backward")
        .to_named();
    let mut worst = 0.0_f64;
    for (name, want) in tensors.keys().map(|k| (k, get(&fx, k))) {
        let e = rel_err(&f64d(&grads[name]), &f64d(want));
        worst = worst.max(e);
        assert!(e < TOL, "{adapter_dir}: {name}: rel err {e}");
    }
    eprintln!(
        "{adapter_dir}: {} gradient tensors, worst rel err {worst:.2e}",
        tensors.len()
    );

    // What we write, we read back identically (PEFT's loading of it is checked by
    // fixtures/check_peft_load.py).
    let out = tempfile::tempdir().expect("tempdir");
    write_adapter(out.path(), &config, &params).expect("write");
    let (config2, tensors2) = read_adapter(out.path()).expect("read back");
    assert_eq!(config2.r, config.r);
    assert_eq!(tensors2, tensors);
}

#[test]
fn peft_query_value_adapter_gradients_match_pytorch() {
    check_peft_gradients("peft_qv", "minilm_grads_qv.safetensors");
}

#[test]
fn peft_all_linear_adapter_gradients_match_pytorch() {
    check_peft_gradients("peft_all", "minilm_grads_all.safetensors");
}
