//! The TOML file of `fibecfed run`: one engine, one config per method. FibecFed, every
//! baseline and every ablation of FIBECFED.md §6 differ only in these values (see
//! `configs/`). Unknown keys are errors that list the valid ones (serde's
//! `deny_unknown_fields`); the pluggable parts (`[curriculum]` scorer, ordering and
//! pacing, `[sharing.selector]`, `[aggregator]`) are looked up by `kind` in a
//! [`crate::registry::Registry`], so a new component needs no edit here.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

pub use fibecfed_data::PartitionConfig;

/// The most clients one simulated run holds: every client keeps a full adapter and
/// its AdamW moments in memory (about 1 MB each for MiniLM at rank 8).
pub const MAX_CLIENTS: usize = 10_000;

/// A whole run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// The name metrics and plots use ("fibecfed", "fedavg-lora", ...).
    pub method: String,
    #[serde(default = "default_seed")]
    pub seed: u64,
    #[serde(default)]
    pub model: ModelSection,
    #[serde(default)]
    pub data: DataSection,
    #[serde(default)]
    pub partition: PartitionConfig,
    #[serde(default)]
    pub federation: Federation,
    #[serde(default)]
    pub lora: LoraSection,
    #[serde(default)]
    pub curriculum: CurriculumSection,
    #[serde(default)]
    pub sharing: Sharing,
    #[serde(default)]
    pub sparse: Sparse,
    /// `kind` names a registered aggregator; the other keys are its settings.
    #[serde(default = "default_aggregator")]
    pub aggregator: toml::Table,
    #[serde(default)]
    pub client: ClientSection,
    #[serde(default)]
    pub simulation: Simulation,
    /// How the arithmetic runs: which OpenBLAS kernel family (absent: whatever the
    /// library picks for this CPU, as before the section existed).
    #[serde(default, skip_serializing_if = "Compute::is_auto")]
    pub compute: Compute,
}

/// `[compute]`: the settings that change how the numbers are computed, not what.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Compute {
    /// The OpenBLAS kernel family every matrix product runs on. Kernels differ in
    /// their last bits (FMA or not, blocking), so `"auto"` gives results that depend
    /// on the CPU OpenBLAS detects (and Debian's OpenBLAS 0.3.21 takes an unknown
    /// recent Xeon for a 2004 Prescott, with SSE3 kernels 2-3× slower);
    /// `"haswell"` (AVX2 + FMA) gives the same bits on every x86-64 CPU since 2013,
    /// AMD or Intel, with or without AVX-512; `"skylakex"` (AVX-512) is faster where it
    /// runs and refused where it does not. See `fibecfed_sim::blas`.
    pub blas: BlasKernel,
}

impl Compute {
    fn is_auto(&self) -> bool {
        self.blas == BlasKernel::Auto
    }
}

/// An OpenBLAS kernel family (`OPENBLAS_CORETYPE`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlasKernel {
    #[default]
    Auto,
    Haswell,
    Skylakex,
}

fn default_seed() -> u64 {
    42
}

fn default_aggregator() -> toml::Table {
    kind_table("fedavg")
}

/// `{ kind = name }`.
pub fn kind_table(name: &str) -> toml::Table {
    let mut t = toml::Table::new();
    t.insert("kind".into(), toml::Value::String(name.into()));
    t
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// A Hugging Face BERT-family folder; `--model-dir` overrides it.
    pub dir: Option<PathBuf>,
    /// Inputs are truncated to this many tokens, [CLS] and [SEP] (or the prompt)
    /// included.
    pub max_len: usize,
    /// `"bert"` (the folder in `dir`, a trained head) or `"llama"` (the GGUF in `file`,
    /// classifying through its frozen LM head; needs `sharing.head = "none"`). Written
    /// only when not `"bert"`, so older configs read and write as before.
    #[serde(skip_serializing_if = "ModelKind::is_bert")]
    pub kind: ModelKind,
    /// `kind = "llama"`: the GGUF file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// `kind = "llama"`: the prompt, `{a}` for the text (and `{b}` for a pair's second);
    /// the label words are read after its last token. Default: the authors' template
    /// for the dataset (`fibecfed_data::authors_verbalizer`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// `kind = "llama"`: label name → word (one token, leading space), for every label
    /// of the data. Default: the authors' words for the dataset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label_words: Option<std::collections::BTreeMap<String, String>>,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            dir: None,
            max_len: 64,
            kind: ModelKind::Bert,
            file: None,
            template: None,
            label_words: None,
        }
    }
}

