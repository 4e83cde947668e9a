//! The system pieces xtask's commands need that cargo cannot fetch: the one table of
//! what each piece is, how it is detected and which Debian package provides it, and
//! `ensure`, which every command calls before it builds or runs anything that needs
//! them.
//!
//! A missing piece is installed with `apt-get install -y` when we are root or
//! password-less `sudo` works; otherwise (or when apt fails) the command stops with
//! exit code 2 and the one line to run. `FIBECFED_SKIP_SYSTEM_CHECK=1` turns the check
//! off for machines where a piece lives where this module does not look.
//!
//! Which command needs what:
//!
//! | command                       | pieces                                        |
//! |-------------------------------|-----------------------------------------------|
//! | test, bench, reproduce        | OpenBLAS                                      |
//! | flower-e2e                    | OpenBLAS; python3-venv when it makes the venv |
//! | codegen                       | protoc                                        |
//! | assets, data (when fetching)  | pip                                           |
//! | gpu-bench                     | none (CUDA is loaded at run time)             |

use std::env;
use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result};

use crate::common::{env_flag, env_path, run_quietly, shell_words};

/// Set to 1 to skip the check (documented in the usage text and the README).
pub const SKIP_VAR: &str = "FIBECFED_SKIP_SYSTEM_CHECK";

/// A system piece some command needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// `libopenblas.so`, which the linker needs for every workspace crate that
    /// multiplies matrices (openblas-src's `system` feature links `-lopenblas`).
    OpenBlas,
    /// `python3 -m pip`, which downloads the model wheel and the fallback data.
    Pip,
    /// `python3 -m venv` with ensurepip (Debian splits both out of python3), for
    /// flower-e2e's flwr environment.
    Venv,
    /// `protoc`, which tonic-prost-build runs for `cargo xtask codegen`.
    Protoc,
}

impl Piece {
    /// Every piece, for searches over the whole table.
    const ALL: [Piece; 4] = [Piece::OpenBlas, Piece::Pip, Piece::Venv, Piece::Protoc];

    /// The table: what each piece is for, its Debian package, how we tell it is there.
    fn entry(self) -> Entry {
        match self {
            Piece::OpenBlas => Entry {
                why: "OpenBLAS, which the linker needs to build the workspace",
                package: "libopenblas-dev",
                detect: Detect::Library("libopenblas.so"),
            },
            Piece::Pip => Entry {
                why: "python3 with pip, which fetches the model and the fallback data",
                package: "python3-pip",
                detect: Detect::Probe(&["python3", "-m", "pip", "--version"]),
            },
            Piece::Venv => Entry {
                why: "python3's venv with ensurepip, for flower-e2e's flwr environment",
                package: "python3-venv",
                // `venv --help` works without ensurepip; making a venv with pip does not.
                detect: Detect::Probe(&["python3", "-c", "import venv, ensurepip"]),
            },
            Piece::Protoc => Entry {
                why: "protoc, which `cargo xtask codegen` runs",
                package: "protobuf-compiler",
                detect: Detect::Probe(&["protoc", "--version"]),
            },
        }
    }
}

/// How a piece is detected.
#[derive(Debug, Clone, Copy)]
enum Detect {
    /// A library file the linker must find in one of the host's library folders;
    /// failing that, the Debian package being installed counts (dpkg knows multiarch
    /// folders we do not list).
    Library(&'static str),
    /// A command that exits 0 exactly when the piece works.
    Probe(&'static [&'static str]),
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// What the person reading the error needs it for.
    why: &'static str,
    package: &'static str,
    detect: Detect,
}

/// A piece was missing and xtask could not install it. `main` maps it to exit code 2
/// (the person has to act, as with bad flags); the message names the package and the
/// command.
#[derive(Debug)]
pub struct MissingPrerequisite {
    pub message: String,
}

impl fmt::Display for MissingPrerequisite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for MissingPrerequisite {}

