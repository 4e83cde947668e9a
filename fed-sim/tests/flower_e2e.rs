//! `fibecfed client` against a real Flower server: flwr 1.42.0's `start_server` with
//! FedAvg (flower/e2e/server.py, which also saves what it received and aggregated),
//! three Rust client processes on the tiny model, three rounds. One client is killed
//! with SIGKILL while it trains in round 2: the round completes with the other two, the
//! client restarts from its saved state and takes part in round 3. The server's
//! aggregate of every round must equal the n_k-weighted mean of what the clients
//! recorded sending, and what the server received must be bitwise what they sent.
//!
//! Needs Python with flwr: `cargo xtask flower-e2e` makes that environment and runs
//! this test with FIBECFED_FLWR_PYTHON set; plain `cargo test` lists it as ignored.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fmt::Write as _;
use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::s;
use fibecfed_flower::NpyArray;
use serde_json::Value;

const ROUNDS: usize = 3;
const CLIENTS: usize = 3;
/// The client killed mid-round.
const VICTIM: usize = 2;

fn config(su: &common::Setup) -> String {
    common::federation_toml(
        su,
        CLIENTS,
        ROUNDS,
        1e-2,
        r#"{ kind = "fixed", layers = [1] }"#,
        r#"
[curriculum]
scorer = "fisher"
ordering = "easy_first"
pacing = { kind = "linear", c0 = 0.3, lambda = 0.6 }
[sparse]
rho = 0.25
"#,
    )
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Procs {
    children: Vec<Child>,
}

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn log_file(path: &Path) -> Stdio {
    Stdio::from(fs::File::create(path).unwrap())
}

fn client(root: &Path, port: u16, k: usize, log: &str, delay_ms: Option<u64>) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fibecfed"));
    cmd.args([
        "client",
        "--server",
        &format!("127.0.0.1:{port}"),
        "--config",
        s(&root.join("federation.toml")),
        "--client-id",
        &k.to_string(),
        "--state-dir",
        s(&root.join(format!("state{k}"))),
        "--record-dir",
        s(&root.join(format!("sent{k}"))),
    ])
    .stdout(Stdio::null())
    .stderr(log_file(&root.join(log)));
    if let Some(ms) = delay_ms {
        cmd.env("FIBECFED_TEST_FIT_DELAY_MS", ms.to_string());
    }
    cmd.spawn().unwrap()
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

/// Every log of the run, for a failure message.
fn logs(root: &Path) -> String {
    let mut out = String::new();
    for e in fs::read_dir(root).unwrap().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "log") {
            let _ = writeln!(out, "==== {}\n{}", p.display(), read(&p));
        }
    }
    out
}