/// The model family of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    #[default]
    Bert,
    Llama,
}

impl ModelKind {
    #[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if lends it
    fn is_bert(&self) -> bool {
        *self == ModelKind::Bert
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// Training TSV: the clients' data. `--train` overrides it.
    pub train: Option<PathBuf>,
    /// Test TSV (the dev split), partitioned into the clients' test sets. `--test`
    /// overrides it.
    pub test: Option<PathBuf>,
    /// A seeded random subset of the training file (the smaller presets).
    pub limit_train: Option<usize>,
    pub limit_test: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Federation {
    /// K.
    pub clients: usize,
    /// q: m = max(1, round(q·K)) clients per round.
    pub fraction: f64,
    /// T.
    pub rounds: usize,
    /// E.
    pub local_epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    /// Each selected client fails before uploading with this probability (simulated
    /// failures); the round goes on without it.
    pub dropout_probability: f64,
    /// Clip every local step's gradient to this global L2 norm (torch's
    /// `clip_grad_norm_`; the authors' code uses 1.0). Absent: no clipping, as
    /// before the key existed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_grad_norm: Option<f64>,
    /// Evaluate every client's model after every this many rounds (and after round 0
    /// and the last round); the rounds between have no accuracy in the metrics
    /// (`"evaluated": false`). 1: every round, as before the key existed.
    #[serde(skip_serializing_if = "is_one")]
    pub eval_every: usize,
    /// Training batches of similar lengths: each epoch's samples (the same ones the
    /// curriculum picked) are sorted by length, ties in their shuffled order, cut into
    /// batches, and the batches shuffled; the pruning mask's epochs are cut the same
    /// way once. Less padding, so less compute and simulated time; other batches, so
    /// other bits. A batch curriculum's picked batches are regrouped the same way.
    /// false: batches as drawn, as before the key existed.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub length_buckets: bool,
    /// When a client does its round-0 work (curriculum scoring, pruning mask):
    /// `"upfront"` in round 0, every client; `"on_selection"` in the first round it
    /// trains in, so clients never selected cost nothing. Layer importance the server
    /// needs in round 0 is still computed then. The deferred work runs with the
    /// initial adapter and round 0's seeds, so accuracies are identical; only the
    /// rounds its tokens and simulated time land in change.
    #[serde(skip_serializing_if = "Prepare::is_upfront")]
    pub prepare: Prepare,
}

/// When clients do their round-0 work (`federation.prepare`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prepare {
    #[default]
    Upfront,
    OnSelection,
}

impl Prepare {
    #[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if lends it
    fn is_upfront(&self) -> bool {
        *self == Self::Upfront
    }
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if lends it
fn is_one(v: &usize) -> bool {
    *v == 1
}

impl Default for Federation {
    fn default() -> Self {
        Self {
            clients: 10,
            fraction: 0.2,
            rounds: 15,
            local_epochs: 1,
            batch_size: 16,
            lr: 5e-4,
            weight_decay: 0.01,
            dropout_probability: 0.0,
            max_grad_norm: None,
            eval_every: 1,
            length_buckets: false,
            prepare: Prepare::Upfront,
        }
    }
}

/// Which LoRA factor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Factor {
    A,
    B,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSection {
    pub rank: usize,
    pub alpha: f32,
    pub dropout: f32,
    pub targets: Vec<String>,
    /// Factors that never train (FFA-LoRA freezes A at its random init).
    pub frozen: Vec<Factor>,
}

impl Default for LoraSection {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: vec!["query".into(), "value".into()],
            frozen: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CurriculumSection {
    /// A registered difficulty scorer: `fisher` (trace of the sample's Fisher) or `loss`.
    pub scorer: String,
    /// A registered ordering: `easy_first`, `hard_first` or `random`.
    pub ordering: String,
    /// `kind` names a registered pacing (`linear`, `root`, `geometric`, `step`,
    /// `constant`); constant pacing means no curriculum and no scoring pass for it.
    pub pacing: toml::Table,
    /// Re-score a client's data when it is selected and this many rounds have passed
    /// since its last scoring; 0 = score once, before its first round.
    pub rescore_every: usize,
    /// Gradient at the true label (empirical Fisher) or a label drawn from the model.
    pub sampled_labels: bool,
    /// What the pacing counts: `"sample"` (the ⌈c·n⌉ easiest samples, reshuffled into
    /// batches each epoch) or `"batch"` (the authors' unit, FIBECFED.md §7: batches of
    /// `federation.batch_size` drawn once, ordered by mean difficulty, the ⌈c·n_b⌉
    /// easiest trained intact in that order).
    #[serde(skip_serializing_if = "CurriculumUnit::is_sample")]
    pub unit: CurriculumUnit,
}

/// The unit the curriculum orders and the pacing counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CurriculumUnit {
    #[default]
    Sample,
    Batch,
}

impl CurriculumUnit {
    #[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if lends it
    fn is_sample(&self) -> bool {
        *self == Self::Sample
    }
}

impl Default for CurriculumSection {
    fn default() -> Self {
        let mut pacing = kind_table("linear");
        pacing.insert("c0".into(), toml::Value::Float(0.3));
        pacing.insert("lambda".into(), toml::Value::Float(0.6));
        Self {
            scorer: "fisher".into(),
            ordering: "easy_first".into(),
            pacing,
            rescore_every: 0,
            sampled_labels: false,
            unit: CurriculumUnit::Sample,
        }
    }
}

/// Layer importance used by the selector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImportanceKind {
    /// Σ of the layer's diagonal Fisher, normalised.
    Fisher,
    /// Output sensitivity to noise on the input embeddings.
    Perturbation,
    /// Sensitivity of each layer's output to an adversarial nudge of the input
    /// embeddings (FIBECFED.md §7): raw scores, meant for `end = "least"`.
    Adversarial,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Sharing {
    /// `kind` names a registered layer selector: `consensus_top_k` (with `fraction`,
    /// FibecFed's GAL), `random` (with `fraction`), `all`, `none` (local-only).
    pub selector: toml::Table,
    pub importance: ImportanceKind,
    /// σ of the embedding noise for `importance = "perturbation"`.
    pub perturbation_sigma: f32,
    /// The length of the nudge ε = step·g/‖g‖ for `importance = "adversarial"`.
    #[serde(skip_serializing_if = "is_default_step")]
    pub adversarial_step: f64,
    /// The samples of the one batch each client nudges (a seeded draw).
    #[serde(skip_serializing_if = "is_default_samples")]
    pub adversarial_samples: usize,
    /// The LoRA factors of global layers that travel and are aggregated (FedSA-LoRA
    /// shares only A); the rest stays on the client.
    pub factors: Vec<Factor>,
    /// What the classification head does: `true` or `"shared"` (trained and
    /// aggregated), `false` or `"local"` (trained, never leaves the client),
    /// `"frozen"` (kept at its seeded initialisation, identical on every client).
    pub head: HeadMode,
}

/// What the classification head does in a federated run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadMode {
    /// Trained on each client and aggregated with the global layers.
    Shared,
    /// Trained on each client, never sent.
    Local,
    /// Never trained: every client keeps the seeded initial head (the closest analogue
    /// of the authors' frozen verbalizer, FIBECFED.md §7).
    Frozen,
    /// No head: the model classifies through its frozen LM head (`model.kind =
    /// "llama"`). The adapter's head tensors are never read, trained or sent.
    None,
}

/// How `head` is written: the booleans of configs made before the modes existed stay
/// booleans, so their `config.toml` reads exactly as before.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum HeadRepr {
    Flag(bool),
    Name(String),
}

