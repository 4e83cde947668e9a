//! How a run is saved and resumed.
//!
//! One file per checkpoint: a safetensors file whose tensors are the run's arrays (f32
//! parameters and moments, f64 Fisher momentum) and whose metadata holds the rest as
//! JSON. One file, written through a rename, so a run killed at any instant leaves
//! either the previous checkpoint or the new one, never half of each.
//!
//! [`snapshot`] and [`restore`] convert a [`RunState`] to and from those contents
//! (tensor names `global/…`, `aggregator/…`, `client{k}/{params,m,v,fisher}/…`); the
//! Flower participant saves one client's state the same way ([`client_snapshot`]).
//! The layout is a contract: run folders written by earlier versions must resume.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use fibecfed_core::NamedTensors;
use fibecfed_curriculum::BatchOrder;
use fibecfed_fisher::{DiagFisher, FisherMomentum, HeadDiag, SiteDiag};
use fibecfed_lora::params::{PEFT_HEAD_BIAS, PEFT_HEAD_WEIGHT, peft_site_name};
use fibecfed_lora::{AdamW, AdamWConfig, LoraParams, SiteId};
use ndarray::ArrayD;
use safetensors::tensor::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};

use crate::local::overlay;
use crate::output::write_atomic;
use crate::state::{ClientState, Pending, RoundMetrics, RunState};

/// The metadata key of the JSON state.
const STATE_KEY: &str = "fibecfed_state";

/// What a checkpoint holds.
#[derive(Debug, Default, Clone)]
pub struct Contents {
    /// JSON text of the run state.
    pub state: String,
    pub f32: BTreeMap<String, ArrayD<f32>>,
    pub f64: BTreeMap<String, ArrayD<f64>>,
}

struct Raw<'a> {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Cow<'a, [u8]>,
}

impl View for &Raw<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn raw_f32(a: &ArrayD<f32>) -> Raw<'static> {
    Raw {
        dtype: Dtype::F32,
        shape: a.shape().to_vec(),
        bytes: Cow::Owned(a.iter().flat_map(|v| v.to_le_bytes()).collect()),
    }
}

fn raw_f64(a: &ArrayD<f64>) -> Raw<'static> {
    Raw {
        dtype: Dtype::F64,
        shape: a.shape().to_vec(),
        bytes: Cow::Owned(a.iter().flat_map(|v| v.to_le_bytes()).collect()),
    }
}

/// Writes `contents` to `path` atomically.
pub fn save(path: &Path, contents: &Contents) -> Result<()> {
    let mut raws: Vec<(String, Raw<'static>)> = Vec::new();
    for (name, a) in &contents.f32 {
        raws.push((name.clone(), raw_f32(a)));
    }
    for (name, a) in &contents.f64 {
        if contents.f32.contains_key(name) {
            bail!("checkpoint: tensor {name} is both f32 and f64");
        }
        raws.push((name.clone(), raw_f64(a)));
    }
    let metadata = HashMap::from([(STATE_KEY.to_owned(), contents.state.clone())]);
    let bytes = safetensors::serialize(raws.iter().map(|(n, r)| (n.as_str(), r)), Some(metadata))
        .map_err(|e| anyhow!("checkpoint {}: {e}", path.display()))?;
    write_atomic(path, &bytes)
}

/// Reads a checkpoint written by [`save`]; errors name the file and the tensor.
pub fn load(path: &Path) -> Result<Contents> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read checkpoint {}", path.display()))?;
    let bad = |what: String| anyhow!("checkpoint {} is damaged: {what}", path.display());
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let state = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(STATE_KEY))
        .ok_or_else(|| bad(format!("no {STATE_KEY} metadata")))?
        .clone();
    let tensors = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let mut out = Contents {
        state,
        ..Contents::default()
    };
    for (name, view) in tensors.tensors() {
        let shape = view.shape().to_vec();
        let data = view.data();
        match view.dtype() {
            Dtype::F32 => {
                let v: Vec<f32> = data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                let a =
                    ArrayD::from_shape_vec(shape, v).map_err(|e| bad(format!("{name}: {e}")))?;
                out.f32.insert(name, a);
            }
            Dtype::F64 => {
                let v: Vec<f64> = data
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                    .collect();
                let a =
                    ArrayD::from_shape_vec(shape, v).map_err(|e| bad(format!("{name}: {e}")))?;
                out.f64.insert(name, a);
            }
            other => return Err(bad(format!("tensor {name} has dtype {other:?}"))),
        }
    }
    Ok(out)
}

