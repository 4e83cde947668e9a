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

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Setup, assert_success, merge, s};
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
        &fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/fibecfed.toml"))
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

/// `fibecfed run` of `config` into `root/sim-NAME` (NAME: the config file's stem):
/// its metrics.
fn simulate(root: &Path, config: &Path) -> Vec<Value> {
    let out = root.join(format!(
        "sim-{}",
        config.file_stem().unwrap().to_string_lossy()
    ));
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
    // The same with the round-0 work deferred to each client's first round, and with
    // a client that has no training data (8 clients on 60 examples, client sizes from Dir(0.1)).
    let deferred = su.root.join("deferred.toml");
    let mut t: toml::Table = toml::from_str(&config(&su, 8)).unwrap();
    merge(
        &mut t,
        toml::from_str(
            "[federation]\nprepare = \"on_selection\"\nfraction = 0.5\n[partition]\nkind = \"dirichlet\"\nalpha = 0.1\nsize_concentration = 0.1\n",
        )
        .unwrap(),
    );
    fs::write(&deferred, toml::to_string(&t).unwrap()).unwrap();
    for file in [&cfg, &deferred] {
        let expected = simulate(&su.root, file);
        // In memory, then with every client's state on disk (reloaded at every step).
        for state in [None, Some(su.root.join("states"))] {
            let out = su.root.join("bindings.jsonl");
            let mut cmd = Command::new(&python);
            cmd.arg(repo().join("python/examples/federate.py"))
                .arg(file)
                .args(["--out", s(&out)]);
            if let Some(dir) = &state {
                let _ = fs::remove_dir_all(dir);
                cmd.args(["--state-dir", s(dir)]);
            }
            let run = cmd.output().unwrap();
            assert_success(&run);
            let got = metrics(&fs::read_to_string(&out).unwrap());
            assert_eq!(got.len(), expected.len(), "{file:?}, state dir {state:?}");
            for (g, e) in got.iter().zip(&expected) {
                assert_eq!(g, e, "{file:?}, state dir {state:?}: a round differs");
            }
        }
        // The federation really federated: layers chosen, bytes sent.
        let last = expected.last().unwrap();
        assert!(last["cum_bytes_up"].as_u64().unwrap() > 0);
        assert!(!expected[0]["gal"].as_array().unwrap().is_empty());
        if file == &deferred {
            // The deferred work lands in later rounds, and some client had no data.
            assert!(expected[1..].iter().any(|m| m["tokens"].as_u64() > Some(0)));
            let empty: usize = expected[1..]
                .iter()
                .map(|m| m["empty"].as_array().unwrap().len())
                .sum();
            let sizes = fs::read_to_string(su.root.join("sim-deferred/partition.json")).unwrap();
            assert!(
                empty > 0 || sizes.contains("[]"),
                "no client without training data: {sizes}"
            );
        }
    }

    // A round asked again (its reply lost) gives the same reply, from the same object
    // or from a new one on the same state folder (a new process); save and load carry
    // the state to another folder.
    let script = r#"
import sys, numpy as np, fibecfed
cfg, root = sys.argv[1], sys.argv[2]
server = fibecfed.Server.from_file(cfg)
nodes = [fibecfed.Node(cfg, k, state_dir=f"{root}/again-{k}") for k in range(server.clients)]
gal = server.select_layers([n.report() for n in nodes])
setups = [n.setup(gal) for n in nodes]
initial = setups[0][1]
k = 0
first = nodes[k].fit(initial, 1)
def same(a, b):
    arrays_a, n_a, m_a = a
    arrays_b, n_b, m_b = b
    assert n_a == n_b and m_a == m_b, (m_a, m_b)
    assert arrays_a.keys() == arrays_b.keys()
    for name in arrays_a:
        assert arrays_a[name].tobytes() == arrays_b[name].tobytes(), name
same(first, nodes[k].fit(initial, 1))
again = fibecfed.Node(cfg, k, state_dir=f"{root}/again-{k}")
same(first, again.fit(initial, 1))
second = again.fit(initial, 2)
assert second[2]["samples"] > 0
try:
    again.fit(initial, 1)
    raise SystemExit("round 1 after round 2 was accepted")
except fibecfed.FibecfedError as e:
    assert "after round 2" in str(e), e
nodes[k].save(f"{root}/saved.safetensors")
moved = fibecfed.Node(cfg, k, state_dir=f"{root}/moved")
moved.load(f"{root}/saved.safetensors")
assert moved.evaluate_counts(initial) == fibecfed.Node(cfg, k, state_dir=f"{root}/again-{k}").evaluate_counts(initial)
print("ok")
"#;
    let again = Command::new(&python)
        .args(["-c", script, s(&cfg), s(&su.root)])
        .output()
        .unwrap();
    assert_success(&again);

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

/// A free TCP port on loopback.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The processes of the deployment, each in its own process group (killed whole, as
/// a machine that dies takes its children with it).
struct Deployment {
    root: PathBuf,
    bin: PathBuf,
    children: Vec<(String, std::process::Child)>,
}

impl Drop for Deployment {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            kill_group(c);
        }
    }
}

