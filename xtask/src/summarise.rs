//! The results folder's report: `summary.md`, `summary.csv` and `plots/`, written from
//! the folder's `job.toml` (what the job ran) and its runs' `metrics.jsonl`.
//! `reproduce` calls [`write_report`] when its runs are done; `cargo xtask summarise`
//! calls it on an existing folder, so that a folder is re-summarised with the current
//! report code, byte for byte as a fresh job would (the wall-clock columns aside).
//!
//! A folder from before `job.toml` existed is summarised from a preset (`--preset`) and
//! the run folders present: `runs/<dataset>/<name>-seed<N>/`.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};

use crate::common::{user_error, workspace_root};
use crate::plots;
use crate::preset::{Plan, Preset};
use crate::report::{self, Run};

/// The job record's file name, in the results folder.
pub const JOB_FILE: &str = "job.toml";

/// What the job ran: enough to find every run and judge it again.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// The preset's label (a built-in name or a file's path).
    pub preset: String,
    pub preset_file: String,
    pub description: Option<String>,
    pub methods: Vec<JobMethod>,
    /// `method` names, as the metrics say them.
    pub primary: String,
    pub baselines: Vec<String>,
    pub target_fraction: f64,
    pub seeds: Vec<u64>,
    pub datasets: Vec<JobDataset>,
    /// Where the data came from (which folder or fallback); `None` when not recorded.
    pub data_source: Option<String>,
    pub model: Option<String>,
    pub commit: Option<String>,
    pub machine: Option<String>,
    pub started: Option<String>,
    /// Set when the job finished.
    pub wall_seconds: Option<f64>,
    pub commands: Vec<String>,
    /// No job.toml: rebuilt from a preset as it is now and the run folders present.
    pub reconstructed: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct JobMethod {
    /// The preset's entry ("variants/fibecfed-head-local").
    pub entry: String,
    /// Its last component: the run folders' name.
    pub name: String,
    /// The config's `method`, as the metrics say it.
    pub method: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct JobDataset {
    pub name: String,
    pub train: Option<String>,
    pub test: Option<String>,
}

impl Job {
    pub fn to_toml(&self) -> Result<String> {
        use toml::Value;
        let strings = |v: &[String]| Value::Array(v.iter().cloned().map(Value::String).collect());
        let mut t = toml::Table::new();
        let mut put = |k: &str, v: Value| {
            t.insert(k.to_owned(), v);
        };
        put("preset", Value::String(self.preset.clone()));
        put("preset_file", Value::String(self.preset_file.clone()));
        if let Some(d) = &self.description {
            put("description", Value::String(d.clone()));
        }
        put("primary", Value::String(self.primary.clone()));
        put("baselines", strings(&self.baselines));
        put("target_fraction", Value::Float(self.target_fraction));
        let seeds = self
            .seeds
            .iter()
            .map(|&s| {
                i64::try_from(s)
                    .map(Value::Integer)
                    .with_context(|| format!("seed {s} does not fit a TOML integer"))
            })
            .collect::<Result<Vec<_>>>()?;
        put("seeds", Value::Array(seeds));
        for (key, value) in [
            ("data_source", &self.data_source),
            ("model", &self.model),
            ("commit", &self.commit),
            ("machine", &self.machine),
            ("started", &self.started),
        ] {
            if let Some(v) = value {
                put(key, Value::String(v.clone()));
            }
        }
        if let Some(w) = self.wall_seconds {
            put("wall_seconds", Value::Float(w));
        }
        put("commands", strings(&self.commands));
        let methods = self
            .methods
            .iter()
            .map(|m| {
                let mut e = toml::Table::new();
                e.insert("entry".into(), Value::String(m.entry.clone()));
                e.insert("name".into(), Value::String(m.name.clone()));
                e.insert("method".into(), Value::String(m.method.clone()));
                Value::Table(e)
            })
            .collect();
        put("methods", Value::Array(methods));
        let datasets = self
            .datasets
            .iter()
            .map(|d| {
                let mut e = toml::Table::new();
                e.insert("name".into(), Value::String(d.name.clone()));
                for (k, v) in [("train", &d.train), ("test", &d.test)] {
                    if let Some(v) = v {
                        e.insert(k.into(), Value::String(v.clone()));
                    }
                }
                Value::Table(e)
            })
            .collect();
        put("datasets", Value::Array(datasets));
        Ok(format!(
            "# What `cargo xtask reproduce` ran here; `cargo xtask summarise <this folder>` \
             reads it.\n{}",
            toml::to_string(&t)?
        ))
    }

    /// Reads `text`, the contents of `file`; errors name the file and the key.
    pub fn parse(text: &str, file: &Path) -> Result<Self> {
        let fail = |m: String| anyhow!("{}: {m}", file.display());
        let t: toml::Table =
            toml::from_str(text).map_err(|e| fail(format!("not valid TOML: {e}")))?;
        let string = |t: &toml::Table, k: &str| -> Result<Option<String>> {
            match t.get(k) {
                None => Ok(None),
                Some(toml::Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(fail(format!("`{k}` is not a string"))),
            }
        };
        let required = |t: &toml::Table, k: &str| -> Result<String> {
            string(t, k)?.ok_or_else(|| fail(format!("`{k}` is missing")))
        };
        let array = |k: &str| -> Result<&Vec<toml::Value>> {
            match t.get(k) {
                Some(toml::Value::Array(a)) => Ok(a),
                Some(_) => Err(fail(format!("`{k}` is not an array"))),
                None => Err(fail(format!("`{k}` is missing"))),
            }
        };
        let string_list = |k: &str| -> Result<Vec<String>> {
            array(k)?
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| fail(format!("`{k}` holds a non-string")))
                })
                .collect()
        };
        let tables = |k: &str| -> Result<Vec<&toml::Table>> {
            array(k)?
                .iter()
                .map(|v| {
                    v.as_table()
                        .ok_or_else(|| fail(format!("`{k}` holds a non-table")))
                })
                .collect()
        };
        let number = |k: &str| -> Result<Option<f64>> {
            match t.get(k) {
                None => Ok(None),
                Some(toml::Value::Float(f)) => Ok(Some(*f)),
                Some(toml::Value::Integer(i)) => Ok(Some(*i as f64)),
                Some(_) => Err(fail(format!("`{k}` is not a number"))),
            }
        };
        // In the file's own order, so that the first fault reported is the first one.
        let preset = required(&t, "preset")?;
        let preset_file = required(&t, "preset_file")?;
        let seeds = array("seeds")?
            .iter()
            .map(|v| {
                v.as_integer()
                    .and_then(|i| u64::try_from(i).ok())
                    .ok_or_else(|| fail("`seeds` holds a non-seed".to_owned()))
            })
            .collect::<Result<Vec<u64>>>()?;
        let methods = tables("methods")?
            .into_iter()
            .map(|m| {
                Ok(JobMethod {
                    entry: required(m, "entry")?,
                    name: required(m, "name")?,
                    method: required(m, "method")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let datasets = tables("datasets")?
            .into_iter()
            .map(|d| {
                Ok(JobDataset {
                    name: required(d, "name")?,
                    train: string(d, "train")?,
                    test: string(d, "test")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            preset,
            preset_file,
            description: string(&t, "description")?,
            methods,
            primary: required(&t, "primary")?,
            baselines: string_list("baselines")?,
            target_fraction: number("target_fraction")?
                .ok_or_else(|| fail("`target_fraction` is missing".to_owned()))?,
            seeds,
            datasets,
            data_source: string(&t, "data_source")?,
            model: string(&t, "model")?,
            commit: string(&t, "commit")?,
            machine: string(&t, "machine")?,
            started: string(&t, "started")?,
            wall_seconds: number("wall_seconds")?,
            commands: string_list("commands")?,
            reconstructed: false,
        })
    }
}

/// Writes `job.toml` into `results`.
pub fn write_job(results: &Path, job: &Job) -> Result<()> {
    let path = results.join(JOB_FILE);
    fs::write(&path, job.to_toml()?).with_context(|| format!("cannot write {}", path.display()))
}

/// Reads every run the job names, then writes summary.md, summary.csv and plots/
/// into `results`; returns summary.md's text. `user_named`: the person named the
/// folder, so a missing or broken metrics file is theirs to fix (exit 2).
pub fn write_report(results: &Path, job: &Job, user_named: bool) -> Result<String> {
    let wrap = |err: anyhow::Error| {
        if user_named {
            user_error(format!("{err:#}"))
        } else {
            err
        }
    };
    let mut sections = String::new();
    let mut csv = String::new();
    for ds in &job.datasets {
        let runs = read_runs(results, job, &ds.name).map_err(wrap)?;
        let table = report::summarise(&runs, &job.primary, &job.baselines, job.target_fraction)
            .with_context(|| {
                format!(
                    "summarising {}",
                    results.join("runs").join(&ds.name).display()
                )
            })
            .map_err(wrap)?;
        let plots_dir = results.join("plots").join(&ds.name);
        let pngs = plots::draw_plots(&runs, Some(&table), &plots_dir)?;
        let _ = writeln!(sections, "## {}\n", ds.name);
        sections.push_str(&report::markdown(&table));
        sections.push('\n');
        for p in &pngs {
            let rel = p.strip_prefix(results).unwrap_or(p);
            let name = p.file_stem().and_then(|s| s.to_str()).unwrap_or("plot");
            let _ = writeln!(
                sections,
                "![{}]({})\n",
                name.replace('_', " "),
                rel.display()
            );
        }
        let body = report::csv(&table);
        let mut lines = body.lines();
        let header = lines.next().unwrap_or_default();
        if csv.is_empty() {
            let _ = writeln!(csv, "dataset,{header}");
        }
        for l in lines {
            let _ = writeln!(csv, "{},{l}", report::csv_field(&ds.name));
        }
    }
    let summary = render(results, job, &sections);
    for (name, text) in [("summary.md", &summary), ("summary.csv", &csv)] {
        let path = results.join(name);
        fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(summary)
}

fn read_runs(results: &Path, job: &Job, dataset: &str) -> Result<Vec<Run>> {
    let mut runs = Vec::new();
    for m in &job.methods {
        for seed in &job.seeds {
            let path = results
                .join("runs")
                .join(dataset)
                .join(format!("{}-seed{seed}", m.name))
                .join("metrics.jsonl");
            let text = fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let run = report::parse_metrics(&text).with_context(|| path.display().to_string())?;
            // A folder holding another method's or seed's metrics would be averaged
            // into the wrong row.
            if run.method != m.method || run.seed != *seed {
                return Err(anyhow!(
                    "{}: holds method {:?} seed {}, expected {:?} seed {seed}",
                    path.display(),
                    run.method,
                    run.seed,
                    m.method
                ));
            }
            runs.push(run);
        }
    }
    Ok(runs)
}

/// What the run seed changes in `fibecfed run`, from fed-sim's and the data crate's
/// code (run.rs, engine.rs, local.rs, fisher.rs, model.rs, data's samples.rs and
/// partition.rs). Keep it in step with them.
const SEED_VARIES: &str = "One run seed drives every random draw \
of a run, each from its own stream: the random subsets of the training and test files \
(`data.limit_train` with the seed, `data.limit_test` with seed + 1; the whole files when \
no limit is set); the partition of both subsets over the clients (the iid shuffle, or the \
Dirichlet client shares and per-client label priors, or the shards); the initial adapter \
every client starts from (LoRA A uniform in ±1/√d_in, B zero, the classification head's \
weights normal with std 0.02); each round's sampled clients and which of them drop out \
(`federation.dropout_probability`), from the server's stream for that round; per client \
and round, the shuffle of its training subset into batches in each local epoch (when no \
curriculum fixes the batches), the LoRA dropout masks of every training step, the seed \
of the Fisher scoring pass (labels drawn from the model's prediction when \
`curriculum.sampled_labels` is set, and the noise of the perturbation importance), the \
curriculum ordering's and batch curriculum's draws; per client, the sample draw of the \
adversarial importance and the stream of the pruning epochs; and the layer selector, for \
selectors that draw (the random one). The model's pretrained weights, the files, the \
configs and the cost model do not depend on it. The same config and seed give the same \
metrics, so two methods run with one seed see the same data subsets, partition and initial \
adapter: hence the paired differences.";

fn render(results: &Path, job: &Job, sections: &str) -> String {
    let folder = results
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("results");
    let mut out = String::new();
    let _ = writeln!(out, "# {} against baselines ({folder})\n", job.primary);
    let _ = writeln!(
        out,
        "Personalised accuracy (each client's own model on its own test part, weighted \
         by test size). Simulated time is the cost model of the configs' `[simulation]` \
         section (padded tokens × seconds per token + bytes ÷ bandwidth, slowest selected \
         client per round, the scoring pass included); MB counts the exact safetensors \
         messages, up and down. Every method uses the same preset settings; nothing is \
         tuned per method on the test split. Primary: {}; baselines: {}; reported without \
         a verdict: {}. The definitions follow each dataset's tables.\n",
        job.primary,
        list_or(&job.baselines, "none"),
        list_or(
            &job.methods
                .iter()
                .map(|m| m.method.clone())
                .filter(|m| *m != job.primary && !job.baselines.contains(m))
                .collect::<Vec<_>>(),
            "none"
        )
    );
    out.push_str(sections);
    let _ = writeln!(out, "## What the seed varies\n\n{SEED_VARIES}\n");
    let _ = writeln!(out, "## Run\n");
    if job.reconstructed {
        let _ = writeln!(
            out,
            "This folder has no `{JOB_FILE}`: this summary was rebuilt from the preset as \
             it is now and the run folders present; what the job did not leave behind is \
             \"not recorded\".\n"
        );
    }
    let unknown = |v: &Option<String>| v.clone().unwrap_or_else(|| "not recorded".to_owned());
    let _ = writeln!(out, "- preset: `{}` (`{}`)", job.preset, job.preset_file);
    if let Some(d) = &job.description {
        let _ = writeln!(out, "- description: {d}");
    }
    let methods: Vec<String> = job
        .methods
        .iter()
        .map(|m| format!("`{}` ({})", m.entry, m.method))
        .collect();
    let _ = writeln!(out, "- methods: {}", methods.join(", "));
    let _ = writeln!(out, "- target fraction: {}", job.target_fraction);
    let seeds: Vec<String> = job.seeds.iter().map(u64::to_string).collect();
    let _ = writeln!(out, "- seeds: {}", seeds.join(", "));
    // A LLaMA preset's model is one GGUF file; every other job's is a folder.
    let what = if job.model.as_deref().is_some_and(|m| {
        std::path::Path::new(m)
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    }) {
        "model file"
    } else {
        "model folder"
    };
    let _ = writeln!(out, "- {what}: `{}`", unknown(&job.model));
    for d in &job.datasets {
        let _ = writeln!(
            out,
            "- {}: train `{}`, test `{}` (from {})",
            d.name,
            unknown(&d.train),
            unknown(&d.test),
            unknown(&job.data_source)
        );
    }
    let _ = writeln!(
        out,
        "- configs: `configs/`; runs: `runs/`; job record: `{JOB_FILE}`"
    );
    let _ = writeln!(
        out,
        "- wall time of the whole job: {}",
        job.wall_seconds
            .map_or_else(|| "not recorded".to_owned(), |w| format!("{w:.1} s"))
    );
    let _ = writeln!(out, "- git commit: `{}`", unknown(&job.commit));
    let _ = writeln!(out, "- machine: {}", unknown(&job.machine));
    let _ = writeln!(out, "- started: {}", unknown(&job.started));
    if !job.commands.is_empty() {
        let _ = writeln!(out, "\nCommands:\n\n```sh");
        for c in &job.commands {
            let _ = writeln!(out, "{c}");
        }
        let _ = writeln!(out, "```");
    }
    out
}

fn list_or(items: &[String], none: &str) -> String {
    if items.is_empty() {
        none.to_owned()
    } else {
        items.join(", ")
    }
}

#[derive(Debug)]
pub struct Options {
    pub dir: PathBuf,
    /// For a folder without job.toml: the preset it was run with.
    pub preset: Option<String>,
}

/// `cargo xtask summarise DIR [--preset NAME|FILE]`.
pub fn run(options: &Options) -> Result<()> {
    let dir = &options.dir;
    if !dir.is_dir() {
        return Err(user_error(format!(
            "{}: not a folder; expected a results folder of `cargo xtask reproduce`",
            dir.display()
        )));
    }
    let job_path = dir.join(JOB_FILE);
    let job = if job_path.is_file() {
        if options.preset.is_some() {
            return Err(user_error(format!(
                "{} names the job's preset; --preset is only for folders without one",
                job_path.display()
            )));
        }
        let text = fs::read_to_string(&job_path)
            .with_context(|| format!("cannot read {}", job_path.display()))
            .map_err(|e| user_error(format!("{e:#}")))?;
        Job::parse(&text, &job_path).map_err(|e| user_error(format!("{e:#}")))?
    } else {
        let Some(preset) = &options.preset else {
            return Err(user_error(format!(
                "{} has no {JOB_FILE}; name the preset it was run with: --preset NAME|FILE",
                dir.display()
            )));
        };
        reconstruct(dir, preset)?
    };
    let summary = write_report(dir, &job, true)?;
    println!("{summary}");
    println!("{}", dir.join("summary.md").display());
    Ok(())
}

/// A job record for a folder without one: the preset's methods, primary and baselines
/// as the preset says them now; datasets and seeds from the run folders present.
fn reconstruct(dir: &Path, asked: &str) -> Result<Job> {
    let root = workspace_root()?;
    let preset = Preset::load(&root, Some(asked))?;
    let plan = preset.plan(&root)?;
    let runs = dir.join("runs");
    let mut datasets: Vec<String> = fs::read_dir(&runs)
        .with_context(|| format!("cannot read {}", runs.display()))
        .map_err(|e| user_error(format!("{e:#}: no run folders to summarise")))?
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .collect();
    datasets.sort();
    let mut seeds: Vec<u64> = Vec::new();
    for ds in &datasets {
        for entry in fs::read_dir(runs.join(ds)).into_iter().flatten().flatten() {
            let Some(folder) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let seed = plan.configs.iter().find_map(|c| {
                folder
                    .strip_prefix(&c.name)?
                    .strip_prefix("-seed")?
                    .parse::<u64>()
                    .ok()
            });
            if let Some(seed) = seed.filter(|s| !seeds.contains(s)) {
                seeds.push(seed);
            }
        }
    }
    seeds.sort_unstable();
    if datasets.is_empty() || seeds.is_empty() {
        return Err(user_error(format!(
            "{}: no run folder of the preset's methods ({}) as runs/<dataset>/<name>-seed<N>",
            dir.display(),
            plan.configs
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let datasets = datasets
        .into_iter()
        .map(|name| JobDataset {
            name,
            train: None,
            test: None,
        })
        .collect();
    let mut job = Job::planned(&preset, &plan, seeds, datasets);
    job.reconstructed = true;
    Ok(job)
}

impl Job {
    /// What a preset's plan runs on `datasets` with `seeds`; what only a job that
    /// ran knows (machine, commit, times, commands) left unrecorded.
    pub fn planned(
        preset: &Preset,
        plan: &Plan,
        seeds: Vec<u64>,
        datasets: Vec<JobDataset>,
    ) -> Self {
        Job {
            preset: preset.label.clone(),
            preset_file: preset.file.display().to_string(),
            description: preset.description.clone(),
            methods: plan
                .configs
                .iter()
                .map(|c| JobMethod {
                    entry: c.entry.clone(),
                    name: c.name.clone(),
                    method: c.method.clone(),
                })
                .collect(),
            primary: plan.primary_method.clone(),
            baselines: plan.baseline_methods.clone(),
            target_fraction: preset.target_fraction,
            seeds,
            datasets,
            data_source: None,
            model: None,
            commit: None,
            machine: None,
            started: None,
            wall_seconds: None,
            commands: Vec::new(),
            reconstructed: false,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::common::UserError;

    fn job() -> Job {
        Job {
            preset: "mine".into(),
            preset_file: "/x/mine.toml".into(),
            description: Some("two methods".into()),
            methods: ["p", "b"]
                .iter()
                .map(|m| JobMethod {
                    entry: format!("dir/{m}"),
                    name: (*m).to_owned(),
                    method: format!("method-{m}"),
                })
                .collect(),
            primary: "method-p".into(),
            baselines: vec!["method-b".into()],
            target_fraction: 0.9,
            seeds: vec![1, 2],
            datasets: vec![JobDataset {
                name: "mr".into(),
                train: Some("/d/train.tsv".into()),
                test: None,
            }],
            data_source: None,
            model: Some("/m".into()),
            commit: Some("abc".into()),
            machine: None,
            started: Some("2026-01-01 00:00:00 UTC".into()),
            wall_seconds: Some(12.5),
            commands: vec!["fibecfed run ...".into()],
            reconstructed: false,
        }
    }

    fn metrics(method: &str, seed: u64, wall: f64) -> String {
        let mut text = String::new();
        for round in 0..4u64 {
            let bonus = if method.ends_with('p') { 0.05 } else { 0.0 };
            let acc = 0.5 + 0.1 * round as f64 + bonus;
            let bytes = round * 1000;
            let _ = writeln!(
                text,
                "{{\"round\":{round},\"method\":\"{method}\",\"seed\":{seed},\"accuracy\":{acc},\
                 \"loss\":0.5,\"cum_sim_seconds\":{round},\"cum_bytes_up\":{bytes},\
                 \"cum_bytes_down\":{bytes},\"wall_seconds\":{wall},\"train_samples\":8}}"
            );
        }
        text
    }

    #[test]
    fn job_record_round_trips() {
        let path = Path::new("/r/job.toml");
        let text = job().to_toml().unwrap();
        assert_eq!(Job::parse(&text, path).unwrap(), job());
        let err = Job::parse("preset = 3\n", path).unwrap_err().to_string();
        assert!(
            err.contains("/r/job.toml") && err.contains("`preset`"),
            "{err}"
        );
    }

    /// The report from a job record and its run folders; a missing or broken metrics
    /// file is named, as the user's error (exit 2) when they named the folder.
    #[test]
    fn writes_the_report_and_names_a_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let results = dir.path();
        let write = |wall: f64| {
            for (name, method) in [("p", "method-p"), ("b", "method-b")] {
                for seed in [1, 2] {
                    let run = results.join(format!("runs/mr/{name}-seed{seed}"));
                    fs::create_dir_all(&run).unwrap();
                    fs::write(run.join("metrics.jsonl"), metrics(method, seed, wall)).unwrap();
                }
            }
        };
        write(1.0);
        let md = write_report(results, &job(), false).unwrap();
        assert!(md.starts_with("# method-p against baselines ("), "{md}");
        assert!(
            md.contains("## mr") && md.contains("## What the seed varies"),
            "{md}"
        );
        assert!(md.contains("![paired differences](plots/mr/paired_differences.png)"));
        assert!(md.contains("- wall time of the whole job: 12.5 s"), "{md}");
        let csv = fs::read_to_string(results.join("summary.csv")).unwrap();
        assert!(csv.starts_with("dataset,kind,method,"), "{csv}");
        assert_eq!(csv.lines().count(), 1 + 2 + 1);
        assert!(results.join("plots/mr/accuracy_vs_round.png").is_file());

        fs::remove_file(results.join("runs/mr/b-seed2/metrics.jsonl")).unwrap();
        let err = write_report(results, &job(), true).unwrap_err();
        let user = err.downcast_ref::<UserError>().map(|u| u.message.clone());
        assert!(
            user.as_deref()
                .is_some_and(|m| m.contains("b-seed2/metrics.jsonl")),
            "{err:#}"
        );
        fs::write(results.join("runs/mr/b-seed2/metrics.jsonl"), "{oops\n").unwrap();
        let err = format!("{:#}", write_report(results, &job(), false).unwrap_err());
        assert!(
            err.contains("b-seed2/metrics.jsonl") && err.contains("not JSON"),
            "{err}"
        );
    }
}