// ---- Conversions between a run's state and a checkpoint's contents ----

/// What converting a run's state to and from [`Contents`] needs to know about the run.
#[derive(Debug)]
pub(crate) struct Shapes<'a> {
    /// The seeded initial adapter: every client's tensors have its names and shapes.
    pub template: &'a LoraParams<f32>,
    pub adam: AdamWConfig,
    /// The Fisher momentum's γ.
    pub gamma: f64,
    /// (train, test) sizes per client: a resume on other data is refused.
    pub sizes: Vec<(usize, usize)>,
    /// [`data_digest`] of the clients' data: a resume on data of the same sizes but
    /// other contents (say, flipped labels) is refused too.
    pub digest: String,
    /// T: a checkpoint cannot be past the run's last round.
    pub rounds: usize,
    /// The encoder's layer count: global layers must be among them.
    pub layers: usize,
}

/// SHA-256 over every client's training and test samples (token ids, segment ids,
/// labels), in client order: what the run trains and evaluates on, whatever files and
/// tokenizer produced it.
pub(crate) fn data_digest(data: &[crate::state::ClientData]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (k, d) in data.iter().enumerate() {
        for (part, samples) in [("train", &d.train), ("test", &d.test)] {
            h.update(format!("client{k}/{part}/{}\n", samples.len()).as_bytes());
            for s in samples {
                h.update((s.label as u64).to_le_bytes());
                h.update((s.encoded.ids.len() as u64).to_le_bytes());
                for (&id, &ty) in s.encoded.ids.iter().zip(&s.encoded.type_ids) {
                    h.update(id.to_le_bytes());
                    h.update(ty.to_le_bytes());
                }
            }
        }
    }
    format!("{:x}", h.finalize())
}

#[derive(Debug, Serialize, Deserialize)]
struct ClientMeta {
    adam_steps: u64,
    order: Option<Vec<usize>>,
    last_scored: Option<usize>,
    momentum: bool,
    /// Absent in checkpoints of versions before the batch curriculum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    batch_lens: Option<Vec<usize>>,
    /// Absent in checkpoints of versions before pruning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pruned: Option<Vec<Vec<usize>>>,
    /// Absent when nothing is owed (and in checkpoints of versions before
    /// `federation.prepare`).
    #[serde(default, skip_serializing_if = "is_nothing_pending")]
    pending: Pending,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if lends it
fn is_nothing_pending(p: &Pending) -> bool {
    !p.any()
}

#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    config: String,
    /// (train, test) sizes per client: a resume on other data is refused.
    sizes: Vec<(usize, usize)>,
    /// [`data_digest`]; absent in checkpoints of versions before it, which resume
    /// with the size check alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    digest: Option<String>,
    round: usize,
    gal: Vec<usize>,
    clients: Vec<ClientMeta>,
    history: Vec<RoundMetrics>,
}

/// Checkpoint contents of `state`, with the aggregator's own state and the config
/// text the run was made with.
pub(crate) fn snapshot(
    shapes: &Shapes<'_>,
    state: &RunState,
    aggregator: NamedTensors,
    config_text: &str,
) -> Result<Contents> {
    let mut c = Contents::default();
    for (name, a) in &state.global {
        c.f32.insert(format!("global/{name}"), a.clone());
    }
    for (name, a) in aggregator {
        c.f32.insert(format!("aggregator/{name}"), a);
    }
    let metas = state
        .clients
        .iter()
        .enumerate()
        .map(|(k, client)| client_contents(k, client, &mut c))
        .collect();
    let meta = Meta {
        config: config_text.to_owned(),
        sizes: shapes.sizes.clone(),
        digest: Some(shapes.digest.clone()),
        round: state.round,
        gal: state.gal.clone(),
        clients: metas,
        history: state.history.clone(),
    };
    c.state = serde_json::to_string(&meta)?;
    // What restore would refuse is never written: a folder must always resume.
    check_tensors(&c).context("the state is not finite and cannot be saved")?;
    Ok(c)
}

