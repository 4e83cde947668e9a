//! Plumbing shared by the tasks: where things live, how children are run, how
//! downloads are checked and how folders appear atomically.

use std::env;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus, Stdio};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::system::{self, Piece};

/// Bad input from the person at the keyboard (flags, environment variables,
/// folders they pointed us at). `main` turns it into exit code 2, so scripts can
/// tell "you asked for something wrong" from "the environment failed".
#[derive(Debug)]
pub struct UserError {
    pub message: String,
    /// Flag-parsing mistakes are easier to fix with the usage text in view; a
    /// folder that lacks a file is not.
    pub show_usage: bool,
}

impl fmt::Display for UserError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for UserError {}

/// A `UserError` that also prints the usage text.
pub fn usage_error(message: impl Into<String>) -> anyhow::Error {
    UserError {
        message: message.into(),
        show_usage: true,
    }
    .into()
}

/// A `UserError` whose message says everything needed.
pub fn user_error(message: impl Into<String>) -> anyhow::Error {
    UserError {
        message: message.into(),
        show_usage: false,
    }
    .into()
}

/// The workspace root. xtask always lives at `<root>/xtask`, so the compile-time
/// manifest path pins it no matter which directory cargo was started from.
pub fn workspace_root() -> Result<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .context("xtask's manifest directory has no parent; expected <root>/xtask")
}

/// Cargo as the outer `cargo xtask` invocation ran it (so toolchain overrides
/// carry through), falling back to whatever `cargo` is on PATH.
pub fn cargo() -> Command {
    Command::new(env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo")))
}

/// The value of an environment variable, treating "set but empty" as unset: an
/// empty `FOO=` in a CI file almost always means "no override".
pub fn env_path(name: &str) -> Option<PathBuf> {
    env::var_os(name)
        .filter(|value| !value.is_empty())
        .map(PathBuf::from)
}

/// True when an opt-out variable is set to anything but "" or "0".
pub fn env_flag(name: &str) -> bool {
    env::var_os(name).is_some_and(|value| !value.is_empty() && value != "0")
}

/// Our cache: `$FIBECFED_CACHE`, else `${XDG_CACHE_HOME:-$HOME/.cache}/fibecfed`.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = env_path("FIBECFED_CACHE") {
        return Ok(dir);
    }
    if let Some(xdg) = env_path("XDG_CACHE_HOME") {
        return Ok(xdg.join("fibecfed"));
    }
    match env_path("HOME") {
        Some(home) => Ok(home.join(".cache").join("fibecfed")),
        None => Err(user_error(
            "cannot place the cache: none of FIBECFED_CACHE, XDG_CACHE_HOME, HOME is set; \
             set FIBECFED_CACHE to a writable folder",
        )),
    }
}

/// `path` made absolute against the current directory (without resolving
/// symlinks, so a Hugging Face snapshot keeps its readable name).
pub fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("cannot make {} absolute", path.display()))
}

/// Lowercase hex SHA-256 of a file, read in a stream (the model is ~90 MB; no
/// reason to hold it in memory just to hash it).
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file =
        File::open(path).with_context(|| format!("cannot open {} to hash it", path.display()))?;
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(format!("{:x}", hasher.finalize()))
}

/// Fails, naming both hashes, when `path` does not hash to `expected`.
pub fn verify_sha256(path: &Path, expected: &str) -> Result<()> {
    let actual = sha256_file(path)?;
    if actual != expected {
        bail!(
            "checksum mismatch for {}: expected sha256 {expected}, got {actual}",
            path.display()
        );
    }
    Ok(())
}

/// `program arg arg` as a person would paste it into a shell, for logs and for
/// the "exact command" in result summaries.
pub fn shell_words<I, S>(words: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    words
        .into_iter()
        .map(|word| shell_quote(&word.as_ref().to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}

fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

pub fn describe(cmd: &Command) -> String {
    shell_words(std::iter::once(cmd.get_program()).chain(cmd.get_args()))
}

/// Runs a child with its stdout sent to our stderr: several tasks promise that
/// their last stdout line is a path, so chatter from pip or cargo must not land
/// there.
pub fn run_quietly(cmd: &mut Command) -> Result<ExitStatus> {
    eprintln!("+ {}", describe(cmd));
    cmd.stdout(Stdio::from(io::stderr()))
        .status()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))
}

/// Runs a child that owns the terminal (tests, benches) and hands back its exit
/// code so that `cargo xtask test` fails exactly when `cargo test` does.
pub fn run_forwarding(cmd: &mut Command) -> Result<ExitCode> {
    eprintln!("+ {}", describe(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    Ok(exit_code_of(status))
}

pub fn exit_code_of(status: ExitStatus) -> ExitCode {
    match status.code() {
        Some(0) => ExitCode::SUCCESS,
        // Exit codes are 0..=255 on Unix; anything odd (or a signal, below)
        // still has to read as failure.
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1).max(1)),
        None => ExitCode::FAILURE,
    }
}

