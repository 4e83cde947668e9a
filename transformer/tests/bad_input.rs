//! Library-level refusals: adapters for another model, unsupported PEFT options,
//! labels the head cannot produce, token ids the model has no embedding for, non-finite
//! logits. Each error must name the tensor, field or sample.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::fixtures;
use fibecfed_lora::{LoraConfig, LoraParams, read_adapter};
use fibecfed_transformer::{Batch, BertModel, Reduction, cross_entropy};
use ndarray::array;

fn tiny() -> BertModel<f32> {
    BertModel::<f32>::load(&fixtures().join("tiny-bert")).unwrap()
}

#[test]
fn adapter_for_another_model_names_the_tensor() {
    let model = tiny();
    let (config, tensors) = read_adapter(&fixtures().join("peft_qv")).unwrap();
    let sites = config
        .resolve_sites(model.config.num_hidden_layers)
        .unwrap();
    let err = LoraParams::<f32>::from_named(
        &tensors,
        config.r,
        &model.site_shapes(&sites),
        32,
        "peft_qv",
    )
    .unwrap_err()
    .to_string();
    // MiniLM's 384-wide factors against a 32-wide model; or layer 2+ that tiny lacks.
    assert!(err.contains("peft_qv") && err.contains("lora_"), "{err}");
    assert!(err.contains("384") || err.contains("layer"), "{err}");
}

#[test]
fn unsupported_peft_options_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    for (field, value) in [
        ("use_dora", "true"),
        ("bias", "\"all\""),
        ("target_modules", "\".*query\""),
    ] {
        let src = fixtures().join("peft_qv");
        let mut cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(src.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        cfg[field] = serde_json::from_str(value).unwrap();
        std::fs::write(dir.path().join("adapter_config.json"), cfg.to_string()).unwrap();
        std::fs::copy(
            src.join("adapter_model.safetensors"),
            dir.path().join("adapter_model.safetensors"),
        )
        .unwrap();
        let err = read_adapter(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(field) && err.contains("adapter_config.json"),
            "{field}: {err}"
        );
    }
    let err = read_adapter(&dir.path().join("missing"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("adapter_config.json"), "{err}");
}

#[test]
fn unknown_target_lists_the_valid_ones() {
    let err = LoraConfig::new(8, 16.0, &["querry"])
        .resolve_sites(6)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("querry") && err.contains("attention.output.dense"),
        "{err}"
    );
}

#[test]
fn labels_outside_the_head_and_non_finite_logits() {
    let logits = array![[0.1_f32, 0.2, 0.3], [1.0, 2.0, 3.0]];
    let err = cross_entropy(&logits, &[0, 3], Reduction::Mean)
        .unwrap_err()
        .to_string();
    assert!(err.contains("sample 1") && err.contains("label 3"), "{err}");
    let nan = array![[0.1_f32, f32::NAN, 0.3]];
    let err = cross_entropy(&nan, &[0], Reduction::Mean)
        .unwrap_err()
        .to_string();
    assert!(err.contains("sample 0") && err.contains("finite"), "{err}");
}

#[test]
fn token_ids_and_lengths_the_model_cannot_embed() {
    let model = tiny();
    let b = Batch::from_parts(1, 3, vec![1, 64, 2], vec![0; 3], vec![true; 3]).unwrap();
    let err = model.encode(&b, None).unwrap_err().to_string();
    assert!(err.contains("64") && err.contains("vocabulary"), "{err}");
    let long = Batch::from_parts(1, 41, vec![1; 41], vec![0; 41], vec![true; 41]).unwrap();
    let err = model.encode(&long, None).unwrap_err().to_string();
    assert!(err.contains("max_position_embeddings"), "{err}");
    assert!(
        Batch::from_parts(2, 2, vec![1; 4], vec![0; 4], vec![true, true, false, true]).is_err()
    );
}

#[test]
fn non_finite_adapter_tensor_is_named() {
    let model = tiny();
    let config = LoraConfig::new(2, 4.0, &["value"]);
    let sites = config.resolve_sites(2).unwrap();
    let shapes = model.site_shapes(&sites);
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
    let params = LoraParams::<f32>::init(&config, &shapes, 32, 2, &mut rng);
    let mut named = params.to_named();
    let name = "base_model.model.encoder.layer.1.attention.self.value.lora_A.weight";
    named.get_mut(name).unwrap()[[0, 0]] = f32::INFINITY;
    let err = LoraParams::<f32>::from_named(&named, 2, &shapes, 32, "adapter_model.safetensors")
        .unwrap_err()
        .to_string();
    assert!(err.contains(name) && err.contains("inf"), "{err}");
}

/// Prompt templates: `{a}` once, `{b}` at most once, no other braces.
#[test]
fn prompt_templates_are_checked() {
    use fibecfed_transformer::PromptTemplate;
    for ok in [
        "{a} . It was",
        "{a} ? {b} These two sentences are",
        "Review: {a}",
    ] {
        let t = PromptTemplate::parse(ok).unwrap();
        assert_eq!(t.as_str(), ok);
        assert_eq!(t.has_pair(), ok.contains("{b}"));
    }
    for bad in [
        "",
        "no text",
        "{a} {a}",
        "{b}",
        "{a} {c}",
        "{a} }",
        "{a} {b} {b}",
        "{ a}",
    ] {
        let e = PromptTemplate::parse(bad).unwrap_err().to_string();
        assert!(e.contains("prompt template"), "{bad:?}: {e}");
    }
}