/// The inverse of [`snapshot`]: the run state and the aggregator's state, checked
/// against the config text and the clients' data.
pub(crate) fn restore(
    shapes: &Shapes<'_>,
    c: &Contents,
    config_text: &str,
) -> Result<(RunState, NamedTensors)> {
    let meta: Meta = serde_json::from_str(&c.state).context("checkpoint state")?;
    check_config(&meta.config, config_text)?;
    if meta.sizes != shapes.sizes {
        bail!(
            "the data differ from the checkpoint's: clients' (train, test) sizes were {:?}, now {:?}; restore the data files or start a new run",
            meta.sizes,
            shapes.sizes
        );
    }
    if let Some(digest) = &meta.digest
        && *digest != shapes.digest
    {
        bail!(
            "the data differ from the checkpoint's: same sizes, other contents (digest {} then, {} now; changed labels, text, tokenizer or max_len); restore the data files or start a new run",
            short(digest),
            short(&shapes.digest)
        );
    }
    check_progress(shapes, &meta)?;
    check_tensors(c)?;
    if meta.clients.len() != shapes.sizes.len() {
        bail!(
            "checkpoint: {} client states for {} clients",
            meta.clients.len(),
            shapes.sizes.len()
        );
    }
    for (k, cm) in meta.clients.iter().enumerate() {
        check_order(shapes, k, cm)?;
    }
    let clients = meta
        .clients
        .iter()
        .enumerate()
        .map(|(k, cm)| client_from(shapes, k, cm, c))
        .collect::<Result<Vec<_>>>()?;
    let state = RunState {
        round: meta.round,
        gal: meta.gal,
        global: prefixed(c, "global/"),
        clients,
        history: meta.history,
    };
    Ok((state, prefixed(c, "aggregator/")))
}

/// The config a checkpoint was made with must be the config of the folder, compared
/// as parsed (a comment or key order does not matter, a value does).
fn check_config(saved: &str, now: &str) -> Result<()> {
    use crate::config::{RunConfig, changed_keys};
    if saved == now {
        return Ok(());
    }
    let (saved, now) = (RunConfig::parse(saved), RunConfig::parse(now));
    let changed = match (&saved, &now) {
        (Ok(a), Ok(b)) => changed_keys(a, b),
        _ => vec!["(the saved config no longer parses)".to_owned()],
    };
    if !changed.is_empty() {
        bail!(
            "config.toml differs from the config the checkpoint was made with (changed: {}); restore it or start a new run",
            changed.join(", ")
        );
    }
    Ok(())
}

fn short(digest: &str) -> &str {
    digest.get(..12).unwrap_or(digest)
}

/// A checkpoint's round, history and global layers must agree with each other and
/// with the run: round r holds metrics of rounds 0..=r, r ≤ T, layers exist.
fn check_progress(shapes: &Shapes<'_>, meta: &Meta) -> Result<()> {
    if meta.round > shapes.rounds {
        bail!(
            "round {} is past the run's last round {} (federation.rounds)",
            meta.round,
            shapes.rounds
        );
    }
    let rounds: Vec<usize> = meta.history.iter().map(|m| m.round).collect();
    if rounds.len() != meta.round + 1 || rounds.iter().enumerate().any(|(i, &r)| i != r) {
        bail!(
            "round {} does not match its history (metrics of rounds {rounds:?}, expected 0..={})",
            meta.round,
            meta.round
        );
    }
    let mut gal = meta.gal.clone();
    gal.sort_unstable();
    gal.dedup();
    if gal.len() != meta.gal.len() || gal.iter().any(|&l| l >= shapes.layers) {
        bail!(
            "global layers {:?} are not distinct layers of the model's {}",
            meta.gal,
            shapes.layers
        );
    }
    Ok(())
}