fn wait_until(root: &Path, what: &str, deadline: Instant, mut done: impl FnMut() -> bool) {
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            logs(root)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn npy(path: &Path) -> NpyArray {
    NpyArray::from_bytes(&fs::read(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// What client k recorded sending in `round`: (n_k, tensors).
fn sent(root: &Path, k: usize, round: usize) -> Option<(u64, Vec<NpyArray>)> {
    let dir = root.join(format!("sent{k}"));
    for e in fs::read_dir(&dir).ok()?.flatten() {
        // A fit without fit.json was cut short (the killed client's): nothing was sent.
        let Ok(meta) = serde_json::from_str::<Value>(&read(&e.path().join("fit.json"))) else {
            continue;
        };
        if meta["round"].as_u64() == Some(round as u64) {
            let names = meta["names"].as_array().unwrap().len();
            let tensors = (0..names)
                .map(|j| npy(&e.path().join(format!("tensor-{j:03}.npy"))))
                .collect();
            return Some((meta["num_examples"].as_u64().unwrap(), tensors));
        }
    }
    None
}

#[test]
#[ignore = "needs Python with flwr 1.42.0: run `cargo xtask flower-e2e`"]
fn three_rust_clients_federate_under_a_stock_flower_server() {
    let python = std::env::var("FIBECFED_FLWR_PYTHON").expect(
        "FIBECFED_FLWR_PYTHON: a Python with flwr==1.42.0 (cargo xtask flower-e2e sets it)",
    );
    let su = common::setup(60, 30);
    let root = su.root.clone();
    fs::write(root.join("federation.toml"), config(&su)).unwrap();
    let server_py: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../flower/e2e/server.py");
    let port = free_port();
    let out = root.join("server-out");
    let deadline = Instant::now() + Duration::from_secs(300);

    let mut procs = Procs {
        children: Vec::new(),
    };
    let server = Command::new(&python)
        .args([
            s(&server_py),
            "--address",
            &format!("127.0.0.1:{port}"),
            "--rounds",
            &ROUNDS.to_string(),
            "--min-clients",
            "2",
            "--wait-for",
            &CLIENTS.to_string(),
            "--out",
            s(&out),
        ])
        .env("FLWR_TELEMETRY_ENABLED", "0")
        .stdout(log_file(&root.join("server.log")))
        .stderr(Stdio::from(
            fs::OpenOptions::new()
                .append(true)
                .open(root.join("server.log"))
                .unwrap(),
        ))
        .spawn()
        .unwrap();
    procs.children.push(server);
    // The clients retry until the server listens: no sleep needed here.
    for k in 0..CLIENTS {
        // The victim trains slowly, so that the kill lands inside its fit.
        let delay = (k == VICTIM).then_some(3_000);
        procs
            .children
            .push(client(&root, port, k, &format!("client{k}.log"), delay));
    }

    let victim_log = root.join(format!("client{VICTIM}.log"));
    wait_until(&root, "the victim's round-2 fit", deadline, || {
        read(&victim_log).contains("round 2: fit started")
    });
    let victim = &mut procs.children[1 + VICTIM];
    victim.kill().unwrap(); // SIGKILL: no goodbye to the server.
    victim.wait().unwrap();
    procs.children[1 + VICTIM] = client(&root, port, VICTIM, "client2-restarted.log", None);

    wait_until(&root, "the server to finish", deadline, || {
        procs.children[0].try_wait().unwrap().is_some()
    });
    let status = procs.children[0].wait().unwrap();
    assert!(status.success(), "server failed\n{}", logs(&root));
    for k in 0..CLIENTS {
        let c = &mut procs.children[1 + k];
        wait_until(&root, "the clients to leave", deadline, || {
            c.try_wait().unwrap().is_some()
        });
        assert!(
            c.wait().unwrap().success(),
            "client {k} failed\n{}",
            logs(&root)
        );
    }
    let restarted = read(&root.join("client2-restarted.log"));
    assert!(
        restarted.contains("continuing from its saved state after 1 fits"),
        "{restarted}"
    );
    // Its fit count went on from the saved state: fit 1 was round 1, fit 2 round 3.
    let fit_round = |fit: usize| {
        let path = root.join(format!("sent{VICTIM}/fit-{fit:03}/fit.json"));
        serde_json::from_str::<Value>(&read(&path)).unwrap()["round"].as_u64()
    };
    assert_eq!((fit_round(1), fit_round(2)), (Some(1), Some(3)));

    let mut previous: Option<Vec<NpyArray>> = None;
    for round in 1..=ROUNDS {
        let dir = out.join(format!("round-{round:03}"));
        let info: Value = serde_json::from_str(&read(&dir.join("round.json")))
            .unwrap_or_else(|e| panic!("round {round}: {e}\n{}", logs(&root)));
        let results = info["results"].as_array().unwrap();
        let failures = info["failures"].as_array().unwrap().len();
        let expected = if round == 2 { (2, 1) } else { (3, 0) };
        assert_eq!(
            (results.len(), failures),
            expected,
            "round {round}: results and failures\n{info:#}"
        );
        // Server side = client side, tensor by tensor, bit for bit.
        let mut uploads = Vec::new();
        for (i, r) in results.iter().enumerate() {
            let k = r["metrics"]["client_id"].as_u64().unwrap() as usize;
            let (n, tensors) = sent(&root, k, round)
                .unwrap_or_else(|| panic!("client {k} recorded nothing for round {round}"));
            assert_eq!(
                r["num_examples"].as_u64(),
                Some(n),
                "round {round} client {k}"
            );
            for (j, t) in tensors.iter().enumerate() {
                let got = npy(&dir.join(format!("received-{i}-{j}.npy")));
                assert_eq!(
                    &got, t,
                    "round {round}: client {k} tensor {j} changed in transit"
                );
            }
            uploads.push((n, tensors));
        }
        assert!(
            round != 2 || sent(&root, VICTIM, 2).is_none(),
            "the killed client recorded an upload for round 2"
        );
        // FedAvg: Σ n_k x_k / Σ n_k, computed here in f64 from what the clients sent.
        let total: u64 = uploads.iter().map(|(n, _)| n).sum();
        let count = uploads[0].1.len();
        let mut aggregate = Vec::new();
        for j in 0..count {
            let got = npy(&dir.join(format!("aggregate-{j}.npy")));
            let shape = &uploads[0].1[j].shape;
            assert_eq!(&got.shape, shape, "round {round} tensor {j}");
            let mut expect = vec![0f64; got.data.len()];
            for (n, t) in &uploads {
                for (e, &v) in expect.iter_mut().zip(&t[j].data) {
                    *e += *n as f64 * v as f64;
                }
            }
            let scale = expect
                .iter()
                .fold(0f64, |m, v| m.max((v / total as f64).abs()))
                .max(1e-12);
            for (idx, (e, &g)) in expect.iter().zip(&got.data).enumerate() {
                let e = e / total as f64;
                // flwr averages in float32: a few ulps of the tensor's largest value.
                assert!(
                    (e - g as f64).abs() <= 1e-6 * scale,
                    "round {round} tensor {j}[{idx}]: server {g}, weighted mean {e}"
                );
            }
            aggregate.push(got);
        }
        if let Some(prev) = &previous {
            assert_ne!(
                prev, &aggregate,
                "round {round}: the global model did not move"
            );
        }
        previous = Some(aggregate);
    }
    let history: Value = serde_json::from_str(&read(&out.join("history.json"))).unwrap();
    let losses = history["losses_distributed"].as_array().unwrap();
    assert_eq!(losses.len(), ROUNDS, "{history:#}");
    assert!(
        losses
            .iter()
            .all(|l| l[1].as_f64().is_some_and(f64::is_finite)),
        "{history:#}"
    );
}
