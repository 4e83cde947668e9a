//! The Fisher pass over a client's data: per-sample difficulty (trace of the sample's
//! empirical Fisher over every LoRA A, LoRA B and head parameter), the diagonal Fisher
//! sums of the adapter, layer importance, and the `fibecfed fisher` command.
//!
//! The transformer's backward hook hands each site's (x, δ) to a
//! [`FisherBackend`]; the loss is the *sum* of per-sample losses, so each sample's
//! rows of δ are exactly its own gradient and samples never mix.

use std::path::Path;

use anyhow::{Context, Result, bail};
use fibecfed_fisher::{
    CpuBackend, CudaBackend, DiagFisher, FisherBackend, GpuMode, LabelMode, PerturbationImportance,
    Products, SampleStats, SiteRows, head_fisher, normalise, sample_labels,
};
use fibecfed_lora::{LoraConfig, LoraParams, SiteId, read_adapter};
use fibecfed_transformer::{Adapter, Classifier, Reduction, SiteHook, SiteTrace, cross_entropy};
use ndarray::{Array1, Array2, ArrayView2};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde::Serialize;

use crate::model::fresh_adapter;
use fibecfed_data::{Sample, batch_of, by_length};

/// ChaCha streams of one seed: 0 initialises a fresh adapter (as `fibecfed train`
/// does), these two draw sampled labels and embedding noise.
const LABEL_STREAM: u64 = 1;
const NOISE_STREAM: u64 = 2;

/// How the pass runs.
#[derive(Debug, Clone, Copy)]
pub struct FisherOptions {
    pub batch_size: usize,
    /// True label (empirical Fisher) or y ~ p(·|x).
    pub labels: LabelMode,
    /// Seeds the sampled labels.
    pub seed: u64,
}

impl Default for FisherOptions {
    fn default() -> Self {
        Self {
            batch_size: 16,
            labels: LabelMode::True,
            seed: 42,
        }
    }
}

/// What a pass over a client's data yields.
#[derive(Debug, Clone)]
pub struct FisherReport {
    /// Per sample, in the order the samples were given.
    pub samples: Vec<SampleStats>,
    /// Σ_i g_i ⊙ g_i per site and for the head (`samples` = n).
    pub diag: DiagFisher<SiteId>,
    /// Σ_{p∈φ_l} Σ_i (∂ℓ_i/∂p)² per layer.
    pub layer_sums: Vec<f64>,
    /// `layer_sums` normalised to sum to one: I_l^k.
    pub layer_importance: Vec<f64>,
}

/// Collects per-sample squares of one batch as the backward pass visits the sites.
pub(crate) struct FisherHook<'a> {
    pub(crate) backend: &'a dyn FisherBackend<f32>,
    pub(crate) stats: Vec<SampleStats>,
    pub(crate) diag: &'a mut DiagFisher<SiteId>,
    /// Layers whose sites are skipped (the training pass needs the Fisher of the
    /// client's own layers only); empty = none.
    pub(crate) skip_layers: &'a [usize],
    pub(crate) error: Option<anyhow::Error>,
}

impl SiteHook<f32> for FisherHook<'_> {
    fn site(&mut self, trace: &SiteTrace<'_, f32>) {
        if self.error.is_some() || self.skip_layers.contains(&trace.site.layer) {
            return;
        }
        let rows = SiteRows {
            x: trace.x,
            delta: trace.delta,
            mask: trace.mask,
            batch: trace.batch,
            seq_len: trace.seq_len,
            a: trace.weights.a.view(),
            b: trace.weights.b.view(),
            scale: trace.scale,
            products: Some(Products {
                u: trace.u,
                db: trace.db,
            }),
        };
        let result = self.backend.site(&rows).map_err(anyhow::Error::from);
        let result = result.and_then(|sq| {
            self.diag.add_site(&trace.site, &sq)?;
            for (s, (a, b)) in self.stats.iter_mut().zip(sq.sq_a.iter().zip(&sq.sq_b)) {
                let v = f64::from(*a) + f64::from(*b);
                s.fisher += v;
                if let Some(l) = s.per_layer.get_mut(trace.site.layer) {
                    *l += v;
                }
            }
            Ok(())
        });
        if let Err(e) = result {
            self.error = Some(e.context(format!("site {}", trace.site)));
        }
    }

    fn head(&mut self, pooled: ArrayView2<'_, f32>, dlogits: ArrayView2<'_, f32>) {
        let result = head_fisher(pooled, dlogits)
            .map_err(anyhow::Error::from)
            .and_then(|sq| {
                self.diag.add_head(&sq)?;
                for (s, (w, b)) in self
                    .stats
                    .iter_mut()
                    .zip(sq.sq_weight.iter().zip(&sq.sq_bias))
                {
                    let v = f64::from(*w) + f64::from(*b);
                    s.head += v;
                    s.fisher += v;
                }
                Ok(())
            });
        if let Err(e) = result {
            self.error = Some(e.context("classification head"));
        }
    }
}

