//! `cargo xtask reproduce`: the project's main job.
//!
//! Until the federated rounds land, it trains the centralised LoRA baseline on
//! MR with the `fibecfed` binary and writes `results/<UTC time>/summary.md`
//! next to the adapter and the metrics the binary produced.

use std::fmt::Write as _;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::common::{cargo, describe, usage_error, user_error, workspace_root};
use crate::{assets, data};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preset {
    /// The full MR train and dev sets.
    #[default]
    Default,
    /// A few minutes on a laptop: enough to prove the pipeline end to end (CI).
    Smoke,
}

impl Preset {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "default" => Ok(Self::Default),
            "smoke" => Ok(Self::Smoke),
            other => Err(usage_error(format!(
                "--preset {other:?}: expected `default` or `smoke`"
            ))),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::Smoke => "smoke",
        }
    }
}

#[derive(Debug, Default)]
pub struct Options {
    pub data_dir: Option<PathBuf>,
    pub model_dir: Option<PathBuf>,
    pub epochs: Option<u32>,
    pub preset: Preset,
}

/// The dataset `reproduce` trains on: the real MR, or its stand-in.
const DATASETS: [&str; 2] = ["mr", data::FALLBACK_DATASET];

pub fn run(options: &Options) -> Result<()> {
    let root = workspace_root()?;
    let model = assets::resolve(options.model_dir.as_deref())?;
    let data_root = data::resolve(options.data_dir.as_deref())?;
    let (dataset, train, dev) = pick_dataset(&data_root)?;

    let binary = build_binary(&root)?;

    let started = SystemTime::now();
    let results_rel = create_results_dir(&root, started)?;
    let epochs = options.epochs.unwrap_or(1);
    let mut args: Vec<String> = vec!["train".into()];
    let mut push = |flag: &str, value: String| {
        args.push(flag.to_owned());
        args.push(value);
    };
    push("--model-dir", model.display().to_string());
    push("--train", train.display().to_string());
    push("--eval", dev.display().to_string());
    push("--epochs", epochs.to_string());
    push("--lora-rank", "8".into());
    push("--lora-alpha", "16".into());
    push("--targets", "query,value".into());
    push("--lr", "5e-4".into());
    push("--batch-size", "16".into());
    push("--max-len", "64".into());
    push("--seed", "42".into());
    push("--save-adapter", format!("{results_rel}/adapter"));
    push("--metrics-out", format!("{results_rel}/metrics.json"));
    if options.preset == Preset::Smoke {
        push("--limit-train", "256".into());
        push("--limit-eval", "200".into());
    }

    let mut train_cmd = Command::new(&binary);
    train_cmd.args(&args).current_dir(&root);
    let command_line = describe(&train_cmd);
    eprintln!("+ (in {}) {command_line}", root.display());
    let clock = Instant::now();
    let status = train_cmd
        .status()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    let wall = clock.elapsed().as_secs_f64();
    if !status.success() {
        bail!("`fibecfed train` failed ({status}); whatever it wrote is in {results_rel}/");
    }

    let metrics_path = root.join(&results_rel).join("metrics.json");
    let metrics_text = fs::read_to_string(&metrics_path).with_context(|| {
        format!(
            "`fibecfed train` succeeded but left no {}",
            metrics_path.display()
        )
    })?;
    let metrics = Metrics::parse(&metrics_text)
        .with_context(|| format!("cannot read {}", metrics_path.display()))?;

    let summary = render_summary(&Summary {
        metrics: &metrics,
        command: &command_line,
        workdir: &root,
        preset: options.preset,
        model: &model,
        dataset,
        data_source: data_root.source,
        train: &train,
        dev: &dev,
        results: &results_rel,
        commit: &git_commit(&root),
        machine: &machine(),
        date: &utc_string(started),
        wall_seconds: wall,
    });
    let summary_path = root.join(&results_rel).join("summary.md");
    fs::write(&summary_path, &summary)
        .with_context(|| format!("cannot write {}", summary_path.display()))?;
    println!("{summary}");
    println!("{}", summary_path.display());
    Ok(())
}