/// Makes `file` a copy of a pinned PyPI artefact: reuses it when its hash is
/// right, else runs `pip download <pip_args> -d <dir>` and checks the result.
pub fn fetch_pinned(file: &Path, sha256: &str, pip_args: &[&str], dir: &Path) -> Result<()> {
    if file.is_file() {
        if verify_sha256(file, sha256).is_ok() {
            eprintln!("using already downloaded {}", file.display());
            return Ok(());
        }
        // pip would reuse a bad file as "already downloaded"; make it fetch anew.
        eprintln!(
            "{} does not match its pinned hash; downloading again",
            file.display()
        );
        fs::remove_file(file).with_context(|| format!("cannot remove {}", file.display()))?;
    }
    // Only now: a file already downloaded needs no pip.
    system::ensure(&[Piece::Pip])?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let status = run_quietly(
        Command::new("python3")
            .args(["-m", "pip", "download"])
            .args(pip_args)
            .arg("-d")
            .arg(dir),
    )?;
    if !status.success() {
        bail!("pip download failed ({status}); is PyPI reachable? (pip's own message is above)");
    }
    if !file.is_file() {
        bail!("pip finished but {} is not there", file.display());
    }
    if let Err(err) = verify_sha256(file, sha256) {
        // Keeping it would make every later run trip over the same file.
        let _ = fs::remove_file(file);
        return Err(err.context("the download was removed; a rerun fetches it again"));
    }
    Ok(())
}

/// Runs a short Python script and returns its stdout; stderr is kept for the
/// error message, where a traceback is the useful part.
pub fn python_output(script: &str, args: &[&OsStr]) -> Result<Vec<u8>> {
    let output = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .context("cannot start python3")?;
    if !output.status.success() {
        bail!(
            "python3 failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output.stdout)
}

/// A folder filled next to its final place and renamed into it only once it is
/// complete, so a killed run never leaves a half-filled folder where later runs
/// would trust it. Dropped without `commit`, it removes itself.
#[derive(Debug)]
pub struct Staging {
    path: PathBuf,
    committed: bool,
}

impl Staging {
    /// Creates `<parent>/.<name>.tmp-<pid>`, first clearing leftovers of runs
    /// that were killed (their pid is gone) so they do not pile up.
    pub fn new(parent: &Path, name: &str) -> Result<Self> {
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
        let prefix = format!(".{name}.tmp-");
        remove_stale_staging(parent, &prefix);
        let path = parent.join(format!("{prefix}{}", std::process::id()));
        if path.exists() {
            fs::remove_dir_all(&path)
                .with_context(|| format!("cannot clear {}", path.display()))?;
        }
        fs::create_dir(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self {
            path,
            committed: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the staged folder to `dest`, replacing an incomplete folder there.
    /// `is_complete` decides whether a folder that appeared at `dest` meanwhile
    /// (another run racing us) can be kept instead.
    pub fn commit(mut self, dest: &Path, is_complete: impl Fn(&Path) -> bool) -> Result<()> {
        if dest.exists() {
            if is_complete(dest) {
                // Someone else finished first; theirs is as good as ours.
                return Ok(());
            }
            fs::remove_dir_all(dest)
                .with_context(|| format!("cannot remove incomplete {}", dest.display()))?;
        }
        fs::rename(&self.path, dest).with_context(|| {
            format!(
                "cannot move {} into place at {}",
                self.path.display(),
                dest.display()
            )
        })?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: failing to tidy up must not hide the real error.
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

fn remove_stale_staging(parent: &Path, prefix: &str) {
    // Without /proc we cannot tell a dead run from a live one; leave them be.
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_leaves_plain_words_alone_and_protects_the_rest() {
        assert_eq!(
            shell_words(["fibecfed", "--lr", "5e-4", "a b", "it's", ""]),
            r"fibecfed --lr 5e-4 'a b' 'it'\''s' ''"
        );
    }

    fn scratch(tag: &str) -> PathBuf {
        env::temp_dir().join(format!("xtask-{tag}-{}", std::process::id()))
    }

    #[test]
    fn sha256_of_a_known_string() -> Result<()> {
        let dir = scratch("sha");
        fs::create_dir_all(&dir)?;
        let file = dir.join("abc");
        fs::write(&file, b"abc")?;
        // FIPS 180-2 test vector.
        let expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256_file(&file)?, expected);
        verify_sha256(&file, expected)?;
        let err = verify_sha256(&file, "00").err().map(|e| e.to_string());
        let err = err.unwrap_or_default();
        assert!(
            err.contains("expected sha256 00") && err.contains(expected),
            "{err}"
        );
        fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn staging_removes_itself_unless_committed() -> Result<()> {
        let parent = scratch("staging");
        let staged = Staging::new(&parent, "thing")?;
        let path = staged.path().to_path_buf();
        assert!(path.is_dir());
        drop(staged);
        assert!(!path.exists());

        let staged = Staging::new(&parent, "thing")?;
        fs::write(staged.path().join("f"), b"x")?;
        let dest = parent.join("thing");
        staged.commit(&dest, |_| false)?;
        assert!(dest.join("f").is_file());
        fs::remove_dir_all(&parent)?;
        Ok(())
    }

    #[test]
    fn exit_codes_keep_failure_visible() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(exit_code_of(ExitStatus::from_raw(0)), ExitCode::SUCCESS);
        assert_eq!(
            exit_code_of(ExitStatus::from_raw(3 << 8)),
            ExitCode::from(3)
        );
        // Killed by SIGKILL: no code, still a failure.
        assert_eq!(exit_code_of(ExitStatus::from_raw(9)), ExitCode::FAILURE);
    }
}
