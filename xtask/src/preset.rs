//! The presets of `cargo xtask reproduce`: TOML files under `configs/presets/` (the
//! built-in `smoke`, `default` and `paper`) or a user's own file, so that an experiment
//! is defined without recompiling xtask.
//!
//! A preset file's `[preset]` table says which method configs run and what the summary
//! measures them against; every other table is run settings shared by the methods, with
//! each method's `configs/<method>.toml` merged over them. This module reads and checks
//! the file and produces the merged config text; running it is `reproduce`'s job.
//!
//! ```toml
//! [preset]
//! methods = ["fibecfed", "fedavg-lora", "ffa-lora", "ablations/dense"]
//! primary = "fibecfed"                   # default: the first of `methods`
//! baselines = ["fedavg-lora", "ffa-lora"] # default: the rest, minus variants/ and ablations/
//! target_fraction = 0.95                 # default 0.95
//! seeds = [42, 43, 44]                   # default [42]; `--seeds` overrides
//!
//! [federation]
//! rounds = 5
//! ```

use std::fmt::Display;
use std::fs;
use std::io::ErrorKind;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};

use crate::common::{absolute, user_error};

/// The preset `reproduce` runs when `--preset` is not given.
pub const DEFAULT: &str = "default";

/// The keys of the `[preset]` table; anything else there is a typo worth stopping for.
const KEYS: [&str; 9] = [
    "description",
    "methods",
    "primary",
    "baselines",
    "baseline",
    "target_fraction",
    "seeds",
    "datasets",
    "run_on",
];

/// The target's fraction when a preset does not set one.
const DEFAULT_TARGET_FRACTION: f64 = 0.95;

/// Entries under these folders are versions of the primary method, not competitors:
/// they are not baselines unless `baselines` names them.
const NOT_BASELINES_BY_DEFAULT: [&str; 2] = ["variants/", "ablations/"];

/// A preset file, read and checked.
#[derive(Debug, Clone)]
pub struct Preset {
    /// What merged configs' first line and summary.md call the preset: a built-in's
    /// bare name (run folders written before presets became files carry it in their
    /// config.toml, which `--resume` compares byte for byte), a user file's absolute
    /// path (a stem alone could pass a stranger's `smoke.toml` off as the built-in).
    pub label: String,
    /// The file it was read from.
    pub file: PathBuf,
    pub description: Option<String>,
    /// Paths under `configs/` without `.toml`, in run order.
    pub methods: Vec<String>,
    /// The entry of `methods` whose claims the summary judges.
    pub primary: String,
    /// The entries the primary is compared with, seed by seed; the best one's plateau
    /// sets the target. Possibly empty (then the target is the primary's own plateau).
    pub baselines: Vec<String>,
    /// Target = this fraction of the best baseline's plateau.
    pub target_fraction: f64,
    /// `seeds`: the seeds `reproduce` runs when `--seeds` is not given.
    pub seeds: Option<Vec<u64>>,
    /// `run_on`: the dataset folders `reproduce` runs on when `--datasets` is not
    /// given (empty: MR, or its stand-in).
    pub run_on: Vec<String>,
    /// Everything but `[preset]`: the settings each method's file is merged over.
    settings: toml::Table,
    /// `[preset.datasets.<name>]`: settings for one dataset (a folder name such as
    /// `mrpc`), merged over `settings` before the method's file, for the protocols
    /// that differ by dataset (rounds, label skew).
    per_dataset: std::collections::BTreeMap<String, toml::Table>,
    /// Whether the person asked for this preset (see [`Source`]).
    user_named: bool,
    /// The key the baselines came from, for error messages: `baseline` in older files.
    baselines_key: &'static str,
}

/// Where a preset's text came from, for its error messages: they name the file, and
/// are the person's to fix (exit 2) when they asked for it; a broken built-in default
/// is the checkout's fault.
struct Source<'a> {
    file: &'a Path,
    user_named: bool,
}

impl Source<'_> {
    fn error(&self, message: impl Display) -> anyhow::Error {
        let message = format!("preset {}: {message}", self.file.display());
        if self.user_named {
            user_error(message)
        } else {
            anyhow!(message)
        }
    }

    fn wrong_type(&self, key: &str, expected: &str, found: &toml::Value) -> anyhow::Error {
        self.error(format_args!(
            "[preset] {key}: expected {expected}, found {}",
            a_type(found)
        ))
    }

    fn missing(&self, key: &str, expected: &str) -> anyhow::Error {
        self.error(format_args!("[preset] lacks `{key}` ({expected})"))
    }
}

/// One method of a preset, merged and ready to run.
#[derive(Debug, Clone)]
pub struct MethodConfig {
    /// The entry of the preset's `methods` ("ablations/dense").
    pub entry: String,
    /// The entry's last component ("dense"): the file and folder names of its results.
    pub name: String,
    /// The config's `method` value: the name its metrics, summary rows and plots use.
    pub method: String,
    /// The merged config text, written as the run's config.toml.
    pub text: String,
}

