//! `cargo xtask gpu-bench`: packages the GPU benchmark for a machine that has a GPU,
//! CUDA and PyTorch but no Rust toolchain.
//!
//! Builds the release `gpu-bench` binary of `fibecfed-kernels` here and copies it, with
//! `kernels/bench/pytorch_squares.py` and `kernels/bench/run.sh`, into the git-ignored
//! `gpu-bench/` folder at the repository root. That folder travels to the GPU machine
//! (for this workplace's device tool: `carry: ["gpu-bench"]`), where `bash
//! gpu-bench/run.sh` runs our kernels and PyTorch's paths side by side and prints the
//! table. Nothing here needs a GPU, nor any system package (`fibecfed-kernels` links
//! no OpenBLAS; CUDA is loaded at run time), so it asks `system` for nothing.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::cargo_build::build_executable;
use crate::common::{cargo, workspace_root};

/// The folder the package lands in, relative to the repository root (in .gitignore).
pub const PACKAGE_DIR: &str = "gpu-bench";

pub fn run() -> Result<()> {
    let root = workspace_root()?;
    let binary = build(&root)?;
    let dest = root.join(PACKAGE_DIR);
    fs::create_dir_all(&dest).with_context(|| format!("cannot create {}", dest.display()))?;
    let bench = root.join("kernels").join("bench");
    for (from, name) in [
        (binary, "gpu-bench"),
        (bench.join("pytorch_squares.py"), "pytorch_squares.py"),
        (bench.join("run.sh"), "run.sh"),
    ] {
        let to = dest.join(name);
        fs::copy(&from, &to)
            .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    }
    println!(
        "packaged {}/ (gpu-bench, pytorch_squares.py, run.sh).\n\
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
