//! Atomic file writes, shared by every crate that writes results: adapters, tensors,
//! checkpoints, metrics.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A temporary name in `path`'s folder that no user file and no other writer (thread
/// or process) shares: a fixed `<file>.tmp` would destroy a user's file of that name
/// and let two writers interleave.
fn tmp_path(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(format!(
        ".fibecfed-{}-{}.tmp",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    path.with_file_name(name)
}

/// Writes `bytes` to `path` through a temporary file, an fsync and a rename, so a
/// reader never sees half a file and an old file survives a failed write. The
/// temporary file is created new (`O_EXCL`: never through a symlink, never over an
/// existing file) and removed when anything fails, a full disk included.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = tmp_path(path);
    let written = (|| {
        let mut file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        file.write_all(bytes)?;
        // Without this the rename can reach the disk before the data, and a crash
        // would leave a complete-looking but empty file at the target.
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    // The data is safe once renamed; a file system that cannot sync a folder (EINVAL
    // on some network mounts) only loses the durability of the rename itself.
    match sync_parent_dir(path) {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::InvalidInput | io::ErrorKind::Unsupported
            ) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// Makes the rename itself durable. Only Unix lets a directory be opened and synced.
#[cfg(unix)]
fn sync_parent_dir(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

#[cfg(not(unix))]
fn sync_parent_dir(_path: &Path) -> io::Result<()> {
    Ok(())
}