impl Serialize for HeadMode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Self::Shared => HeadRepr::Flag(true),
            Self::Local => HeadRepr::Flag(false),
            Self::Frozen => HeadRepr::Name("frozen".into()),
            Self::None => HeadRepr::Name("none".into()),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for HeadMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        match HeadRepr::deserialize(d)? {
            HeadRepr::Flag(true) => Ok(Self::Shared),
            HeadRepr::Flag(false) => Ok(Self::Local),
            HeadRepr::Name(n) => match n.as_str() {
                "shared" => Ok(Self::Shared),
                "local" => Ok(Self::Local),
                "frozen" => Ok(Self::Frozen),
                "none" => Ok(Self::None),
                other => Err(serde::de::Error::custom(format!(
                    "sharing.head: unknown mode {other:?}; expected \"shared\", \"local\", \"frozen\", \"none\" (or true/false)"
                ))),
            },
        }
    }
}

impl Default for Sharing {
    fn default() -> Self {
        let mut selector = kind_table("consensus_top_k");
        selector.insert("fraction".into(), toml::Value::Float(0.5));
        Self {
            selector,
            importance: ImportanceKind::Fisher,
            perturbation_sigma: 0.01,
            adversarial_step: DEFAULT_ADVERSARIAL_STEP,
            adversarial_samples: DEFAULT_ADVERSARIAL_SAMPLES,
            factors: vec![Factor::A, Factor::B],
            head: HeadMode::Shared,
        }
    }
}

