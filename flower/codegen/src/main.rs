//! Regenerates `flower/src/generated/` from `flower/proto/transport.proto` with
//! tonic-prost-build and Debian's `protoc` (package `protobuf-compiler`).
//!
//! The generated code is committed so that building the workspace needs no protoc;
//! this tool is run by `cargo xtask codegen` after the .proto changes, and
//! `cargo xtask codegen --check` fails when the committed code is stale.
//!
//! Usage: `fibecfed-flower-codegen [--check] FLOWER_CRATE_DIR`

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};

/// Files the generator writes, relative to `src/generated/`.
const OUTPUTS: [&str; 2] = ["flwr.proto.rs", "transport.descriptor.bin"];

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let mut check = false;
    let mut crate_dir = None;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--check" => check = true,
            a if a.starts_with('-') => bail!("unknown flag {a}; usage: [--check] FLOWER_CRATE_DIR"),
            a => crate_dir = Some(PathBuf::from(a)),
        }
    }
    let crate_dir = crate_dir.context("usage: [--check] FLOWER_CRATE_DIR")?;
    if Command::new("protoc").arg("--version").output().is_err() {
        bail!(
            "protoc not found: install Debian's protobuf-compiler (`sudo apt-get install -y protobuf-compiler`)"
        );
    }
    let proto_dir = crate_dir.join("proto");
    let proto = proto_dir.join("transport.proto");
    let target = crate_dir.join("src/generated");
    let scratch = tempfile::tempdir().context("temporary folder")?;
    generate(&proto, &proto_dir, scratch.path())?;
    if check {
        let mut stale = Vec::new();
        for name in OUTPUTS {
            let fresh = std::fs::read(scratch.path().join(name))?;
            let committed = std::fs::read(target.join(name)).unwrap_or_default();
            if fresh != committed {
                stale.push(name);
            }
        }
        if !stale.is_empty() {
            bail!(
                "{} out of date with {} ({}); run `cargo xtask codegen` and commit the result",
                target.display(),
                proto.display(),
                stale.join(", ")
            );
        }
        eprintln!("codegen: {} is up to date", target.display());
        return Ok(());
    }
    std::fs::create_dir_all(&target)?;
    for name in OUTPUTS {
        std::fs::copy(scratch.path().join(name), target.join(name))
            .with_context(|| format!("writing {}", target.join(name).display()))?;
    }
    eprintln!("codegen: wrote {}", target.display());
    Ok(())
}

fn generate(proto: &Path, include: &Path, out: &Path) -> Result<()> {
    tonic_prost_build::configure()
        .build_client(true)
        // The server side serves the crate's in-process tests (a scripted Flower
        // server that can send what flwr's never does).
        .build_server(true)
        // Ordered maps: metrics and configs print and serialise deterministically.
        .btree_map(".")
        .file_descriptor_set_path(out.join("transport.descriptor.bin"))
        .out_dir(out)
        .compile_protos(&[proto], &[include])
        .with_context(|| format!("compiling {}", proto.display()))?;
    Ok(())
}
