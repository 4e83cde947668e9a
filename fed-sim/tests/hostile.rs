//! The hostile-input suite: every class of bad input the robustness issue named (output
//! paths that are inputs or user files, damaged or mismatched checkpoints, data and
//! configs that would "succeed" silently, inputs that would hang or exhaust memory,
//! settings whose failure would not name them), each case run through the binary.
//!
//! Every case asserts: exit status 2 with a message naming the culprit (or, where the
//! input is acceptable, success as documented), no panic, and no file changed, added or
//! removed outside the outputs the command was asked to write.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Setup, s, tsv};
use serde_json::Value;

/// What a case must end with.
enum Expect {
    /// Exit 2, stderr holding every needle.
    Refused(Vec<&'static str>),
    /// Exit 0: the input is acceptable (the case's name says why).
    Success,
}

/// One hostile input: the command to run, and the paths it may write.
struct Case {
    name: &'static str,
    args: Vec<String>,
    env: Vec<(&'static str, String)>,
    expect: Expect,
    /// Files or folders the command was asked to write; anything else must stay as it
    /// was.
    outputs: Vec<PathBuf>,
}

impl Case {
    fn new(name: &'static str, args: &[&str], expect: Expect) -> Self {
        Self {
            name,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            env: Vec::new(),
            expect,
            outputs: Vec::new(),
        }
    }

    fn writes(mut self, path: &Path) -> Self {
        self.outputs.push(path.to_path_buf());
        self
    }

    fn env(mut self, key: &'static str, value: &str) -> Self {
        self.env.push((key, value.to_owned()));
        self
    }
}

fn refused(needles: &[&'static str]) -> Expect {
    Expect::Refused(needles.to_vec())
}

/// Every regular file under `root` with its bytes; other entries (folders, FIFOs,
/// links) by kind only, so a FIFO is never opened.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let meta = fs::symlink_metadata(&p).unwrap();
            if meta.is_dir() {
                stack.push(p.clone());
                out.insert(p, None);
            } else if meta.is_file() {
                out.insert(p.clone(), Some(fs::read(&p).unwrap()));
            } else {
                out.insert(p, None);
            }
        }
    }
    out
}

/// Runs the binary with a deadline: a hang is a failure, not a stuck test.
fn run_bounded(args: &[String], env: &[(&'static str, String)], limit: Duration) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fibecfed"));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{args:?} still running after {limit:?} (hang); stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Runs a case; returns what went wrong, if anything.
fn check(root: &Path, case: &Case) -> Option<String> {
    let before = snapshot(root);
    let out = run_bounded(&case.args, &case.env, Duration::from_secs(60));
    let after = snapshot(root);
    let err = String::from_utf8_lossy(&out.stderr);
    // `HOSTILE_SHOW=1 cargo test --test hostile -- --nocapture` lists every message.
    if std::env::var_os("HOSTILE_SHOW").is_some() {
        println!(
            "{}:\n    {}",
            case.name,
            err.trim().lines().last().unwrap_or("")
        );
    }
    let mut problems = String::new();
    match &case.expect {
        Expect::Refused(needles) => {
            if out.status.code() != Some(2) {
                let _ = write!(problems, "exit {:?}, expected 2; ", out.status.code());
            }
            for n in needles {
                if !err.contains(n) {
                    let _ = write!(problems, "message lacks {n:?}; ");
                }
            }
        }
        Expect::Success => {
            if !out.status.success() {
                let _ = write!(problems, "exit {:?}, expected 0; ", out.status.code());
            }
        }
    }
    if err.contains("panicked") || err.contains("RUST_BACKTRACE") {
        problems.push_str("panicked; ");
    }
    let allowed = |p: &Path| case.outputs.iter().any(|o| p.starts_with(o));
    for (path, bytes) in &before {
        if !allowed(path) && after.get(path) != Some(bytes) {
            let _ = write!(problems, "{} changed or vanished; ", path.display());
        }
    }
    for path in after.keys() {
        if !allowed(path) && !before.contains_key(path) {
            let _ = write!(problems, "{} appeared; ", path.display());
        }
    }
    (!problems.is_empty()).then(|| format!("{}: {problems}\nstderr:\n{err}", case.name))
}

/// Runs every case, each in a fresh copy of the fixture, and reports all failures
/// together.
fn run_all(cases: &[(Setup, Case)]) {
    let total = cases.len();
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|(su, case)| check(&su.root, case))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {total} cases failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

fn setup() -> Setup {
    common::setup(24, 12)
}

/// A run config on the fixture, `extra` TOML merged over it.
fn run_config(su: &Setup, extra: &str) -> PathBuf {
    let base = common::federation_toml(
        su,
        2,
        2,
        1e-2,
        r#"{ kind = "consensus_top_k", fraction = 0.5 }"#,
        "",
    );
    let mut t: toml::Table = toml::from_str(&base).unwrap();
    let over: toml::Table = toml::from_str(extra).unwrap();
    for (k, v) in over {
        match (t.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => b.extend(o),
            (_, v) => {
                t.insert(k, v);
            }
        }
    }
    let path = su.root.join("run.toml");
    fs::write(&path, toml::to_string(&t).unwrap()).unwrap();
    path
}

fn run_case(name: &'static str, su: &Setup, extra: &str, expect: Expect) -> Case {
    let config = run_config(su, extra);
    let out = su.root.join("out");
    Case::new(
        name,
        &["run", "--config", s(&config), "--out", s(&out)],
        expect,
    )
    .writes(&out)
}

fn mkfifo(path: &Path) {
    let ok = Command::new("mkfifo").arg(path).status().unwrap().success();
    assert!(ok, "mkfifo {}", path.display());
}

fn fisher_args<'a>(su: &'a Setup, data: &'a Path, output: &'a Path) -> Vec<&'a str> {
    vec![
        "fisher",
        "--model-dir",
        s(&su.model),
        "--data",
        s(data),
        "--output",
        s(output),
        "--max-len",
        "32",
    ]
}

fn embed_args<'a>(su: &'a Setup, input: &'a Path, output: &'a Path) -> Vec<&'a str> {
    vec![
        "embed",
        "--model-dir",
        s(&su.model),
        "--input",
        s(input),
        "--output",
        s(output),
        "--max-len",
        "32",
    ]
}

