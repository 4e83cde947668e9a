//! Checkpoint layouts other Hugging Face BERT folders use: task models whose tensors
//! carry a `bert.` prefix (with heads the encoder ignores) and TensorFlow-converted
//! LayerNorm names (gamma/beta). They must load into the same model.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::fixtures;
use fibecfed_lora::io::{read_safetensors, write_safetensors};
use fibecfed_transformer::{Batch, BertModel};

#[test]
fn prefixed_and_gamma_beta_checkpoints_load_identically() {
    let src = fixtures().join("tiny-bert");
    let original = BertModel::<f32>::load(&src).unwrap();
    let tensors = read_safetensors(&src.join("model.safetensors")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let mut renamed: fibecfed_core::NamedTensors = tensors
        .iter()
        .map(|(k, v)| {
            let k = k
                .replace("LayerNorm.weight", "LayerNorm.gamma")
                .replace("LayerNorm.bias", "LayerNorm.beta");
            (format!("bert.{k}"), v.clone())
        })
        .collect();
    // What BertForSequenceClassification / BertForPreTraining checkpoints also hold.
    renamed.insert(
        "classifier.weight".into(),
        ndarray::ArrayD::zeros(vec![2, 32]),
    );
    renamed.insert(
        "bert.pooler.dense.weight".into(),
        ndarray::ArrayD::zeros(vec![32, 32]),
    );
    write_safetensors(&dir.path().join("model.safetensors"), &renamed, None).unwrap();
    let loaded = BertModel::<f32>::load(dir.path()).unwrap();

    let batch = Batch::from_parts(
        2,
        4,
        vec![1, 5, 9, 2, 1, 7, 2, 0],
        vec![0; 8],
        vec![true, true, true, true, true, true, true, false],
    )
    .unwrap();
    let a = original.encode(&batch, None).unwrap();
    let b = loaded.encode(&batch, None).unwrap();
    assert_eq!(
        a, b,
        "the same weights under other names must give the same output"
    );
}