/// What `reproduce` runs for a preset.
#[derive(Debug, Clone)]
pub struct Plan {
    pub configs: Vec<MethodConfig>,
    /// The `method` value of the preset's primary, as its metrics name it.
    pub primary_method: String,
    /// The `method` values of the baselines, in the preset's order.
    pub baseline_methods: Vec<String>,
}

impl Preset {
    /// Whether the shared settings run a LLaMA decoder (`[model] kind = "llama"`): its
    /// model is the SmolLM2 GGUF, passed as `--model-file`.
    pub fn runs_llama(&self) -> bool {
        self.settings
            .get("model")
            .and_then(|m| m.get("kind"))
            .and_then(toml::Value::as_str)
            == Some("llama")
    }
}

impl Preset {
    /// The preset `asked` names (`None`: the default one). A bare name (no `/`, no
    /// `.toml`) is a file under `configs/presets/`; anything else is a path, relative to
    /// the current directory.
    pub fn load(root: &Path, asked: Option<&str>) -> Result<Self> {
        let presets = presets_dir(root);
        let (label, file, user_named) = match asked {
            None => (
                DEFAULT.to_owned(),
                presets.join(format!("{DEFAULT}.toml")),
                false,
            ),
            Some(name) if is_bare_name(name) => {
                (name.to_owned(), presets.join(format!("{name}.toml")), true)
            }
            Some(path) => {
                let file = absolute(Path::new(path))?;
                (file.display().to_string(), file, true)
            }
        };
        let text = match fs::read_to_string(&file) {
            Ok(text) => text,
            Err(err) if err.kind() == ErrorKind::NotFound && asked.is_some_and(is_bare_name) => {
                return Err(user_error(format!(
                    "--preset {label:?}: no preset of that name ({} does not exist); \
                     available: {}; or give the path of your own preset file",
                    file.display(),
                    available(&presets).join(", ")
                )));
            }
            Err(err) => {
                let source = Source {
                    file: &file,
                    user_named,
                };
                return Err(source.error(format_args!("cannot read it ({err})")));
            }
        };
        Self::parse(root, label, file, &text, user_named)
    }

