//! The `fibecfed` binary end to end on the tiny BERT fixture (with a word-level
//! tokenizer written here), and every bad input the CLI must refuse with exit code 2
//! and a message naming the file, field or flag.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::path::Path;
use std::process::Output;

use common::{Setup, assert_refused, assert_success, fibecfed, s, tiny_model, tsv};

#[test]
fn train_embed_and_adapter_round_trip_on_the_tiny_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let (train, eval) = (dir.path().join("train.tsv"), dir.path().join("dev.tsv"));
    tsv(&train, 64);
    tsv(&eval, 16);
    let adapter = dir.path().join("adapter");
    let metrics = dir.path().join("metrics.json");
    let out = fibecfed(&[
        "train",
        "--model-dir",
        s(&model),
        "--train",
        s(&train),
        "--eval",
        s(&eval),
        "--epochs",
        "2",
        "--lora-rank",
        "4",
        "--targets",
        "query,value,dense",
        "--batch-size",
        "8",
        "--lr",
        "1e-2",
        "--save-adapter",
        s(&adapter),
        "--metrics-out",
        s(&metrics),
        "--max-len",
        "32",
    ]);
    assert_success(&out);
    let m: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&metrics).unwrap()).unwrap();
    let epochs = m["epochs"].as_array().unwrap();
    assert_eq!(epochs.len(), 2);
    let loss = |e: &serde_json::Value| e["train_loss"].as_f64().unwrap();
    assert!(
        loss(&epochs[1]) < loss(&epochs[0]),
        "loss did not fall: {m}"
    );
    // The adapter folder is PEFT's layout and reads back.
    let (config, tensors) = fibecfed_lora::read_adapter(&adapter).unwrap();
    assert_eq!(config.r, 4);
    assert!(tensors.contains_key("base_model.model.encoder.layer.1.output.dense.lora_B.weight"));
    assert!(tensors.contains_key("base_model.model.classifier.weight"));

    let input = dir.path().join("texts.txt");
    fs::write(
        &input,
        "good movie\n\nthe plot was boring and the actors awful\n",
    )
    .unwrap();
    let output = dir.path().join("emb.jsonl");
    let rows = embed(&model, &input, &output, &["--max-len", "32"]);
    assert_eq!(
        rows.len(),
        3,
        "one object per input line, empty lines included"
    );
    assert!(rows.iter().all(|r| r.len() == 32));
}

/// Runs `fibecfed embed` and returns its embeddings, one per output line.
fn embed(model: &Path, input: &Path, output: &Path, extra: &[&str]) -> Vec<Vec<f64>> {
    let mut args = vec![
        "embed",
        "--model-dir",
        s(model),
        "--input",
        s(input),
        "--output",
        s(output),
    ];
    args.extend_from_slice(extra);
    let out = fibecfed(&args);
    assert_success(&out);
    fs::read_to_string(output)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect()
}

fn setup() -> Setup {
    common::setup(16, 8)
}

fn train_with(su: &Setup, model: &Path, extra: &[&str]) -> Output {
    let mut args = common::train_args(su, model);
    args.extend_from_slice(extra);
    fibecfed(&args)
}

#[test]
fn missing_model_folder_and_files() {
    let su = setup();
    let nowhere = su.root.join("no-such-model");
    assert_refused(&train_with(&su, &nowhere, &[]), &["no-such-model"]);
    fs::remove_file(su.model.join("tokenizer.json")).unwrap();
    assert_refused(
        &train_with(&su, &su.model, &[]),
        &["tokenizer.json", "missing"],
    );
}

#[test]
fn config_missing_a_key() {
    let su = setup();
    let path = su.model.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    c.as_object_mut().unwrap().remove("num_attention_heads");
    fs::write(&path, c.to_string()).unwrap();
    assert_refused(
        &train_with(&su, &su.model, &[]),
        &["config.json", "num_attention_heads"],
    );
}