/// What detection and installation ask of the machine; tests pass a fake one.
pub trait Host {
    /// The stdout of `argv` when it ran and exited 0; `None` otherwise.
    fn output(&self, argv: &[&str]) -> Option<String>;
    /// Runs `argv` with its output shown (apt's progress); true on exit 0.
    fn run(&self, argv: &[String]) -> Result<bool>;
    /// Where the linker looks for libraries.
    fn library_dirs(&self) -> Vec<PathBuf>;
}

/// The machine we run on.
#[derive(Debug)]
struct RealHost;

impl Host for RealHost {
    fn output(&self, argv: &[&str]) -> Option<String> {
        let (program, args) = argv.split_first()?;
        let out = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn run(&self, argv: &[String]) -> Result<bool> {
        let (program, args) = argv.split_first().context("empty command")?;
        // apt's chatter goes to stderr: some commands promise a path on stdout.
        Ok(run_quietly(Command::new(program).args(args))?.success())
    }

    fn library_dirs(&self) -> Vec<PathBuf> {
        library_dirs(env_path("LIBRARY_PATH").as_deref())
    }
}

/// `LIBRARY_PATH` (which gcc passes to the linker) first, then the folders Debian,
/// Fedora and hand-built installs use.
fn library_dirs(library_path: Option<&Path>) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = library_path
        .map(|p| env::split_paths(p).collect())
        .unwrap_or_default();
    dirs.push(PathBuf::from(format!(
        "/usr/lib/{}-linux-gnu",
        env::consts::ARCH
    )));
    for dir in [
        "/usr/lib64",
        "/usr/lib",
        "/usr/local/lib",
        "/usr/local/lib64",
    ] {
        dirs.push(PathBuf::from(dir));
    }
    dirs
}

/// Makes sure `pieces` are there, installing what is missing when allowed.
pub fn ensure(pieces: &[Piece]) -> Result<()> {
    if env_flag(SKIP_VAR) {
        eprintln!("system check skipped ({SKIP_VAR} is set)");
        return Ok(());
    }
    ensure_on(&RealHost, pieces)
}

fn ensure_on(host: &dyn Host, pieces: &[Piece]) -> Result<()> {
    let missing = missing(host, pieces);
    if missing.is_empty() {
        return Ok(());
    }
    let packages: Vec<&str> = missing.iter().map(|e| e.package).collect();
    let access = access(host);
    let Some(prefix) = access.apt_prefix() else {
        return Err(missing_error(&missing, access, None));
    };
    eprintln!(
        "system: missing {}; installing with apt-get",
        describe_missing(&missing)
    );
    let installed = apt_install(host, &prefix, &packages)?;
    let still = self::missing(host, pieces);
    if installed && still.is_empty() {
        eprintln!("system: installed {}", packages.join(" "));
        return Ok(());
    }
    let why = if installed {
        "apt-get succeeded but the check still fails"
    } else {
        "apt-get failed (its output is above)"
    };
    Err(missing_error(
        &still_or(&still, &missing),
        access,
        Some(why),
    ))
}

/// The entries after a failed install: those still missing, or all when the recheck
/// found nothing missing (then apt's own failure is the news).
fn still_or(still: &[Entry], before: &[Entry]) -> Vec<Entry> {
    if still.is_empty() {
        before.to_vec()
    } else {
        still.to_vec()
    }
}

/// The table entries of `pieces` that are not there.
fn missing(host: &dyn Host, pieces: &[Piece]) -> Vec<Entry> {
    pieces
        .iter()
        .map(|p| p.entry())
        .filter(|e| !is_present(host, e))
        .collect()
}

fn is_present(host: &dyn Host, entry: &Entry) -> bool {
    match entry.detect {
        Detect::Library(file) => {
            host.library_dirs().iter().any(|d| d.join(file).exists())
                || dpkg_installed(host, entry.package)
        }
        Detect::Probe(argv) => host.output(argv).is_some(),
    }
}

/// `dpkg -s` exits 0 for a removed package whose config files remain, so ask for the
/// status itself.
fn dpkg_installed(host: &dyn Host, package: &str) -> bool {
    host.output(&["dpkg-query", "-W", "-f=${Status}", package])
        .is_some_and(|status| status.trim() == "install ok installed")
}