    /// Reads `text`, the contents of `file`, and checks it against `root`'s configs.
    fn parse(
        root: &Path,
        label: String,
        file: PathBuf,
        text: &str,
        user_named: bool,
    ) -> Result<Self> {
        let source = Source {
            file: &file,
            user_named,
        };
        // toml's message carries the line, the column and the offending line itself.
        let mut doc: toml::Table = toml::from_str(text)
            .map_err(|err| source.error(format_args!("not valid TOML: {err}")))?;
        let own = match doc.remove("preset") {
            Some(toml::Value::Table(table)) => table,
            Some(other) => {
                return Err(source.error(format_args!(
                    "`preset` must be a table (`[preset]`), found {}",
                    a_type(&other)
                )));
            }
            None => {
                return Err(source.error(
                    "no [preset] table; it lists the methods to run \
                     (see configs/presets/default.toml)",
                ));
            }
        };
        if let Some(key) = own.keys().find(|k| !KEYS.contains(&k.as_str())) {
            return Err(source.error(format_args!(
                "[preset] has no key `{key}`; its keys are {}",
                KEYS.join(", ")
            )));
        }
        let description = match own.get("description") {
            None => None,
            Some(toml::Value::String(s)) => Some(s.clone()),
            Some(other) => return Err(source.wrong_type("description", "a string", other)),
        };
        let methods: Vec<String> = match own.get("methods") {
            Some(toml::Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, item)| match item {
                    toml::Value::String(s) => Ok(s.clone()),
                    other => Err(source.wrong_type(&format!("methods[{i}]"), "a string", other)),
                })
                .collect::<Result<_>>()?,
            Some(other) => return Err(source.wrong_type("methods", "an array of strings", other)),
            None => return Err(source.missing("methods", "an array of method config names")),
        };
        let strings = |key: &str, value: &toml::Value| -> Result<Vec<String>> {
            match value {
                toml::Value::Array(items) => items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| match item {
                        toml::Value::String(s) => Ok(s.clone()),
                        other => Err(source.wrong_type(&format!("{key}[{i}]"), "a string", other)),
                    })
                    .collect(),
                other => Err(source.wrong_type(key, "an array of strings", other)),
            }
        };
        let primary = match own.get("primary") {
            None => None,
            Some(toml::Value::String(s)) => Some(s.clone()),
            Some(other) => return Err(source.wrong_type("primary", "a string", other)),
        };
        let baselines = own
            .get("baselines")
            .map(|v| strings("baselines", v))
            .transpose()?;
        let legacy_baseline = match own.get("baseline") {
            None => None,
            Some(toml::Value::String(s)) => Some(s.clone()),
            Some(other) => return Err(source.wrong_type("baseline", "a string", other)),
        };
        if baselines.is_some() && legacy_baseline.is_some() {
            return Err(source.error(
                "[preset] has both `baseline` and `baselines`; `baseline = \"x\"` is the \
                 older spelling of `baselines = [\"x\"]`: keep only `baselines`",
            ));
        }
        let target_fraction = match own.get("target_fraction") {
            None => DEFAULT_TARGET_FRACTION,
            Some(toml::Value::Float(f)) => *f,
            Some(toml::Value::Integer(i)) => *i as f64,
            Some(other) => return Err(source.wrong_type("target_fraction", "a number", other)),
        };
        let seeds = match own.get("seeds") {
            None => None,
            Some(toml::Value::Array(items)) => {
                let mut seeds: Vec<u64> = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    let seed = match item {
                        toml::Value::Integer(n) => u64::try_from(*n).ok(),
                        _ => None,
                    }
                    .ok_or_else(|| {
                        source.wrong_type(&format!("seeds[{i}]"), "a non-negative integer", item)
                    })?;
                    if seeds.contains(&seed) {
                        return Err(source.error(format_args!(
                            "[preset] seeds: {seed} appears twice; each seed runs once"
                        )));
                    }
                    seeds.push(seed);
                }
                if seeds.is_empty() {
                    return Err(source.error("[preset] seeds is empty; name at least one seed"));
                }
                Some(seeds)
            }
            Some(other) => {
                return Err(source.wrong_type("seeds", "an array of non-negative integers", other));
            }
        };
        let run_on = match own.get("run_on") {
            None => Vec::new(),
            Some(toml::Value::Array(items)) => {
                let mut names: Vec<String> = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    let name = item
                        .as_str()
                        .filter(|n| is_bare_name(n) && !n.is_empty() && !n.starts_with('.'))
                        .ok_or_else(|| {
                            source.wrong_type(
                                &format!("run_on[{i}]"),
                                "a dataset folder name",
                                item,
                            )
                        })?;
                    if names.iter().any(|n| n == name) {
                        return Err(
                            source.error(format_args!("[preset] run_on: {name} appears twice"))
                        );
                    }
                    names.push(name.to_owned());
                }
                if names.is_empty() {
                    return Err(source.error(
                        "[preset] run_on is empty; name a dataset folder or leave the key out",
                    ));
                }
                names
            }
            Some(other) => {
                return Err(source.wrong_type("run_on", "an array of dataset folder names", other));
            }
        };
        let mut per_dataset = std::collections::BTreeMap::new();
        match own.get("datasets") {
            None => {}
            Some(toml::Value::Table(t)) => {
                for (name, v) in t {
                    match v {
                        toml::Value::Table(settings) => {
                            per_dataset.insert(name.clone(), settings.clone());
                        }
                        other => {
                            return Err(source.wrong_type(
                                &format!("datasets.{name}"),
                                "a table of run settings",
                                other,
                            ));
                        }
                    }
                }
            }
            Some(other) => {
                return Err(source.wrong_type("datasets", "a table of dataset tables", other));
            }
        }
        let primary = primary.unwrap_or_else(|| methods.first().cloned().unwrap_or_default());
        let baselines_key = if legacy_baseline.is_some() {
            "baseline"
        } else {
            "baselines"
        };
        let baselines = match (baselines, legacy_baseline) {
            (Some(list), _) => list,
            // The older spelling, kept so that older presets still run. It named the
            // method whose accuracy set the target, which could be the primary itself:
            // then there is nothing to compare with, and the target is its own plateau.
            (None, Some(one)) if one == primary => Vec::new(),
            (None, Some(one)) => vec![one],
            (None, None) => methods
                .iter()
                .filter(|m| {
                    **m != primary
                        && !NOT_BASELINES_BY_DEFAULT
                            .iter()
                            .any(|folder| m.starts_with(folder))
                })
                .cloned()
                .collect(),
        };
        let preset = Self {
            label,
            file,
            description,
            methods,
            primary,
            baselines,
            target_fraction,
            seeds,
            run_on,
            settings: doc,
            per_dataset,
            user_named,
            baselines_key,
        };
        preset.check(root)?;
        Ok(preset)
    }

    /// What `parse` cannot see from the types alone: the methods exist and their
    /// results would not overwrite each other, the baseline is one of them.
    fn check(&self, root: &Path) -> Result<()> {
        if self.methods.is_empty() {
            return Err(self.error("[preset] methods is empty; name at least one method"));
        }
        let configs = root.join("configs");
        let mut seen: Vec<&str> = Vec::new();
        for entry in &self.methods {
            if !is_plain_relative(entry) {
                return Err(self.error(format_args!(
                    "[preset] methods: {entry:?} is not a config name; expected a path \
                     under configs/ without `.toml`, like \"fibecfed\" or \"ablations/dense\""
                )));
            }
            if !configs.join(format!("{entry}.toml")).is_file() {
                return Err(self.error(format_args!(
                    "[preset] methods: {entry:?}: no configs/{entry}.toml; available: {}",
                    method_configs(&configs).join(", ")
                )));
            }
            let name = last_component(entry);
            if let Some(earlier) = seen.iter().find(|e| last_component(e) == name) {
                return Err(self.error(format_args!(
                    "[preset] methods: {earlier:?} and {entry:?} would both write their \
                     results as `{name}`; name each config once"
                )));
            }
            seen.push(entry);
        }
        if !self.methods.contains(&self.primary) {
            return Err(self.error(format_args!(
                "[preset] primary {:?} is not one of methods ({})",
                self.primary,
                self.methods.join(", ")
            )));
        }
        // Named `baseline` in the message when that is the key the file used.
        let key = self.baselines_key;
        for (i, b) in self.baselines.iter().enumerate() {
            if !self.methods.contains(b) {
                return Err(self.error(format_args!(
                    "[preset] {key} {b:?} is not one of methods ({})",
                    self.methods.join(", ")
                )));
            }
            if *b == self.primary {
                return Err(self.error(format_args!(
                    "[preset] baselines: {b:?} is the primary method; it cannot be its own \
                     baseline"
                )));
            }
            if self.baselines[..i].contains(b) {
                return Err(self.error(format_args!("[preset] baselines: {b:?} appears twice")));
            }
        }
        // `!(.. > ..)` so that NaN is refused too.
        if !(self.target_fraction > 0.0 && self.target_fraction <= 1.0) {
            return Err(self.error(format_args!(
                "[preset] target_fraction is {}; expected a number in (0, 1]",
                self.target_fraction
            )));
        }
        Ok(())
    }

    /// The datasets with settings of their own.
    pub fn dataset_names(&self) -> impl Iterator<Item = &str> {
        self.per_dataset.keys().map(String::as_str)
    }

    /// Every method merged, in the preset's order, and the baseline's metrics name.
    /// Done before anything runs, so that a bad method file stops the job in its
    /// first second rather than hours in.
    pub fn plan(&self, root: &Path) -> Result<Plan> {
        self.plan_for(root, None)
    }

    /// [`Self::plan`] on one dataset: its `[preset.datasets.<name>]` settings, when the
    /// preset has them, merged over the shared ones.
    pub fn plan_for(&self, root: &Path, dataset: Option<&str>) -> Result<Plan> {
        let own = dataset.and_then(|d| self.per_dataset.get(d).map(|t| (d, t)));
        let mut configs: Vec<MethodConfig> = Vec::with_capacity(self.methods.len());
        for entry in &self.methods {
            let merged = self.merged_table(root, entry, own.map(|o| o.1))?;
            let method = match merged.get("method") {
                Some(toml::Value::String(m)) => m.clone(),
                _ => bail!(
                    "configs/{entry}.toml: no `method = \"...\"` (nor in the preset): \
                     the name its results are reported under"
                ),
            };
            // The summary groups runs by this name; two configs sharing it would be
            // averaged together as if they were seeds of one method.
            if let Some(other) = configs.iter().find(|c| c.method == method) {
                return Err(self.error(format_args!(
                    "[preset] methods: configs/{}.toml and configs/{entry}.toml both say \
                     method = {method:?}; the summary could not tell them apart",
                    other.entry
                )));
            }
            configs.push(MethodConfig {
                entry: entry.clone(),
                name: last_component(entry).to_owned(),
                method,
                text: render(entry, &self.label, own.map(|o| o.0), &merged)?,
            });
        }
        let method_of = |entry: &str| {
            configs
                .iter()
                .find(|c| c.entry == entry)
                .map(|c| c.method.clone())
                .with_context(|| format!("{entry:?} is not among the methods"))
        };
        let primary_method = method_of(&self.primary)?;
        let baseline_methods = self
            .baselines
            .iter()
            .map(|b| method_of(b))
            .collect::<Result<_>>()?;
        Ok(Plan {
            configs,
            primary_method,
            baseline_methods,
        })
    }

    /// The preset's shared settings with `configs/<method>.toml` merged over them.
    fn merged_table(
        &self,
        root: &Path,
        method: &str,
        dataset: Option<&toml::Table>,
    ) -> Result<toml::Table> {
        let path = root.join("configs").join(format!("{method}.toml"));
        let text =
            fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let own: toml::Table = toml::from_str(&text)
            .with_context(|| format!("{} is not valid TOML", path.display()))?;
        let mut merged = self.settings.clone();
        if let Some(d) = dataset {
            merge(&mut merged, d.clone());
        }
        merge(&mut merged, own);
        Ok(merged)
    }

    fn error(&self, message: impl Display) -> anyhow::Error {
        Source {
            file: &self.file,
            user_named: self.user_named,
        }
        .error(message)
    }
}