#[test]
fn truncated_and_lying_checkpoints() {
    let su = setup();
    let path = su.model.join("model.safetensors");
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert_refused(&train_with(&su, &su.model, &[]), &["model.safetensors"]);
    // A header that claims more bytes than the file has.
    let mut lying = bytes.clone();
    lying[..8].copy_from_slice(&(bytes.len() as u64 * 2).to_le_bytes());
    fs::write(&path, &lying).unwrap();
    assert_refused(&train_with(&su, &su.model, &[]), &["model.safetensors"]);
}

#[test]
fn tensor_of_the_wrong_shape() {
    let su = setup();
    let path = su.model.join("model.safetensors");
    let mut t = fibecfed_lora::io::read_safetensors(&path).unwrap();
    let name = "encoder.layer.1.attention.self.key.weight";
    t.insert(name.to_owned(), ndarray::ArrayD::zeros(vec![32, 31]));
    fibecfed_lora::io::write_safetensors(&path, &t, None).unwrap();
    assert_refused(
        &train_with(&su, &su.model, &[]),
        &[name, "[32, 31]", "[32, 32]"],
    );
}

#[test]
fn unknown_lora_target() {
    let su = setup();
    assert_refused(
        &train_with(&su, &su.model, &["--targets", "query,qeury"]),
        &["qeury"],
    );
}

#[test]
fn tsv_with_wrong_column_count_or_unknown_label() {
    let su = setup();
    fs::write(&su.train, "sentence\tlabel\ngood movie\t1\nbad\tmovie\t0\n").unwrap();
    assert_refused(&train_with(&su, &su.model, &[]), &["train.tsv", "3"]);
    tsv(&su.train, 16);
    fs::write(&su.eval, "sentence\tlabel\ngood movie\t1\nbad movie\t7\n").unwrap();
    assert_refused(&train_with(&su, &su.model, &[]), &["dev.tsv", "7"]);
}

#[test]
fn unwritable_outputs_fail_before_training() {
    let su = setup();
    let file = su.root.join("a-file");
    fs::write(&file, "x").unwrap();
    let bad_metrics = su.root.join("no-such-dir/metrics.json");
    assert_refused(
        &train_with(&su, &su.model, &["--metrics-out", s(&bad_metrics)]),
        &["no-such-dir"],
    );
    let bad_adapter = file.join("adapter");
    assert_refused(
        &train_with(&su, &su.model, &["--save-adapter", s(&bad_adapter)]),
        &["a-file"],
    );
    let input = su.root.join("texts.txt");
    fs::write(&input, "good\n").unwrap();
    let out = fibecfed(&[
        "embed",
        "--model-dir",
        s(&su.model),
        "--input",
        s(&input),
        "--output",
        s(&bad_metrics),
    ]);
    assert_refused(&out, &["no-such-dir"]);
}

#[test]
fn bad_flags() {
    let su = setup();
    assert_refused(
        &train_with(&su, &su.model, &["--batch-size", "zero"]),
        &["batch-size"],
    );
    assert_refused(
        &train_with(&su, &su.model, &["--lora-rank", "0"]),
        &["rank"],
    );
    assert_refused(
        &fibecfed(&[
            "train",
            "--model-dir",
            s(&su.model),
            "--train",
            s(&su.train),
            "--eval",
            s(&su.eval),
            "--max-len",
            "1000",
        ]),
        &["max-len", "40"],
    );
}