const DEFAULT_ADVERSARIAL_STEP: f64 = 0.5;
const DEFAULT_ADVERSARIAL_SAMPLES: usize = 10;

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if lends it
fn is_default_step(v: &f64) -> bool {
    *v == DEFAULT_ADVERSARIAL_STEP
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if lends it
fn is_default_samples(v: &usize) -> bool {
    *v == DEFAULT_ADVERSARIAL_SAMPLES
}

/// Sparse local update of the layers that stay on the client.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Sparse {
    /// ρ: fraction of units updated each round; 1 = dense.
    pub rho: f64,
    /// γ of the Fisher momentum.
    pub gamma: f64,
    pub granularity: fibecfed_fisher::Granularity,
    /// The one-time pruning mask of the authors' code (FIBECFED.md §7); absent: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prune: Option<Prune>,
}

/// `[sparse.prune]`: once per client, before its first round, `epochs` local epochs
/// from the initial adapter score every output neuron of the LoRA sites in the
/// client's own layers by its Fisher proxy mean_i (ΔW_eff[j,i]/lr)² per epoch, with
/// momentum m ← (1−μ)·m + μ·score; the ⌈ratio·n⌉ lowest neurons are pruned for good
/// (their LoRA output is zero, they never train). The mask epochs' training is then
/// discarded, as the authors' code does: the client starts round 1 from the initial
/// adapter and a fresh optimiser.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Prune {
    /// Fraction of the client's local neurons pruned.
    pub ratio: f64,
    /// Local epochs over the client's data that form the scores.
    pub epochs: usize,
    /// μ, the weight of each epoch's new score.
    pub momentum: f64,
}

impl Default for Prune {
    fn default() -> Self {
        Self {
            ratio: 0.05,
            epochs: 3,
            momentum: 0.5,
        }
    }
}

