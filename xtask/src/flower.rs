//! `cargo xtask flower-e2e` and `cargo xtask codegen`.
//!
//! flower-e2e makes a virtual environment with the pinned flwr (once, in the cache),
//! checks that our `.proto` declares flwr's wire contract, then runs the end-to-end test
//! (a stock Flower server, three `fibecfed client` processes, one killed and restarted)
//! with that Python.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context, Result, bail};

use crate::common::{Staging, cache_dir, cargo, run_forwarding, run_quietly, workspace_root};
use crate::system::{self, Piece};

/// The flwr release whose transport the client speaks (its `transport.proto` is the
/// contract `flower/proto/transport.proto` restates).
pub const FLWR_VERSION: &str = "1.42.0";

/// The venv's Python, creating the venv (python3 -m venv + pip install flwr) if needed.
fn flwr_python() -> Result<PathBuf> {
    let venv = cache_dir()?.join(format!("flwr-{FLWR_VERSION}-venv"));
    let python = venv.join("bin/python");
    if python.is_file() && has_flwr(&python) {
        eprintln!("using flwr {FLWR_VERSION} in {}", venv.display());
        return Ok(python);
    }
    let parent = venv
        .parent()
        .context("the cache folder has no parent")?
        .to_path_buf();
    let name = venv
        .file_name()
        .context("venv name")?
        .to_string_lossy()
        .into_owned();
    // Only now: a venv already in the cache needs no python3-venv.
    system::ensure(&[Piece::Venv])?;
    // Built beside its final place and renamed in only when complete: a killed
    // install never leaves a venv that looks usable.
    let staging = Staging::new(&parent, &name)?;
    let status = run_quietly(
        Command::new("python3")
            .args(["-m", "venv"])
            .arg(staging.path()),
    )?;
    if !status.success() {
        bail!(
            "python3 -m venv failed ({status}): Debian needs `sudo apt-get install -y python3-venv`"
        );
    }
    let status = run_quietly(
        Command::new(staging.path().join("bin/python"))
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .arg(format!("flwr=={FLWR_VERSION}")),
    )?;
    if !status.success() {
        bail!(
            "pip install flwr=={FLWR_VERSION} failed ({status}); is PyPI reachable? (pip's message is above)"
        );
    }
    // A venv records its own path in its scripts; `bin/python -m` (all we use) works
    // after the rename regardless.
    staging.commit(&venv, |dir| has_flwr(&dir.join("bin/python")))?;
    if !has_flwr(&python) {
        bail!(
            "{} has no flwr {FLWR_VERSION} after installing it",
            venv.display()
        );
    }
    Ok(python)
}

fn has_flwr(python: &Path) -> bool {
    Command::new(python)
        .args([
            "-c",
            &format!("import flwr, sys; sys.exit(flwr.__version__ != '{FLWR_VERSION}')"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `cargo xtask flower-e2e [CARGO_TEST_ARGS...]`.
pub fn e2e(extra: &[String]) -> Result<ExitCode> {
    system::ensure(&[Piece::OpenBlas])?;
    let root = workspace_root()?;
    let python = flwr_python()?;
    let status = run_quietly(
        Command::new(&python)
            .arg(root.join("flower/e2e/check_contract.py"))
            .arg(root.join("flower/src/generated/transport.descriptor.bin")),
    )?;
    if !status.success() {
        bail!(
            "flower/proto/transport.proto no longer matches flwr {FLWR_VERSION}'s transport.proto (differences above)"
        );
    }
    let mut cmd = cargo();
    cmd.args([
        "test",
        "-p",
        "fibecfed-sim",
        "--test",
        "flower_e2e",
        "--",
        "--ignored",
        "--nocapture",
    ])
    .args(extra)
    .env("FIBECFED_FLWR_PYTHON", &python)
    .env("FLWR_TELEMETRY_ENABLED", "0")
    .current_dir(&root);
    run_forwarding(&mut cmd)
}

/// `cargo xtask codegen [--check]`: regenerates (or checks) flower/src/generated/.
pub fn codegen(check: bool) -> Result<ExitCode> {
    // The codegen crate links no OpenBLAS; protoc is all it needs from the system.
    system::ensure(&[Piece::Protoc])?;
    let root = workspace_root()?;
    let mut cmd = cargo();
    cmd.args(["run", "--quiet", "-p", "fibecfed-flower-codegen", "--"]);
    if check {
        cmd.arg("--check");
    }
    cmd.arg(root.join("flower")).current_dir(&root);
    run_forwarding(&mut cmd)
}
