//! `fibecfed run` with the LLaMA decoder (`model.kind = "llama"`): on the real SmolLM2
//! GGUF (FIBECFED_SMOLLM2_GGUF, which `cargo xtask test` sets; "skipped" without it) a
//! small FibecFed run gives the same metrics at 1 and 2 threads and sends exactly the
//! global layers' LoRA factors (no head); bad configs and malformed GGUF files exit 2
//! with the key, file or tensor named.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{assert_refused, assert_success, fibecfed, s, tsv};
use fibecfed_lora::params::peft_site_name;
use fibecfed_lora::{SiteId, SiteKind};
use ndarray::ArrayD;

fn gguf(test: &str) -> Option<PathBuf> {
    use std::io::Write as _;
    let file = std::env::var_os("FIBECFED_SMOLLM2_GGUF").map(PathBuf::from);
    if file.is_none() {
        let line = format!("skipped: {test}: FIBECFED_SMOLLM2_GGUF is not set\n");
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }
    file
}

/// FibecFed as configs/fibecfed.toml has it, at a size that runs in seconds.
fn config(file: &Path, data: &Path, extra: &str) -> String {
    format!(
        r#"method = "fibecfed"
seed = 7
[model]
kind = "llama"
file = "{file}"
max_len = 24
[data]
train = "{train}"
test = "{test}"
[federation]
clients = 3
fraction = 0.67
rounds = 1
local_epochs = 1
batch_size = 4
lr = 2e-3
max_grad_norm = 1.0
[lora]
targets = ["q_proj", "v_proj"]
dropout = 0.05
[curriculum]
scorer = "fisher"
ordering = "easy_first"
pacing = {{ kind = "linear", c0 = 0.6, lambda = 0.8 }}
unit = "batch"
[sharing]
selector = {{ kind = "consensus_top_k", fraction = 0.75, end = "least", weighting = "equal" }}
importance = "adversarial"
adversarial_samples = 4
head = "none"
[sparse]
rho = 1.0
[sparse.prune]
ratio = 0.05
epochs = 1
momentum = 0.5
[aggregator]
kind = "fedavg"
{extra}"#,
        file = file.display(),
        train = data.join("train.tsv").display(),
        test = data.join("dev.tsv").display(),
    )
}

/// A folder named like one of the nine datasets, so the authors' template applies.
fn data(root: &Path, name: &str) -> PathBuf {
    let d = root.join(name);
    fs::create_dir_all(&d).unwrap();
    tsv(&d.join("train.tsv"), 18);
    tsv(&d.join("dev.tsv"), 8);
    d
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("wall_seconds");
            v
        })
        .collect()
}

/// The byte just after tensor `name`'s name in the file's tensor table (the name is
/// preceded by its u64 length; the metadata never holds it with that prefix).
fn tensor_entry(bytes: &[u8], name: &str) -> usize {
    let mut key = (name.len() as u64).to_le_bytes().to_vec();
    key.extend_from_slice(name.as_bytes());
    let at = bytes
        .windows(key.len())
        .position(|w| w == key.as_slice())
        .expect("tensor in the table");
    at + key.len()
}