/// The config text `reproduce` writes for one method: a line saying where it came
/// from, then the merged table. Checkpoints compare it byte for byte on `--resume`, so
/// neither the line nor the rendering may change.
fn render(
    method: &str,
    label: &str,
    dataset: Option<&str>,
    merged: &toml::Table,
) -> Result<String> {
    let own = dataset.map_or(String::new(), |d| format!(" and its `{d}` settings"));
    Ok(format!(
        "# {method}: configs/{method}.toml over the `{label}` preset's shared settings{own}.\n{}",
        toml::to_string(merged)?
    ))
}

/// Deep merge: tables merge key by key, anything else in `over` replaces. A table that
/// names another `kind` than the one it lands on (`[partition] kind = "iid"` over a
/// Dirichlet split) replaces it whole: the settings of one kind mean nothing to another.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o))
                if o.get("kind").is_none_or(|kind| b.get("kind") == Some(kind)) =>
            {
                merge(b, o);
            }
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// "an integer", "a string": the type of a value as an error message says it.
fn a_type(value: &toml::Value) -> String {
    let name = value.type_str();
    let article = if name.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    format!("{article} {name}")
}

fn presets_dir(root: &Path) -> PathBuf {
    root.join("configs").join("presets")
}

/// A name rather than a path: `--preset smoke`, not `--preset ./smoke.toml`.
fn is_bare_name(asked: &str) -> bool {
    !asked.contains('/') && !asked.contains(std::path::MAIN_SEPARATOR) && !is_toml_file(asked)
}