/// One pass over `samples` with dropout off: per-sample difficulty and loss, the
/// diagonal Fisher and the layer importance. Errors name the sample (0-based index
/// into `samples`) or the tensor.
pub fn fisher_pass(
    model: &Classifier<f32>,
    adapter: Adapter<'_, f32>,
    samples: &[Sample],
    options: FisherOptions,
    backend: &dyn FisherBackend<f32>,
) -> Result<FisherReport> {
    check_pass(samples, options.batch_size, adapter.params.num_labels())?;
    let n_layers = model.num_layers();
    let blank = SampleStats::zeros(n_layers);
    let mut out = vec![blank.clone(); samples.len()];
    let mut diag = DiagFisher::new();
    // Its own stream, so that it never repeats the draws of an adapter initialised
    // from the same seed.
    let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
    rng.set_stream(LABEL_STREAM);
    for chunk in by_length(samples).chunks(options.batch_size) {
        let batch = batch_of(samples, chunk, model.pad_token_id())?;
        let fwd = model.forward(&batch, adapter, None)?;
        if let Some(row) = fwd
            .logits()
            .rows()
            .into_iter()
            .position(|r| r.iter().any(|v| !v.is_finite()))
        {
            bail!(
                "sample {}: the logits are not finite ({}), so its loss is NaN: check the model and adapter weights",
                chunk[row],
                fwd.logits().row(row)
            );
        }
        let (losses, dlogits) =
            losses_and_gradient(fwd.logits(), samples, chunk, options.labels, &mut rng)?;
        let mut hook = FisherHook {
            backend,
            stats: vec![blank.clone(); chunk.len()],
            diag: &mut diag,
            skip_layers: &[],
            error: None,
        };
        model.backward(&batch, adapter, &fwd, &dlogits, &mut hook)?;
        if let Some(e) = hook.error {
            return Err(e.context(format!("Fisher of samples {chunk:?}")));
        }
        for ((&i, mut s), loss) in chunk.iter().zip(hook.stats).zip(losses) {
            if !loss.is_finite() || !s.fisher.is_finite() {
                bail!(
                    "sample {i}: loss {loss} and Fisher trace {} are not both finite (NaN in the model, adapter or input?)",
                    s.fisher
                );
            }
            s.loss = loss;
            out[i] = s;
        }
        diag.samples += chunk.len();
    }
    if let Some(what) = diag.first_non_finite() {
        bail!("the diagonal Fisher of {what} is not finite");
    }
    let layer_sums = diag.layer_sums(n_layers, |s| s.layer)?;
    let layer_importance = normalise(&layer_sums)?;
    Ok(FisherReport {
        samples: out,
        diag,
        layer_sums,
        layer_importance,
    })
}

/// The inputs of a scoring pass, checked before any work.
fn check_pass(samples: &[Sample], batch_size: usize, classes: usize) -> Result<()> {
    if samples.is_empty() {
        bail!("no samples to score: the data is empty");
    }
    if batch_size == 0 {
        bail!("the Fisher batch size must be at least 1");
    }
    if let Some(i) = samples.iter().position(|s| s.label >= classes) {
        bail!(
            "sample {i} has label id {} but the adapter's head produces {classes} classes",
            samples[i].label
        );
    }
    Ok(())
}

/// Per-sample losses at the true labels, and the summed loss's gradient at the labels
/// `mode` asks for: the reported loss is always at the true label; only the gradient's
/// label follows the mode.
fn losses_and_gradient(
    logits: &Array2<f32>,
    samples: &[Sample],
    chunk: &[usize],
    mode: LabelMode,
    rng: &mut ChaCha8Rng,
) -> Result<(Array1<f64>, Array2<f32>)> {
    let truth: Vec<usize> = chunk.iter().map(|&i| samples[i].label).collect();
    let in_batch = |e: &dyn std::fmt::Display| anyhow::anyhow!("{e} (batch of samples {chunk:?})");
    let (losses, mut dlogits) =
        cross_entropy(logits, &truth, Reduction::Sum).map_err(|e| in_batch(&e))?;
    if mode == LabelMode::Sampled {
        let drawn = sample_labels(logits.view(), rng).map_err(|e| in_batch(&e))?;
        dlogits = cross_entropy(logits, &drawn, Reduction::Sum)
            .map_err(|e| in_batch(&e))?
            .1;
    }
    Ok((losses, dlogits))
}