fn pick_dataset(root: &data::DataRoot) -> Result<(&'static str, PathBuf, PathBuf)> {
    let mut reasons = Vec::new();
    for dataset in DATASETS {
        match data::split_files(&root.path, dataset) {
            Ok((train, dev)) => return Ok((dataset, train, dev)),
            Err(why) => reasons.push(format!("{why:#}")),
        }
    }
    let message = format!(
        "no MR data under {} (from {}): {}",
        root.path.display(),
        root.source,
        reasons.join("; ")
    );
    if root.user_named {
        Err(user_error(message))
    } else {
        bail!(message)
    }
}

/// Builds the binary and asks cargo where it put it, so a custom
/// `CARGO_TARGET_DIR` or `build.target-dir` is honoured. Diagnostics are still
/// rendered for the person watching (`json-render-diagnostics` sends them to
/// stderr).
fn build_binary(root: &Path) -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--release",
        "-p",
        "fibecfed-sim",
        "--bin",
        "fibecfed",
        "--message-format=json-render-diagnostics",
    ])
    .current_dir(root)
    .stdout(Stdio::piped());
    eprintln!("+ {}", describe(&cmd));
    let output = cmd
        .output()
        .with_context(|| format!("cannot start `{}`", describe(&cmd)))?;
    if !output.status.success() {
        bail!("building the fibecfed binary failed ({})", output.status);
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    find_executable(&stdout, "fibecfed")
        .context("cargo built fibecfed-sim but reported no `fibecfed` executable")
}

/// Picks the executable of binary target `name` out of cargo's JSON messages.
fn find_executable(messages: &str, name: &str) -> Option<PathBuf> {
    messages
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|msg| msg["reason"] == "compiler-artifact" && msg["target"]["name"] == name)
        .find_map(|msg| msg["executable"].as_str().map(PathBuf::from))
}

/// `results/<YYYYmmdd-HHMMSS>` relative to the workspace root; a suffix keeps
/// two runs started in the same second apart.
fn create_results_dir(root: &Path, started: SystemTime) -> Result<String> {
    let stamp = compact_stamp(started);
    let results = root.join("results");
    fs::create_dir_all(&results).with_context(|| format!("cannot create {}", results.display()))?;
    for attempt in 1..100 {
        let name = if attempt == 1 {
            stamp.clone()
        } else {
            format!("{stamp}-{attempt}")
        };
        match fs::create_dir(results.join(&name)) {
            Ok(()) => return Ok(format!("results/{name}")),
            Err(err) if err.kind() == ErrorKind::AlreadyExists => {}
            Err(err) => {
                return Err(err).with_context(|| format!("cannot create results/{name}"));
            }
        }
    }
    bail!("cannot find a free results/{stamp}-N folder")
}

#[derive(Debug, PartialEq)]
struct EpochRow {
    epoch: u64,
    train_loss: f64,
    eval_accuracy: f64,
    seconds: f64,
}

/// What `fibecfed train --metrics-out` writes:
/// `{"epochs":[{"epoch":1,"train_loss":..,"eval_accuracy":..,"seconds":..}],"config":{..}}`.
#[derive(Debug)]
struct Metrics {
    epochs: Vec<EpochRow>,
    config: Option<Value>,
}

impl Metrics {
    fn parse(text: &str) -> Result<Self> {
        let json: Value = serde_json::from_str(text).context("not valid JSON")?;
        let rows = json["epochs"]
            .as_array()
            .context("field `epochs`: expected an array")?;
        let mut epochs = Vec::with_capacity(rows.len());
        for (i, row) in rows.iter().enumerate() {
            let number = |field: &str| {
                row[field]
                    .as_f64()
                    .with_context(|| format!("field `epochs[{i}].{field}`: expected a number"))
            };
            epochs.push(EpochRow {
                epoch: row["epoch"].as_u64().with_context(|| {
                    format!("field `epochs[{i}].epoch`: expected a non-negative integer")
                })?,
                train_loss: number("train_loss")?,
                eval_accuracy: number("eval_accuracy")?,
                seconds: number("seconds")?,
            });
        }
        let config = json.get("config").filter(|c| !c.is_null()).cloned();
        Ok(Self { epochs, config })
    }
}