/// `fibecfed embed` on the real MiniLM reproduces transformers' mean-pooled embeddings
/// (fixture made by transformer/tests/fixtures/make_fixtures.py), through the CLI's own
/// tokenisation, length-sorted batching and JSON output.
#[test]
fn embed_matches_transformers_on_the_real_model() {
    let Some(model) = fibecfed_transformer::cached_default_model() else {
        eprintln!(
            "skipped: the real all-MiniLM-L6-v2 model was not found (set FIBECFED_MODEL_DIR or run `cargo xtask assets`)"
        );
        return;
    };
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../transformer/tests/fixtures/minilm_forward.safetensors");
    let (tensors, meta) =
        fibecfed_lora::io::read_safetensors_with_metadata_filtered(&fixture, |n| {
            n == "mean_pooled"
        })
        .unwrap();
    let sentences: Vec<String> = serde_json::from_str(&meta["sentences"]).unwrap();
    let want = &tensors["mean_pooled"];
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.txt"), dir.path().join("out.jsonl"));
    fs::write(&input, sentences.join("\n")).unwrap();
    let rows = embed(&model, &input, &output, &["--batch-size", "4"]);
    assert_eq!(rows.len(), sentences.len());
    let scale = want.iter().fold(0.0_f64, |m, v| m.max(f64::from(v.abs())));
    for (i, row) in rows.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            let diff = (v - f64::from(want[[i, j]])).abs() / scale;
            assert!(diff < 1e-4, "sentence {i}, dim {j}: rel err {diff}");
        }
    }
}

#[test]
fn flags_out_of_range_name_the_flag() {
    let su = setup();
    for (flag, value) in [
        ("--lora-rank", "100000"),
        ("--limit-eval", "0"),
        ("--lr", "NaN"),
        ("--weight-decay", "-1"),
        ("--lora-dropout", "1.5"),
    ] {
        let arg = format!("{flag}={value}");
        assert_refused(&train_with(&su, &su.model, &[&arg]), &[flag]);
    }
    // A pair needs room for [CLS] a [SEP] b [SEP].
    fs::write(
        &su.train,
        "sentence1\tsentence2\tlabel\ngood movie\tbad movie\t0\nfun plot\tfun film\t1\n",
    )
    .unwrap();
    fs::write(
        &su.eval,
        "sentence1\tsentence2\tlabel\ngood movie\tbad movie\t1\n",
    )
    .unwrap();
    let args = [
        "train",
        "--model-dir",
        s(&su.model),
        "--train",
        s(&su.train),
        "--eval",
        s(&su.eval),
        "--max-len",
        "3",
    ];
    assert_refused(&fibecfed(&args), &["max length 3"]);
}

#[test]
fn non_finite_weights_name_the_tensor() {
    let su = setup();
    let path = su.model.join("model.safetensors");
    let mut t = fibecfed_lora::io::read_safetensors(&path).unwrap();
    let name = "encoder.layer.0.intermediate.dense.bias";
    t.get_mut(name).unwrap()[[3]] = f32::NAN;
    fibecfed_lora::io::write_safetensors(&path, &t, None).unwrap();
    assert_refused(&train_with(&su, &su.model, &[]), &[name, "NaN"]);
}

/// Runs `fibecfed fisher` on the tiny model and returns (stderr-checked) output lines.
fn fisher_with(su: &Setup, data: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "fisher",
        "--model-dir",
        s(&su.model),
        "--data",
        s(data),
        "--output",
        s(out),
        "--max-len",
        "32",
        "--batch-size",
        "5",
    ];
    args.extend_from_slice(extra);
    fibecfed(&args)
}

fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn fisher_scores_every_sample_and_layer() {
    let su = setup();
    let (out, layers) = (su.root.join("d.jsonl"), su.root.join("layers.json"));
    let run = fisher_with(
        &su,
        &su.train,
        &out,
        &[
            "--layer-importance",
            s(&layers),
            "--targets",
            "query,value,dense",
        ],
    );
    assert_success(&run);
    let lines = jsonl(&out);
    assert_eq!(lines.len(), 16, "one line per sample");
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["index"].as_u64(), Some(i as u64));
        let d = l["difficulty"].as_f64().unwrap();
        // A fresh adapter has B = 0, so only B and the head carry gradient: still > 0.
        assert!(d.is_finite() && d > 0.0, "sample {i}: {d}");
        assert!(l["loss"].as_f64().unwrap() > 0.0);
    }
    let imp: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&layers).unwrap()).unwrap();
    let v: Vec<f64> = imp["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(v.len(), 2, "the tiny model has 2 layers");
    assert!((v.iter().sum::<f64>() - 1.0).abs() < 1e-9 && v.iter().all(|x| *x > 0.0));

    // The same seed gives bitwise the same sampled-label scores; the perturbation
    // importance is a distribution over the layers as well.
    let sampled = |name: &str| {
        let p = su.root.join(name);
        let l = su.root.join(format!("{name}.layers.json"));
        let run = fisher_with(
            &su,
            &su.train,
            &p,
            &[
                "--labels",
                "sampled",
                "--seed",
                "7",
                "--importance",
                "perturbation",
                "--layer-importance",
                s(&l),
            ],
        );
        assert_success(&run);
        (
            fs::read_to_string(&p).unwrap(),
            fs::read_to_string(&l).unwrap(),
        )
    };
    let (a, la) = sampled("s1.jsonl");
    let (b, lb) = sampled("s2.jsonl");
    assert_eq!(a, b);
    assert_eq!(la, lb);
    let imp: serde_json::Value = serde_json::from_str(&la).unwrap();
    assert_eq!(imp["method"], "perturbation");
    let v: Vec<f64> = imp["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert!((v.iter().sum::<f64>() - 1.0).abs() < 1e-9 && v.len() == 2);
}

#[test]
fn fisher_refuses_bad_adapters_data_and_labels() {
    let su = setup();
    let out = su.root.join("d.jsonl");
    // An adapter made for MiniLM (hidden 384) does not fit the tiny model (hidden 32).
    let minilm_adapter =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../transformer/tests/fixtures/peft_qv");
    assert_refused(
        &fisher_with(&su, &su.train, &out, &["--adapter", s(&minilm_adapter)]),
        &["peft_qv", "lora_A", "does not fit"],
    );
    // Header only.
    let empty = su.root.join("empty.tsv");
    fs::write(&empty, "sentence\tlabel\n").unwrap();
    assert_refused(&fisher_with(&su, &empty, &out, &[]), &["empty.tsv"]);
    // A label the adapter's 2-class head cannot produce.
    let adapter = su.root.join("adapter");
    let trained = train_with(&su, &su.model, &["--save-adapter", s(&adapter)]);
    assert_success(&trained);
    let three = su.root.join("three.tsv");
    fs::write(
        &three,
        "sentence\tlabel\ngood film\t0\nbad film\t1\nthe plot\t2\n",
    )
    .unwrap();
    assert_refused(
        &fisher_with(&su, &three, &out, &["--adapter", s(&adapter)]),
        &["three.tsv", "3 label values", "2 classes"],
    );
    // One class only: no classifier Fisher to speak of.
    let one = su.root.join("one.tsv");
    fs::write(&one, "sentence\tlabel\ngood film\t1\nfun film\t1\n").unwrap();
    assert_refused(
        &fisher_with(&su, &one, &out, &[]),
        &["one.tsv", "at least 2 classes"],
    );
    // Perturbation settings are checked before any work.
    assert_refused(
        &fisher_with(&su, &su.train, &out, &["--importance", "perturbation"]),
        &["--layer-importance"],
    );
    let layers = su.root.join("layers.json");
    assert_refused(
        &fisher_with(
            &su,
            &su.train,
            &out,
            &[
                "--importance",
                "perturbation",
                "--layer-importance",
                s(&layers),
                "--sigma",
                "0",
            ],
        ),
        &["--sigma"],
    );
    // A head so large that the logits overflow: the loss is NaN, named by sample.
    let weights = adapter.join("adapter_model.safetensors");
    let mut t = fibecfed_lora::io::read_safetensors(&weights).unwrap();
    t.get_mut("base_model.model.classifier.weight")
        .unwrap()
        .fill(3e38);
    fibecfed_lora::io::write_safetensors(&weights, &t, None).unwrap();
    assert_refused(
        &fisher_with(&su, &su.train, &out, &["--adapter", s(&adapter)]),
        &["sample", "not finite"],
    );
    assert!(!out.exists(), "nothing is written when the pass fails");
}