fn with<'a>(mut base: Vec<&'a str>, extra: &[&'a str]) -> Vec<&'a str> {
    base.extend_from_slice(extra);
    base
}

#[test]
fn outputs_never_replace_inputs_or_user_files() {
    let mut cases = Vec::new();

    for file in ["config.toml", "metrics.jsonl", "partition.json"] {
        let su = setup();
        let out = su.root.join("out");
        fs::create_dir(&out).unwrap();
        fs::write(out.join(file), "the user's own file").unwrap();
        let config = run_config(&su, "");
        let name = match file {
            "config.toml" => "run --out holding a user's config.toml",
            "metrics.jsonl" => "run --out holding a user's metrics.jsonl",
            _ => "run --out holding a user's partition.json",
        };
        // Only the lock file may appear in the folder.
        let lock = out.join(".fibecfed.lock");
        let case = Case::new(
            name,
            &["run", "--config", s(&config), "--out", s(&out)],
            refused(&["already holds", file]),
        )
        .writes(&lock);
        cases.push((su, case));
    }

    let su = setup();
    let out = su.root.join("out-file");
    fs::write(&out, "not a folder").unwrap();
    let config = run_config(&su, "");
    let case = Case::new(
        "run --out naming a file",
        &["run", "--config", s(&config), "--out", s(&out)],
        refused(&["out-file", "not a folder"]),
    );
    cases.push((su, case));

    let su = setup();
    let config = run_config(&su, "");
    let inside = su.model.join("run");
    let case = Case::new(
        "run --out inside the model folder (success: new files harm no input)",
        &["run", "--config", s(&config), "--out", s(&inside)],
        Expect::Success,
    )
    .writes(&inside);
    cases.push((su, case));

    let su = setup();
    let data = su.train.clone();
    let case = Case::new(
        "fisher --output = --data",
        &fisher_args(&su, &data, &data),
        refused(&["--output", "--data", "destroy the input"]),
    );
    cases.push((su, case));

    let su = setup();
    let data = su.train.clone();
    fs::create_dir(su.root.join("sub")).unwrap();
    let dotted = su.root.join("sub/../train.tsv");
    let case = Case::new(
        "fisher --output = --data through ..",
        &fisher_args(&su, &data, &dotted),
        refused(&["--output", "--data"]),
    );
    cases.push((su, case));

    let su = setup();
    let data = su.train.clone();
    let link = su.root.join("hard-link.tsv");
    fs::hard_link(&data, &link).unwrap();
    let case = Case::new(
        "fisher --output a hard link of --data",
        &fisher_args(&su, &data, &link),
        refused(&["--output", "--data"]),
    );
    cases.push((su, case));

    let su = setup();
    let data = su.train.clone();
    let link = su.root.join("sym-link.tsv");
    std::os::unix::fs::symlink(&data, &link).unwrap();
    let case = Case::new(
        "fisher --output a symlink to --data",
        &fisher_args(&su, &data, &link),
        refused(&["--output", "--data"]),
    );
    cases.push((su, case));

    let su = setup();
    let (data, out) = (su.train.clone(), su.root.join("scores.jsonl"));
    let args = with(
        fisher_args(&su, &data, &out),
        &["--layer-importance", s(&out)],
    );
    let case = Case::new(
        "fisher --layer-importance = --output",
        &args,
        refused(&["--layer-importance", "--output", "both write"]),
    );
    cases.push((su, case));

    let su = setup();
    let (data, out) = (su.train.clone(), su.model.join("config.json"));
    let case = Case::new(
        "fisher --output = the model's config.json",
        &fisher_args(&su, &data, &out),
        refused(&["would replace a file of the input folder", "--model-dir"]),
    );
    cases.push((su, case));

    let su = setup();
    let input = su.root.join("lines.txt");
    fs::write(&input, "good movie\nbad plot\n").unwrap();
    let case = Case::new(
        "embed --output = --input",
        &embed_args(&su, &input, &input),
        refused(&["--output", "--input"]),
    );
    cases.push((su, case));

    let su = setup();
    let input = su.root.join("lines.txt");
    fs::write(&input, "good movie\n").unwrap();
    let tok = su.model.join("tokenizer.json");
    let case = Case::new(
        "embed --output = the model's tokenizer.json",
        &embed_args(&su, &input, &tok),
        refused(&["--model-dir"]),
    );
    cases.push((su, case));

    let su = setup();
    let adapter = su.root.join("adapter");
    let metrics = adapter.join("adapter_config.json");
    let args = with(
        common::train_args(&su, &su.model),
        &["--save-adapter", s(&adapter), "--metrics-out", s(&metrics)],
    );
    let case = Case::new(
        "train --metrics-out inside --save-adapter's config",
        &args,
        refused(&["--metrics-out", "--save-adapter"]),
    );
    cases.push((su, case));

    for (name, which) in [
        ("train --metrics-out = --train", "train"),
        ("train --metrics-out = --eval", "eval"),
    ] {
        let su = setup();
        let target = if which == "train" {
            su.train.clone()
        } else {
            su.eval.clone()
        };
        let args = with(
            common::train_args(&su, &su.model),
            &["--metrics-out", s(&target)],
        );
        let flag = if which == "train" {
            "--train"
        } else {
            "--eval"
        };
        let case = Case::new(name, &args, refused(&["--metrics-out", flag]));
        cases.push((su, case));
    }

    // Documented successes: the temporary file is ours, never the user's.
    let su = setup();
    let (data, out) = (su.train.clone(), su.root.join("scores.jsonl"));
    let victim = su.root.join("victim.txt");
    fs::write(&victim, "precious").unwrap();
    std::os::unix::fs::symlink(&victim, su.root.join("scores.jsonl.tmp")).unwrap();
    let case = Case::new(
        "fisher with a scores.jsonl.tmp symlink beside its output (success; the link's target is untouched)",
        &fisher_args(&su, &data, &out),
        Expect::Success,
    )
    .writes(&out);
    cases.push((su, case));

    let su = setup();
    let input = su.root.join("lines.txt");
    fs::write(&input, "good movie\n").unwrap();
    let out = su.root.join("emb.jsonl");
    fs::write(su.root.join("emb.jsonl.tmp"), "the user's own").unwrap();
    fs::write(su.root.join(".emb.jsonl.tmp"), "the user's own too").unwrap();
    let case = Case::new(
        "embed with the user's own emb.jsonl.tmp (success; the user's files kept)",
        &embed_args(&su, &input, &out),
        Expect::Success,
    )
    .writes(&out);
    cases.push((su, case));

    run_all(&cases);
}

/// A finished two-round run in `su.root/run`.
fn finished_run(su: &Setup) -> PathBuf {
    let config = run_config(su, "");
    let out = su.root.join("run");
    let o = run_bounded(
        &[
            "run".into(),
            "--config".into(),
            s(&config).into(),
            "--out".into(),
            s(&out).into(),
        ],
        &[],
        Duration::from_secs(120),
    );
    common::assert_success(&o);
    out
}

/// An edit of a checkpoint's JSON state and f32 tensors.
type Edit = dyn Fn(&mut Value, &mut BTreeMap<String, Vec<f32>>);

/// Rewrites a checkpoint with `edit` applied to its JSON state and its tensors.
fn edit_checkpoint(path: &Path, edit: impl FnOnce(&mut Value, &mut BTreeMap<String, Vec<f32>>)) {
    use safetensors::tensor::{Dtype, SafeTensors, TensorView};
    let bytes = fs::read(path).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    let mut state: Value = serde_json::from_str(&meta["fibecfed_state"]).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut f32s = BTreeMap::new();
    let mut others = Vec::new();
    for (name, view) in st.tensors() {
        if view.dtype() == Dtype::F32 {
            let v: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            f32s.insert(name.clone(), v);
        }
        others.push((
            name,
            view.dtype(),
            view.shape().to_vec(),
            view.data().to_vec(),
        ));
    }
    edit(&mut state, &mut f32s);
    let bufs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = others
        .into_iter()
        .map(|(name, dtype, shape, data)| {
            let data = match f32s.get(&name) {
                Some(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                None => data,
            };
            (name, dtype, shape, data)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = bufs
        .iter()
        .map(|(n, d, sh, data)| (n.clone(), TensorView::new(*d, sh.clone(), data).unwrap()))
        .collect();
    let mut m = std::collections::HashMap::new();
    m.insert("fibecfed_state".to_owned(), state.to_string());
    let out = safetensors::serialize(views, Some(m)).unwrap();
    fs::write(path, out).unwrap();
}

fn resume_case(name: &'static str, run: &Path, expect: Expect) -> Case {
    Case::new(name, &["run", "--resume", s(run)], expect).writes(&run.join(".fibecfed.lock"))
}

#[test]
fn resume_refuses_checkpoints_that_do_not_match() {
    let mut cases = Vec::new();
    let checkpoint_edits: Vec<(&'static str, Box<Edit>, Vec<&'static str>)> = vec![
        (
            "round 1 with the history of rounds 0..=2",
            Box::new(|v, _| v["round"] = 1.into()),
            vec!["checkpoint.safetensors", "does not match its history"],
        ),
        (
            "round 99 of 2",
            Box::new(|v, _| v["round"] = 99.into()),
            vec!["checkpoint.safetensors", "past the run's last round"],
        ),
        (
            "history with a round missing",
            Box::new(|v, _| {
                v["history"].as_array_mut().unwrap().remove(1);
            }),
            vec!["checkpoint.safetensors", "history"],
        ),
        (
            "global layers [0, 1, 99]",
            Box::new(|v, _| v["gal"] = serde_json::json!([0, 1, 99])),
            vec!["checkpoint.safetensors", "global layers", "99"],
        ),
        (
            "a repeated global layer",
            Box::new(|v, _| v["gal"] = serde_json::json!([1, 1])),
            vec!["checkpoint.safetensors", "global layers"],
        ),
        (
            "a NaN in a global tensor",
            Box::new(|_, t| {
                let name = t.keys().find(|n| n.starts_with("global/")).unwrap().clone();
                t.get_mut(&name).unwrap()[0] = f32::NAN;
            }),
            vec!["checkpoint.safetensors", "global/", "NaN"],
        ),
        (
            "an infinite client parameter",
            Box::new(|_, t| {
                let name = t.keys().find(|n| n.contains("/params/")).unwrap().clone();
                t.get_mut(&name).unwrap()[0] = f32::INFINITY;
            }),
            vec!["checkpoint.safetensors", "/params/"],
        ),
        (
            "another data digest",
            Box::new(|v, _| v["digest"] = "00".into()),
            vec!["checkpoint.safetensors", "data differ"],
        ),
        (
            "a curriculum order that is no permutation",
            Box::new(|v, _| {
                for c in v["clients"].as_array_mut().unwrap() {
                    c["order"] = serde_json::json!([0, 0]);
                }
            }),
            vec!["checkpoint.safetensors", "permutation"],
        ),
    ];
    for (name, edit, needles) in checkpoint_edits {
        let su = setup();
        let run = finished_run(&su);
        edit_checkpoint(&run.join("checkpoint.safetensors"), |v, t| edit(v, t));
        let case = resume_case(name, &run, Expect::Refused(needles));
        cases.push((su, case));
    }

    // Run folders of earlier versions keep resuming.
    let su = setup();
    let run = finished_run(&su);
    edit_checkpoint(&run.join("checkpoint.safetensors"), |v, _| {
        v.as_object_mut().unwrap().remove("digest").unwrap();
    });
    let case = resume_case(
        "a checkpoint of an earlier version, without a data digest (success)",
        &run,
        Expect::Success,
    )
    .writes(&run.join("metrics.jsonl"));
    cases.push((su, case));

    let su = setup();
    let run = finished_run(&su);
    let old = |text: &str| text.replace("alpha = 16.0", "alpha = 0.0");
    let path = run.join("config.toml");
    let text = fs::read_to_string(&path).unwrap();
    assert!(text.contains("alpha = 16.0"), "{text}");
    fs::write(&path, old(&text)).unwrap();
    edit_checkpoint(&run.join("checkpoint.safetensors"), |v, _| {
        v["config"] = old(v["config"].as_str().unwrap()).into();
    });
    let case = resume_case(
        "a folder made before lora.alpha had to be positive (success: new bounds apply to new runs)",
        &run,
        Expect::Success,
    )
    .writes(&run.join("metrics.jsonl"));
    cases.push((su, case));

    let su = setup();
    let run = finished_run(&su);
    // Every training label flipped: same sizes, other data.
    let text = fs::read_to_string(&su.train).unwrap();
    let flipped: String = text
        .lines()
        .map(|l| match l.rsplit_once('\t') {
            Some((t, "0")) => format!("{t}\t1\n"),
            Some((t, "1")) => format!("{t}\t0\n"),
            _ => format!("{l}\n"),
        })
        .collect();
    fs::write(&su.train, flipped).unwrap();
    let case = resume_case(
        "every training label flipped",
        &run,
        refused(&["data differ", "other contents"]),
    );
    cases.push((su, case));

    let su = setup();
    let run = finished_run(&su);
    tsv(&su.train, 20);
    let case = resume_case("fewer training examples", &run, refused(&["data differ"]));
    cases.push((su, case));

    let su = setup();
    let run = finished_run(&su);
    let path = run.join("config.toml");
    let text = fs::read_to_string(&path).unwrap();
    fs::write(&path, format!("# my note\n{text}\n# another\n")).unwrap();
    let case = resume_case(
        "a comment added to config.toml (success: the config is compared as parsed)",
        &run,
        Expect::Success,
    )
    .writes(&run.join("metrics.jsonl"));
    cases.push((su, case));

    let su = setup();
    let run = finished_run(&su);
    let path = run.join("config.toml");
    let text = fs::read_to_string(&path).unwrap();
    fs::write(&path, text.replace("seed = 5", "seed = 6")).unwrap();
    let case = resume_case(
        "another seed in config.toml",
        &run,
        refused(&["config.toml differs", "changed: seed"]),
    );
    cases.push((su, case));

    let su = setup();
    let run = finished_run(&su);
    let path = run.join("checkpoint.safetensors");
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() / 3]).unwrap();
    let case = resume_case(
        "a truncated checkpoint",
        &run,
        refused(&["checkpoint", "damaged"]),
    );
    cases.push((su, case));

    let su = setup();
    let run = finished_run(&su);
    fs::remove_file(run.join("checkpoint.safetensors")).unwrap();
    let case = resume_case(
        "no checkpoint",
        &run,
        refused(&["no checkpoint.safetensors"]),
    );
    cases.push((su, case));

    let su = setup();
    let nowhere = su.root.join("nowhere");
    let case = Case::new(
        "--resume of a folder that does not exist",
        &["run", "--resume", s(&nowhere)],
        refused(&["nowhere", "config.toml"]),
    );
    cases.push((su, case));

    let su = setup();
    let run = finished_run(&su);
    fs::remove_file(&su.train).unwrap();
    mkfifo(&su.train);
    let case = resume_case(
        "the training file replaced by a FIFO",
        &run,
        refused(&["data.train", "not a regular file"]),
    );
    cases.push((su, case));

    let su = setup();
    let run = finished_run(&su);
    let out = su.root.join("run");
    let config = run_config(&su, "");
    let case = Case::new(
        "a new run into a finished run's folder",
        &["run", "--config", s(&config), "--out", s(&out)],
        refused(&["already holds", "--resume"]),
    )
    .writes(&run.join(".fibecfed.lock"));
    cases.push((su, case));

    run_all(&cases);
}

#[test]
fn bad_data_and_settings_never_succeed_silently() {
    let mut cases = Vec::new();

    let su = setup();
    fs::write(&su.train, "sentence\tlabel\ngood movie\t1\ngreat plot\t1\n").unwrap();
    cases.push((
        run_case(
            "run on single-class training data",
            &su,
            "",
            refused(&["train.tsv", "at least 2 classes"]),
        ),
        su,
    ));
    let su = setup();
    fs::write(&su.train, "sentence\tlabel\ngood movie\t1\ngreat plot\t1\n").unwrap();
    let case = Case::new(
        "train on single-class training data",
        &common::train_args(&su, &su.model),
        refused(&["train.tsv", "at least 2 classes"]),
    );
    cases.push((case, su));

    let su = setup();
    cases.push((
        run_case(
            "lora.frozen = [a, b] with sharing.factors = [] (success: head-only training)",
            &su,
            "[lora]\nfrozen = [\"a\", \"b\"]\n[sharing]\nfactors = []\n",
            Expect::Success,
        ),
        su,
    ));
    let su = setup();
    cases.push((
        run_case(
            "lora.frozen = [a, b]",
            &su,
            "[lora]\nfrozen = [\"a\", \"b\"]\n",
            refused(&["lora.frozen"]),
        ),
        su,
    ));
    let su = setup();
    cases.push((
        run_case(
            "sparse.prune with lora.frozen = [b]",
            &su,
            "[lora]\nfrozen = [\"b\"]\n[sparse.prune]\nratio = 0.1\n",
            refused(&["sparse.prune", "lora.frozen"]),
        ),
        su,
    ));

    // A character-level BPE tokenizer of another model: no [CLS]/[SEP].
    let su = setup();
    let mut vocab = serde_json::Map::new();
    for (i, c) in "abcdefghijklmnopqrstuvwxyz ".chars().enumerate() {
        vocab.insert(c.to_string(), i.into());
    }
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
        "model": {"type": "BPE", "vocab": vocab, "merges": [], "dropout": null,
                  "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false}
    });
    fs::write(su.model.join("tokenizer.json"), tok.to_string()).unwrap();
    let case = Case::new(
        "a tokenizer without [CLS] and [SEP]",
        &common::train_args(&su, &su.model),
        refused(&["tokenizer.json", "[CLS]", "another model"]),
    );
    cases.push((case, su));

    // A word-level tokenizer with more ids than the embedding has rows.
    let su = setup();
    let path = su.model.join("tokenizer.json");
    let mut tok: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
    for i in 0..5000 {
        vocab.insert(format!("w{i}"), (24 + i).into());
    }
    fs::write(&path, tok.to_string()).unwrap();
    let case = Case::new(
        "a tokenizer with more tokens than embedding rows",
        &common::train_args(&su, &su.model),
        refused(&["tokenizer.json", "embedding table"]),
    );
    cases.push((case, su));

    let su = setup();
    let input = su.root.join("lines.txt");
    fs::write(&input, "good movie\n").unwrap();
    let out = su.root.join("emb.jsonl");
    let case = Case::new(
        "embed --batch-size 0",
        &with(embed_args(&su, &input, &out), &["--batch-size", "0"]),
        refused(&["--batch-size"]),
    );
    cases.push((case, su));

    let su = setup();
    let out = su.root.join("scores.jsonl");
    let data = su.train.clone();
    let case = Case::new(
        "fisher --batch-size 0",
        &with(fisher_args(&su, &data, &out), &["--batch-size", "0"]),
        refused(&["--batch-size"]),
    );
    cases.push((case, su));

    let su = setup();
    let case = Case::new(
        "train --limit-train 0",
        &with(common::train_args(&su, &su.model), &["--limit-train", "0"]),
        refused(&["--limit-train"]),
    );
    cases.push((case, su));

    let su = setup();
    fs::write(&su.train, "").unwrap();
    let case = Case::new(
        "an empty training file",
        &common::train_args(&su, &su.model),
        refused(&["train.tsv", "empty"]),
    );
    cases.push((case, su));

    let su = setup();
    fs::write(
        &su.train,
        "sentence\tlabel\ngood movie\t1\n\t0\nbad movie\t0\n",
    )
    .unwrap();
    let case = Case::new(
        "a line with an empty sentence",
        &common::train_args(&su, &su.model),
        refused(&["train.tsv:3", "empty sentence"]),
    );
    cases.push((case, su));

    let su = setup();
    fs::write(
        &su.train,
        "sentence\tlabel\ngood movie\t1\n\n   \nbad movie\t0\n",
    )
    .unwrap();
    let case = Case::new(
        "empty and blank lines between examples (success: skipped, as documented)",
        &common::train_args(&su, &su.model),
        Expect::Success,
    );
    cases.push((case, su));

    let su = setup();
    let input = su.root.join("lines.txt");
    fs::write(&input, "good movie\n\nbad plot\n").unwrap();
    let out = su.root.join("emb.jsonl");
    let case = Case::new(
        "embed input with an empty line (success: it embeds the empty text)",
        &embed_args(&su, &input, &out),
        Expect::Success,
    )
    .writes(&out);
    cases.push((case, su));

    let su = setup();
    let trec = su.root.join("trec");
    fs::create_dir(&trec).unwrap();
    let train = trec.join("train.tsv");
    tsv(&train, 16);
    let case = Case::new(
        "0/1 labels in a folder named trec",
        &[
            "train",
            "--model-dir",
            s(&su.model),
            "--train",
            s(&train),
            "--eval",
            s(&train),
            "--max-len",
            "32",
        ],
        refused(&["trec", "folder name", "unknown label"]),
    );
    cases.push((case, su));

    run_all(&cases.into_iter().map(|(c, su)| (su, c)).collect::<Vec<_>>());
}

#[test]
fn inputs_that_would_hang_or_exhaust_memory_are_refused() {
    let mut cases = Vec::new();

    let su = setup();
    let fifo = su.root.join("fifo.tsv");
    mkfifo(&fifo);
    let config = run_config(&su, "");
    let out = su.root.join("out");
    // The output folder must not even be created.
    let case = Case::new(
        "run --train FIFO",
        &[
            "run",
            "--config",
            s(&config),
            "--out",
            s(&out),
            "--train",
            s(&fifo),
        ],
        refused(&["fifo.tsv", "not a regular file"]),
    );
    cases.push((su, case));

    // The value after `--train` (slot 4) or `--eval` (slot 6) of `train_args`.
    for (name, slot, flag) in [
        ("train --train FIFO", 4, "--train"),
        ("train --eval FIFO", 6, "--eval"),
    ] {
        let su = setup();
        let fifo = su.root.join("fifo.tsv");
        mkfifo(&fifo);
        let mut args = common::train_args(&su, &su.model);
        args[slot] = s(&fifo);
        let case = Case::new(name, &args, refused(&[flag, "not a regular file"]));
        cases.push((su, case));
    }

    let su = setup();
    let fifo = su.root.join("fifo.txt");
    mkfifo(&fifo);
    let out = su.root.join("emb.jsonl");
    let case = Case::new(
        "embed --input FIFO",
        &embed_args(&su, &fifo, &out),
        refused(&["--input", "not a regular file"]),
    );
    cases.push((su, case));

    let su = setup();
    let fifo = su.root.join("fifo.tsv");
    mkfifo(&fifo);
    let out = su.root.join("scores.jsonl");
    let case = Case::new(
        "fisher --data FIFO",
        &fisher_args(&su, &fifo, &out),
        refused(&["--data", "not a regular file"]),
    );
    cases.push((su, case));

    let su = setup();
    let case = Case::new(
        "train --train a folder",
        &{
            let mut a = common::train_args(&su, &su.model);
            a[4] = s(&su.model);
            a
        },
        refused(&["--train", "not a regular file"]),
    );
    cases.push((su, case));

    let su = setup();
    let case = run_case(
        "federation.clients = 1000000",
        &su,
        "[federation]\nclients = 1000000\n",
        refused(&["federation.clients", "1000000"]),
    );
    cases.push((su, case));

    let su = setup();
    let case = run_case(
        "partition.shards_per_client = 900000",
        &su,
        "[partition]\nkind = \"shards\"\nshards_per_client = 900000\n",
        refused(&["partition.shards_per_client"]),
    );
    cases.push((su, case));

    let su = setup();
    let case = run_case(
        "more shards than training examples (success: some clients are empty, as before)",
        &su,
        "[partition]\nkind = \"shards\"\nshards_per_client = 20\n",
        Expect::Success,
    );
    cases.push((su, case));

    for value in ["100000", "many", "-1"] {
        let su = setup();
        let case = Case::new(
            match value {
                "100000" => "RAYON_NUM_THREADS=100000",
                "many" => "RAYON_NUM_THREADS=many",
                _ => "RAYON_NUM_THREADS=-1",
            },
            &common::train_args(&su, &su.model),
            refused(&["RAYON_NUM_THREADS"]),
        )
        .env("RAYON_NUM_THREADS", value);
        cases.push((su, case));
    }

    let su = setup();
    let case = Case::new(
        "RAYON_NUM_THREADS set but empty (success: read as unset, as rayon does)",
        &common::train_args(&su, &su.model),
        Expect::Success,
    )
    .env("RAYON_NUM_THREADS", "");
    cases.push((su, case));

    let su = setup();
    let case = Case::new(
        "RAYON_NUM_THREADS=3 (success: any count up to 1024 gives the same results)",
        &common::train_args(&su, &su.model),
        Expect::Success,
    )
    .env("RAYON_NUM_THREADS", "3");
    cases.push((su, case));

    run_all(&cases);
}

#[test]
fn every_bad_setting_is_named() {
    let table: Vec<(&'static str, &str, Vec<&'static str>)> = vec![
        (
            "lora.alpha = -1e30",
            "[lora]\nalpha = -1e30\n",
            vec!["lora.alpha"],
        ),
        (
            "lora.alpha = 1e30",
            "[lora]\nalpha = 1e30\n",
            vec!["lora.alpha"],
        ),
        (
            "lora.alpha = 0",
            "[lora]\nalpha = 0.0\n",
            vec!["lora.alpha"],
        ),
        (
            "model.max_len = 3",
            "[model]\nmax_len = 3\n",
            vec!["model.max_len"],
        ),
        (
            "model.max_len = 1",
            "[model]\nmax_len = 1\n",
            vec!["model.max_len"],
        ),
        (
            "model.dir = \"\"",
            "[model]\ndir = \"\"\n",
            vec!["model.dir", "empty"],
        ),
        (
            "data.train = \"\"",
            "[data]\ntrain = \"\"\n",
            vec!["data.train", "empty"],
        ),
        (
            "simulation.seconds_per_token = 1e308",
            "[simulation]\nseconds_per_token = 1e308\n",
            vec!["simulation.seconds_per_token"],
        ),
        (
            "simulation.upload_bytes_per_second = 0",
            "[simulation]\nupload_bytes_per_second = 0.0\n",
            vec!["simulation.upload_bytes_per_second"],
        ),
        (
            "federation.fraction = 2",
            "[federation]\nfraction = 2.0\n",
            vec!["federation.fraction"],
        ),
        (
            "federation.rounds = 0",
            "[federation]\nrounds = 0\n",
            vec!["federation.rounds"],
        ),
        (
            "federation.lr = nan",
            "[federation]\nlr = nan\n",
            vec!["federation.lr"],
        ),
        (
            "federation.lr = -1",
            "[federation]\nlr = -1.0\n",
            vec!["federation.lr"],
        ),
        (
            "federation.clients = 0",
            "[federation]\nclients = 0\n",
            vec!["federation.clients"],
        ),
        (
            "sparse.rho = 0",
            "[sparse]\nrho = 0.0\n",
            vec!["sparse.rho"],
        ),
        (
            "sparse.gamma = 2",
            "[sparse]\ngamma = 2.0\n",
            vec!["sparse.gamma"],
        ),
        (
            "partition alpha = -1",
            "[partition]\nkind = \"dirichlet\"\nalpha = -1.0\n",
            vec!["partition", "alpha"],
        ),
        (
            "an unknown key",
            "[federation]\nrounds_ = 3\n",
            vec!["rounds_"],
        ),
        (
            "a value of the wrong type",
            "[federation]\nrounds = \"3\"\n",
            vec!["rounds"],
        ),
        (
            "lora.targets = []",
            "[lora]\ntargets = []\n",
            vec!["lora.targets"],
        ),
        ("lora.rank = 0", "[lora]\nrank = 0\n", vec!["lora.rank"]),
        (
            "sharing.head = \"frozn\"",
            "[sharing]\nhead = \"frozn\"\n",
            vec!["sharing.head", "frozn"],
        ),
        (
            "an unknown end of the layer ranking",
            "[sharing.selector]\nkind = \"consensus_top_k\"\nend = \"middle\"\n",
            vec!["sharing.selector", "middle"],
        ),
        (
            "federation.max_grad_norm = 0",
            "[federation]\nmax_grad_norm = 0.0\n",
            vec!["federation.max_grad_norm"],
        ),
        (
            "lora.dropout = 1",
            "[lora]\ndropout = 1.0\n",
            vec!["lora.dropout"],
        ),
        (
            "client.prox_mu = -1",
            "[client]\nprox_mu = -1.0\n",
            vec!["client.prox_mu"],
        ),
        (
            "an unknown selector kind",
            "[sharing.selector]\nkind = \"best_layers\"\n",
            vec!["best_layers"],
        ),
        (
            "sparse.prune.ratio = 1",
            "[sparse.prune]\nratio = 1.0\n",
            vec!["sparse.prune.ratio"],
        ),
        (
            "sparse.prune.epochs = 0",
            "[sparse.prune]\nepochs = 0\n",
            vec!["sparse.prune.epochs"],
        ),
        (
            "sparse.prune.momentum = 1.5",
            "[sparse.prune]\nmomentum = 1.5\n",
            vec!["sparse.prune.momentum"],
        ),
        (
            "sharing.adversarial_step = NaN",
            "[sharing]\nadversarial_step = nan\n",
            vec!["sharing.adversarial_step"],
        ),
        (
            "sharing.adversarial_samples = 0",
            "[sharing]\nadversarial_samples = 0\n",
            vec!["sharing.adversarial_samples"],
        ),
        (
            "an unknown curriculum unit",
            "[curriculum]\nunit = \"token\"\n",
            vec!["unit", "token"],
        ),
    ];
    let mut cases = Vec::new();
    for (name, extra, needles) in table {
        let su = setup();
        let mut case = run_case(name, &su, extra, Expect::Refused(needles));
        // Refused before the folder is made.
        case.outputs.clear();
        cases.push((su, case));
    }

    for (name, flag, value) in [
        ("train --lora-alpha=-1", "--lora-alpha", "-1"),
        ("train --lora-alpha 1e30", "--lora-alpha", "1e30"),
        ("train --max-len 3", "--max-len", "3"),
        ("train --lr inf", "--lr", "inf"),
        ("train --max-grad-norm=-1", "--max-grad-norm", "-1"),
    ] {
        let su = setup();
        let joined;
        let mut args = common::train_args(&su, &su.model);
        if flag == "--max-len" {
            args[8] = value;
        } else {
            // `--flag=value`: clap would read a lone `-1` as a flag.
            joined = format!("{flag}={value}");
            args.push(&joined);
        }
        let case = Case::new(name, &args, refused(&[flag]));
        cases.push((su, case));
    }

    let su = setup();
    let certs = su.root.join("roots.pem");
    fs::write(
        &certs,
        (0..200u8).map(|i| i.wrapping_mul(37)).collect::<Vec<_>>(),
    )
    .unwrap();
    let config = run_config(&su, "");
    let case = Case::new(
        "client --root-certificates of random bytes",
        &[
            "client",
            "--config",
            s(&config),
            "--client-id",
            "0",
            "--server",
            "127.0.0.1:9",
            "--root-certificates",
            s(&certs),
        ],
        refused(&["roots.pem"]),
    );
    cases.push((su, case));

    let su = setup();
    let config = run_config(&su, "");
    let case = Case::new(
        "client --client-id out of range",
        &[
            "client",
            "--config",
            s(&config),
            "--client-id",
            "7",
            "--server",
            "127.0.0.1:9",
        ],
        refused(&["--client-id", "federation.clients"]),
    );
    cases.push((su, case));

    let su = setup();
    fs::remove_file(su.model.join("config.json")).unwrap();
    let case = Case::new(
        "a model folder without config.json",
        &common::train_args(&su, &su.model),
        refused(&["config.json"]),
    );
    cases.push((su, case));

    let su = setup();
    let config = run_config(&su, "");
    let out = su.root.join("out");
    let case = Case::new(
        "--resume together with --config",
        &[
            "run",
            "--config",
            s(&config),
            "--out",
            s(&out),
            "--resume",
            s(&out),
        ],
        refused(&["--resume"]),
    );
    cases.push((su, case));

    run_all(&cases);
}

/// Waits until the child's stderr shows `needle`, keeping the rest of stderr.
fn wait_for(child: &mut std::process::Child, needle: &str) {
    use std::io::{BufRead, BufReader};
    let stderr = child.stderr.take().unwrap();
    let needle = needle.to_owned();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains(&needle) {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(120))
        .expect("the run never reached the hook");
}

#[test]
fn concurrent_runs_into_one_folder_refuse_and_corrupt_nothing() {
    let su = setup();
    let config = run_config(&su, "[federation]\nrounds = 3\n");
    let out = su.root.join("out");
    // The first run holds the folder, parked inside round 2.
    let mut first = Command::new(env!("CARGO_BIN_EXE_fibecfed"));
    first
        .args([
            "run",
            "--config",
            s(&config),
            "--out",
            s(&out),
            "--seed",
            "1",
        ])
        .env("FIBECFED_TEST_HANG_ROUND", "2")
        .stderr(Stdio::piped());
    let mut first = first.spawn().unwrap();
    wait_for(&mut first, "test hook: round 2 trained");
    let held = snapshot(&out);

    let second = run_bounded(
        &[
            "run".into(),
            "--config".into(),
            s(&config).into(),
            "--out".into(),
            s(&out).into(),
            "--seed".into(),
            "2".into(),
        ],
        &[],
        Duration::from_secs(60),
    );
    common::assert_refused(&second, &["in use by another fibecfed process", "out"]);
    let resume = run_bounded(
        &["run".into(), "--resume".into(), s(&out).into()],
        &[],
        Duration::from_secs(60),
    );
    common::assert_refused(&resume, &["in use by another fibecfed process"]);
    assert_eq!(snapshot(&out), held, "a refused run changed the folder");

    first.kill().unwrap();
    first.wait().unwrap();
    // The lock died with its holder: the run resumes, and is seed 1's throughout.
    let resumed = run_bounded(
        &["run".into(), "--resume".into(), s(&out).into()],
        &[],
        Duration::from_secs(120),
    );
    common::assert_success(&resumed);
    let config = fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(config.contains("seed = 1"), "{config}");
    let metrics = fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let seeds: Vec<u64> = metrics
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["seed"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(seeds, vec![1, 1, 1, 1], "{metrics}");
}