fn kill_group(c: &mut std::process::Child) {
    let _ = Command::new("kill")
        .args(["-9", "--", &format!("-{}", c.id())])
        .status();
    let _ = c.kill();
    let _ = c.wait();
}

impl Deployment {
    /// Wrappers for flwr's commands: they run the venv's scripts with its Python (the
    /// cached venv was moved into place, so its scripts' own `#!` lines point
    /// elsewhere), and Flower starts `flower-superexec`, `flwr-serverapp` and
    /// `flwr-clientapp` by name from PATH.
    fn new(root: &Path, python: &Path) -> Self {
        let bin = root.join("bin");
        fs::create_dir_all(&bin).unwrap();
        let venv_bin = python.parent().unwrap();
        for name in [
            "flwr",
            "flower-superlink",
            "flower-supernode",
            "flower-superexec",
            "flwr-serverapp",
            "flwr-clientapp",
        ] {
            let path = bin.join(name);
            fs::write(
                &path,
                format!(
                    "#!/bin/sh\nexec '{}' '{}' \"$@\"\n",
                    python.display(),
                    venv_bin.join(name).display()
                ),
            )
            .unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        }
        Self {
            root: root.to_path_buf(),
            bin,
            children: Vec::new(),
        }
    }

    /// A command of flwr's with the test's PATH, its own FLWR_HOME and no network use.
    fn command(&self, name: &str, home: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(name));
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![self.bin.clone()];
        paths.extend(std::env::split_paths(&path));
        cmd.env("PATH", std::env::join_paths(paths).unwrap())
            .env("FLWR_HOME", self.root.join(home))
            .env("FLWR_TELEMETRY_ENABLED", "0")
            .env("FLWR_DISABLE_UPDATE_CHECK", "1")
            .env("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1");
        cmd
    }

    fn spawn(&mut self, label: &str, mut cmd: Command) {
        use std::os::unix::process::CommandExt;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join(format!("{label}.log")))
            .unwrap();
        cmd.stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0);
        let child = cmd.spawn().unwrap();
        self.children.push((label.to_owned(), child));
    }

    fn kill(&mut self, label: &str) {
        let i = self.children.iter().position(|(l, _)| l == label).unwrap();
        let (_, mut child) = self.children.remove(i);
        kill_group(&mut child);
    }

    /// Every log, for a failure message.
    fn logs(&self) -> String {
        let mut out = String::new();
        let mut files: Vec<PathBuf> = fs::read_dir(&self.root)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "log" || x == "jsonl"))
            .collect();
        files.sort();
        for p in files {
            let text = fs::read_to_string(&p).unwrap_or_default();
            // The tail: the end of a log says what went wrong.
            let tail: String = text
                .chars()
                .rev()
                .take(6000)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            let _ = writeln!(out, "==== {}\n{tail}", p.display());
        }
        out
    }
}

