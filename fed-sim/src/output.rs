//! Output files: checked before long work starts, written atomically.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Creates `dir` if needed and proves it writable with a probe file, so a run fails
/// at start rather than after hours of training.
pub fn check_writable_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir)
        .with_context(|| format!("cannot create output folder {}", dir.display()))?;
    let probe = dir.join(".fibecfed-write-probe");
    fs::write(&probe, b"")
        .with_context(|| format!("output folder {} is not writable", dir.display()))?;
    let _ = fs::remove_file(&probe);
    Ok(())
}

/// The parent folder of `file` must exist and be writable; `file` must not be a folder.
pub fn check_writable_file(file: &Path) -> Result<()> {
    if file.is_dir() {
        anyhow::bail!(
            "output path {} is a folder, expected a file",
            file.display()
        );
    }
    let parent = parent_of(file);
    if !parent.is_dir() {
        anyhow::bail!(
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

fn parent_of(file: &Path) -> PathBuf {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn tmp_path(file: &Path) -> PathBuf {
    let mut name = file
        .file_name()
        .map(std::ffi::OsStr::to_os_string)
        .unwrap_or_default();
    name.push(".tmp");
    file.with_file_name(name)
}

/// Writes through a temporary file and a rename, so a reader never sees half a file
/// and an old file survives a failed write.
pub fn write_atomic(file: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(file);
    let mut f =
        fs::File::create(&tmp).with_context(|| format!("cannot write {}", file.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("cannot write {}", file.display()))?;
    f.sync_all()
        .with_context(|| format!("cannot write {}", file.display()))?;
    drop(f);
    fs::rename(&tmp, file).with_context(|| format!("cannot write {}", file.display()))?;
    Ok(())
}