/// Whether and how we may run apt-get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Access {
    apt: bool,
    root: bool,
    sudo: bool,
}

impl Access {
    /// The words before `apt-get`, or `None` when we cannot install. `env` carries
    /// DEBIAN_FRONTEND through sudo, which resets the environment.
    fn apt_prefix(self) -> Option<Vec<String>> {
        let env = ["env", "DEBIAN_FRONTEND=noninteractive"];
        let words: &[&str] = match (self.apt, self.root, self.sudo) {
            (false, _, _) | (true, false, false) => return None,
            (true, true, _) => &env,
            (true, false, true) => &["sudo", "-n", env[0], env[1]],
        };
        Some(words.iter().map(|w| (*w).to_owned()).collect())
    }
}

fn access(host: &dyn Host) -> Access {
    let apt = host.output(&["apt-get", "--version"]).is_some();
    let root = host
        .output(&["id", "-u"])
        .is_some_and(|uid| uid.trim() == "0");
    // Only asked when it matters: `sudo -n` never prompts, so this cannot hang.
    let sudo = apt && !root && host.output(&["sudo", "-n", "true"]).is_some();
    Access { apt, root, sudo }
}

/// `apt-get install -y`, once more after `apt-get update` when the first try fails
/// (fresh images often have stale or empty package lists).
fn apt_install(host: &dyn Host, prefix: &[String], packages: &[&str]) -> Result<bool> {
    let command = |args: &[&str]| -> Vec<String> {
        let mut argv = prefix.to_vec();
        argv.push("apt-get".to_owned());
        argv.extend(args.iter().map(|a| (*a).to_owned()));
        argv
    };
    let install: Vec<&str> = ["install", "-y"].iter().chain(packages).copied().collect();
    if host.run(&command(&install))? {
        return Ok(true);
    }
    eprintln!("system: apt-get install failed; updating the package lists and trying again");
    if !host.run(&command(&["update"]))? {
        return Ok(false);
    }
    host.run(&command(&install))
}

fn describe_missing(missing: &[Entry]) -> String {
    missing
        .iter()
        .map(|e| format!("{} ({})", e.package, e.why))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The command a person should run: plain when they are root, with sudo otherwise.
fn install_command(missing: &[Entry], root: bool) -> String {
    let mut words = if root { vec![] } else { vec!["sudo"] };
    words.extend(["apt-get", "install", "-y"]);
    words.extend(missing.iter().map(|e| e.package));
    shell_words(words)
}

fn missing_error(missing: &[Entry], access: Access, why: Option<&str>) -> anyhow::Error {
    let command = install_command(missing, access.root);
    let mut message = format!("missing system package(s): {}", describe_missing(missing));
    if let Some(why) = why {
        let _ = write!(message, "\n{why}");
    }
    if access.apt {
        let _ = write!(message, "\nInstall with:\n  {command}");
    } else {
        let _ = write!(
            message,
            "\nThis machine has no apt-get: install the equivalent of Debian's `{command}` \
             with its package manager"
        );
    }
    let _ = write!(
        message,
        "\n(If it is installed where xtask does not look, set {SKIP_VAR}=1.)"
    );
    MissingPrerequisite { message }.into()
}

/// For a failed build: when the linker could not find a library from the table,
/// the package that provides it and how to install it.
pub fn link_error_hint(text: &str) -> Option<String> {
    Piece::ALL.iter().map(|p| p.entry()).find_map(|e| {
        let Detect::Library(file) = e.detect else {
            return None;
        };
        let name = file.strip_prefix("lib")?.strip_suffix(".so")?;
        mentions_lib(text, name).then(|| {
            format!(
                "the linker cannot find {file}: install {} (`sudo apt-get install -y {}`)",
                e.package, e.package
            )
        })
    })
}

/// True when `text` has `-l<name>` as a whole word (`-lopenblas`, not `-lopenblas64`).
fn mentions_lib(text: &str, name: &str) -> bool {
    let needle = format!("-l{name}");
    text.match_indices(&needle).any(|(at, _)| {
        text[at + needle.len()..]
            .chars()
            .next()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'))
    })
}

#[cfg(test)]
mod tests;