struct Summary<'a> {
    metrics: &'a Metrics,
    command: &'a str,
    workdir: &'a Path,
    preset: Preset,
    model: &'a Path,
    dataset: &'a str,
    data_source: &'a str,
    train: &'a Path,
    dev: &'a Path,
    results: &'a str,
    commit: &'a str,
    machine: &'a str,
    date: &'a str,
    wall_seconds: f64,
}

fn render_summary(s: &Summary<'_>) -> String {
    let mut out = String::new();
    // `writeln!` into a String cannot fail; the results are ignored on purpose.
    let _ = writeln!(out, "# Centralised LoRA baseline ({})\n", s.results);
    let _ = writeln!(
        out,
        "This is the **centralised LoRA baseline**: one model trained on all of the \
         training data, with no clients and no federated rounds. FibecFed rounds \
         (Fisher-based curriculum, global aggregation layers, sparse updates) arrive \
         with the federated issue; until then `cargo xtask reproduce` runs only this \
         baseline.\n"
    );
    let _ = writeln!(out, "| epoch | train loss | eval accuracy | wall seconds |");
    let _ = writeln!(out, "|---:|---:|---:|---:|");
    for row in &s.metrics.epochs {
        let _ = writeln!(
            out,
            "| {} | {:.4} | {:.4} | {:.1} |",
            row.epoch, row.train_loss, row.eval_accuracy, row.seconds
        );
    }
    if s.metrics.epochs.is_empty() {
        let _ = writeln!(out, "| (metrics.json lists no epochs) | | | |");
    }
    let _ = writeln!(out, "\n## Run\n");
    let _ = writeln!(out, "- preset: `{}`", s.preset.name());
    let _ = writeln!(
        out,
        "- command (run from `{}`):\n\n  ```sh\n  {}\n  ```\n",
        s.workdir.display(),
        s.command
    );
    let _ = writeln!(out, "- model folder: `{}`", s.model.display());
    let _ = writeln!(out, "- dataset: `{}` (from {})", s.dataset, s.data_source);
    let _ = writeln!(out, "- train file: `{}`", s.train.display());
    let _ = writeln!(out, "- eval file: `{}`", s.dev.display());
    let _ = writeln!(
        out,
        "- outputs: `{0}/adapter`, `{0}/metrics.json`",
        s.results
    );
    let _ = writeln!(
        out,
        "- wall time of the train command (measured by xtask): {:.1} s",
        s.wall_seconds
    );
    let _ = writeln!(out, "- git commit: `{}`", s.commit);
    let _ = writeln!(out, "- machine: {}", s.machine);
    let _ = writeln!(out, "- date: {}", s.date);
    if let Some(config) = &s.metrics.config {
        let pretty = serde_json::to_string_pretty(config).unwrap_or_else(|_| config.to_string());
        let _ = writeln!(
            out,
            "\n## Config (as reported by the binary)\n\n```json\n{pretty}\n```"
        );
    }
    out
}

fn git_commit(root: &Path) -> String {
    Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["rev-parse", "HEAD"])
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// "host, N logical CPUs, CPU model": enough to tell which machine a time
/// came from.
fn machine() -> String {
    let host = fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown host".to_owned());
    let cpus = std::thread::available_parallelism()
        .map_or_else(|_| "unknown".to_owned(), |n| n.to_string());
    let model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| cpu_model(&info))
        .unwrap_or_else(|| "unknown CPU".to_owned());
    format!("{host}, {cpus} logical CPUs (nproc), {model}")
}

fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(key, _)| key.trim() == "model name")
        .map(|(_, value)| value.trim().to_owned())
}

fn civil(time: SystemTime) -> (i64, u32, u32, u32, u32, u32) {
    // A clock before 1970 is not worth an error here; it shows as 1970.
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    civil_from_unix(secs)
}

/// UTC calendar fields from Unix seconds (Howard Hinnant's `civil_from_days`),
/// to avoid a date-time dependency for one timestamp.
fn civil_from_unix(secs: u64) -> (i64, u32, u32, u32, u32, u32) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        year,
        month,
        day,
        (rem / 3_600) as u32,
        (rem / 60 % 60) as u32,
        (rem % 60) as u32,
    )
}