/// The perturbation-sensitivity alternative to Fisher importance:
/// I_l = mean_i ‖h_l(x_i) − h_l(x_i+ε_i)‖ / ‖ε_i‖, ε ~ N(0, σ²) on the input
/// embeddings of real tokens, normalised over layers.
pub fn perturbation_importance(
    model: &Classifier<f32>,
    adapter: Adapter<'_, f32>,
    samples: &[Sample],
    batch_size: usize,
    sigma: f32,
    seed: u64,
) -> Result<Vec<f64>> {
    if samples.is_empty() {
        bail!("no samples to score: the data is empty");
    }
    if batch_size == 0 {
        bail!("the batch size must be at least 1");
    }
    let normal = Normal::new(0.0f32, sigma)
        .ok()
        .filter(|_| sigma.is_finite() && sigma > 0.0)
        .with_context(|| format!("the perturbation σ must be positive and finite, got {sigma}"))?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(NOISE_STREAM);
    let mut acc = PerturbationImportance::new(model.num_layers());
    let hid = model.hidden_size();
    for chunk in by_length(samples).chunks(batch_size) {
        let batch = batch_of(samples, chunk, model.pad_token_id())?;
        let rows = batch.batch * batch.seq_len;
        let noise = Array2::from_shape_fn((rows, hid), |(r, _)| {
            if batch.mask[r] {
                normal.sample(&mut rng)
            } else {
                0.0
            }
        });
        let norms: Vec<f64> = noise
            .axis_chunks_iter(ndarray::Axis(0), batch.seq_len)
            .map(|n| {
                n.iter()
                    .map(|&v| f64::from(v) * f64::from(v))
                    .sum::<f64>()
                    .sqrt()
            })
            .collect();
        let clean = model.layer_outputs(&batch, Some(adapter), None)?;
        let noisy = model.layer_outputs(&batch, Some(adapter), Some(&noise))?;
        for (l, (c, p)) in clean.iter().zip(&noisy).enumerate() {
            acc.add(l, c.view(), p.view(), &batch.mask, batch.seq_len, &norms)?;
        }
    }
    Ok(acc.finish()?)
}

/// Layer sensitivity to an adversarial nudge of the input embeddings (the layer
/// score of the authors' code, FIBECFED.md §7), on one batch of `samples`, dropout
/// off: g is the gradient of the batch's mean cross-entropy with respect to the
/// embeddings the first layer reads, ε = step·g/‖g‖ with one L2 norm over the whole
/// batch, and per layer l, with H_l the batch's mean-pooled output of layer l (what
/// our head reads, the analogue of the authors' hidden state at the classification
/// position), s_l = |‖H_l(x+ε)‖_F − ‖H_l(x)‖_F| / ‖H_l(x)‖_F. Norms in f64. Returns
/// the L raw scores (not normalised: the authors sum them over clients) and the
/// padded tokens of the batch.
pub fn adversarial_sensitivity(
    model: &Classifier<f32>,
    adapter: Adapter<'_, f32>,
    samples: &[Sample],
    step: f64,
) -> Result<(Vec<f64>, u64)> {
    if samples.is_empty() {
        bail!("no samples to score: the data is empty");
    }
    if !(step.is_finite() && step > 0.0) {
        bail!("the adversarial step must be positive and finite, got {step}");
    }
    check_pass(samples, 1, adapter.params.num_labels())?;
    let ids: Vec<usize> = (0..samples.len()).collect();
    let batch = batch_of(samples, &ids, model.pad_token_id())?;
    let labels: Vec<usize> = samples.iter().map(|s| s.label).collect();
    let fwd = model.forward(&batch, adapter, None)?;
    if fwd.logits().iter().any(|v| !v.is_finite()) {
        bail!("the logits are not finite, so the loss is NaN: check the model and adapter weights");
    }
    let (_, dlogits) = cross_entropy(fwd.logits(), &labels, Reduction::Mean)?;
    let mut g = model.embedding_gradient(&batch, adapter, &fwd, &dlogits)?;
    // Padding never reaches a real token, so its rows are zero already; zeroing them
    // states it, as the perturbation noise does.
    for (mut row, &real) in g.rows_mut().into_iter().zip(&batch.mask) {
        if !real {
            row.fill(0.0);
        }
    }
    let norm = g
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt();
    if !(norm.is_finite() && norm > 0.0) {
        bail!(
            "the loss gradient at the input embeddings has norm {norm}: no adversarial direction to nudge along"
        );
    }
    let factor = step / norm;
    let eps = g.mapv(|v| (f64::from(v) * factor) as f32);
    let clean = model.layer_outputs(&batch, Some(adapter), None)?;
    let nudged = model.layer_outputs(&batch, Some(adapter), Some(&eps))?;
    let frobenius = |h: &Array2<f32>| {
        model
            .pool(h, &batch)
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            .sqrt()
    };
    let mut scores = Vec::with_capacity(clean.len());
    for (l, (c, n)) in clean.iter().zip(&nudged).enumerate() {
        let (a, b) = (frobenius(c), frobenius(n));
        if !(a.is_finite() && b.is_finite() && a > 0.0) {
            bail!(
                "layer {l}: the pooled output's norm is {a} (nudged {b}): cannot form a relative change"
            );
        }
        scores.push((b - a).abs() / a);
    }
    Ok((scores, (batch.batch * batch.seq_len) as u64))
}