#[test]
fn llama_run_is_thread_count_invariant_and_sends_no_head() {
    let Some(file) = gguf("llama_run_is_thread_count_invariant_and_sends_no_head") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let d = data(tmp.path(), "sst-2");
    let cfg = tmp.path().join("run.toml");
    fs::write(&cfg, config(&file, &d, "")).unwrap();
    let mut runs = Vec::new();
    for threads in ["1", "2"] {
        let out = tmp.path().join(format!("out{threads}"));
        let o = Command::new(env!("CARGO_BIN_EXE_fibecfed"))
            .args(["run", "--config", s(&cfg), "--out", s(&out)])
            .env("RAYON_NUM_THREADS", threads)
            .output()
            .unwrap();
        assert_success(&o);
        runs.push(metrics(&out));
    }
    assert_eq!(runs[0], runs[1], "metrics differ between 1 and 2 threads");
    let round1 = &runs[0][1];
    assert!(round1["accuracy"].as_f64().unwrap().is_finite());
    let gal: Vec<usize> = round1["gal"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    // 75% of SmolLM2's 30 layers travel.
    assert_eq!(gal.len(), 23);
    // One upload = the safetensors message of the global layers' q and v factors.
    let mut message = fibecfed_aggregation::Tensors::new();
    for &l in &gal {
        for (kind, out) in [(SiteKind::Query, 576), (SiteKind::Value, 192)] {
            let site = SiteId::new(l, kind);
            message.insert(
                peft_site_name(site, "lora_A"),
                ArrayD::<f32>::zeros(vec![8, 576]),
            );
            message.insert(
                peft_site_name(site, "lora_B"),
                ArrayD::<f32>::zeros(vec![out, 8]),
            );
        }
    }
    let one = fibecfed_aggregation::message_bytes(&message).unwrap();
    let selected = round1["selected"].as_array().unwrap().len() as u64;
    assert_eq!(selected, 2);
    assert_eq!(round1["bytes_up"].as_u64().unwrap(), selected * one);
}

#[test]
fn llama_bad_configs_and_files_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let d = data(tmp.path(), "sst-2");
    let run = |text: String, name: &str| {
        let cfg = tmp.path().join(format!("{name}.toml"));
        fs::write(&cfg, text).unwrap();
        fibecfed(&[
            "run",
            "--config",
            s(&cfg),
            "--out",
            s(&tmp.path().join(name)),
        ])
    };
    let fake = tmp.path().join("none.gguf");
    // Decided from the config alone, before any model file is read.
    let shared = config(&fake, &d, "").replace("head = \"none\"", "head = \"shared\"");
    assert_refused(&run(shared, "head"), &["sharing.head", "none"]);
    let no_file = config(&fake, &d, "").replace(&format!("file = \"{}\"\n", fake.display()), "");
    assert_refused(&run(no_file, "nofile"), &["model.file"]);
    let bert_none = config(&fake, &d, "")
        .replace("kind = \"llama\"\n", "")
        .replace(&format!("file = \"{}\"\n", fake.display()), "");
    assert_refused(&run(bert_none, "bertnone"), &["sharing.head", "none"]);
    assert_refused(
        &run(config(&fake, &d, ""), "missing"),
        &["model.file", "none.gguf"],
    );
    // A GGUF that is not a LLaMA with a tokenizer: the missing key is named.
    let small = Path::new(env!("CARGO_MANIFEST_DIR")).join("../gguf/tests/fixtures/small.gguf");
    assert_refused(
        &run(config(&small, &d, ""), "small"),
        &["small.gguf", "tokenizer.ggml"],
    );
    let Some(file) = gguf("llama_bad_configs_and_files_exit_2 (real-file cases)") else {
        return;
    };
    // Truncated: the tensor data is cut off.
    let bytes = fs::read(&file).unwrap();
    let cut = tmp.path().join("cut.gguf");
    fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    assert_refused(&run(config(&cut, &d, ""), "cut"), &["cut.gguf"]);
    // Lying tensor table entries of the real file: an unknown type, an offset beyond
    // the data; each refusal names the tensor.
    let patched = |name: &str, edit: &dyn Fn(&mut [u8], usize, usize)| {
        let mut b = bytes.clone();
        let at = tensor_entry(&b, "blk.3.attn_q.weight");
        // After the name: u32 n_dims, n_dims × u64 dims, u32 type, u64 offset.
        let dims = u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize;
        let type_at = at + 4 + 8 * dims;
        edit(&mut b, type_at, type_at + 4);
        let f = tmp.path().join(format!("{name}.gguf"));
        fs::write(&f, &b).unwrap();
        f
    };
    let unknown = patched("unknown", &|b, ty, _| {
        b[ty..ty + 4].copy_from_slice(&99u32.to_le_bytes());
    });
    assert_refused(
        &run(config(&unknown, &d, ""), "unknown"),
        &["unknown.gguf", "blk.3.attn_q.weight"],
    );
    let lying = patched("lying", &|b, _, off| {
        b[off..off + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    });
    assert_refused(
        &run(config(&lying, &d, ""), "lying"),
        &["lying.gguf", "blk.3.attn_q.weight"],
    );
    // A label word of several tokens, and a label without a word.
    let two = config(&file, &d, "").replace(
        "max_len = 24",
        "max_len = 24\ntemplate = \"{a} It was\"\nlabel_words = { \"0\" = \" xqzvkjw\", \"1\" = \" great\" }",
    );
    assert_refused(
        &run(two, "two"),
        &["model.label_words", "xqzvkjw", "tokens"],
    );
    let missing = config(&file, &d, "").replace(
        "max_len = 24",
        "max_len = 24\ntemplate = \"{a} It was\"\nlabel_words = { \"1\" = \" great\" }",
    );
    assert_refused(&run(missing, "word"), &["model.label_words", "\"0\""]);
}