fn compact_stamp(time: SystemTime) -> String {
    let (y, mo, d, h, mi, s) = civil(time);
    format!("{y:04}{mo:02}{d:02}-{h:02}{mi:02}{s:02}")
}

fn utc_string(time: SystemTime) -> String {
    let (y, mo, d, h, mi, s) = civil(time);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02} UTC")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::shell_words;
    use std::time::Duration;

    #[test]
    fn calendar_dates() {
        assert_eq!(civil_from_unix(0), (1970, 1, 1, 0, 0, 0));
        assert_eq!(civil_from_unix(951_782_400), (2000, 2, 29, 0, 0, 0));
        assert_eq!(civil_from_unix(1_700_000_000), (2023, 11, 14, 22, 13, 20));
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(compact_stamp(t), "20231114-221320");
        assert_eq!(utc_string(t), "2023-11-14 22:13:20 UTC");
    }

    #[test]
    fn metrics_contract() -> Result<()> {
        let m = Metrics::parse(
            r#"{"epochs":[{"epoch":1,"train_loss":0.41,"eval_accuracy":0.79,"seconds":123.4}],
                "config":{"lora_rank":8}}"#,
        )?;
        assert_eq!(
            m.epochs,
            vec![EpochRow {
                epoch: 1,
                train_loss: 0.41,
                eval_accuracy: 0.79,
                seconds: 123.4
            }]
        );
        assert_eq!(m.config, Some(serde_json::json!({"lora_rank": 8})));

        let err = Metrics::parse(r#"{"epochs":[{"epoch":1,"train_loss":"x"}]}"#)
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(err.contains("epochs[0].train_loss"), "{err}");
        assert!(Metrics::parse("{}").is_err());
        Ok(())
    }

    #[test]
    fn summary_names_the_baseline_and_the_numbers() -> Result<()> {
        let metrics = Metrics::parse(
            r#"{"epochs":[{"epoch":1,"train_loss":0.41,"eval_accuracy":0.79,"seconds":123.4}]}"#,
        )?;
        let text = render_summary(&Summary {
            metrics: &metrics,
            command: &shell_words(["fibecfed", "train", "--epochs", "1"]),
            workdir: Path::new("/w"),
            preset: Preset::Smoke,
            model: Path::new("/m"),
            dataset: "mr",
            data_source: "../shared/data",
            train: Path::new("/d/mr/train.tsv"),
            dev: Path::new("/d/mr/dev.tsv"),
            results: "results/20231114-221320",
            commit: "unknown",
            machine: "host, 2 logical CPUs (nproc), cpu",
            date: "2023-11-14 22:13:20 UTC",
            wall_seconds: 130.0,
        });
        assert!(text.contains("centralised LoRA baseline"));
        assert!(text.contains("FibecFed rounds"));
        assert!(text.contains("| 1 | 0.4100 | 0.7900 | 123.4 |"), "{text}");
        assert!(text.contains("fibecfed train --epochs 1"));
        Ok(())
    }

    #[test]
    fn finds_the_binary_in_cargo_messages() {
        let messages = r#"{"reason":"compiler-artifact","target":{"name":"fibecfed_sim"},"executable":null}
not json
{"reason":"compiler-artifact","target":{"name":"fibecfed"},"executable":"/t/release/fibecfed"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            find_executable(messages, "fibecfed"),
            Some(PathBuf::from("/t/release/fibecfed"))
        );
        assert_eq!(find_executable(messages, "other"), None);
    }

    #[test]
    fn cpu_model_from_cpuinfo() {
        let info = "processor\t: 0\nvendor_id\t: X\nmodel name\t: Fancy CPU @ 3GHz\n";
        assert_eq!(cpu_model(info).as_deref(), Some("Fancy CPU @ 3GHz"));
        assert_eq!(cpu_model("nothing"), None);
    }

    #[test]
    fn presets_parse() {
        assert_eq!(Preset::parse("smoke").ok(), Some(Preset::Smoke));
        assert!(Preset::parse("fast").is_err());
    }
}
