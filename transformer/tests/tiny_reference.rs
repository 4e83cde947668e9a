//! The encoder against PyTorch on a tiny random BERT (fixtures made by
//! `fixtures/make_fixtures.py` with transformers + PEFT): forward hidden states,
//! logits, loss and every LoRA/head gradient, plus f16 and bf16 checkpoints. Needs no
//! download, so it always runs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use fibecfed_core::NamedTensors;
use fibecfed_lora::{LoraConfig, LoraParams};
use fibecfed_transformer::{Adapter, BertModel, NoHook, Reduction, cross_entropy};

/// f32 forward/backward against PyTorch's f32: both sides round differently, and
/// through 2 layers that stays below 1e-5 of the tensor's scale; 1e-4 is the bar the
/// issue sets.
const TOL: f64 = 1e-4;

fn strip(t: &NamedTensors, prefix: &str) -> NamedTensors {
    t.iter()
        .filter_map(|(k, v)| k.strip_prefix(prefix).map(|n| (n.to_owned(), v.clone())))
        .collect()
}

#[test]
fn tiny_bert_forward_and_gradients_match_pytorch() {
    let dir = fixtures().join("tiny-bert");
    let model = BertModel::<f32>::load(&dir).expect("tiny model loads");
    let fx_path = fixtures().join("tiny_grads.safetensors");
    let fx = floats(&fx_path);
    let batch = batch_from(&fx_path, "");

    // Base model, no adapter.
    let h = model.encode(&batch, None).expect("forward");
    let want = f64d(get(&fx, "base_last_hidden_state"));
    let got = f64d(&h.into_dyn())
        .into_shape_with_order(want.raw_dim())
        .expect("shape");
    let e = rel_err(&got, &want);
    assert!(e < TOL, "base hidden state rel err {e}");

    // With the adapter PEFT built (all linear modules, r = 3, alpha = 6).
    let lora = LoraConfig::new(3, 6.0, &["query", "key", "value", "dense"]);
    let sites = lora.resolve_sites(2).expect("sites");
    let shapes = model.site_shapes(&sites);
    let (params, ignored) =
        LoraParams::<f32>::from_named(&strip(&fx, "adapter."), 3, &shapes, 32, "tiny_grads")
            .expect("adapter");
    assert!(ignored.is_empty());
    let adapter = Adapter {
        params: &params,
        scale: lora.scale(),
    };
    let fwd = model.forward(&batch, adapter, None).expect("forward");
    let e = rel_err(
        &f64d(&fwd.logits.clone().into_dyn()),
        &f64d(get(&fx, "logits")),
    );
    assert!(e < TOL, "logits rel err {e}");
    let labels = labels(&fx_path);
    let (losses, dlogits) = cross_entropy(&fwd.logits, &labels, Reduction::Mean).expect("loss");
    let want_loss = f64::from(get(&fx, "loss")[[0]]);
    let loss = losses.mean().expect("non-empty");
    assert!(
        (loss - want_loss).abs() < TOL * want_loss.abs(),
        "loss {loss} vs {want_loss}"
    );

    let grads = model
        .backward(&batch, adapter, &fwd, &dlogits, &mut NoHook)
        .expect("backward");
    let want = strip(&fx, "grad.");
    let got = grads.to_named();
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (name, w) in &want {
        let e = rel_err(&f64d(&got[name]), &f64d(w));
        assert!(e < TOL, "{name}: rel err {e}");
    }
}

#[test]
fn half_precision_checkpoints_load_and_match() {
    for (folder, dtype) in [("tiny-bert-f16", "F16"), ("tiny-bert-bf16", "BF16")] {
        let dir = fixtures().join(folder);
        let model = BertModel::<f32>::load(&dir).unwrap_or_else(|e| panic!("{folder}: {e}"));
        let fx_path = dir.join("forward.safetensors");
        let fx = floats(&fx_path);
        let batch = batch_from(&fx_path, "");
        let want = f64d(get(&fx, "last_hidden_state"));
        let got = f64d(&model.encode(&batch, None).expect("forward").into_dyn())
            .into_shape_with_order(want.raw_dim())
            .expect("shape");
        // The weights are exactly the stored half values, upcast; only f32 rounding differs.
        let e = rel_err(&got, &want);
        assert!(e < TOL, "{folder} ({dtype}) rel err {e}");
    }
}

/// `layer_outputs` taps the same forward pass: its last layer is the PyTorch-checked
/// last hidden state, zero noise changes nothing, and noise of the wrong shape is an error.
#[test]
fn layer_outputs_tap_the_forward_pass() {
    let model = BertModel::<f32>::load(&fixtures().join("tiny-bert")).expect("tiny model loads");
    let fx_path = fixtures().join("tiny_grads.safetensors");
    let batch = batch_from(&fx_path, "");
    let outs = model.layer_outputs(&batch, None, None).expect("forward");
    assert_eq!(outs.len(), model.config.num_hidden_layers);
    let last = model.encode(&batch, None).expect("forward");
    assert_eq!(outs.last(), Some(&last));
    let zeros = ndarray::Array2::<f32>::zeros(last.raw_dim());
    assert_eq!(
        model
            .layer_outputs(&batch, None, Some(&zeros))
            .expect("forward"),
        outs
    );
    let noise = zeros.mapv(|_| 0.5);
    let moved = model
        .layer_outputs(&batch, None, Some(&noise))
        .expect("forward");
    assert!(moved.iter().zip(&outs).all(|(a, b)| a != b));
    let wrong = ndarray::Array2::<f32>::zeros((1, 3));
    let err = model.layer_outputs(&batch, None, Some(&wrong)).unwrap_err();
    assert!(err.to_string().contains("embedding noise"), "{err}");
}