impl Default for Sparse {
    fn default() -> Self {
        Self {
            rho: 0.25,
            gamma: 0.9,
            granularity: fibecfed_fisher::Granularity::Neuron,
            prune: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientSection {
    /// FedProx μ on the shared tensors; 0 = plain local training.
    pub prox_mu: f32,
}

/// The deterministic cost model behind "simulated time": wall clocks differ from run to
/// run, and metrics must not.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Simulation {
    /// Seconds per padded token of a forward+backward pass (training or scoring).
    /// Default: MiniLM r=8 on the 2-core reference machine (≈2,100 tokens/s).
    pub seconds_per_token: f64,
    pub upload_bytes_per_second: f64,
    pub download_bytes_per_second: f64,
}

impl Default for Simulation {
    fn default() -> Self {
        Self {
            seconds_per_token: 1.0 / 2100.0,
            upload_bytes_per_second: 1.0e6,
            download_bytes_per_second: 5.0e6,
        }
    }
}

impl Simulation {
    /// Every rate with its key under `simulation.`.
    fn rates(&self) -> [(&'static str, f64); 3] {
        [
            ("seconds_per_token", self.seconds_per_token),
            ("upload_bytes_per_second", self.upload_bytes_per_second),
            ("download_bytes_per_second", self.download_bytes_per_second),
        ]
    }
}

impl RunConfig {
    /// Reads and checks a config file; errors name the file and the key.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("config {}", path.display()))
    }

    /// Command-line overrides of the model folder and data files (`--model-dir`,
    /// `--train`, `--test`).
    /// The command line's (or a node's) paths over the config's. For a LLaMA config
    /// (`model.kind = "llama"`) the model path names its GGUF file (`model.file`),
    /// since a node config or `--model-dir` has one model slot.
    pub fn override_paths(
        &mut self,
        model_dir: Option<&Path>,
        train: Option<&Path>,
        test: Option<&Path>,
    ) {
        let model_slot = match self.model.kind {
            ModelKind::Bert => &mut self.model.dir,
            ModelKind::Llama => &mut self.model.file,
        };
        for (slot, value) in [
            (model_slot, model_dir),
            (&mut self.data.train, train),
            (&mut self.data.test, test),
        ] {
            if let Some(v) = value {
                *slot = Some(v.to_path_buf());
            }
        }
    }

    pub fn parse(text: &str) -> Result<Self> {
        let config: Self = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        config.validate()?;
        Ok(config)
    }

    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }

    /// SHA-256 (hex) of the config without the model and data paths, which differ
    /// between the machines of one federation: every node and the server of a
    /// deployment compare it.
    pub fn federation_digest(&self) -> Result<String> {
        use sha2::{Digest, Sha256};
        let mut c = self.clone();
        c.override_paths(
            Some(Path::new("")),
            Some(Path::new("")),
            Some(Path::new("")),
        );
        Ok(format!("{:x}", Sha256::digest(c.to_toml()?.as_bytes())))
    }

    /// Checks what needs no model or data; every message names the key.
    pub fn validate(&self) -> Result<()> {
        let f = &self.federation;
        if self.method.trim().is_empty() {
            bail!("method: must name the method");
        }
        if f.clients == 0 || f.clients > 1_000_000 {
            bail!(
                "federation.clients: must be between 1 and 1,000,000, got {}",
                f.clients
            );
        }
        if !(f.fraction > 0.0 && f.fraction <= 1.0) {
            bail!("federation.fraction: must be in (0, 1], got {}", f.fraction);
        }
        if f.rounds == 0 {
            bail!("federation.rounds: must be at least 1");
        }
        if !(0.0..1.0).contains(&f.dropout_probability) {
            bail!(
                "federation.dropout_probability: must be in [0, 1), got {}",
                f.dropout_probability
            );
        }
        check_max_grad_norm(f.max_grad_norm, "federation.max_grad_norm")?;
        if f.eval_every == 0 {
            bail!("federation.eval_every: must be at least 1 (1 = every round)");
        }
        if self.model.max_len < 3 {
            bail!("model.max_len: must be at least 3 ([CLS], a token, [SEP])");
        }
        let m = &self.model;
        match m.kind {
            ModelKind::Bert => {
                for (key, set) in [
                    ("model.file", m.file.is_some()),
                    ("model.template", m.template.is_some()),
                    ("model.label_words", m.label_words.is_some()),
                ] {
                    if set {
                        bail!("{key}: only read with model.kind = \"llama\"");
                    }
                }
                if self.sharing.head == HeadMode::None {
                    bail!(
                        "sharing.head = \"none\": a BERT model classifies with its head; say \"shared\", \"local\" or \"frozen\""
                    );
                }
            }
            ModelKind::Llama => {
                if m.dir.is_some() {
                    bail!("model.dir: a LLaMA model is one GGUF file; name it in model.file");
                }
                if self.sharing.head != HeadMode::None {
                    bail!(
                        "sharing.head: model.kind = \"llama\" classifies through its frozen LM head, so there is no head to share, keep or freeze; say sharing.head = \"none\""
                    );
                }
            }
        }
        self.partition.validate()?;
        let l = &self.lora;
        Hyper {
            epochs: f.local_epochs,
            batch_size: f.batch_size,
            lr: f.lr,
            weight_decay: f.weight_decay,
            rank: l.rank,
            alpha: l.alpha,
            dropout: l.dropout,
        }
        .check(&HyperNames::CONFIG)?;
        if l.targets.is_empty() {
            bail!("lora.targets: name at least one module");
        }
        let s = &self.sparse;
        if !(s.rho > 0.0 && s.rho <= 1.0) {
            bail!("sparse.rho: must be in (0, 1], got {}", s.rho);
        }
        if !(0.0..=1.0).contains(&s.gamma) {
            bail!("sparse.gamma: must be in [0, 1], got {}", s.gamma);
        }
        if let Some(p) = &s.prune {
            if !(p.ratio > 0.0 && p.ratio < 1.0) {
                bail!("sparse.prune.ratio: must be in (0, 1), got {}", p.ratio);
            }
            if p.epochs == 0 || p.epochs > 1000 {
                bail!(
                    "sparse.prune.epochs: must be between 1 and 1000, got {}",
                    p.epochs
                );
            }
            if !(0.0..=1.0).contains(&p.momentum) {
                bail!(
                    "sparse.prune.momentum: must be in [0, 1], got {}",
                    p.momentum
                );
            }
        }
        let sh = &self.sharing;
        if !(sh.adversarial_step.is_finite() && sh.adversarial_step > 0.0) {
            bail!(
                "sharing.adversarial_step: must be a positive number, got {}",
                sh.adversarial_step
            );
        }
        // One batch through forward and backward: kept small enough to fit in memory.
        if sh.adversarial_samples == 0 || sh.adversarial_samples > 256 {
            bail!(
                "sharing.adversarial_samples: must be between 1 and 256 (one batch), got {}",
                sh.adversarial_samples
            );
        }
        if !(self.client.prox_mu.is_finite() && self.client.prox_mu >= 0.0) {
            bail!("client.prox_mu: must be ≥ 0, got {}", self.client.prox_mu);
        }
        if !(self.sharing.perturbation_sigma > 0.0 && self.sharing.perturbation_sigma.is_finite()) {
            bail!("sharing.perturbation_sigma: must be positive");
        }
        for (key, v) in self.simulation.rates() {
            if !(v.is_finite() && v > 0.0) {
                bail!("simulation.{key}: must be a positive number, got {v}");
            }
        }
        for (key, path) in [
            ("model.dir", &self.model.dir),
            ("data.train", &self.data.train),
            ("data.test", &self.data.test),
        ] {
            if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                bail!("{key}: is empty; give a path or leave the key out");
            }
        }
        Ok(())
    }

