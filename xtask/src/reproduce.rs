//! `cargo xtask reproduce`: the project's main job. It obtains the model and the data,
//! runs the methods a preset file names (`configs/presets/*.toml` or the user's own;
//! see `preset`) with `fibecfed run`, each its `configs/<method>.toml` merged over the
//! preset's shared settings, and writes
//! `results/<UTC time>/` with `job.toml` (what ran), `summary.md`, `summary.csv`, the
//! configs used, every run's folder (metrics.jsonl, partition.json, checkpoint) and the
//! PNG plots (see `summarise`, which writes the report).

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

use crate::cargo_build::build_executable;
use crate::common::{absolute, cargo, describe, user_error, workspace_root};
use crate::preset::Preset;
use crate::summarise::{self, Job, JobDataset};
use crate::system::{self, Piece};
use crate::{assets, data, smollm2};

#[derive(Debug, Default)]
pub struct Options {
    pub data_dir: Option<PathBuf>,
    pub model_dir: Option<PathBuf>,
    /// `--preset`: a built-in name or a file; `None` is the default preset.
    pub preset: Option<String>,
    /// `--model smollm2`: the preset must run the LLaMA decoder.
    pub smollm2: bool,
    /// Dataset folder names; default MR (or its stand-in).
    pub datasets: Vec<String>,
    /// One run per seed and method; default the preset's `seeds`, else 42.
    pub seeds: Vec<u64>,
    /// `--jobs`: runs at a time (default 1).
    pub jobs: usize,
}

/// The dataset `reproduce` trains on by default: the real MR, or its stand-in.
const DEFAULT_DATASETS: [&str; 2] = ["mr", data::FALLBACK_DATASET];

/// A dataset to run on.
struct Dataset {
    name: String,
    train: PathBuf,
    test: PathBuf,
}

pub fn run(options: &Options) -> Result<()> {
    let root = workspace_root()?;
    // The preset and every method's merged config first: a mistake in them should stop
    // the job before the downloads and the build, not after.
    let preset = Preset::load(&root, options.preset.as_deref())?;
    let plan = preset.plan(&root)?;
    for name in preset.dataset_names() {
        preset.plan_for(&root, Some(name))?;
    }
    eprintln!(
        "preset {} ({}): {}",
        preset.label,
        preset.file.display(),
        preset.description.as_deref().unwrap_or("no description")
    );
    let seeds = pick_seeds(&options.seeds, preset.seeds.as_deref())?;
    // Before the downloads, so a missing OpenBLAS stops the job at once.
    system::ensure(&[Piece::OpenBlas])?;
    // A LLaMA preset runs the SmolLM2 GGUF (`--model-file`); the others a BERT folder.
    let llama = preset.runs_llama();
    if options.smollm2 && !llama {
        return Err(user_error(format!(
            "--model smollm2: preset {} runs a BERT model; a SmolLM2 preset has [model] kind = \"llama\" (configs/presets/smollm2.toml)",
            preset.label
        )));
    }
    if llama && options.model_dir.is_some() {
        return Err(user_error(format!(
            "--model-dir names a BERT folder, but preset {} runs a LLaMA model (the SmolLM2 GGUF; set FIBECFED_SMOLLM2_GGUF to use another file)",
            preset.label
        )));
    }
    let model = if llama {
        smollm2::resolve()?
    } else {
        assets::resolve(options.model_dir.as_deref())?
    };
    let model_flag = if llama { "--model-file" } else { "--model-dir" };
    let data_root = data::resolve(options.data_dir.as_deref())?;
    // `--datasets`, else the preset's `run_on`, else MR (or its stand-in).
    let asked = if options.datasets.is_empty() {
        &preset.run_on
    } else {
        &options.datasets
    };
    let datasets = pick_datasets(&data_root, asked)?;
    let binary = build_binary(&root)?;

    let started = SystemTime::now();
    let clock = Instant::now();
    let results_rel = create_results_dir(&root, started)?;
    let results = root.join(&results_rel);
    // Written first, so that a job that stops half-way still says what it was.
    let mut job = Job::planned(
        &preset,
        &plan,
        seeds.clone(),
        datasets
            .iter()
            .map(|d| JobDataset {
                name: d.name.clone(),
                train: Some(d.train.display().to_string()),
                test: Some(d.test.display().to_string()),
            })
            .collect(),
    );
    job.data_source = Some(data_root.source.to_string());
    job.model = Some(model.display().to_string());
    job.commit = Some(git_commit(&root));
    job.machine = Some(machine());
    job.started = Some(utc_string(started));
    summarise::write_job(&results, &job)?;
    let mut queue: Vec<Pending> = Vec::new();
    for ds in &datasets {
        let plan = preset.plan_for(&root, Some(&ds.name))?;
        for config in &plan.configs {
            let name = &config.name;
            let config_path = results
                .join("configs")
                .join(&ds.name)
                .join(format!("{name}.toml"));
            write_file(&config_path, &config.text)?;
            for &seed in &seeds {
                let out = results
                    .join("runs")
                    .join(&ds.name)
                    .join(format!("{name}-seed{seed}"));
                let mut cmd = Command::new(&binary);
                cmd.arg("run")
                    .arg("--config")
                    .arg(&config_path)
                    .arg("--out")
                    .arg(&out)
                    .arg(model_flag)
                    .arg(&model)
                    .arg("--train")
                    .arg(&ds.train)
                    .arg("--test")
                    .arg(&ds.test)
                    .arg("--seed")
                    .arg(seed.to_string());
                queue.push(Pending {
                    line: describe(&cmd),
                    cmd,
                    what: format!("{name} on {} (seed {seed})", ds.name),
                    out,
                });
            }
        }
    }
    run_all(queue, options.jobs.max(1), &binary, &mut job.commands)?;
    job.wall_seconds = Some(clock.elapsed().as_secs_f64());
    summarise::write_job(&results, &job)?;
    // The same function `cargo xtask summarise` runs, so both give the same files.
    let summary = summarise::write_report(&results, &job, false)?;
    println!("{summary}");
    println!("{}", results.join("summary.md").display());
    eprintln!("results: {results_rel}");
    Ok(())
}

