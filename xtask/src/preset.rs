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
//! methods = ["fibecfed", "fedavg-lora"]
//! baseline = "fedavg-lora"
//! target_fraction = 0.95
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
const KEYS: [&str; 5] = [
    "description",
    "methods",
    "baseline",
    "target_fraction",
    "datasets",
];

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
    /// The entry of `methods` whose final accuracy sets the target.
    pub baseline: String,
    /// Target = this fraction of the baseline's mean final accuracy.
    pub target_fraction: f64,
    /// Everything but `[preset]`: the settings each method's file is merged over.
    settings: toml::Table,
    /// `[preset.datasets.<name>]`: settings for one dataset (a folder name such as
    /// `mrpc`), merged over `settings` before the method's file, for the protocols
    /// that differ by dataset (rounds, label skew).
    per_dataset: std::collections::BTreeMap<String, toml::Table>,
    /// Whether the person asked for this preset (see [`Source`]).
    user_named: bool,
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
    /// The `method` value of the preset's baseline, as its metrics name it.
    pub baseline_method: String,
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
        let methods = match own.get("methods") {
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
        let baseline = match own.get("baseline") {
            Some(toml::Value::String(s)) => s.clone(),
            Some(other) => return Err(source.wrong_type("baseline", "a string", other)),
            None => return Err(source.missing("baseline", "one of `methods`")),
        };
        let target_fraction = match own.get("target_fraction") {
            Some(toml::Value::Float(f)) => *f,
            Some(toml::Value::Integer(i)) => *i as f64,
            Some(other) => return Err(source.wrong_type("target_fraction", "a number", other)),
            None => return Err(source.missing("target_fraction", "a number in (0, 1]")),
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
        let preset = Self {
            label,
            file,
            description,
            methods,
            baseline,
            target_fraction,
            settings: doc,
            per_dataset,
            user_named,
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
        if !self.methods.contains(&self.baseline) {
            return Err(self.error(format_args!(
                "[preset] baseline {:?} is not one of methods ({})",
                self.baseline,
                self.methods.join(", ")
            )));
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
        let baseline_method = configs
            .iter()
            .find(|c| c.entry == self.baseline)
            .map(|c| c.method.clone())
            .with_context(|| format!("baseline {:?} is not among the methods", self.baseline))?;
        Ok(Plan {
            configs,
            baseline_method,
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

    const BUILT_IN: [&str; 4] = ["smoke", "default", "paper", "heads"];

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
            ["default", "heads", "paper", "smoke"]
        );
        for name in BUILT_IN {
            let preset = Preset::load(&root, Some(name))?;
            assert_eq!(preset.label, name);
            assert!(preset.description.as_deref().is_some_and(|d| !d.is_empty()));
            assert_eq!(preset.methods[..2], ["fibecfed", "fedavg-lora"]);
            assert_eq!(preset.baseline, "fedavg-lora");
            assert_eq!(preset.target_fraction, 0.95);
            let plan = preset.plan(&root)?;
            assert_eq!(plan.baseline_method, "fedavg-lora");
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

    /// Run folders written while the presets were Rust literals carry the merged text
    /// in their config.toml and `--resume` compares it byte for byte. The merged text is
    /// a function of the preset's label, its shared settings and the method's own file,
    /// so the files must give the very tables and lists the code held. Changing a
    /// built-in preset breaks resuming its old runs through `reproduce`: a deliberate
    /// edit here too. `default` and `paper` changed in issue 14 (the authors' training
    /// settings for every method, FIBECFED.md §7); their old run folders still resume
    /// with `fibecfed run --resume`, which reads the folder's own config.toml.
    #[test]
    fn built_in_presets_match_the_former_literals() -> Result<()> {
        let root = workspace_root()?;
        let former: [(&str, &str, &[&str]); 1] = [(
            "smoke",
            "[model]\nmax_len = 48\n\n\
             [data]\nlimit_train = 240\nlimit_test = 120\n\n\
             [federation]\nclients = 4\nfraction = 0.5\nrounds = 3\nbatch_size = 8\nlr = 2e-3\n",
            &["fibecfed", "fedavg-lora"],
        )];
        for (name, settings, methods) in former {
            let preset = Preset::load(&root, Some(name))?;
            assert_eq!(preset.label, name);
            assert_eq!(preset.methods, methods);
            let settings: toml::Table = toml::from_str(settings)?;
            assert_eq!(preset.settings, settings, "{name}");
            // Bitwise too: `==` on floats would let a -0.0 through.
            assert_eq!(
                toml::to_string(&preset.settings)?,
                toml::to_string(&settings)?
            );
        }
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
        assert_eq!(plan.baseline_method, "fibecfed-dense");
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

    #[test]
    fn unknown_name_lists_the_presets() -> Result<()> {
        let root = workspace_root()?;
        let message = user_message(Preset::load(&root, Some("fast")));
        assert!(message.contains("\"fast\""), "{message}");
        assert!(
            message.contains("default, heads, paper, smoke"),
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
        let cases: [(&str, String, &[&str]); 13] = [
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
