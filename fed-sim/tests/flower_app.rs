//! FibecFed through the Python bindings (the `fibecfed` wheel) and on a real Flower
//! deployment, against `fibecfed run` with the same config and seed.
//!
//! - `bindings_federate_like_fibecfed_run`: `python/examples/federate.py` (the doc
//!   example: a Server and one Node per client in one process) in a fresh venv holding
//!   only the wheel and numpy. Its metrics must equal `fibecfed run`'s, bit for bit.
//! - `flower_deployment_matches_the_simulation`: `flower-superlink --insecure`, three
//!   `flower-supernode` (client ids 0..2) and a fourth whose node config is bad, and
//!   `flwr run` of the app in `flower/app`, 3 rounds on the tiny model. One SuperNode
//!   is killed with SIGKILL while it trains in round 2 and restarted. The run must
//!   complete, report the bad node by its config key, choose the shared layers by the
//!   consensus of the reports, and write metrics equal to `fibecfed run`'s bit for bit
//!   (accuracy, loss, bytes, and every other field but the wall-clock time).
//!
//! Both need Python environments that `cargo xtask flower-e2e` makes (it builds the
//! wheel first): FIBECFED_BINDINGS_PYTHON and FIBECFED_FLWR_PYTHON. Plain `cargo test`
//! lists them as ignored.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Setup, assert_success, s};
use serde_json::Value;

/// The tiny model's settings, then FibecFed as its authors ran it (configs/
/// fibecfed.toml: batch curriculum, adversarial layer scores with the consensus,
/// pruning), with one of the two layers shared and a simulated dropout, so that every
/// server step runs: the consensus, sampling with failures, aggregation, pruning.
fn config(su: &Setup, clients: usize) -> String {
    let base = format!(
        r#"
seed = 11
[model]
dir = "{model}"
max_len = 32
[data]
train = "{train}"
test = "{test}"
[lora]
rank = 4
[federation]
clients = {clients}
fraction = 0.67
rounds = 3
batch_size = 8
lr = 1e-2
dropout_probability = 0.2
"#,
        model = s(&su.model),
        train = s(&su.train),
        test = s(&su.eval),
    );
    let mut t: toml::Table = toml::from_str(&base).unwrap();
    let method: toml::Table = toml::from_str(
        &fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/fibecfed.toml"),
        )
        .unwrap(),
    )
    .unwrap();
    merge(&mut t, method);
    merge(
        &mut t,
        toml::from_str("[sharing.selector]\nfraction = 0.5\n").unwrap(),
    );
    toml::to_string(&t).unwrap()
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Metrics lines without the measured wall time (the one field that differs).
fn metrics(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("wall_seconds");
            v
        })
        .collect()
}

/// `fibecfed run` of `config` into `root/sim`: its metrics.
fn simulate(root: &Path, config: &Path) -> Vec<Value> {
    let out = root.join("sim");
    let run = Command::new(env!("CARGO_BIN_EXE_fibecfed"))
        .args(["run", "--config", s(config), "--out", s(&out)])
        .output()
        .unwrap();
    assert_success(&run);
    metrics(&fs::read_to_string(out.join("metrics.jsonl")).unwrap())
}

fn python(var: &str) -> PathBuf {
    PathBuf::from(std::env::var(var).unwrap_or_else(|_| {
        panic!("{var}: a Python environment that `cargo xtask flower-e2e` makes")
    }))
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
#[ignore = "needs the fibecfed wheel in a venv: run `cargo xtask flower-e2e`"]
fn bindings_federate_like_fibecfed_run() {
    let python = python("FIBECFED_BINDINGS_PYTHON");
    let su = common::setup(60, 30);
    let cfg = su.root.join("federation.toml");
    fs::write(&cfg, config(&su, 3)).unwrap();
    let expected = simulate(&su.root, &cfg);

    // In memory, then with every client's state on disk (reloaded at every step).
    for state in [None, Some(su.root.join("states"))] {
        let out = su.root.join("bindings.jsonl");
        let mut cmd = Command::new(&python);
        cmd.arg(repo().join("python/examples/federate.py"))
            .arg(&cfg)
            .args(["--out", s(&out)]);
        if let Some(dir) = &state {
            cmd.args(["--state-dir", s(dir)]);
        }
        let run = cmd.output().unwrap();
        assert_success(&run);
        let got = metrics(&fs::read_to_string(&out).unwrap());
        assert_eq!(got.len(), expected.len(), "state dir {state:?}");
        for (g, e) in got.iter().zip(&expected) {
            assert_eq!(g, e, "state dir {state:?}: a round differs");
        }
    }
    // The federation really federated: layers chosen, bytes sent, accuracy measured.
    let last = expected.last().unwrap();
    assert!(last["cum_bytes_up"].as_u64().unwrap() > 0);
    assert_eq!(expected[0]["gal"].as_array().unwrap().len(), 1);

    // Rust errors arrive as Python exceptions with the same message.
    let bad = Command::new(&python)
        .args([
            "-c",
            "import fibecfed, sys\ntry:\n    fibecfed.Node(sys.argv[1], 7)\nexcept fibecfed.FibecfedError as e:\n    print(e)\n    sys.exit(3)",
            s(&cfg),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&bad.stdout);
    assert_eq!(bad.status.code(), Some(3), "{text}");
    assert!(
        text.contains("client id 7 is out of range") && text.contains("federation.clients = 3"),
        "{text}"
    );
}
