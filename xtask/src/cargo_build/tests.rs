use std::fs;
use std::path::Path;

use super::*;
use crate::common::cargo;

/// Captured from `cargo build --message-format=json` (cargo 1.95) of a crate whose
/// build script prints `cargo:rustc-link-lib=nosuchlib_fibecfed`: the linker's
/// complaint is only in a note of the compiler message, never on cargo's stderr.
const LINK_FAILURE: &str = include_str!("link-failure.jsonl");

#[test]
fn a_link_failure_names_the_missing_library() -> Result<()> {
    let mut shown = Vec::new();
    let scan = scan(LINK_FAILURE.as_bytes(), "linkfail", &mut shown)?;
    let shown = String::from_utf8(shown)?;
    assert!(
        shown.contains("error: linking with `cc` failed")
            && shown.contains("unable to find library -lnosuchlib_fibecfed"),
        "{shown}"
    );
    assert_eq!(scan.executable, None);
    assert_eq!(scan.errors.len(), 1);
    let error = &scan.errors[0];
    assert!(error.starts_with("linking with `cc` failed"), "{error}");
    assert!(
        error.contains("rust-lld: error: unable to find library -lnosuchlib_fibecfed"),
        "{error}"
    );
    // The long linker command line is a note too, but carries no "error".
    assert!(!error.contains("-nodefaultlibs"), "{error}");
    Ok(())
}

#[test]
fn finds_the_executable_and_shows_warnings_without_counting_them() -> Result<()> {
    let messages = r#"{"reason":"compiler-artifact","target":{"name":"fibecfed_sim"},"executable":null}
not json
{"reason":"compiler-message","message":{"level":"warning","message":"unused","rendered":"warning: unused\n","children":[],"spans":[]}}
{"reason":"compiler-artifact","target":{"name":"fibecfed"},"executable":"/t/release/fibecfed"}
{"reason":"build-finished","success":true}"#;
    let mut shown = Vec::new();
    let scan = scan(messages.as_bytes(), "fibecfed", &mut shown)?;
    assert_eq!(scan.executable, Some(PathBuf::from("/t/release/fibecfed")));
    assert!(scan.errors.is_empty());
    assert_eq!(String::from_utf8(shown)?, "not json\nwarning: unused\n");
    Ok(())
}

#[test]
fn a_compile_error_names_its_place() -> Result<()> {
    let message = r#"{"reason":"compiler-message","message":{"level":"error","message":"cannot find value `x` in this scope","rendered":"error[E0425]: ...\n","children":[],"spans":[{"file_name":"src/main.rs","line_start":3,"is_primary":true}]}}"#;
    let scan = scan(message.as_bytes(), "x", &mut Vec::new())?;
    assert_eq!(
        scan.errors,
        ["cannot find value `x` in this scope (src/main.rs:3)"]
    );
    Ok(())
}

#[test]
fn a_missing_openblas_gets_its_package_named() {
    let scan = Scan {
        executable: None,
        errors: vec![
            "linking with `cc` failed: exit status: 1\n\
             rust-lld: error: unable to find library -lopenblas"
                .to_owned(),
        ],
    };
    let summary = scan.summary();
    assert!(
        summary.contains("unable to find library -lopenblas")
            && summary.contains("sudo apt-get install -y libopenblas-dev"),
        "{summary}"
    );
    assert_eq!(Scan::default().summary(), "; cargo's message is above");
}

/// A throwaway crate; with `link` its build script asks for a library nobody has.
fn tiny_crate(dir: &Path, link: bool) -> Result<()> {
    fs::create_dir_all(dir.join("src"))?;
    fs::write(
        dir.join("Cargo.toml"),
        "[package]\nname = \"tiny\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\n[workspace]\n",
    )?;
    fs::write(dir.join("src/main.rs"), "fn main() {}\n")?;
    let script = if link {
        "fn main() { println!(\"cargo:rustc-link-lib=nosuchlib_fibecfed\"); }\n"
    } else {
        "fn main() {}\n"
    };
    fs::write(dir.join("build.rs"), script)?;
    Ok(())
}

fn build_tiny(dir: &Path) -> Result<PathBuf> {
    let mut cmd = cargo();
    // Its own target folder: the workspace's may be locked by the cargo running us.
    cmd.args(["build", "--offline", "--bin", "tiny"])
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", dir.join("target"));
    build_executable(&mut cmd, "tiny")
}

#[test]
fn a_real_failed_build_says_why() -> Result<()> {
    let dir = tempfile::tempdir()?;
    tiny_crate(dir.path(), true)?;
    let err = build_tiny(dir.path()).err().map(|e| format!("{e:#}"));
    let err = err.unwrap_or_default();
    // lld says "unable to find library -lX", GNU ld "cannot find -lX".
    assert!(
        err.contains("failed (exit status: 101)")
            && (err.contains("unable to find library -lnosuchlib_fibecfed")
                || err.contains("cannot find -lnosuchlib_fibecfed")),
        "{err}"
    );
    Ok(())
}

#[test]
fn a_real_build_finds_its_executable() -> Result<()> {
    let dir = tempfile::tempdir()?;
    tiny_crate(dir.path(), false)?;
    let exe = build_tiny(dir.path())?;
    assert!(exe.is_file(), "{}", exe.display());
    Ok(())
}
