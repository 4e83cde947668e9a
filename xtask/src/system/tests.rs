use std::cell::RefCell;
use std::collections::HashSet;
use std::fs;

use super::*;

/// A described machine: which packages are installed, who we are, and what apt
/// does. Installing a package makes its probe succeed, as on a real machine.
// A fake machine is a bag of yes/no facts; an enum per fact would only obscure them.
#[allow(clippy::struct_excessive_bools)]
#[derive(Debug, Default)]
struct Fake {
    installed: RefCell<HashSet<&'static str>>,
    lib_dirs: Vec<PathBuf>,
    dpkg: bool,
    apt: bool,
    root: bool,
    sudo: bool,
    /// apt-get install fails until `apt-get update` has run.
    stale_lists: RefCell<bool>,
    /// apt-get fails whatever we do (no network).
    apt_broken: bool,
    ran: RefCell<Vec<String>>,
}

impl Fake {
    fn with(packages: &[&'static str]) -> Self {
        Self {
            installed: RefCell::new(packages.iter().copied().collect()),
            ..Self::default()
        }
    }

    fn has(&self, package: &str) -> bool {
        self.installed.borrow().contains(package)
    }

    fn ran(&self) -> Vec<String> {
        self.ran.borrow().clone()
    }
}

impl Host for Fake {
    fn output(&self, argv: &[&str]) -> Option<String> {
        let ok = match argv {
            ["python3", "-m", "pip", ..] => self.has("python3-pip"),
            ["python3", "-c", ..] => self.has("python3-venv"),
            ["protoc", ..] => self.has("protobuf-compiler"),
            ["apt-get", "--version"] => self.apt,
            ["sudo", "-n", "true"] => self.sudo,
            ["id", "-u"] => return Some(if self.root { "0\n" } else { "1000\n" }.to_owned()),
            ["dpkg-query", .., package] if self.dpkg => {
                let status = if self.has(package) {
                    "install ok installed"
                } else {
                    "deinstall ok config-files"
                };
                return Some(status.to_owned());
            }
            _ => false,
        };
        ok.then(String::new)
    }