/// The adapter to score: a PEFT folder, checked against the model, or a fresh
/// PEFT-style init (A uniform, B zero, head normal) from `seed` for `num_labels`.
pub fn load_or_init_adapter(
    model: &Classifier<f32>,
    adapter_dir: Option<&Path>,
    fresh: &LoraConfig,
    num_labels: usize,
    seed: u64,
) -> Result<(LoraConfig, LoraParams<f32>)> {
    let layers = model.num_layers();
    if let Some(dir) = adapter_dir {
        let (config, tensors) =
            read_adapter(dir).with_context(|| format!("adapter {}", dir.display()))?;
        let sites = model
            .resolve_sites(&config)
            .with_context(|| format!("adapter {}", dir.display()))?;
        let shapes = model.site_shapes(&sites);
        let (params, _ignored) = LoraParams::<f32>::from_named(
            &tensors,
            config.r,
            &shapes,
            model.hidden_size(),
            &dir.display().to_string(),
        )
        .with_context(|| {
            format!(
                "adapter {} does not fit the model ({}-layer, hidden {})",
                dir.display(),
                layers,
                model.hidden_size()
            )
        })?;
        model
            .check_adapter(&params)
            .with_context(|| format!("adapter {}", dir.display()))?;
        return Ok((config, params));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let params = fresh_adapter(model, fresh, num_labels, &mut rng)?;
    Ok((fresh.clone(), params))
}

/// One line of `fibecfed fisher`'s output.
#[derive(Debug, Serialize)]
struct Line {
    index: usize,
    difficulty: f64,
    loss: f64,
}

/// JSON lines `{"index": i, "difficulty": d, "loss": ℓ}`, one per sample, in input order.
pub fn difficulty_jsonl(report: &FisherReport) -> Result<String> {
    let mut text = String::new();
    for (index, s) in report.samples.iter().enumerate() {
        text += &serde_json::to_string(&Line {
            index,
            difficulty: s.fisher,
            loss: s.loss,
        })?;
        text.push('\n');
    }
    Ok(text)
}

/// The default backend: the CPU code of `fibecfed-fisher`.
pub fn cpu_backend() -> &'static dyn FisherBackend<f32> {
    &CpuBackend
}

/// Where the Fisher pass computes per-sample gradient squares (`fibecfed fisher --device`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    /// The GPU when one is usable, else the CPU with a notice saying why.
    #[default]
    Auto,
    /// The CPU code.
    Cpu,
    /// The GPU (fp32 kernels); an error when none is usable.
    Cuda,
}

/// The backend picked for a [`Device`] and the one line that says which, and why.
pub struct ChosenBackend {
    pub backend: Box<dyn FisherBackend<f32>>,
    pub notice: String,
}

impl std::fmt::Debug for ChosenBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChosenBackend")
            .field("notice", &self.notice)
            .finish_non_exhaustive()
    }
}

/// Picks the backend. The GPU path needs the CUDA driver, NVRTC and a device; `auto`
/// falls back to the CPU when any is missing (the notice names which), `cuda` fails.
/// The GPU kernels are deterministic, so repeated runs on one machine agree bitwise
/// whichever backend `auto` lands on.
pub fn choose_backend(device: Device) -> Result<ChosenBackend> {
    let cpu = |notice: String| ChosenBackend {
        backend: Box::new(CpuBackend),
        notice,
    };
    let gpu = |backend: CudaBackend| ChosenBackend {
        notice: format!(
            "Fisher squares on the GPU: {} (CUDA, {})",
            backend.device_name(),
            backend.mode().name()
        ),
        backend: Box::new(backend),
    };
    Ok(match device {
        Device::Cpu => cpu("Fisher squares on the CPU (--device cpu)".into()),
        Device::Auto | Device::Cuda => match CudaBackend::new(GpuMode::Fp32) {
            Ok(backend) => gpu(backend),
            Err(why) if device == Device::Auto => cpu(format!(
                "Fisher squares on the CPU: no usable CUDA GPU ({why})"
            )),
            Err(why) => bail!("--device cuda: no usable CUDA GPU: {why}"),
        },
    })
}
