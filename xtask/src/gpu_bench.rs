//! `cargo xtask gpu-bench`: packages the GPU benchmark for a machine that has a GPU,
//! CUDA and PyTorch but no Rust toolchain.
//!
//! Builds the release `gpu-bench` binary of `fibecfed-kernels` here and copies it, with
//! `kernels/bench/pytorch_squares.py` and `kernels/bench/run.sh`, into the git-ignored
//! `gpu-bench/` folder at the repository root. That folder travels to the GPU machine
//! (for this workplace's device tool: `carry: ["gpu-bench"]`), where `bash
//! gpu-bench/run.sh` runs our kernels and PyTorch's paths side by side and prints the
//! table. It also packages the GPU test executables (`kernels/tests/gpu.rs` and
//! `fisher/tests/cuda.rs`, `cargo test --release --no-run`) into `gpu-bench/tests/`,
//! which run.sh runs first, plain and under compute-sanitizer (memcheck, racecheck)
//! when the machine has it: without a GPU those tests only print "skipped". The fisher
//! tests link OpenBLAS, so the shared libraries they load from outside the C library
//! (libopenblas, libgfortran, libquadmath) go into `gpu-bench/lib/`, which run.sh puts
//! on LD_LIBRARY_PATH: the GPU machine has no Rust and may have no OpenBLAS.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::cargo_build::build_executable;
use crate::common::{cargo, workspace_root};
use crate::system::{self, Piece};

/// The folder the package lands in, relative to the repository root (in .gitignore).
pub const PACKAGE_DIR: &str = "gpu-bench";

/// The GPU test executables: (package, test target, packaged name).
const TESTS: [(&str, &str, &str); 2] = [
    ("fibecfed-kernels", "gpu", "kernels-gpu"),
    ("fibecfed-fisher", "cuda", "fisher-cuda"),
];

/// Shared libraries the test executables may load that a bare GPU machine may lack.
const BUNDLED_LIBS: [&str; 5] = [
    "libopenblas",
    "libgfortran",
    "libquadmath",
    "libblas",
    "liblapack",
];

pub fn run() -> Result<()> {
    let root = workspace_root()?;
    // The fisher tests link OpenBLAS.
    system::ensure(&[Piece::OpenBlas])?;
    let binary = build(&root)?;
    let dest = root.join(PACKAGE_DIR);
    // Stale executables and libraries go; results in out/ stay.
    for sub in ["tests", "lib"] {
        let dir = dest.join(sub);
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
        }
    }
    fs::create_dir_all(dest.join("tests"))
        .and_then(|()| fs::create_dir_all(dest.join("lib")))
        .with_context(|| format!("cannot create {}", dest.display()))?;
    for (package, target, name) in TESTS {
        let mut cmd = cargo();
        cmd.args([
            "test",
            "--release",
            "--no-run",
            "-p",
            package,
            "--test",
            target,
        ])
        .current_dir(&root);
        let exe = build_executable(&mut cmd, target)?;
        let to = dest.join("tests").join(name);
        fs::copy(&exe, &to)
            .with_context(|| format!("cannot copy {} to {}", exe.display(), to.display()))?;
        strip(&to);
        bundle_libraries(&to, &dest.join("lib"))?;
    }
    let bench = root.join("kernels").join("bench");
    for (from, name) in [
        (binary, "gpu-bench"),
        (bench.join("pytorch_squares.py"), "pytorch_squares.py"),
        (bench.join("run.sh"), "run.sh"),
    ] {
        let to = dest.join(name);
        fs::copy(&from, &to)
            .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
        if name == "gpu-bench" {
            strip(&to);
        }
    }
    println!(
        "packaged {}/ (gpu-bench, the GPU tests, pytorch_squares.py, run.sh).\n\
         On the GPU machine, from the repository root (device tool: carry [\"{PACKAGE_DIR}\"]):\n  \
         bash {PACKAGE_DIR}/run.sh",
        dest.display()
    );
    Ok(())
}

/// `cargo build --release` of the bench binary; its path comes from cargo's own
/// artifact messages, so CARGO_TARGET_DIR and the like need no guessing.
fn build(root: &Path) -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--release",
        "-p",
        "fibecfed-kernels",
        "--bin",
        "gpu-bench",
    ])
    .current_dir(root);
    build_executable(&mut cmd, "gpu-bench")
}

/// Strips debug information (line tables) to keep the package small; a missing `strip`
/// only leaves the file larger.
fn strip(file: &Path) {
    let _ = std::process::Command::new("strip")
        .arg("--strip-debug")
        .arg(file)
        .status();
}

/// Copies the libraries from [`BUNDLED_LIBS`] that `ldd` says `exe` loads into `lib`.
fn bundle_libraries(exe: &Path, lib: &Path) -> Result<()> {
    let out = std::process::Command::new("ldd")
        .arg(exe)
        .output()
        .with_context(|| format!("cannot run ldd on {}", exe.display()))?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "\tlibopenblas.so.0 => /lib/x86_64-linux-gnu/libopenblas.so.0 (0x...)"
        let Some((name, rest)) = line.trim().split_once(" => ") else {
            continue;
        };
        if !BUNDLED_LIBS.iter().any(|b| name.starts_with(b)) {
            continue;
        }
        let Some(path) = rest
            .split_whitespace()
            .next()
            .filter(|p| p.starts_with('/'))
        else {
            anyhow::bail!(
                "{} needs {name}, which ldd cannot find: {line}",
                exe.display()
            );
        };
        let to = lib.join(name);
        if !to.exists() {
            // fs::copy follows the symlink: the file lands under the soname.
            fs::copy(path, &to).with_context(|| format!("cannot copy {path}"))?;
        }
    }
    Ok(())
}
