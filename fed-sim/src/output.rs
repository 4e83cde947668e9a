//! Output files: checked before long work starts, never the same as an input, written
//! atomically through a temporary file of our own, and run folders locked against a
//! second process.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Creates `dir` if needed and proves it writable with a probe file, so a run fails
/// at start rather than after hours of training.
pub fn check_writable_dir(dir: &Path) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        bail!("output folder {} exists and is not a folder", dir.display());
    }
    fs::create_dir_all(dir)
        .with_context(|| format!("cannot create output folder {}", dir.display()))?;
    let probe = dir.join(format!(".fibecfed-write-probe-{}", std::process::id()));
    fs::write(&probe, b"")
        .with_context(|| format!("output folder {} is not writable", dir.display()))?;
    let _ = fs::remove_file(&probe);
    Ok(())
}

/// The parent folder of `file` must exist and be writable; `file` must not be a folder.
pub fn check_writable_file(file: &Path) -> Result<()> {
    if file.is_dir() {
        bail!(
            "output path {} is a folder, expected a file",
            file.display()
        );
    }
    let parent = parent_of(file);
    if !parent.is_dir() {
        bail!(
            "cannot write {}: folder {} does not exist",
            file.display(),
            parent.display()
        );
    }
    // A name of our own, so no file of the user's (say `<file>.tmp`) is touched.
    let probe = parent.join(format!(".fibecfed-write-probe-{}", std::process::id()));
    fs::write(&probe, b"").with_context(|| format!("cannot write {}", file.display()))?;
    let _ = fs::remove_file(&probe);
    Ok(())
}

/// An input file must be a regular file (or a link to one): a FIFO, a device or a
/// folder would block or fail half-way, after outputs were created.
pub fn check_input_file(flag: &str, path: &Path) -> Result<()> {
    let meta = fs::metadata(path).with_context(|| format!("{flag} {}", path.display()))?;
    if !meta.is_file() {
        bail!(
            "{flag} {}: not a regular file (a folder, FIFO or device cannot be read as input)",
            path.display()
        );
    }
    Ok(())
}

fn parent_of(file: &Path) -> PathBuf {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Where `path` is (or would be, for a file not yet written): symlinks and `..`
/// resolved as far as the path exists, so two spellings of one file compare equal.
fn resolved(path: &Path) -> PathBuf {
    if let Ok(p) = fs::canonicalize(path) {
        return p;
    }
    match (fs::canonicalize(parent_of(path)), path.file_name()) {
        (Ok(parent), Some(name)) => parent.join(name),
        _ => std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
    }
}

/// Whether two paths name one file or folder: equal once resolved, or (for paths
/// that exist) one inode, hard links included.
pub fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    resolved(a) == resolved(b)
        || matches!((fs::metadata(a), fs::metadata(b)),
            (Ok(x), Ok(y)) if x.dev() == y.dev() && x.ino() == y.ino())
}

/// Refuses a command whose outputs would replace one of its inputs, replace a file of
/// an input folder, or collide with each other. `inputs` and `outputs` are (flag, path);
/// an output folder is given as the files the command writes into it.
pub fn check_outputs_apart(inputs: &[(&str, &Path)], outputs: &[(&str, PathBuf)]) -> Result<()> {
    for (i, (out_flag, out)) in outputs.iter().enumerate() {
        let out_r = resolved(out);
        for (in_flag, input) in inputs {
            if same_file(out, input) {
                bail!(
                    "{out_flag} {} is the input given by {in_flag}: writing it would destroy the input; choose another output",
                    out.display()
                );
            }
            // A new file inside an input folder harms nothing (a run folder under the
            // model's is fine); replacing one of the folder's files does.
            if input.is_dir() && out_r.starts_with(resolved(input)) && out.exists() {
                bail!(
                    "{out_flag} {} would replace a file of the input folder {in_flag} {}; write outputs elsewhere",
                    out.display(),
                    input.display()
                );
            }
        }
        for (other_flag, other) in &outputs[..i] {
            if same_file(other, out) {
                bail!(
                    "{out_flag} and {other_flag} both write {}: give them different paths",
                    out.display()
                );
            }
        }
    }
    Ok(())
}

/// Writes through a temporary file and a rename ([`fibecfed_core::fsio::write_atomic`]),
/// naming the file in errors.
pub fn write_atomic(file: &Path, bytes: &[u8]) -> Result<()> {
    fibecfed_core::fsio::write_atomic(file, bytes)
        .with_context(|| format!("cannot write {}", file.display()))
}

/// An exclusive lock on a run folder, held until dropped (or the process ends, however
/// it ends: the OS releases it, so a killed run never leaves a stale lock).
#[derive(Debug)]
pub struct FolderLock {
    _file: fs::File,
}