    /// The checks a new run (or a new Flower participant) adds to [`Self::validate`]:
    /// settings that are accepted in a saved `config.toml`, so that run folders made
    /// before these checks keep resuming, but that a new run refuses because they
    /// could only fail later, far from their cause, or waste the run.
    pub fn check_new_run(&self) -> Result<()> {
        // Bounded, not only finite: the cost model multiplies these by token and byte
        // counts, and a product that overflows to infinity cannot be saved.
        for (key, v) in self.simulation.rates() {
            if !(1e-12..=1e12).contains(&v) {
                bail!(
                    "simulation.{key}: must be a number between 1e-12 and 1e12, got {}",
                    readable(v)
                );
            }
        }
        check_alpha(self.lora.alpha, HyperNames::CONFIG.alpha)?;
        let frozen = &self.lora.frozen;
        if frozen.contains(&Factor::A)
            && frozen.contains(&Factor::B)
            && !self.sharing.factors.is_empty()
        {
            bail!(
                "lora.frozen: with both A and B frozen only the head trains, yet sharing.factors = {:?} uploads LoRA tensors that never change; for head-only training set sharing.factors = []",
                self.sharing.factors
            );
        }
        if self.sparse.prune.is_some() && frozen.contains(&Factor::B) {
            bail!(
                "sparse.prune: with lora.frozen = [\"b\"] B never moves, so every neuron's score is 0 and the mask would prune by index alone; leave [sparse.prune] out or B trainable"
            );
        }
        if self.federation.clients > MAX_CLIENTS {
            bail!(
                "federation.clients: at most {MAX_CLIENTS} (each client keeps its own adapter and optimiser state in memory), got {}",
                self.federation.clients
            );
        }
        Ok(())
    }

    /// Whether round t's models are evaluated: round 0, every `eval_every`-th round
    /// and the last.
    pub fn evaluates(&self, t: usize) -> bool {
        let f = &self.federation;
        t == 0 || t >= f.rounds || t.is_multiple_of(f.eval_every.max(1))
    }

    /// m = max(1, round(q·K)).
    pub fn clients_per_round(&self) -> usize {
        let f = &self.federation;
        ((f.fraction * f.clients as f64).round() as usize).clamp(1, f.clients)
    }

    /// The LoRA configuration of the adapters.
    pub fn lora_config(&self) -> fibecfed_lora::LoraConfig {
        let targets: Vec<&str> = self.lora.targets.iter().map(String::as_str).collect();
        let mut lora = fibecfed_lora::LoraConfig::new(self.lora.rank, self.lora.alpha, &targets);
        lora.dropout = self.lora.dropout;
        lora
    }
}

