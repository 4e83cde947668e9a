//! Cargo builds whose executable xtask then runs or packages (the fibecfed binary,
//! gpu-bench). Cargo's JSON messages say where the executable landed, so a custom
//! `CARGO_TARGET_DIR` needs no guessing; this module makes sure that reading them
//! never hides why a build failed.
//!
//! With `--message-format=json` cargo leaves its diagnostics to us: every
//! compiler message is printed to stderr as it arrives (as cargo would), cargo's
//! own stderr (progress, build-script failures) passes straight through, and a
//! failure ends with the errors' headlines, so the last lines on screen say why
//! (a missing `-lopenblas`, say) rather than only cargo's exit status.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::common::describe;
use crate::system;

/// How many errors the closing summary names; the full text is above it.
const SUMMARY_ERRORS: usize = 5;

/// Runs `cmd` (a `cargo build ...` without a message format) and returns the
/// executable of binary target `bin`.
pub fn build_executable(cmd: &mut Command, bin: &str) -> Result<PathBuf> {
    cmd.arg("--message-format=json")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    eprintln!("+ {}", describe(cmd));
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    let scan = match child.stdout.take() {
        Some(out) => scan(BufReader::new(out), bin, &mut std::io::stderr().lock()),
        None => Ok(Scan::default()),
    };
    // Waited for before `scan`'s error is looked at, so no child is left behind.
    let status = child.wait().context("waiting for cargo")?;
    let scan = scan?;
    if !status.success() {
        bail!("`{}` failed ({status}){}", describe(cmd), scan.summary());
    }
    scan.executable.with_context(|| {
        format!("cargo built `{bin}` but no artifact message named its executable")
    })
}

/// What cargo's messages told us.
#[derive(Debug, Default)]
pub struct Scan {
    pub executable: Option<PathBuf>,
    /// A one-paragraph headline per error-level compiler message.
    pub errors: Vec<String>,
}

impl Scan {
    /// The errors' headlines and, when one is a missing library we know, the
    /// package to install; empty when cargo's message above is all there is.
    fn summary(&self) -> String {
        if self.errors.is_empty() {
            return "; cargo's message is above".to_owned();
        }
        let mut out = String::from(":");
        for error in self.errors.iter().take(SUMMARY_ERRORS) {
            out.push_str("\n  - ");
            out.push_str(&error.replace('\n', "\n    "));
        }
        if self.errors.len() > SUMMARY_ERRORS {
            let more = self.errors.len() - SUMMARY_ERRORS;
            let _ = write!(out, "\n  ... and {more} more (above)");
        }
        let all = self.errors.join("\n");
        if let Some(hint) = system::link_error_hint(&all) {
            let _ = write!(out, "\n{hint}");
        }
        out
    }
}

/// Reads cargo's JSON lines: writes each compiler message's rendered text to
/// `diagnostics`, remembers the errors and the executable of `bin`. Lines that are
/// not JSON are passed on as they are, so nothing cargo says is lost.
pub fn scan(messages: impl BufRead, bin: &str, diagnostics: &mut impl Write) -> Result<Scan> {
    let mut found = Scan::default();
    for line in messages.lines() {
        let line = line.context("reading cargo's messages")?;
        let Ok(msg) = serde_json::from_str::<Value>(&line) else {
            writeln!(diagnostics, "{line}")?;
            continue;
        };
        match msg["reason"].as_str() {
            Some("compiler-message") => {
                let message = &msg["message"];
                if let Some(rendered) = message["rendered"].as_str() {
                    write!(diagnostics, "{rendered}")?;
                }
                if message["level"].as_str().is_some_and(is_error_level) {
                    found.errors.push(headline(message));
                }
            }
            Some("compiler-artifact") if msg["target"]["name"] == bin => {
                if let Some(path) = msg["executable"].as_str() {
                    found.executable = Some(PathBuf::from(path));
                }
            }
            _ => {}
        }
    }
    Ok(found)
}

fn is_error_level(level: &str) -> bool {
    // "error: internal compiler error" is reported with its own level.
    level == "error" || level.starts_with("error:")
}

/// The error's own message, its source location, and the lines of its notes that
/// report an error themselves (a linker's "unable to find library -lfoo" lives in a
/// note of "linking with `cc` failed").
fn headline(message: &Value) -> String {
    let mut out = message["message"].as_str().unwrap_or("").trim().to_owned();
    let primary = message["spans"].as_array().and_then(|spans| {
        spans
            .iter()
            .find(|s| s["is_primary"].as_bool().unwrap_or(false))
    });
    if let Some(span) = primary
        && let (Some(file), Some(line)) = (span["file_name"].as_str(), span["line_start"].as_u64())
    {
        let _ = write!(out, " ({file}:{line})");
    }
    let notes = message["children"].as_array().into_iter().flatten();
    for note in notes.filter_map(|c| c["message"].as_str()) {
        for line in note.lines().map(str::trim) {
            if line.contains("error") {
                out.push('\n');
                out.push_str(line);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;