/// The lock file in a locked folder.
pub const LOCK_FILE: &str = ".fibecfed.lock";

/// Locks `dir` (which must exist) for this process; a second process gets a clear
/// refusal naming the holder's pid instead of writing beside it.
pub fn lock_folder(dir: &Path) -> Result<FolderLock> {
    lock_folder_waiting(dir, std::time::Duration::ZERO)
}

/// [`lock_folder`], waiting up to `wait` for another holder to let go (a process of a
/// crashed parent finishing its step, say) before refusing.
pub fn lock_folder_waiting(dir: &Path, wait: std::time::Duration) -> Result<FolderLock> {
    let path = dir.join(LOCK_FILE);
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot create the lock file {}", path.display()))?;
    let deadline = std::time::Instant::now() + wait;
    loop {
        match file.try_lock() {
            Ok(()) => break,
            Err(fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(fs::TryLockError::WouldBlock) => {
                let holder = fs::read_to_string(&path).unwrap_or_default();
                bail!(
                    "{} is in use by another fibecfed process{}; wait for it to finish or choose another folder",
                    dir.display(),
                    match holder.trim() {
                        "" => String::new(),
                        pid => format!(" (pid {pid})"),
                    }
                );
            }
            Err(fs::TryLockError::Error(e)) => {
                // Some network and FUSE file systems have no locks (ENOLCK, EOPNOTSUPP):
                // runs there worked before the lock existed and still do, unguarded.
                eprintln!(
                    "warning: cannot lock {} ({e}); nothing stops a second process from writing there",
                    path.display()
                );
                return Ok(FolderLock { _file: file });
            }
        }
    }
    // Only the holder writes its pid, for the message above.
    let _ = file.set_len(0);
    let _ = write!(file, "{}", std::process::id());
    Ok(FolderLock { _file: file })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_leaves_user_tmp_files_and_symlinks_alone() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("victim");
        fs::write(&target, b"precious").unwrap();
        let out = dir.path().join("metrics.jsonl");
        std::os::unix::fs::symlink(&target, dir.path().join("metrics.jsonl.tmp")).unwrap();
        fs::write(dir.path().join(".metrics.jsonl.tmp"), b"mine").unwrap();
        write_atomic(&out, b"new").unwrap();
        assert_eq!(fs::read(&out).unwrap(), b"new");
        assert_eq!(fs::read(&target).unwrap(), b"precious");
        assert_eq!(
            fs::read(dir.path().join(".metrics.jsonl.tmp")).unwrap(),
            b"mine"
        );
        // Nothing of ours is left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(!names.iter().any(|n| n.contains("fibecfed")), "{names:?}");
    }

    #[test]
    fn a_failed_write_removes_its_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        // The rename fails: the destination is a non-empty folder.
        let out = dir.path().join("out");
        fs::create_dir(&out).unwrap();
        fs::write(out.join("x"), b"").unwrap();
        let err = write_atomic(&out, b"data").unwrap_err();
        assert!(format!("{err:#}").contains("out"), "{err:#}");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "a temporary file was left: {names:?}");
    }

    #[test]
    fn a_second_lock_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock_folder(dir.path()).unwrap();
        let err = lock_folder(dir.path()).unwrap_err().to_string();
        assert!(err.contains("in use by another fibecfed process"), "{err}");
        assert!(err.contains(&std::process::id().to_string()), "{err}");
        drop(first);
        lock_folder(dir.path()).unwrap();
    }

    #[test]
    fn outputs_may_not_be_inputs_or_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data.tsv");
        fs::write(&data, b"x").unwrap();
        let link = dir.path().join("link.tsv");
        fs::hard_link(&data, &link).unwrap();
        let model = dir.path().join("model");
        fs::create_dir(&model).unwrap();
        fs::write(model.join("config.json"), b"{}").unwrap();
        let inputs = [("--data", data.as_path()), ("--model-dir", model.as_path())];
        let same = dir.path().join("sub/../data.tsv");
        fs::create_dir(dir.path().join("sub")).unwrap();
        for (out, needle) in [
            (same, "--data"),
            (link, "--data"),
            (
                model.join("config.json"),
                "would replace a file of the input folder",
            ),
        ] {
            let err = check_outputs_apart(&inputs, &[("--output", out)])
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{err}");
        }
        let a = dir.path().join("a.json");
        let err = check_outputs_apart(&inputs, &[("--x", a.clone()), ("--y", a.clone())])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--x and --y") || err.contains("--y and --x"),
            "{err}"
        );
        check_outputs_apart(&inputs, &[("--x", a)]).unwrap();
        // A new file in an input folder is fine.
        check_outputs_apart(&inputs, &[("--x", model.join("new.json"))]).unwrap();
    }
}
