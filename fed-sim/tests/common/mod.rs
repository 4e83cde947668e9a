//! Helpers shared by the binary's integration tests: the tiny BERT fixture with a
//! word-level tokenizer, a small sentiment TSV, and running `fibecfed`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const WORDS: [&str; 20] = [
    "good", "bad", "great", "awful", "movie", "film", "plot", "actors", "was", "is", "a", "the",
    "fun", "boring", "loved", "hated", "it", "very", "not", "and",
];

pub fn tiny_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../transformer/tests/fixtures/tiny-bert")
}

/// A copy of the tiny model with a whitespace word-level tokenizer.
pub fn tiny_model(dir: &Path) -> PathBuf {
    let m = dir.join("model");
    fs::create_dir_all(&m).unwrap();
    for f in ["config.json", "model.safetensors"] {
        fs::copy(tiny_fixture().join(f), m.join(f)).unwrap();
    }
    let mut vocab = serde_json::Map::new();
    for (i, w) in ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]
        .iter()
        .chain(WORDS.iter())
        .enumerate()
    {
        vocab.insert((*w).to_owned(), serde_json::json!(i));
    }
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {"type": "BertProcessing", "sep": ["[SEP]", 2], "cls": ["[CLS]", 1]},
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    fs::write(m.join("tokenizer.json"), tok.to_string()).unwrap();
    m
}

/// A small sentiment TSV: label 1 sentences use positive words.
pub fn tsv(path: &Path, n: usize) {
    let mut s = String::from("sentence\tlabel\n");
    for i in 0..n {
        let (w, y) = if i % 2 == 0 {
            (["good", "great", "fun", "loved"][i / 2 % 4], 1)
        } else {
            (["bad", "awful", "boring", "hated"][i / 2 % 4], 0)
        };
        let tail = if i % 3 == 0 { "and fun" } else { "" };
        writeln!(s, "the {} was very {w} {tail}\t{y}", WORDS[4 + i % 4]).unwrap();
    }
    fs::write(path, s).unwrap();
}

pub fn fibecfed(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fibecfed"))
        .args(args)
        .output()
        .expect("binary runs")
}

/// Merges TOML table `over` into `base`, table by table (later keys win).
pub fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Exit code 0; otherwise the failure shows the binary's stderr.
pub fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Exit code 2, a message containing every needle, and no panic.
pub fn assert_refused(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "expected exit 2, stderr:\n{err}"
    );
    assert!(!err.contains("panicked"), "panicked:\n{err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}:\n{err}");
    }
}

/// `fibecfed train` on the setup's data with `model`: batch 8, max length 32. The
/// values of `--train`, `--eval` and `--max-len` sit at indices 4, 6 and 8.
pub fn train_args<'a>(su: &'a Setup, model: &'a Path) -> Vec<&'a str> {
    vec![
        "train",
        "--model-dir",
        s(model),
        "--train",
        s(&su.train),
        "--eval",
        s(&su.eval),
        "--max-len",
        "32",
        "--batch-size",
        "8",
    ]
}

/// A temporary folder with the tiny model, `train.tsv` and `dev.tsv`.
pub struct Setup {
    pub _dir: tempfile::TempDir,
    pub root: PathBuf,
    pub model: PathBuf,
    pub train: PathBuf,
    pub eval: PathBuf,
}

pub fn setup(n_train: usize, n_eval: usize) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let model = tiny_model(&root);
    let (train, eval) = (root.join("train.tsv"), root.join("dev.tsv"));
    tsv(&train, n_train);
    tsv(&eval, n_eval);
    Setup {
        _dir: dir,
        root,
        model,
        train,
        eval,
    }
}

/// A `fibecfed client` federation config on the tiny model: `clients` parts, `rounds`
/// rounds at learning rate `lr`, the global layers chosen by `selector` (a TOML inline
/// table), then the TOML sections in `extra`.
pub fn federation_toml(
    su: &Setup,
    clients: usize,
    rounds: usize,
    lr: f64,
    selector: &str,
    extra: &str,
) -> String {
    format!(
        r#"
method = "fibecfed"
seed = 5
[model]
dir = "{}"
max_len = 32
[data]
train = "{}"
test = "{}"
[lora]
rank = 4
[federation]
clients = {clients}
rounds = {rounds}
batch_size = 4
lr = {lr:e}
[sharing]
selector = {selector}
{extra}"#,
        s(&su.model),
        s(&su.train),
        s(&su.eval)
    )
}