fn is_toml_file(name: &str) -> bool {
    Path::new(name)
        .extension()
        .is_some_and(|ext| ext.eq_ignore_ascii_case("toml"))
}

/// Only plain folder and file names: no `..`, no root, no `.toml`, which would
/// silently name another file than the user meant.
fn is_plain_relative(entry: &str) -> bool {
    !entry.is_empty()
        && !is_toml_file(entry)
        && Path::new(entry)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

fn last_component(entry: &str) -> &str {
    entry.rsplit('/').next().unwrap_or(entry)
}

/// The built-in preset names, for an error message; empty when the folder is unreadable.
fn available(presets: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(presets)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let path = e.path();
            (path.extension()? == "toml")
                .then(|| path.file_stem()?.to_str().map(str::to_owned))
                .flatten()
        })
        .collect();
    names.sort();
    names
}

/// The method configs under `configs/` (presets excluded), as a preset names them.
fn method_configs(configs: &Path) -> Vec<String> {
    fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) {
        for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if path.is_dir() {
                if !(prefix.is_empty() && name == "presets") {
                    walk(&path, &format!("{prefix}{name}/"), out);
                }
            } else if let Some(stem) = name.strip_suffix(".toml") {
                out.push(format!("{prefix}{stem}"));
            }
        }
    }
    let mut out = Vec::new();
    walk(configs, "", &mut out);
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::{UserError, workspace_root};

    const BUILT_IN: [&str; 6] = ["smoke", "default", "paper", "heads", "evidence", "smollm2"];

    /// The message of a `UserError` (exit 2), or a failure naming what came instead.
    fn user_message<T: std::fmt::Debug>(result: Result<T>) -> String {
        match result {
            Ok(value) => panic!("expected an error, got {value:?}"),
            Err(err) => match err.downcast_ref::<UserError>() {
                Some(user) => user.message.clone(),
                None => panic!("expected a user error, got {err:#}"),
            },
        }
    }

    fn write_preset(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
        let path = dir.join(name);
        fs::write(&path, text)?;
        Ok(path)
    }

    /// Every built-in file parses, its methods exist under configs/, FibecFed and the
    /// target's baseline come first, and the merge keeps the preset's settings unless
    /// the method's file overrides them.
    #[test]
    fn built_in_presets_load_and_merge() -> Result<()> {
        let root = workspace_root()?;
        assert_eq!(
            available(&presets_dir(&root)),
            ["default", "evidence", "heads", "paper", "smoke", "smollm2"]
        );
        for name in BUILT_IN {
            let preset = Preset::load(&root, Some(name))?;
            assert_eq!(preset.label, name);
            // Only the SmolLM2 preset runs the LLaMA decoder (and so `--model-file`).
            assert_eq!(preset.runs_llama(), name == "smollm2", "{name}");
            assert!(preset.description.as_deref().is_some_and(|d| !d.is_empty()));
            assert_eq!(preset.methods[..2], ["fibecfed", "fedavg-lora"]);
            assert_eq!(preset.primary, "fibecfed");
            assert!(preset.baselines.iter().any(|b| b == "fedavg-lora"));
            assert_eq!(preset.target_fraction, 0.95);
            let plan = preset.plan(&root)?;
            assert_eq!(plan.primary_method, "fibecfed");
            assert!(plan.baseline_methods.iter().any(|b| b == "fedavg-lora"));
            assert_eq!(plan.configs.len(), preset.methods.len());
            for config in &plan.configs {
                let table: toml::Table = toml::from_str(&config.text)?;
                let clients = table["federation"]["clients"].as_integer();
                if config.entry == "centralised" {
                    assert_eq!(clients, Some(1), "{}", config.text);
                } else {
                    assert_eq!(
                        clients,
                        preset.settings["federation"]["clients"].as_integer()
                    );
                }
            }
        }
        let default = Preset::load(&root, None)?;
        assert_eq!(default.label, DEFAULT);
        assert_eq!(default.methods, Preset::load(&root, Some(DEFAULT))?.methods);
        Ok(())
    }

    /// `[preset.datasets.<name>]` settings go over the shared ones for that dataset
    /// only, before the method's file; a dataset without them gets the shared text
    /// exactly as before.
    #[test]
    fn per_dataset_settings_merge_for_their_dataset_only() -> Result<()> {
        let root = workspace_root()?;
        let paper = Preset::load(&root, Some("paper"))?;
        let fib = |d: Option<&str>| -> Result<(String, toml::Table)> {
            let plan = paper.plan_for(&root, d)?;
            let text = plan.configs[0].text.clone();
            let table: toml::Table = toml::from_str(&text)?;
            Ok((text, table))
        };
        let get = |t: &toml::Table, a: &str, b: &str| t[a][b].clone();
        let (mrpc_text, mrpc) = fib(Some("mrpc"))?;
        assert_eq!(get(&mrpc, "federation", "rounds").as_integer(), Some(50));
        assert_eq!(get(&mrpc, "partition", "alpha").as_float(), Some(1.0));
        assert_eq!(get(&mrpc, "federation", "clients").as_integer(), Some(100));
        assert!(
            mrpc_text
                .lines()
                .next()
                .unwrap_or("")
                .contains("its `mrpc` settings")
        );
        let (_, sst) = fib(Some("sst-2"))?;
        assert_eq!(get(&sst, "federation", "rounds").as_integer(), Some(20));
        assert_eq!(get(&sst, "partition", "alpha").as_float(), Some(5.0));
        let (rte_text, rte) = fib(Some("rte"))?;
        assert_eq!(get(&rte, "federation", "rounds").as_integer(), Some(100));
        assert_eq!(rte_text, fib(None)?.0);
        // The method's own file still wins over a dataset's settings.
        let plan = paper.plan_for(&root, Some("mrpc"))?;
        let central = plan.configs.iter().find(|c| c.entry == "centralised");
        if let Some(c) = central {
            let t: toml::Table = toml::from_str(&c.text)?;
            assert_eq!(t["federation"]["clients"].as_integer(), Some(1));
        }
        let dir = tempfile::tempdir()?;
        let bad = write_preset(
            dir.path(),
            "bad.toml",
            "[preset]\nmethods = [\"fibecfed\"]\nbaseline = \"fibecfed\"\ntarget_fraction = 0.9\ndatasets = { mr = 3 }\n",
        )?;
        let msg = user_message(Preset::load(&root, Some(bad.to_str().unwrap_or(""))));
        assert!(msg.contains("datasets.mr"), "{msg}");
        Ok(())
    }

    #[test]
    fn names_and_paths() {
        assert!(is_bare_name("smoke"));
        assert!(!is_bare_name("smoke.toml"));
        assert!(!is_bare_name("./smoke"));
        assert!(!is_bare_name("my/exp"));
        assert!(is_plain_relative("ablations/dense"));
        for bad in ["", "../fibecfed", "/etc/x", "./fibecfed", "fibecfed.toml"] {
            assert!(!is_plain_relative(bad), "{bad}");
        }
    }

    /// A user's own file, named by path, with a method from a subfolder as baseline.
    #[test]
    fn user_file_by_path() -> Result<()> {
        let root = workspace_root()?;
        let dir = tempfile::tempdir()?;
        let path = write_preset(
            dir.path(),
            "mine.toml",
            "[preset]\n\
             methods = [\"fibecfed\", \"ablations/dense\"]\n\
             baseline = \"ablations/dense\"\n\
             target_fraction = 1\n\
             [federation]\nclients = 6\nrounds = 2\n",
        )?;
        let asked = path.to_str().context("temporary path is not UTF-8")?;
        let preset = Preset::load(&root, Some(asked))?;
        assert_eq!(preset.label, path.display().to_string());
        assert_eq!(preset.description, None);
        assert_eq!(preset.target_fraction, 1.0);
        let plan = preset.plan(&root)?;
        assert_eq!(plan.primary_method, "fibecfed");
        assert_eq!(plan.baseline_methods, ["fibecfed-dense"]);
        let dense = &plan.configs[1];
        assert_eq!(
            (dense.name.as_str(), dense.method.as_str()),
            ("dense", "fibecfed-dense")
        );
        assert!(dense.text.starts_with(&format!(
            "# ablations/dense: configs/ablations/dense.toml over the `{}` preset's shared settings.\n",
            path.display()
        )));
        let table: toml::Table = toml::from_str(&dense.text)?;
        assert_eq!(table["federation"]["clients"].as_integer(), Some(6));
        assert_eq!(table["sparse"]["rho"].as_float(), Some(1.0));
        Ok(())
    }

    /// The defaults: the first method is the primary; the baselines are the others
    /// that are not variants or ablations; 0.95; no seeds (reproduce's 42). The
    /// older `baseline = "x"` means `baselines = ["x"]`, or none when x is the primary.
    #[test]
    fn primary_baselines_and_seeds() -> Result<()> {
        let root = workspace_root()?;
        let dir = tempfile::tempdir()?;
        let load = |name: &str, text: &str| -> Result<Preset> {
            let path = write_preset(dir.path(), name, text)?;
            Preset::load(
                &root,
                Some(path.to_str().context("temporary path is not UTF-8")?),
            )
        };
        let methods = "methods = [\"fibecfed\", \"fedavg-lora\", \"variants/fibecfed-fisher-gal\", \
                       \"ffa-lora\", \"ablations/dense\"]\n";
        let defaults = load("defaults.toml", &format!("[preset]\n{methods}"))?;
        assert_eq!(defaults.primary, "fibecfed");
        assert_eq!(defaults.baselines, ["fedavg-lora", "ffa-lora"]);
        assert_eq!(
            (defaults.target_fraction, defaults.seeds.clone()),
            (0.95, None)
        );
        let plan = defaults.plan(&root)?;
        assert_eq!(plan.baseline_methods, ["fedavg-lora", "ffa-lora"]);

        let explicit = load(
            "explicit.toml",
            &format!(
                "[preset]\n{methods}primary = \"ffa-lora\"\nbaselines = [\"ablations/dense\"]\n\
                 seeds = [44, 42]\ntarget_fraction = 0.9\n"
            ),
        )?;
        assert_eq!(explicit.primary, "ffa-lora");
        assert_eq!(explicit.baselines, ["ablations/dense"]);
        assert_eq!(explicit.seeds, Some(vec![44, 42]));
        let plan = explicit.plan(&root)?;
        assert_eq!(plan.primary_method, "ffa-lora");
        assert_eq!(plan.baseline_methods, ["fibecfed-dense"]);

        let legacy = load(
            "legacy.toml",
            &format!("[preset]\n{methods}baseline = \"ffa-lora\"\n"),
        )?;
        assert_eq!(legacy.baselines, ["ffa-lora"]);
        let itself = load(
            "itself.toml",
            "[preset]\nmethods = [\"fibecfed\"]\nbaseline = \"fibecfed\"\n",
        )?;
        assert!(itself.baselines.is_empty());
        let none = load(
            "none.toml",
            "[preset]\nmethods = [\"fibecfed\"]\nbaselines = []\n",
        )?;
        assert!(none.baselines.is_empty());
        assert!(defaults.run_on.is_empty());

        let on = load(
            "on.toml",
            &format!("[preset]\n{methods}run_on = [\"mr\", \"trec\"]\n"),
        )?;
        assert_eq!(on.run_on, ["mr", "trec"]);
        for (bad, needle) in [
            ("run_on = [\"mr\", \"mr\"]", "appears twice"),
            ("run_on = []", "run_on is empty"),
            ("run_on = [\"../x\"]", "run_on[0]"),
            ("run_on = \"mr\"", "run_on"),
        ] {
            let message = user_message(load("bad-on.toml", &format!("[preset]\n{methods}{bad}\n")));
            assert!(message.contains(needle), "{bad}: {message}");
        }
        Ok(())
    }

    #[test]
    fn unknown_name_lists_the_presets() -> Result<()> {
        let root = workspace_root()?;
        let message = user_message(Preset::load(&root, Some("fast")));
        assert!(message.contains("\"fast\""), "{message}");
        assert!(
            message.contains("default, evidence, heads, paper, smoke"),
            "{message}"
        );
        Ok(())
    }

    #[test]
    fn missing_file_is_named() -> Result<()> {
        let root = workspace_root()?;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("absent.toml");
        let asked = path.to_str().context("temporary path is not UTF-8")?;
        let message = user_message(Preset::load(&root, Some(asked)));
        assert!(message.contains(asked), "{message}");
        assert!(message.contains("cannot read"), "{message}");
        Ok(())
    }

    /// Each fault is reported with the file and what is wrong where.
    #[test]
    fn malformed_files_are_explained() -> Result<()> {
        let root = workspace_root()?;
        let dir = tempfile::tempdir()?;
        let ok_tail = "baseline = \"fibecfed\"\ntarget_fraction = 0.9\n";
        let cases: [(&str, String, &[&str]); 22] = [
            (
                "syntax",
                "[preset]\nmethods = [\"fibecfed\"\n".into(),
                &["not valid TOML", "line 2"],
            ),
            (
                "no-table",
                "[federation]\nrounds = 1\n".into(),
                &["no [preset] table"],
            ),
            (
                "not-a-table",
                "preset = 3\n".into(),
                &["`preset` must be a table (`[preset]`), found an integer"],
            ),
            (
                "typo",
                format!("[preset]\nmethod = [\"fibecfed\"]\n{ok_tail}"),
                &["no key `method`", "methods"],
            ),
            (
                "methods-type",
                format!("[preset]\nmethods = \"fibecfed\"\n{ok_tail}"),
                &["[preset] methods: expected an array of strings, found a string"],
            ),
            (
                "methods-item",
                format!("[preset]\nmethods = [\"fibecfed\", 3]\n{ok_tail}"),
                &["[preset] methods[1]: expected a string, found an integer"],
            ),
            (
                "methods-missing",
                format!("[preset]\n{ok_tail}"),
                &["[preset] lacks `methods`"],
            ),
            (
                "empty",
                format!("[preset]\nmethods = []\n{ok_tail}"),
                &["methods is empty"],
            ),
            (
                "unknown-method",
                format!("[preset]\nmethods = [\"fibecfed\", \"fedavg\"]\n{ok_tail}"),
                &[
                    "\"fedavg\": no configs/fedavg.toml",
                    "fedavg-lora",
                    "ablations/dense",
                ],
            ),
            (
                "with-suffix",
                format!("[preset]\nmethods = [\"fibecfed.toml\"]\n{ok_tail}"),
                &["\"fibecfed.toml\" is not a config name"],
            ),
            (
                "twice",
                format!("[preset]\nmethods = [\"fibecfed\", \"fibecfed\"]\n{ok_tail}"),
                &["both write their results as `fibecfed`"],
            ),
            (
                "baseline",
                "[preset]\nmethods = [\"fibecfed\"]\nbaseline = \"fedavg-lora\"\n\
                 target_fraction = 0.9\n"
                    .into(),
                &["baseline \"fedavg-lora\" is not one of methods (fibecfed)"],
            ),
            (
                "fraction",
                "[preset]\nmethods = [\"fibecfed\"]\nbaseline = \"fibecfed\"\n\
                 target_fraction = 95\n"
                    .into(),
                &["target_fraction is 95; expected a number in (0, 1]"],
            ),
            (
                "both-baseline-keys",
                "[preset]\nmethods = [\"fibecfed\", \"fedavg-lora\"]\nbaseline = \"fedavg-lora\"\n\
                 baselines = [\"fedavg-lora\"]\n"
                    .into(),
                &["both `baseline` and `baselines`"],
            ),
            (
                "primary-unknown",
                "[preset]\nmethods = [\"fibecfed\"]\nprimary = \"fedavg-lora\"\n".into(),
                &["[preset] primary \"fedavg-lora\" is not one of methods (fibecfed)"],
            ),
            (
                "primary-type",
                "[preset]\nmethods = [\"fibecfed\"]\nprimary = [\"fibecfed\"]\n".into(),
                &["[preset] primary: expected a string, found an array"],
            ),
            (
                "baselines-unknown",
                "[preset]\nmethods = [\"fibecfed\"]\nbaselines = [\"ffa-lora\"]\n".into(),
                &["[preset] baselines \"ffa-lora\" is not one of methods (fibecfed)"],
            ),
            (
                "baselines-primary",
                "[preset]\nmethods = [\"fibecfed\", \"fedavg-lora\"]\nbaselines = [\"fibecfed\"]\n"
                    .into(),
                &["[preset] baselines: \"fibecfed\" is the primary method"],
            ),
            (
                "baselines-twice",
                "[preset]\nmethods = [\"fibecfed\", \"fedavg-lora\"]\n\
                 baselines = [\"fedavg-lora\", \"fedavg-lora\"]\n"
                    .into(),
                &["[preset] baselines: \"fedavg-lora\" appears twice"],
            ),
            (
                "seeds-empty",
                "[preset]\nmethods = [\"fibecfed\"]\nseeds = []\n".into(),
                &["[preset] seeds is empty"],
            ),
            (
                "seeds-negative",
                "[preset]\nmethods = [\"fibecfed\"]\nseeds = [42, -1]\n".into(),
                &["[preset] seeds[1]: expected a non-negative integer, found an integer"],
            ),
            (
                "seeds-twice",
                "[preset]\nmethods = [\"fibecfed\"]\nseeds = [42, 43, 42]\n".into(),
                &["[preset] seeds: 42 appears twice"],
            ),
        ];
        for (name, text, expected) in cases {
            let path = write_preset(dir.path(), &format!("{name}.toml"), &text)?;
            let asked = path.to_str().context("temporary path is not UTF-8")?;
            let message = user_message(Preset::load(&root, Some(asked)));
            assert!(message.contains(asked), "{name}: {message}");
            for part in expected {
                assert!(message.contains(part), "{name}: {part:?} not in {message}");
            }
        }
        Ok(())
    }

    /// A broken built-in default that nobody named is the checkout's fault, not bad
    /// input: a plain failure (exit 1), still naming the file.
    #[test]
    fn unnamed_default_fails_as_the_checkout_s_fault() -> Result<()> {
        let root = workspace_root()?;
        let file = presets_dir(&root).join("default.toml");
        let err = Preset::parse(&root, DEFAULT.into(), file.clone(), "[preset\n", false)
            .err()
            .context("a broken file parsed")?;
        assert!(err.downcast_ref::<UserError>().is_none(), "{err:#}");
        assert!(format!("{err:#}").contains(&file.display().to_string()));
        Ok(())
    }

    #[test]
    fn merge_is_deep() -> Result<()> {
        let mut base: toml::Table = toml::from_str("[a]\nx = 1\ny = 2\n[b]\nz = 3\n")?;
        merge(&mut base, toml::from_str("[a]\ny = 5\n[c]\nw = 6\n")?);
        let expected: toml::Table = toml::from_str("[a]\nx = 1\ny = 5\n[b]\nz = 3\n[c]\nw = 6\n")?;
        assert_eq!(base, expected);
        // Another kind replaces the table whole; the same kind merges.
        let mut base: toml::Table = toml::from_str("[p]\nkind = \"dirichlet\"\nalpha = 5.0\n")?;
        merge(&mut base, toml::from_str("[p]\nkind = \"iid\"\n")?);
        assert_eq!(base, toml::from_str("[p]\nkind = \"iid\"\n")?);
        let mut base: toml::Table =
            toml::from_str("[p]\nkind = \"dirichlet\"\nalpha = 5.0\nsize_concentration = 5.0\n")?;
        merge(
            &mut base,
            toml::from_str("[p]\nkind = \"dirichlet\"\nalpha = 1.0\n")?,
        );
        assert_eq!(
            base,
            toml::from_str("[p]\nkind = \"dirichlet\"\nalpha = 1.0\nsize_concentration = 5.0\n")?
        );
        Ok(())
    }
}