fn wait_for(
    what: &str,
    deadline: std::time::Instant,
    d: &Deployment,
    mut done: impl FnMut() -> bool,
) {
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            d.logs()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn listening(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[test]
#[ignore = "needs flwr 1.42.0 and the fibecfed wheel in a venv: run `cargo xtask flower-e2e`"]
fn flower_deployment_matches_the_simulation() {
    const CLIENTS: usize = 3;
    let python = python("FIBECFED_FLWR_PYTHON");
    let su = common::setup(60, 30);
    let root = su.root.clone();
    let cfg = root.join("federation.toml");
    fs::write(&cfg, config(&su, CLIENTS)).unwrap();
    let expected = simulate(&root, &cfg);
    // The victim: a client that trains in round 2 (the draw is the seed's).
    let r2 = &expected[2];
    let ids = |key: &str| -> Vec<u64> {
        r2[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect()
    };
    let dropped = ids("dropped");
    let victim = ids("selected")
        .into_iter()
        .find(|k| !dropped.contains(k))
        .expect("some client trains in round 2");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(900);

    let mut d = Deployment::new(&root, &python);
    let link = free_port();
    let mut superlink = d.command("flower-superlink", "home-superlink");
    superlink.args([
        "--insecure",
        "--host",
        "127.0.0.1",
        "--port",
        &link.to_string(),
        "--disable-runtime-dependency-installation",
    ]);
    d.spawn("superlink", superlink);
    wait_for("the SuperLink", deadline, &d, || listening(link));

    let markers = root.join("markers");
    fs::create_dir_all(&markers).unwrap();
    let supernode = |d: &Deployment, label: &str, node_config: String, slow: bool| {
        let mut cmd = d.command("flower-supernode", &format!("home-{label}"));
        cmd.args([
            "--insecure",
            "--superlink",
            &format!("127.0.0.1:{link}"),
            "--host",
            "127.0.0.1",
            "--port",
            &free_port().to_string(),
            "--node-config",
            &node_config,
        ]);
        if slow {
            cmd.env("FIBECFED_TEST_FIT_DELAY_MS", "4000")
                .env("FIBECFED_TEST_MARKER_DIR", &markers);
        }
        cmd
    };
    let node_config = |k: u64, extra: &str| {
        format!(
            "client-id={k} config='{}' state-dir='{}'{extra}",
            cfg.display(),
            root.join(format!("state{k}")).display()
        )
    };
    for k in 0..CLIENTS as u64 {
        let cmd = supernode(&d, &format!("node{k}"), node_config(k, ""), k == victim);
        d.spawn(&format!("node{k}"), cmd);
    }
    // Two nodes with bad node configs: an unknown client id, and missing data.
    let cmd = supernode(&d, "bad-id", node_config(7, ""), false);
    d.spawn("bad-id", cmd);
    let missing = root.join("no-such-train.tsv");
    let cmd = supernode(
        &d,
        "bad-data",
        node_config(1, &format!(" train='{}'", missing.display())),
        false,
    );
    d.spawn("bad-data", cmd);

    // `flwr run` against a named connection in the CLI's own FLWR_HOME.
    let home = root.join("home-cli");
    fs::create_dir_all(&home).unwrap();
    fs::write(
        home.join("config.toml"),
        format!(
            "[superlink]\ndefault = \"e2e\"\n\n[superlink.e2e]\naddress = \"127.0.0.1:{link}\"\ninsecure = true\n"
        ),
    )
    .unwrap();
    let out = root.join("app-out");
    let run = d
        .command("flwr", "home-cli")
        .args([
            "run",
            s(&repo().join("flower/app")),
            "e2e",
            "--format",
            "json",
        ])
        .args([
            "--run-config",
            &format!("config='{}' out='{}'", cfg.display(), out.display()),
        ])
        .output()
        .unwrap();
    let started = String::from_utf8_lossy(&run.stdout).to_string();
    assert!(
        run.status.success(),
        "flwr run: {started}\n{}\n{}",
        String::from_utf8_lossy(&run.stderr),
        d.logs()
    );
    let reply: Value =
        serde_json::from_str(started.trim()).unwrap_or_else(|e| panic!("{e}: {started}"));
    let run_id = match &reply["run-id"] {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    };

    let status = |d: &Deployment| -> (String, String) {
        let ls = d
            .command("flwr", "home-cli")
            .args(["ls", "e2e", "--run-id", &run_id, "--format", "json"])
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&ls.stdout).unwrap_or(Value::Null);
        let field = |k: &str| v["runs"][0][k].as_str().unwrap_or("").to_owned();
        (field("status"), field("status-details"))
    };

    // Kill the victim's SuperNode (and its ClientApp) while it trains in round 2, then
    // start it again with the same node config: Flower gives it a new node id.
    let marker = markers.join(format!("fit-{victim}-r2"));
    let mut early = (String::new(), String::new());
    let mut polls = 0;
    wait_for("the victim's round-2 training", deadline, &d, || {
        polls += 1;
        // Every few seconds: a run that already ended will never get there.
        if polls % 25 == 0 {
            early = status(&d);
        }
        marker.exists() || early.0.starts_with("finished")
    });
    assert!(
        marker.exists(),
        "the run ended before round 2: {early:?}\n{}",
        d.logs()
    );
    d.kill(&format!("node{victim}"));
    std::thread::sleep(std::time::Duration::from_secs(2));
    let cmd = supernode(
        &d,
        &format!("node{victim}-restarted"),
        node_config(victim, ""),
        false,
    );
    d.spawn(&format!("node{victim}-restarted"), cmd);

    let mut last = (String::new(), String::new());
    wait_for("the run to finish", deadline, &d, || {
        std::thread::sleep(std::time::Duration::from_secs(1));
        last = status(&d);
        last.0.starts_with("finished")
    });
    assert_eq!(last.0, "finished:completed", "{}\n{}", last.1, d.logs());

    // The same metrics as `fibecfed run`, every field but the wall time.
    let got = metrics(&fs::read_to_string(out.join("metrics.jsonl")).unwrap());
    assert_eq!(got.len(), expected.len(), "\n{}", d.logs());
    for (g, e) in got.iter().zip(&expected) {
        assert_eq!(g, e, "round {} differs from fibecfed run", e["round"]);
    }
    let events: Vec<Value> = fs::read_to_string(out.join("events.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let of = |kind: &str| -> Vec<&Value> { events.iter().filter(|e| e["event"] == kind).collect() };
    // The layers came from the clients' reports (the consensus of their scores).
    let selected = of("layers_selected");
    assert_eq!(selected.len(), 1, "{events:#?}");
    assert_eq!(selected[0]["selector_reads_reports"], true);
    assert_eq!(selected[0]["gal"], expected[0]["gal"]);
    // Both bad nodes were refused with a message naming the node config key.
    let refused: Vec<String> = of("node_refused")
        .iter()
        .map(|e| e["reason"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        refused
            .iter()
            .any(|r| r.contains("client id 7 is out of range")),
        "{refused:#?}"
    );
    assert!(
        refused
            .iter()
            .any(|r| r.contains("node config train") && r.contains("no-such-train.tsv")),
        "{refused:#?}"
    );
    // The victim's round-2 training went again to its restarted node.
    assert!(
        of("message_resent")
            .iter()
            .any(|e| e["client"] == victim && e["message"] == "round 2 training"),
        "{events:#?}"
    );
    assert!(
        of("client_moved").iter().any(|e| e["client"] == victim),
        "{events:#?}"
    );
}

/// The ClientApp's reading of a node config, case by case: every bad value is refused
/// with a message naming the key (and the file), before any message is answered.
#[test]
#[ignore = "needs flwr 1.42.0 and the fibecfed wheel in a venv: run `cargo xtask flower-e2e`"]
fn bad_node_configs_are_refused_by_name() {
    let python = python("FIBECFED_FLWR_PYTHON");
    let su = common::setup(60, 30);
    let cfg = su.root.join("federation.toml");
    fs::write(&cfg, config(&su, 3)).unwrap();
    // A state folder that client 0 of another config (another seed) wrote.
    let other = su.root.join("other.toml");
    fs::write(&other, config(&su, 3).replace("seed = 11", "seed = 12")).unwrap();
    let foreign = su.root.join("foreign-state");
    let script = r#"
import json, sys
sys.path.insert(0, sys.argv[1])
import fibecfed
from fibecfed_app.client_app import node_of

cfg, other, foreign, root = sys.argv[2:6]
fibecfed.Node(other, 0, state_dir=foreign).report()

class Context:
    def __init__(self, node_config):
        self.node_config = node_config

cases = [
    ({}, ["node config client-id is missing"]),
    ({"client-id": "0"}, ["node config client-id must be a non-negative integer", "'0'"]),
    ({"client-id": -1}, ["node config client-id must be a non-negative integer"]),
    ({"client-id": 0, "state-dir": root + "/s"}, ["node config config is missing"]),
    ({"client-id": 0, "config": cfg}, ["node config state-dir is missing"]),
    ({"client-id": 0, "config": root + "/nope.toml", "state-dir": root + "/s"}, ["node config config", "nope.toml", "is not a file"]),
    ({"client-id": 0, "config": cfg, "state-dir": root + "/s", "test": root + "/nope.tsv"}, ["node config test", "nope.tsv"]),
    ({"client-id": 0, "config": cfg, "state-dir": root + "/s", "model-dir": root + "/nope"}, ["node config model-dir", "is not a folder"]),
    ({"client-id": 3, "config": cfg, "state-dir": root + "/s"}, ["client-id=3", "client id 3 is out of range", "federation.clients = 3"]),
    # Found when the state is read, at the first message: the file is named.
    ({"client-id": 0, "config": cfg, "state-dir": foreign}, ["foreign-state/node-state.safetensors", "saved with another config"]),
]
failures = []
for node_config, needles in cases:
    try:
        node_of(Context(node_config)).report()
        failures.append(f"{node_config}: accepted")
    except (ValueError, fibecfed.FibecfedError) as e:
        missing = [n for n in needles if n not in str(e)]
        if missing:
            failures.append(f"{node_config}: {e!s} lacks {missing}")
print(json.dumps(failures))
sys.exit(1 if failures else 0)
"#;
    let out = Command::new(&python)
        .arg("-c")
        .arg(script)
        .arg(repo().join("flower/app"))
        .args([s(&cfg), s(&other), s(&foreign), s(&su.root)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