/// Global, aggregator and client parameters must be finite: a run never saves a
/// diverged state (it rolls diverged clients back, and [`snapshot`] refuses the rest),
/// so on restore a NaN means a damaged file.
fn check_tensors(c: &Contents) -> Result<()> {
    for (name, a) in &c.f32 {
        let checked = name.starts_with("global/")
            || name.starts_with("aggregator/")
            || name.contains("/params/");
        if checked && a.iter().any(|v| !v.is_finite()) {
            bail!("tensor {name} holds NaN or infinite values");
        }
    }
    Ok(())
}

/// One client's state as checkpoint contents (names prefixed `client{k}/`).
pub(crate) fn client_snapshot(k: usize, client: &ClientState) -> Result<Contents> {
    let mut c = Contents::default();
    let meta = client_contents(k, client, &mut c);
    c.state = serde_json::to_string(&meta)?;
    Ok(c)
}

/// The inverse of [`client_snapshot`], checked against client k's data.
pub(crate) fn client_restore(shapes: &Shapes<'_>, k: usize, c: &Contents) -> Result<ClientState> {
    let cm: ClientMeta = serde_json::from_str(&c.state).context("client state")?;
    check_order(shapes, k, &cm)?;
    client_from(shapes, k, &cm, c)
}

/// The f32 tensors under `prefix`, with the prefix taken off their names.
fn prefixed(c: &Contents, prefix: &str) -> NamedTensors {
    c.f32
        .iter()
        .filter_map(|(n, a)| n.strip_prefix(prefix).map(|s| (s.to_owned(), a.clone())))
        .collect()
}

/// Writes client k's tensors into `c` under `client{k}/`; returns its metadata.
fn client_contents(k: usize, client: &ClientState, c: &mut Contents) -> ClientMeta {
    let (m, v, steps) = client.opt.state();
    for (prefix, p) in [("params", &client.params), ("m", m), ("v", v)] {
        for (name, a) in p.to_named() {
            c.f32.insert(format!("client{k}/{prefix}/{name}"), a);
        }
    }
    if let Some(mom) = &client.momentum {
        for (name, a) in diag_named(mom.current()) {
            c.f64.insert(format!("client{k}/fisher/{name}"), a);
        }
    }
    ClientMeta {
        adam_steps: steps,
        order: client.order.clone(),
        last_scored: client.last_scored,
        momentum: client.momentum.is_some(),
        batch_lens: client.batch_lens.clone(),
        pruned: client.pruned.clone(),
        pending: client.pending,
    }
}

/// A checkpoint's curriculum order must be a permutation of client k's samples.
fn check_order(shapes: &Shapes<'_>, k: usize, cm: &ClientMeta) -> Result<()> {
    if let Some(order) = &cm.order {
        let n = shapes.sizes.get(k).map_or(0, |s| s.0);
        let mut seen = vec![false; n];
        let permutation = order.len() == n
            && order.iter().all(|&i| match seen.get_mut(i) {
                Some(s) if !*s => {
                    *s = true;
                    true
                }
                _ => false,
            });
        if !permutation {
            bail!(
                "checkpoint: client {k}'s curriculum order is not a permutation of its {n} samples"
            );
        }
    }
    if let Some(lens) = &cm.batch_lens {
        let order = cm.order.as_deref().unwrap_or_default();
        let n = order.len();
        // The very check the rounds rebuild the batches with.
        if cm.order.is_none() || BatchOrder::from_parts(order, lens).is_err() {
            bail!(
                "checkpoint: client {k}'s curriculum batch lengths do not cut its order of {n} samples into non-empty batches"
            );
        }
    }
    if let Some(pruned) = &cm.pruned {
        let sites: Vec<usize> = shapes
            .template
            .sites
            .values()
            .map(|w| w.b.nrows())
            .collect();
        let fits = pruned.len() == sites.len()
            && pruned.iter().zip(&sites).all(|(p, &d_out)| {
                p.windows(2).all(|w| w[0] < w[1]) && p.iter().all(|&j| j < d_out)
            });
        if !fits {
            bail!(
                "checkpoint: client {k}'s pruned neurons do not fit the adapter's {} sites (ascending neuron ids below each site's output size)",
                sites.len()
            );
        }
    }
    Ok(())
}