/// One `fibecfed run` of the job, not yet started.
struct Pending {
    cmd: Command,
    line: String,
    /// "fibecfed on mr (seed 42)", for messages.
    what: String,
    out: PathBuf,
}

/// Runs the job's runs, `jobs` at a time; `commands` gets their command lines in the
/// plan's order whatever order they finish in. With several at a time, each run gets
/// an equal share of the cores (`RAYON_NUM_THREADS`; metrics do not depend on the
/// thread count) and its output goes to `<run folder>.log`. After a failure no new run
/// starts; those under way finish, and the first failure is reported.
fn run_all(
    queue: Vec<Pending>,
    jobs: usize,
    binary: &Path,
    commands: &mut Vec<String>,
) -> Result<()> {
    let lines: Vec<String> = queue.iter().map(|p| p.line.clone()).collect();
    let start_one = |mut p: Pending| -> Result<()> {
        eprintln!("+ {}", p.line);
        if jobs > 1 {
            let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
            p.cmd
                .env("RAYON_NUM_THREADS", (cores / jobs).max(1).to_string());
            let log = p.out.with_extension("log");
            if let Some(dir) = log.parent() {
                fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            let file = fs::File::create(&log)
                .with_context(|| format!("cannot create {}", log.display()))?;
            let err = file
                .try_clone()
                .with_context(|| format!("cannot reopen {}", log.display()))?;
            p.cmd.stdout(Stdio::from(file)).stderr(Stdio::from(err));
        }
        let clock = Instant::now();
        let status = p
            .cmd
            .status()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        if !status.success() {
            bail!(
                "{} failed ({status}); its folder is {}; continue it with `{} run --resume {}`",
                p.what,
                p.out.display(),
                binary.display(),
                p.out.display()
            );
        }
        if jobs > 1 {
            eprintln!("done: {} in {:.0} s", p.what, clock.elapsed().as_secs_f64());
        }
        Ok(())
    };
    if jobs == 1 {
        for p in queue {
            start_one(p)?;
        }
    } else {
        let queue = std::sync::Mutex::new(queue.into_iter());
        let failed = std::sync::Mutex::new(None::<anyhow::Error>);
        std::thread::scope(|scope| {
            for _ in 0..jobs {
                scope.spawn(|| {
                    loop {
                        if failed.lock().map_or(true, |f| f.is_some()) {
                            return;
                        }
                        let next = queue.lock().ok().and_then(|mut q| q.next());
                        let Some(p) = next else { return };
                        if let Err(e) = start_one(p) {
                            if let Ok(mut f) = failed.lock() {
                                f.get_or_insert(e);
                            }
                            return;
                        }
                    }
                });
            }
        });
        if let Some(e) = failed.into_inner().ok().flatten() {
            return Err(e);
        }
    }
    commands.extend(lines);
    Ok(())
}

/// `--seeds` when given, else the preset's `seeds`, else 42 alone.
fn pick_seeds(asked: &[u64], preset: Option<&[u64]>) -> Result<Vec<u64>> {
    if let Some(seed) = asked
        .iter()
        .enumerate()
        .find_map(|(i, s)| asked[..i].contains(s).then_some(s))
    {
        return Err(user_error(format!(
            "--seeds: {seed} is given twice; each seed runs once"
        )));
    }
    Ok(if !asked.is_empty() {
        asked.to_vec()
    } else if let Some(seeds) = preset {
        seeds.to_vec()
    } else {
        vec![DEFAULT_SEED]
    })
}

/// The seed of a job whose preset names none.
const DEFAULT_SEED: u64 = 42;

fn write_file(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

fn pick_datasets(root: &data::DataRoot, asked: &[String]) -> Result<Vec<Dataset>> {
    if !asked.is_empty() {
        return asked
            .iter()
            .map(|name| {
                let (train, test) = data::split_files(&root.path, name).map_err(|e| {
                    user_error(format!(
                        "dataset {name} (--datasets, or the preset's run_on): not usable under {} ({e:#})",
                        root.path.display()
                    ))
                })?;
                Ok(Dataset {
                    name: name.clone(),
                    train: absolute(&train)?,
                    test: absolute(&test)?,
                })
            })
            .collect();
    }
    let mut reasons = Vec::new();
    for name in DEFAULT_DATASETS {
        match data::split_files(&root.path, name) {
            Ok((train, test)) => {
                return Ok(vec![Dataset {
                    name: name.to_owned(),
                    train: absolute(&train)?,
                    test: absolute(&test)?,
                }]);
            }
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
/// `CARGO_TARGET_DIR` or `build.target-dir` is honoured.
fn build_binary(root: &Path) -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--release",
        "-p",
        "fibecfed-sim",
        "--bin",
        "fibecfed",
    ])
    .current_dir(root);
    build_executable(&mut cmd, "fibecfed").context("building the fibecfed binary failed")
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
    use std::time::Duration;

    /// A queue of shell commands as runs: each writes its index into `dir`.
    fn queue(dir: &Path, scripts: &[&str]) -> Vec<Pending> {
        scripts
            .iter()
            .enumerate()
            .map(|(i, script)| {
                let mut cmd = Command::new("sh");
                cmd.arg("-c").arg(script).current_dir(dir);
                Pending {
                    line: format!("run {i}"),
                    cmd,
                    what: format!("run {i}"),
                    out: dir.join(format!("run{i}")),
                }
            })
            .collect()
    }

    /// Several at a time: every run runs once, with its share of the cores and its
    /// output in `<run>.log`; the command lines come back in queue order.
    #[test]
    fn runs_go_several_at_a_time_and_keep_their_order() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let scripts: Vec<String> = (0..5)
            .map(|i| {
                format!(
                    "sleep 0.0{}; echo $RAYON_NUM_THREADS > done{i}; echo said {i}",
                    5 - i
                )
            })
            .collect();
        let refs: Vec<&str> = scripts.iter().map(String::as_str).collect();
        let mut lines = Vec::new();
        run_all(queue(dir.path(), &refs), 2, Path::new("sh"), &mut lines)?;
        assert_eq!(
            lines,
            (0..5).map(|i| format!("run {i}")).collect::<Vec<_>>()
        );
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        for i in 0..5 {
            let threads = fs::read_to_string(dir.path().join(format!("done{i}")))?;
            assert_eq!(threads.trim(), (cores / 2).max(1).to_string());
            let log = fs::read_to_string(dir.path().join(format!("run{i}.log")))?;
            assert_eq!(log.trim(), format!("said {i}"));
        }
        // One at a time: the environment is left alone, the output inherited.
        let mut lines = Vec::new();
        run_all(
            queue(
                dir.path(),
                &["test -z \"$RAYON_NUM_THREADS\" && touch alone"],
            ),
            1,
            Path::new("sh"),
            &mut lines,
        )?;
        assert!(
            dir.path().join("alone").exists() || std::env::var_os("RAYON_NUM_THREADS").is_some()
        );
        Ok(())
    }

    /// A failed run is reported by name; no run starts after it.
    #[test]
    fn a_failed_run_stops_the_queue() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let mut lines = Vec::new();
        let err = run_all(
            queue(
                dir.path(),
                &[
                    "exit 3",
                    "sleep 0.2; touch late1",
                    "sleep 0.2; touch late2",
                    "touch late3",
                ],
            ),
            2,
            Path::new("sh"),
            &mut lines,
        )
        .expect_err("a run failed");
        assert!(format!("{err:#}").contains("run 0 failed"), "{err:#}");
        assert!(!dir.path().join("late3").exists());
        assert!(lines.is_empty());
        Ok(())
    }

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
    fn seeds_from_the_flag_the_preset_or_the_default() -> Result<()> {
        assert_eq!(pick_seeds(&[7, 8], Some(&[1, 2]))?, [7, 8]);
        assert_eq!(pick_seeds(&[], Some(&[1, 2]))?, [1, 2]);
        assert_eq!(pick_seeds(&[], None)?, [42]);
        let err = pick_seeds(&[7, 8, 7], None).err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("7 is given twice")),
            "{err:?}"
        );
        Ok(())
    }

    #[test]
    fn cpu_model_from_cpuinfo() {
        let info = "processor\t: 0\nvendor_id\t: X\nmodel name\t: Fancy CPU @ 3GHz\n";
        assert_eq!(cpu_model(info).as_deref(), Some("Fancy CPU @ 3GHz"));
        assert_eq!(cpu_model("nothing"), None);
    }
}