/// A clipping norm must be a positive number.
pub(crate) fn check_max_grad_norm(v: Option<f64>, name: &str) -> Result<()> {
    match v {
        Some(v) if !(v.is_finite() && v > 0.0) => {
            bail!("{name}: must be a positive number, got {v}")
        }
        _ => Ok(()),
    }
}

/// α/r scales every LoRA update; a negative or huge α turns the model's outputs into
/// NaN a few steps in, far from the setting that caused it.
pub(crate) fn check_alpha(alpha: f32, name: &str) -> Result<()> {
    if !(alpha > 0.0 && alpha <= 1e4) {
        bail!(
            "{name}: must be a positive number up to 1e4, got {}",
            readable(f64::from(alpha))
        );
    }
    Ok(())
}

/// A number as a user would write it: 1e308, not 309 digits.
pub(crate) fn readable(v: f64) -> String {
    if v == 0.0 || (1e-4..1e6).contains(&v.abs()) {
        format!("{v}")
    } else {
        format!("{v:e}")
    }
}

/// The dotted keys whose values differ between two configs (`federation.lr`, ...),
/// for messages that say what changed.
pub fn changed_keys(a: &RunConfig, b: &RunConfig) -> Vec<String> {
    fn walk(prefix: &str, a: &toml::Value, b: &toml::Value, out: &mut Vec<String>) {
        match (a, b) {
            (toml::Value::Table(x), toml::Value::Table(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let path = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    match (x.get(k), y.get(k)) {
                        (Some(p), Some(q)) => walk(&path, p, q, out),
                        _ => out.push(path),
                    }
                }
            }
            _ if a != b => out.push(prefix.to_owned()),
            _ => {}
        }
    }
    let mut out = Vec::new();
    match (toml::Value::try_from(a), toml::Value::try_from(b)) {
        (Ok(x), Ok(y)) => walk("", &x, &y, &mut out),
        // Fail closed: what cannot be compared counts as changed.
        _ => out.push("(the configs could not be compared)".to_owned()),
    }
    out
}

/// The optimiser and LoRA settings that a federated run (config keys) and centralised
/// training (`fibecfed train` flags) share, checked in one place.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Hyper {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub rank: usize,
    pub alpha: f32,
    pub dropout: f32,
}

/// How a caller spells each [`Hyper`] setting in its error messages.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HyperNames {
    pub epochs: &'static str,
    pub batch_size: &'static str,
    pub lr: &'static str,
    pub weight_decay: &'static str,
    pub rank: &'static str,
    pub alpha: &'static str,
    pub dropout: &'static str,
}

impl HyperNames {
    /// The keys of a run config.
    pub const CONFIG: Self = Self {
        epochs: "federation.local_epochs",
        batch_size: "federation.batch_size",
        lr: "federation.lr",
        weight_decay: "federation.weight_decay",
        rank: "lora.rank",
        alpha: "lora.alpha",
        dropout: "lora.dropout",
    };
    /// The flags of `fibecfed train`.
    pub const FLAGS: Self = Self {
        epochs: "--epochs",
        batch_size: "--batch-size",
        lr: "--lr",
        weight_decay: "--weight-decay",
        rank: "--lora-rank",
        alpha: "--lora-alpha",
        dropout: "--lora-dropout",
    };
}

impl Hyper {
    /// Each message names the setting as the caller spells it.
    pub fn check(&self, n: &HyperNames) -> Result<()> {
        if self.epochs == 0 {
            bail!("{}: must be at least 1", n.epochs);
        }
        if self.batch_size == 0 {
            bail!("{}: must be at least 1", n.batch_size);
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("{}: must be a positive number, got {}", n.lr, self.lr);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bail!(
                "{}: must be a non-negative number, got {}",
                n.weight_decay,
                self.weight_decay
            );
        }
        if self.rank == 0 {
            bail!("{}: must be at least 1", n.rank);
        }
        if !self.alpha.is_finite() {
            bail!("{}: must be finite, got {}", n.alpha, self.alpha);
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("{}: must be in [0, 1), got {}", n.dropout, self.dropout);
        }
        Ok(())
    }
}