/// Client k's state from the `client{k}/` tensors of a checkpoint.
fn client_from(
    shapes: &Shapes<'_>,
    k: usize,
    cm: &ClientMeta,
    c: &Contents,
) -> Result<ClientState> {
    let load = |what: &str| -> Result<LoraParams<f32>> {
        let mut p = shapes.template.clone();
        let t = prefixed(c, &format!("client{k}/{what}/"));
        if t.len() != p.to_named().len() {
            bail!(
                "checkpoint: client {k} {what}: {} tensors, expected {}",
                t.len(),
                p.to_named().len()
            );
        }
        overlay(&mut p, &t)?;
        Ok(p)
    };
    let params = load("params")?;
    let opt = AdamW::from_state(shapes.adam, load("m")?, load("v")?, cm.adam_steps)?;
    let momentum = if cm.momentum {
        let prefix = format!("client{k}/fisher/");
        let named: BTreeMap<String, ArrayD<f64>> = c
            .f64
            .iter()
            .filter_map(|(n, a)| n.strip_prefix(&prefix).map(|s| (s.to_owned(), a.clone())))
            .collect();
        let diag = diag_from_named(shapes.template, &named)
            .with_context(|| format!("checkpoint: client {k} Fisher momentum"))?;
        Some(FisherMomentum::seeded(shapes.gamma, &diag)?)
    } else {
        None
    };
    Ok(ClientState {
        params,
        opt,
        momentum,
        order: cm.order.clone(),
        last_scored: cm.last_scored,
        batch_lens: cm.batch_lens.clone(),
        pruned: cm.pruned.clone(),
        pending: cm.pending,
    })
}

fn diag_named(d: &DiagFisher<SiteId>) -> Vec<(String, ArrayD<f64>)> {
    let mut out = Vec::new();
    for (site, s) in &d.sites {
        out.push((peft_site_name(*site, "lora_A"), s.a.clone().into_dyn()));
        out.push((peft_site_name(*site, "lora_B"), s.b.clone().into_dyn()));
    }
    if let Some(h) = &d.head {
        out.push((PEFT_HEAD_WEIGHT.to_owned(), h.weight.clone().into_dyn()));
        out.push((PEFT_HEAD_BIAS.to_owned(), h.bias.clone().into_dyn()));
    }
    out
}

/// A [`DiagFisher`] with `samples` = 1 holding `named` exactly (so its mean is itself).
fn diag_from_named(
    template: &LoraParams<f32>,
    named: &BTreeMap<String, ArrayD<f64>>,
) -> Result<DiagFisher<SiteId>> {
    let get2 = |name: &str| -> Result<ndarray::Array2<f64>> {
        named
            .get(name)
            .ok_or_else(|| anyhow!("{name} is missing"))?
            .clone()
            .into_dimensionality()
            .map_err(|e| anyhow!("{name}: {e}"))
    };
    let mut d = DiagFisher::new();
    for site in template.sites.keys() {
        let (a_name, b_name) = (
            peft_site_name(*site, "lora_A"),
            peft_site_name(*site, "lora_B"),
        );
        if named.contains_key(&a_name) {
            d.sites.insert(
                *site,
                SiteDiag {
                    a: get2(&a_name)?,
                    b: get2(&b_name)?,
                },
            );
        }
    }
    if named.contains_key(PEFT_HEAD_WEIGHT) {
        let bias = named
            .get(PEFT_HEAD_BIAS)
            .ok_or_else(|| anyhow!("{PEFT_HEAD_BIAS} is missing"))?
            .clone()
            .into_dimensionality()
            .map_err(|e| anyhow!("{PEFT_HEAD_BIAS}: {e}"))?;
        d.head = Some(HeadDiag {
            weight: get2(PEFT_HEAD_WEIGHT)?,
            bias,
        });
    }
    d.samples = 1;
    Ok(d)
}