    fn run(&self, argv: &[String]) -> Result<bool> {
        self.ran.borrow_mut().push(argv.join(" "));
        let apt_at = argv.iter().position(|w| w == "apt-get");
        let args: Vec<&str> = apt_at
            .map(|at| argv[at + 1..].iter().map(String::as_str).collect())
            .unwrap_or_default();
        if self.apt_broken {
            return Ok(false);
        }
        match args.as_slice() {
            ["update"] => {
                self.stale_lists.replace(false);
                Ok(true)
            }
            ["install", "-y", packages @ ..] if !*self.stale_lists.borrow() => {
                for package in packages {
                    let name = Piece::ALL
                        .iter()
                        .map(|p| p.entry().package)
                        .find(|known| known == package);
                    self.installed.borrow_mut().extend(name);
                }
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn library_dirs(&self) -> Vec<PathBuf> {
        self.lib_dirs.clone()
    }
}

fn message(result: Result<()>) -> String {
    match result {
        Ok(()) => "ok".to_owned(),
        Err(err) => {
            assert!(
                err.downcast_ref::<MissingPrerequisite>().is_some(),
                "not a MissingPrerequisite: {err:#}"
            );
            format!("{err:#}")
        }
    }
}

#[test]
fn openblas_is_found_by_its_file_or_by_dpkg() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut fake = Fake::with(&[]);
    fake.lib_dirs = vec![dir.path().join("nothing-here"), dir.path().to_path_buf()];
    assert_eq!(missing(&fake, &[Piece::OpenBlas]).len(), 1);
    // Only the unversioned name counts: it is what `-lopenblas` looks for.
    fs::write(dir.path().join("libopenblas.so.0"), "")?;
    assert_eq!(missing(&fake, &[Piece::OpenBlas]).len(), 1);
    fs::write(dir.path().join("libopenblas.so"), "")?;
    assert!(missing(&fake, &[Piece::OpenBlas]).is_empty());

    let mut fake = Fake::with(&["libopenblas-dev"]);
    fake.dpkg = true;
    assert!(missing(&fake, &[Piece::OpenBlas]).is_empty());
    // Removed but not purged: dpkg still lists it, the library is gone.
    let mut fake = Fake::with(&[]);
    fake.dpkg = true;
    assert_eq!(missing(&fake, &[Piece::OpenBlas]).len(), 1);
    Ok(())
}

#[test]
fn nothing_missing_means_nothing_run() {
    let fake = Fake::with(&["libopenblas-dev", "protobuf-compiler", "python3-pip"]);
    let fake = Fake {
        dpkg: true,
        apt: true,
        root: true,
        ..fake
    };
    let pieces = [Piece::OpenBlas, Piece::Protoc, Piece::Pip];
    assert_eq!(message(ensure_on(&fake, &pieces)), "ok");
    assert!(fake.ran().is_empty());
}

#[test]
fn root_installs_with_apt_and_retries_after_update() {
    let fake = Fake {
        dpkg: true,
        apt: true,
        root: true,
        stale_lists: RefCell::new(true),
        ..Fake::default()
    };
    assert_eq!(message(ensure_on(&fake, &[Piece::OpenBlas])), "ok");
    let install = "env DEBIAN_FRONTEND=noninteractive apt-get install -y libopenblas-dev";
    assert_eq!(
        fake.ran(),
        [
            install,
            "env DEBIAN_FRONTEND=noninteractive apt-get update",
            install
        ]
    );
    assert!(fake.has("libopenblas-dev"));
}

#[test]
fn sudo_is_used_when_it_needs_no_password() {
    let fake = Fake {
        apt: true,
        sudo: true,
        ..Fake::default()
    };
    assert_eq!(
        message(ensure_on(&fake, &[Piece::Protoc, Piece::Venv])),
        "ok"
    );
    assert_eq!(
        fake.ran(),
        [
            "sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y protobuf-compiler python3-venv"
        ]
    );
}

#[test]
fn without_root_or_sudo_the_command_is_printed() {
    let fake = Fake {
        apt: true,
        dpkg: true,
        ..Fake::default()
    };
    let text = message(ensure_on(&fake, &[Piece::OpenBlas]));
    assert!(fake.ran().is_empty());
    assert!(
        text.contains("missing system package(s): libopenblas-dev (OpenBLAS")
            && text.contains("\n  sudo apt-get install -y libopenblas-dev\n")
            && text.contains(SKIP_VAR),
        "{text}"
    );
}

#[test]
fn a_failing_apt_as_root_gives_the_plain_command() {
    let fake = Fake {
        apt: true,
        root: true,
        apt_broken: true,
        ..Fake::default()
    };
    let text = message(ensure_on(&fake, &[Piece::Pip]));
    assert_eq!(fake.ran().len(), 2, "{:?}", fake.ran());
    assert!(
        text.contains("apt-get failed") && text.contains("\n  apt-get install -y python3-pip\n"),
        "{text}"
    );
}

#[test]
fn without_apt_it_says_what_debian_would_install() {
    let fake = Fake {
        root: true,
        ..Fake::default()
    };
    let text = message(ensure_on(&fake, &[Piece::Protoc]));
    assert!(fake.ran().is_empty());
    assert!(
        text.contains("no apt-get") && text.contains("`apt-get install -y protobuf-compiler`"),
        "{text}"
    );
}

#[test]
fn library_dirs_put_library_path_first() {
    let dirs = library_dirs(Some(Path::new("/opt/a:/opt/b")));
    assert_eq!(
        &dirs[..2],
        [PathBuf::from("/opt/a"), PathBuf::from("/opt/b")]
    );
    assert!(dirs.contains(&PathBuf::from("/usr/lib")));
    assert!(!library_dirs(None).is_empty());
}

#[test]
fn link_hints_match_whole_library_names() {
    let hint = link_error_hint("rust-lld: error: unable to find library -lopenblas");
    assert!(
        hint.is_some_and(|h| h.contains("sudo apt-get install -y libopenblas-dev")),
        "lld wording"
    );
    assert!(link_error_hint("/usr/bin/ld: cannot find -lopenblas: No such file").is_some());
    assert!(link_error_hint("cannot find -lopenblas64").is_none());
    assert!(link_error_hint("cannot find -lfoo").is_none());
}
