//! A LLaMA-architecture decoder loaded from a GGUF file, with LoRA sites, a hand-written
//! backward pass and the encoder's per-site hook, classifying through its frozen LM head
//! (a verbalizer: the logits of the label words at each prompt's last token). It computes
//! what transformers' `LlamaForCausalLM` with PEFT's LoRA computes (the references of the
//! tests: logits within 1e-4 on SmolLM2-135M, per-sample LoRA gradients within 1e-4).
//!
//! Per layer: RMSNorm, q/k/v projections, rotary position embeddings (HF's rotate-half
//! form, θ from `llama.rope.freq_base`), causal attention with grouped-query heads (query
//! head h reads key/value head h / (heads / kv_heads)), the output projection and the
//! residual; RMSNorm, the SwiGLU MLP (down(silu(gate(x)) ⊙ up(x))) and the residual. Then
//! the final RMSNorm and the LM head, tied to the token embeddings when the file has no
//! `output.weight`.
//!
//! GGUF stores the q and k projections with their rows permuted for llama.cpp's
//! interleaved rotary form; they are permuted back on load (the inverse of llama.cpp's
//! `convert_hf_to_gguf.py` permute, as transformers' GGUF loader does), so that the rotate-
//! half form applies.
//!
//! Batches are right-padded (the [`Batch`] the tokenizer makes): position t of a row is
//! its t-th token, padding keys are masked, and a padding row never reaches a real one,
//! so a sequence's result does not depend on what it is batched with. LoRA sites are
//! q, k, v, o, gate, up and down ([`SiteKind::llama_suffix`]); the adapter's output is
//! added before the rotary embedding, as PEFT wraps `q_proj` itself. Only the LoRA
//! factors receive gradients; `LoraParams::head` is not read (nothing classification-
//! specific is trained: `head = "none"`).

use std::collections::BTreeMap;
use std::path::Path;

use fibecfed_core::Real;
use fibecfed_gguf::Gguf;
use fibecfed_lora::{LoraParams, SiteId, SiteKind, SiteShape};
use ndarray::linalg::general_mat_mul;
use ndarray::parallel::prelude::*;
use ndarray::{Array1, Array2, Array3, ArrayView2, Axis, Zip, s};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::SeedableRng;

use crate::ModelError;
use crate::encoder::{
    Adapter, BackwardCtx, Dropout, NoHook, SiteCache, SiteHook, SiteState, Tap, layer_depth,
    lora_backward, lora_forward, lowest_layer, mask_values,
};
use crate::ops::{add_assign, causal_softmax_rows, softmax_backward_rows};
use crate::par;
use crate::tokenize::Batch;

/// The hyper-parameters a LLaMA GGUF states under `llama.*`.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn_size: usize,
    pub rms_eps: f32,
    pub rope_theta: f64,
}

impl LlamaConfig {
    /// Reads the `llama.*` keys; a missing or mistyped key is named.
    pub fn from_gguf(g: &Gguf) -> Result<Self, ModelError> {
        let arch = g.get_str("general.architecture")?;
        if arch != "llama" {
            return Err(ModelError::Config {
                path: g.path().to_path_buf(),
                problem: format!(
                    "general.architecture is {arch:?}; only \"llama\" is read as a decoder"
                ),
            });
        }
        let int = |key: &str| -> Result<usize, ModelError> {
            let v = g.get_u64(key)?;
            usize::try_from(v)
                .ok()
                .filter(|&v| v > 0)
                .ok_or_else(|| ModelError::Config {
                    path: g.path().to_path_buf(),
                    problem: format!("{key} = {v} is not a usable size"),
                })
        };
        let hidden_size = int("llama.embedding_length")?;
        let heads = int("llama.attention.head_count")?;
        // Optional in GGUF: absent means no grouping (one key/value head per query head).
        let kv_heads = match g.get("llama.attention.head_count_kv") {
            Ok(_) => int("llama.attention.head_count_kv")?,
            Err(_) => heads,
        };
        let bad = |problem: String| ModelError::Config {
            path: g.path().to_path_buf(),
            problem,
        };
        // What this decoder does not compute is refused rather than silently skipped:
        // scaled or frequency-corrected rotary embeddings (Llama 3.x), and heads whose
        // width is not embedding_length / head_count.
        if let Some(key) = g.metadata().keys().find(|k| {
            k.starts_with("llama.rope.scaling.")
                || k.as_str() == "llama.attention.key_length"
                || k.as_str() == "llama.attention.value_length"
        }) && !(key.ends_with("scaling.type") && g.get_str(key).is_ok_and(|t| t == "none"))
            && !(key.ends_with("_length")
                && heads > 0
                && g.get_u64(key)
                    .is_ok_and(|v| v as usize * heads == hidden_size))
        {
            return Err(bad(format!(
                "{key} is set: this decoder computes plain rotary embeddings and heads of embedding_length / head_count values only"
            )));
        }
        if g.tensor("rope_freqs.weight").is_ok() {
            return Err(bad(
                "tensor rope_freqs.weight is present (rotary frequency factors, Llama 3.1+): not computed by this decoder".into(),
            ));
        }
        if hidden_size % heads != 0 || heads % kv_heads != 0 {
            return Err(bad(format!(
                "llama.embedding_length {hidden_size}, head_count {heads} and head_count_kv {kv_heads} do not divide"
            )));
        }
        let head_dim = hidden_size / heads;
        if head_dim % 2 != 0 {
            return Err(bad(format!(
                "heads of {head_dim} values cannot take rotary embeddings"
            )));
        }
        let vocab_size = match g.get_u64("llama.vocab_size") {
            Ok(v) => usize::try_from(v).map_err(|_| bad(format!("llama.vocab_size {v}")))?,
            // Older files state it only through the vocabulary.
            Err(_) => g.get_strings("tokenizer.ggml.tokens")?.len(),
        };
        Ok(Self {
            vocab_size,
            hidden_size,
            layers: int("llama.block_count")?,
            heads,
            kv_heads,
            head_dim,
            ffn_size: int("llama.feed_forward_length")?,
            rms_eps: g.get_f64("llama.attention.layer_norm_rms_epsilon")? as f32,
            // Absent means the LLaMA default; present but unreadable is an error.
            rope_theta: match g.get("llama.rope.freq_base") {
                Ok(_) => g.get_f64("llama.rope.freq_base")?,
                Err(_) => 10_000.0,
            },
        })
    }
}

/// One decoder layer's weights, row-major (out × in) as in PyTorch.
#[derive(Debug, Clone)]
struct Layer<F> {
    attn_norm: Array1<F>,
    q: Array2<F>,
    k: Array2<F>,
    v: Array2<F>,
    o: Array2<F>,
    ffn_norm: Array1<F>,
    gate: Array2<F>,
    up: Array2<F>,
    down: Array2<F>,
}

impl<F> Layer<F> {
    fn weight(&self, kind: SiteKind) -> &Array2<F> {
        match kind {
            SiteKind::Query => &self.q,
            SiteKind::Key => &self.k,
            SiteKind::Value => &self.v,
            SiteKind::AttentionOutput => &self.o,
            SiteKind::Gate => &self.gate,
            SiteKind::Intermediate => &self.up,
            SiteKind::Output => &self.down,
        }
    }
}

/// A LLaMA decoder with its weights dequantised to `F` (f32 to run, f64 for the
/// finite-difference tests).
#[derive(Debug, Clone)]
pub struct LlamaModel<F = f32> {
    pub config: LlamaConfig,
    embed: Array2<F>,
    layers: Vec<Layer<F>>,
    norm: Array1<F>,
    /// `output.weight` when the file has one; else the embeddings (tied).
    head: Option<Array2<F>>,
}

fn matrix<F: Real>(
    g: &Gguf,
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<Array2<F>, ModelError> {
    let (shape, values) = g.dequantize(name)?;
    if shape != [rows, cols] {
        return Err(ModelError::TensorShape {
            path: g.path().to_path_buf(),
            tensor: name.to_owned(),
            expected: format!("[{rows}, {cols}]"),
            found: format!("{shape:?}"),
        });
    }
    let values = values.into_iter().map(F::from_f32).collect();
    Array2::from_shape_vec((rows, cols), values).map_err(|e| ModelError::Config {
        path: g.path().to_path_buf(),
        problem: format!("{name}: {e}"),
    })
}

fn vector<F: Real>(g: &Gguf, name: &str, len: usize) -> Result<Array1<F>, ModelError> {
    let (shape, values) = g.dequantize(name)?;
    if shape != [len] {
        return Err(ModelError::TensorShape {
            path: g.path().to_path_buf(),
            tensor: name.to_owned(),
            expected: format!("[{len}]"),
            found: format!("{shape:?}"),
        });
    }
    Ok(values.into_iter().map(F::from_f32).collect())
}

/// Undoes llama.cpp's permutation of a q or k projection's rows: within each head the
/// file holds row 2i + j where the rotate-half form wants row j·(d/2) + i.
fn unpermute<F: Real>(w: &Array2<F>, heads: usize) -> Array2<F> {
    let (rows, cols) = w.dim();
    let head = rows / heads;
    let half = head / 2;
    let mut out = Array2::zeros((rows, cols));
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                out.row_mut(h * head + j * half + i)
                    .assign(&w.row(h * head + 2 * i + j));
            }
        }
    }
    out
}

/// x·Wᵀ with W stored out × in, parallel over row blocks.
fn project<F: Real>(x: &Array2<F>, w: &Array2<F>) -> Array2<F> {
    let mut y = Array2::zeros((x.nrows(), w.nrows()));
    par::gemm(F::one(), &x.view(), &w.t(), F::zero(), &mut y.view_mut());
    y
}

/// x / sqrt(mean(x²) + ε) · w per row, as HF's LlamaRMSNorm; returns 1/rms per row.
fn rms_norm<F: Real>(x: &Array2<F>, w: &Array1<F>, eps: F) -> (Array2<F>, Array1<F>) {
    let d = F::from_f64(x.ncols() as f64);
    let mut out = x.clone();
    let mut rstd = Array1::zeros(x.nrows());
    Zip::from(out.rows_mut())
        .and(&mut rstd)
        .par_for_each(|mut row, r| {
            let mean = row.iter().map(|&v| v * v).sum::<F>() / d;
            let inv = F::one() / (mean + eps).sqrt();
            Zip::from(&mut row)
                .and(w)
                .for_each(|v, &g| *v = g * (*v * inv));
            *r = inv;
        });
    (out, rstd)
}

/// RMSNorm's backward: with g = w ⊙ dy and r = 1/rms, dx = r·g − x·r³·(g·x)/d.
fn rms_backward<F: Real>(
    dy: &Array2<F>,
    x: &Array2<F>,
    w: &Array1<F>,
    rstd: &Array1<F>,
) -> Array2<F> {
    let d = F::from_f64(x.ncols() as f64);
    let mut dx = Array2::zeros(x.raw_dim());
    Zip::from(dx.rows_mut())
        .and(dy.rows())
        .and(x.rows())
        .and(rstd)
        .par_for_each(|mut out, dy, x, &r| {
            let mut dot = F::zero();
            for ((&g, &w), &x) in dy.iter().zip(w).zip(x) {
                dot += g * w * x;
            }
            let c = r * r * r * dot / d;
            Zip::from(&mut out)
                .and(&dy)
                .and(w)
                .and(&x)
                .for_each(|o, &g, &w, &x| *o = r * g * w - x * c);
        });
    dx
}

/// cos and sin of the rotary angles p·θ_i (θ_i = base^(−2i/d)) for positions 0..T, as
/// transformers forms them: θ_i and p·θ_i in f32, then cos and sin.
struct Rope<F> {
    cos: Array2<F>,
    sin: Array2<F>,
}

impl<F: Real> Rope<F> {
    fn new(seq_len: usize, head_dim: usize, theta: f64) -> Self {
        let half = head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| (1.0 / theta.powf((2 * i) as f64 / head_dim as f64)) as f32)
            .collect();
        let angle = |p: usize, i: usize| f64::from(p as f32 * inv[i]);
        Self {
            cos: Array2::from_shape_fn((seq_len, half), |(p, i)| F::from_f64(angle(p, i).cos())),
            sin: Array2::from_shape_fn((seq_len, half), |(p, i)| F::from_f64(angle(p, i).sin())),
        }
    }

    /// Rotates every head of `x` (B·T × heads·d) in place, rotate-half form: (a, b) ↦
    /// (a·cos − b·sin, b·cos + a·sin); `inverse` rotates back, which is also the
    /// backward pass (the rotation is orthogonal).
    fn apply(&self, x: &mut Array2<F>, head_dim: usize, inverse: bool) {
        let t = self.cos.nrows();
        let half = head_dim / 2;
        x.axis_iter_mut(Axis(0))
            .into_par_iter()
            .enumerate()
            .for_each(|(row_index, mut row)| {
                let p = row_index % t;
                let heads = row.len() / head_dim;
                for h in 0..heads {
                    let base = h * head_dim;
                    for i in 0..half {
                        let (c, mut sn) = (self.cos[[p, i]], self.sin[[p, i]]);
                        if inverse {
                            sn = -sn;
                        }
                        let (a, b) = (row[base + i], row[base + i + half]);
                        row[base + i] = a * c - b * sn;
                        row[base + i + half] = b * c + a * sn;
                    }
                }
            });
    }
}

fn sigmoid<F: Real>(a: F) -> F {
    F::one() / (F::one() + (-a).exp())
}

/// What one layer's backward needs from its forward.
#[derive(Debug, Clone)]
struct LayerCache<F> {
    input: Array2<F>,
    rstd1: Array1<F>,
    xn: Array2<F>,
    /// q and k after the rotary embedding, v as projected.
    q: Array2<F>,
    k: Array2<F>,
    v: Array2<F>,
    probs: Array3<F>,
    context: Array2<F>,
    h1: Array2<F>,
    rstd2: Array1<F>,
    xn2: Array2<F>,
    gate: Array2<F>,
    up: Array2<F>,
    act: Array2<F>,
    sites: BTreeMap<SiteKind, SiteCache<F>>,
}

/// What [`LlamaModel::run`] returns: the final norm's input (B·T × hidden), each
/// sequence's last real row, and with `record` what backward needs.
struct Pass<F> {
    hidden: Array2<F>,
    last: Vec<usize>,
    layers: Vec<LayerCache<F>>,
}

/// A training forward pass of the decoder: the label words' logits and what backward
/// needs.
#[derive(Debug, Clone)]
pub struct DecoderForward<F> {
    /// B × labels: the LM head's logits of the label words at each last real token.
    pub logits: Array2<F>,
    labels: Vec<u32>,
    /// Row of each sequence's last real token in the B·T rows.
    last: Vec<usize>,
    /// The final norm's input and 1/rms on those rows.
    last_hidden: Array2<F>,
    last_rstd: Array1<F>,
    layers: Vec<LayerCache<F>>,
}

impl<F: Real> LlamaModel<F> {
    /// Loads and dequantises a LLaMA GGUF; missing keys or tensors, and tensors of
    /// another shape than the config makes, are named.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let g = Gguf::open(path)?;
        let c = LlamaConfig::from_gguf(&g)?;
        let (d, kv) = (c.hidden_size, c.kv_heads * c.head_dim);
        let mut layers = Vec::with_capacity(c.layers);
        for l in 0..c.layers {
            let n = |t: &str| format!("blk.{l}.{t}.weight");
            layers.push(Layer {
                attn_norm: vector(&g, &n("attn_norm"), d)?,
                q: unpermute(&matrix(&g, &n("attn_q"), d, d)?, c.heads),
                k: unpermute(&matrix(&g, &n("attn_k"), kv, d)?, c.kv_heads),
                v: matrix(&g, &n("attn_v"), kv, d)?,
                o: matrix(&g, &n("attn_output"), d, d)?,
                ffn_norm: vector(&g, &n("ffn_norm"), d)?,
                gate: matrix(&g, &n("ffn_gate"), c.ffn_size, d)?,
                up: matrix(&g, &n("ffn_up"), c.ffn_size, d)?,
                down: matrix(&g, &n("ffn_down"), d, c.ffn_size)?,
            });
        }
        let head = match g.tensor("output.weight") {
            Ok(_) => Some(matrix(&g, "output.weight", c.vocab_size, d)?),
            Err(_) => None,
        };
        Ok(Self {
            embed: matrix(&g, "token_embd.weight", c.vocab_size, d)?,
            norm: vector(&g, "output_norm.weight", d)?,
            layers,
            head,
            config: c,
        })
    }

    /// A model of `config`'s shape with seeded random weights (uniform ±0.3/√fan-in,
    /// norms 1 ± 0.1, tied head): for tests and benchmarks that need no real model.
    pub fn random(config: LlamaConfig, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut m = |rows: usize, cols: usize| {
            let b = 0.3 / (cols as f64).sqrt();
            Array2::from_shape_simple_fn((rows, cols), || F::from_f64(rng.random_range(-b..b)))
        };
        let c = &config;
        let (d, kv) = (c.hidden_size, c.kv_heads * c.head_dim);
        let embed = m(c.vocab_size, d).mapv(|v| v * F::from_f64(10.0));
        // The norms draw from their own stream, so the matrices' draws do not depend
        // on them.
        let mut norm_rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
        let mut norm = || -> Array1<F> {
            Array1::from_shape_simple_fn(d, || F::from_f64(1.0 + norm_rng.random_range(-0.1..0.1)))
        };
        let layers = (0..c.layers)
            .map(|_| Layer {
                attn_norm: norm(),
                q: m(d, d),
                k: m(kv, d),
                v: m(kv, d),
                o: m(d, d),
                ffn_norm: norm(),
                gate: m(c.ffn_size, d),
                up: m(c.ffn_size, d),
                down: m(d, c.ffn_size),
            })
            .collect();
        Self {
            norm: norm(),
            embed,
            layers,
            head: None,
            config,
        }
    }

    /// The LM head's weights (vocab × hidden).
    fn head_weight(&self) -> &Array2<F> {
        self.head.as_ref().unwrap_or(&self.embed)
    }

    /// The (d_in, d_out) of each site that this model has.
    pub fn site_shapes(&self, sites: &[SiteId]) -> Vec<SiteShape> {
        sites
            .iter()
            .filter_map(|&site| {
                let w = self.layers.get(site.layer)?.weight(site.kind);
                Some(SiteShape {
                    site,
                    d_in: w.ncols(),
                    d_out: w.nrows(),
                })
            })
            .collect()
    }

    /// Checks that every adapter site exists in this model with fitting shapes.
    pub fn check_adapter(&self, params: &LoraParams<F>) -> Result<(), ModelError> {
        for (site, w) in &params.sites {
            let Some(layer) = self.layers.get(site.layer) else {
                return Err(ModelError::Input(format!(
                    "adapter site {} is outside this {}-layer model",
                    site.llama_module_path(),
                    self.layers.len()
                )));
            };
            let base = layer.weight(site.kind);
            if w.a.ncols() != base.ncols()
                || w.b.nrows() != base.nrows()
                || w.b.ncols() != w.a.nrows()
            {
                return Err(ModelError::Input(format!(
                    "adapter site {}: A is {:?} and B is {:?}, but the base weight is {:?} (expected A [r, {}], B [{}, r])",
                    site.llama_module_path(),
                    w.a.shape(),
                    w.b.shape(),
                    base.shape(),
                    base.ncols(),
                    base.nrows()
                )));
            }
        }
        Ok(())
    }

    /// Token ids within the vocabulary, right padding; returns each sequence's last
    /// real row.
    fn check_batch(&self, batch: &Batch) -> Result<Vec<usize>, ModelError> {
        let vocab = self.config.vocab_size;
        let n = batch.batch.saturating_mul(batch.seq_len);
        if n == 0 || batch.input_ids.len() != n || batch.mask.len() != n {
            return Err(ModelError::Input(format!(
                "a batch of {} × {} needs that many ids and mask entries (got {} and {})",
                batch.batch,
                batch.seq_len,
                batch.input_ids.len(),
                batch.mask.len()
            )));
        }
        if let Some((i, id)) = batch
            .input_ids
            .iter()
            .enumerate()
            .find(|&(_, &id)| id as usize >= vocab)
        {
            return Err(ModelError::Input(format!(
                "token id {id} (sequence {}, position {}) is outside the vocabulary of {vocab} entries: tokenizer and model do not match",
                i / batch.seq_len.max(1),
                i % batch.seq_len.max(1)
            )));
        }
        let t = batch.seq_len;
        (0..batch.batch)
            .map(|b| {
                let m = &batch.mask[b * t..(b + 1) * t];
                let len = m.iter().take_while(|&&x| x).count();
                if len == 0 || m[len..].iter().any(|&x| x) {
                    return Err(ModelError::Input(format!(
                        "sequence {b} is not right-padded (or has no tokens): the decoder reads each sequence's last real token"
                    )));
                }
                Ok(b * t + len - 1)
            })
            .collect()
    }

    fn check_labels(&self, labels: &[u32]) -> Result<(), ModelError> {
        if labels.is_empty() {
            return Err(ModelError::Input(
                "the verbalizer has no label words".into(),
            ));
        }
        if let Some(&id) = labels
            .iter()
            .find(|&&id| id as usize >= self.config.vocab_size)
        {
            return Err(ModelError::Input(format!(
                "label word id {id} is outside the vocabulary of {} entries",
                self.config.vocab_size
            )));
        }
        Ok(())
    }

    /// Multi-head causal attention with grouped-query heads, one sequence per task.
    /// Returns the context (N × hidden) and, with `record`, the probabilities
    /// (B·heads × T × T).
    fn attention(
        &self,
        q: &Array2<F>,
        k: &Array2<F>,
        v: &Array2<F>,
        batch: &Batch,
        record: bool,
    ) -> (Array2<F>, Array3<F>) {
        let c = &self.config;
        let (t, dh, heads) = (batch.seq_len, c.head_dim, c.heads);
        let group = c.heads / c.kv_heads;
        let scale = F::one() / F::from_f64((dh as f64).sqrt());
        let mut ctx = Array2::zeros((batch.batch * t, c.hidden_size));
        let mut probs = Array3::zeros(if record {
            (batch.batch * heads, t, t)
        } else {
            (batch.batch, 0, 0)
        });
        let per_seq = if record { heads } else { 1 };
        ctx.axis_chunks_iter_mut(Axis(0), t)
            .into_par_iter()
            .zip(probs.axis_chunks_iter_mut(Axis(0), per_seq).into_par_iter())
            .enumerate()
            .for_each(|(bi, (mut ctx_b, mut probs_b))| {
                let rows = bi * t..(bi + 1) * t;
                let key_mask = &batch.mask[rows.clone()];
                let mut sc = Array2::zeros((t, t));
                for h in 0..heads {
                    let kvh = h / group;
                    let qh = q.slice(s![rows.clone(), h * dh..(h + 1) * dh]);
                    let kh = k.slice(s![rows.clone(), kvh * dh..(kvh + 1) * dh]);
                    let vh = v.slice(s![rows.clone(), kvh * dh..(kvh + 1) * dh]);
                    general_mat_mul(scale, &qh, &kh.t(), F::zero(), &mut sc);
                    causal_softmax_rows(&mut sc, key_mask);
                    let mut ch = ctx_b.slice_mut(s![.., h * dh..(h + 1) * dh]);
                    general_mat_mul(F::one(), &sc, &vh, F::zero(), &mut ch);
                    if record {
                        probs_b.index_axis_mut(Axis(0), h).assign(&sc);
                    }
                }
            });
        (ctx, probs)
    }

    /// Gradients of the rotated q, the rotated k and v from the context's gradient;
    /// a key/value head sums over the query heads of its group.
    fn attention_backward(
        &self,
        dctx: &Array2<F>,
        cache: &LayerCache<F>,
        batch: &Batch,
    ) -> (Array2<F>, Array2<F>, Array2<F>) {
        let c = &self.config;
        let (t, dh, heads) = (batch.seq_len, c.head_dim, c.heads);
        let group = c.heads / c.kv_heads;
        let kv = c.kv_heads * dh;
        let scale = F::one() / F::from_f64((dh as f64).sqrt());
        let n = batch.batch * t;
        let mut dq = Array2::zeros((n, c.hidden_size));
        let mut dk = Array2::zeros((n, kv));
        let mut dv = Array2::zeros((n, kv));
        dq.axis_chunks_iter_mut(Axis(0), t)
            .into_par_iter()
            .zip(dk.axis_chunks_iter_mut(Axis(0), t).into_par_iter())
            .zip(dv.axis_chunks_iter_mut(Axis(0), t).into_par_iter())
            .enumerate()
            .for_each(|(bi, ((mut dq_b, mut dk_b), mut dv_b))| {
                let rows = bi * t..(bi + 1) * t;
                let mut dp = Array2::zeros((t, t));
                for h in 0..heads {
                    let kvh = h / group;
                    let (qc, kc) = (h * dh..(h + 1) * dh, kvh * dh..(kvh + 1) * dh);
                    let p = cache.probs.index_axis(Axis(0), bi * heads + h);
                    let dc = dctx.slice(s![rows.clone(), qc.clone()]);
                    let qh = cache.q.slice(s![rows.clone(), qc.clone()]);
                    let kh = cache.k.slice(s![rows.clone(), kc.clone()]);
                    let vh = cache.v.slice(s![rows.clone(), kc.clone()]);
                    general_mat_mul(F::one(), &dc, &vh.t(), F::zero(), &mut dp);
                    general_mat_mul(
                        F::one(),
                        &p.t(),
                        &dc,
                        F::one(),
                        &mut dv_b.slice_mut(s![.., kc.clone()]),
                    );
                    softmax_backward_rows(&mut dp, &p, scale);
                    general_mat_mul(
                        F::one(),
                        &dp,
                        &kh,
                        F::zero(),
                        &mut dq_b.slice_mut(s![.., qc]),
                    );
                    general_mat_mul(
                        F::one(),
                        &dp.t(),
                        &qh,
                        F::one(),
                        &mut dk_b.slice_mut(s![.., kc]),
                    );
                }
            });
        (dq, dk, dv)
    }

    /// Runs the decoder to the final norm's input (B·T × hidden); returns it with each
    /// sequence's last real row and, with `record`, what backward needs.
    fn run(
        &self,
        batch: &Batch,
        adapter: Option<Adapter<'_, F>>,
        mut dropout: Option<Dropout<'_>>,
        record: bool,
        tap: &mut Tap<'_, F>,
    ) -> Result<Pass<F>, ModelError> {
        par::init();
        let last = self.check_batch(batch)?;
        if let Some(a) = adapter {
            self.check_adapter(a.params)?;
        }
        let c = &self.config;
        let eps = F::from_f32(c.rms_eps);
        let n = batch.batch * batch.seq_len;
        let mut h = Array2::<F>::zeros((n, c.hidden_size));
        for (row, &id) in batch.input_ids.iter().enumerate() {
            h.row_mut(row).assign(&self.embed.row(id as usize));
        }
        if let Some(noise) = tap.embedding_noise {
            if noise.dim() != h.dim() {
                return Err(ModelError::Input(format!(
                    "embedding noise is {:?} but the embeddings are {:?}",
                    noise.dim(),
                    h.dim()
                )));
            }
            add_assign(&mut h, noise);
        }
        let rope = Rope::<F>::new(batch.seq_len, c.head_dim, c.rope_theta);
        let mut caches = Vec::with_capacity(if record { self.layers.len() } else { 0 });
        for (l, layer) in self.layers.iter().enumerate() {
            let mut sites = BTreeMap::new();
            // A base projection plus, where the adapter has this site, its LoRA term.
            let mut fwd = |x: &Array2<F>, kind: SiteKind, dropout: &mut Option<Dropout<'_>>| {
                let mut y = project(x, layer.weight(kind));
                if let Some((w, scale)) = adapter.and_then(|a| {
                    a.params
                        .sites
                        .get(&SiteId::new(l, kind))
                        .map(|w| (w, a.scale))
                }) {
                    let cache = lora_forward(x, w, scale, dropout, &mut y.view_mut());
                    if record {
                        sites.insert(kind, cache);
                    }
                }
                y
            };
            let (xn, rstd1) = rms_norm(&h, &layer.attn_norm, eps);
            let mut q = fwd(&xn, SiteKind::Query, &mut dropout);
            let mut k = fwd(&xn, SiteKind::Key, &mut dropout);
            let v = fwd(&xn, SiteKind::Value, &mut dropout);
            rope.apply(&mut q, c.head_dim, false);
            rope.apply(&mut k, c.head_dim, false);
            let (context, probs) = self.attention(&q, &k, &v, batch, record);
            let mut h1 = fwd(&context, SiteKind::AttentionOutput, &mut dropout);
            add_assign(&mut h1, &h);
            let (xn2, rstd2) = rms_norm(&h1, &layer.ffn_norm, eps);
            let gate = fwd(&xn2, SiteKind::Gate, &mut dropout);
            let up = fwd(&xn2, SiteKind::Intermediate, &mut dropout);
            let mut act = gate.clone();
            Zip::from(&mut act)
                .and(&up)
                .par_for_each(|a, &u| *a = *a * sigmoid(*a) * u);
            let mut h2 = fwd(&act, SiteKind::Output, &mut dropout);
            add_assign(&mut h2, &h1);
            if let Some(out) = tap.layer_outputs.as_mut() {
                out.push(h2.clone());
            }
            if record {
                caches.push(LayerCache {
                    input: h,
                    rstd1,
                    xn,
                    q,
                    k,
                    v,
                    probs,
                    context,
                    h1,
                    rstd2,
                    xn2,
                    gate,
                    up,
                    act,
                    sites,
                });
            }
            h = h2;
        }
        Ok(Pass {
            hidden: h,
            last,
            layers: caches,
        })
    }

    /// The final norm on each sequence's last real row: (its input, 1/rms, its output).
    fn last_rows(&self, hidden: &Array2<F>, last: &[usize]) -> (Array2<F>, Array1<F>, Array2<F>) {
        let mut x = Array2::zeros((last.len(), hidden.ncols()));
        for (mut row, &r) in x.axis_iter_mut(Axis(0)).zip(last) {
            row.assign(&hidden.row(r));
        }
        let (xn, rstd) = rms_norm(&x, &self.norm, F::from_f32(self.config.rms_eps));
        (x, rstd, xn)
    }

    /// The LM head's rows of the label words (labels × hidden).
    fn label_rows(&self, labels: &[u32]) -> Array2<F> {
        let head = self.head_weight();
        let mut words = Array2::zeros((labels.len(), head.ncols()));
        for (mut row, &id) in words.axis_iter_mut(Axis(0)).zip(labels) {
            row.assign(&head.row(id as usize));
        }
        words
    }

    /// The LM head's logits of the label words (B × labels) from the normed last rows.
    fn verbalize(&self, xn: &Array2<F>, labels: &[u32]) -> Array2<F> {
        xn.dot(&self.label_rows(labels).t())
    }

    /// The verbalizer's logits for evaluation: the LM head's logits of `labels` (token
    /// ids of the label words) at each sequence's last real token, B × labels.
    pub fn label_logits(
        &self,
        batch: &Batch,
        adapter: Option<Adapter<'_, F>>,
        labels: &[u32],
    ) -> Result<Array2<F>, ModelError> {
        self.evaluate(batch, adapter, labels, &mut Tap::default())
    }

    /// [`LlamaModel::label_logits`] with `noise` (B·T × hidden) added to the input
    /// embeddings, where [`LlamaModel::layer_outputs`] adds it.
    pub fn label_logits_with_noise(
        &self,
        batch: &Batch,
        adapter: Option<Adapter<'_, F>>,
        labels: &[u32],
        noise: &Array2<F>,
    ) -> Result<Array2<F>, ModelError> {
        let mut tap = Tap {
            embedding_noise: Some(noise),
            layer_outputs: None,
        };
        self.evaluate(batch, adapter, labels, &mut tap)
    }

    /// The label words' logits of a pass that keeps nothing for backward.
    fn evaluate(
        &self,
        batch: &Batch,
        adapter: Option<Adapter<'_, F>>,
        labels: &[u32],
        tap: &mut Tap<'_, F>,
    ) -> Result<Array2<F>, ModelError> {
        self.check_labels(labels)?;
        let pass = self.run(batch, adapter, None, false, tap)?;
        let (_, _, xn) = self.last_rows(&pass.hidden, &pass.last);
        Ok(self.verbalize(&xn, labels))
    }

    /// Training forward pass: the label words' logits plus the cache for
    /// [`LlamaModel::backward`].
    pub fn forward(
        &self,
        batch: &Batch,
        adapter: Adapter<'_, F>,
        dropout: Option<Dropout<'_>>,
        labels: &[u32],
    ) -> Result<DecoderForward<F>, ModelError> {
        self.check_labels(labels)?;
        let Pass {
            hidden,
            last,
            layers,
        } = self.run(batch, Some(adapter), dropout, true, &mut Tap::default())?;
        let (last_hidden, last_rstd, xn) = self.last_rows(&hidden, &last);
        Ok(DecoderForward {
            logits: self.verbalize(&xn, labels),
            labels: labels.to_vec(),
            last,
            last_hidden,
            last_rstd,
            layers,
        })
    }

    /// Every layer's output (B·T × hidden each, layer 0 first) with `noise` added to the
    /// input embeddings: what the perturbation-sensitivity layer choice compares.
    pub fn layer_outputs(
        &self,
        batch: &Batch,
        adapter: Option<Adapter<'_, F>>,
        noise: Option<&Array2<F>>,
    ) -> Result<Vec<Array2<F>>, ModelError> {
        let mut outputs = Vec::with_capacity(self.layers.len());
        let mut tap = Tap {
            embedding_noise: noise,
            layer_outputs: Some(&mut outputs),
        };
        self.run(batch, adapter, None, false, &mut tap)?;
        Ok(outputs)
    }

    /// Gradients of the loss whose ∂/∂logits is `dlogits` with respect to every LoRA
    /// factor; the hook sees each site's (x, δ) as they are formed. `head` of the result
    /// is zero (nothing classification-specific trains).
    pub fn backward(
        &self,
        batch: &Batch,
        adapter: Adapter<'_, F>,
        fwd: &DecoderForward<F>,
        dlogits: &Array2<F>,
        hook: &mut dyn SiteHook<F>,
    ) -> Result<LoraParams<F>, ModelError> {
        Ok(self
            .backward_through(batch, adapter, fwd, dlogits, hook, false)?
            .0)
    }

    /// The gradient with respect to the token embeddings the first layer reads
    /// (B·T × hidden: where [`LlamaModel::layer_outputs`] adds its noise).
    pub fn embedding_gradient(
        &self,
        batch: &Batch,
        adapter: Adapter<'_, F>,
        fwd: &DecoderForward<F>,
        dlogits: &Array2<F>,
    ) -> Result<Array2<F>, ModelError> {
        let (_, dx) = self.backward_through(batch, adapter, fwd, dlogits, &mut NoHook, true)?;
        dx.ok_or_else(|| ModelError::Input("the backward pass did not reach the embeddings".into()))
    }

    fn backward_through(
        &self,
        batch: &Batch,
        adapter: Adapter<'_, F>,
        fwd: &DecoderForward<F>,
        dlogits: &Array2<F>,
        hook: &mut dyn SiteHook<F>,
        to_input: bool,
    ) -> Result<(LoraParams<F>, Option<Array2<F>>), ModelError> {
        let params = adapter.params;
        let last = self.check_batch(batch)?;
        if dlogits.dim() != fwd.logits.dim()
            || fwd.layers.len() != self.layers.len()
            || last != fwd.last
        {
            return Err(ModelError::Input(format!(
                "dlogits is {:?} for a forward pass of logits {:?} over another batch or model: backward needs the forward it follows",
                dlogits.dim(),
                fwd.logits.dim()
            )));
        }
        if let Some(site) = params.sites.keys().find(|s| {
            fwd.layers
                .get(s.layer)
                .is_none_or(|c| !c.sites.contains_key(&s.kind))
        }) {
            return Err(ModelError::Input(format!(
                "adapter site {} was not part of the forward pass: backward needs the adapter forward ran with",
                site.llama_module_path()
            )));
        }
        let mut grads = params.zeros_like();
        let Some(lowest) = lowest_layer(params, to_input) else {
            return Ok((grads, None));
        };
        let c = &self.config;
        // Verbalizer: logits = norm(h_last)·Eᵀ over the label rows of the head.
        let dxn = dlogits.dot(&self.label_rows(&fwd.labels));
        let dlast = rms_backward(&dxn, &fwd.last_hidden, &self.norm, &fwd.last_rstd);
        let n = batch.batch * batch.seq_len;
        let mut dh = Array2::<F>::zeros((n, c.hidden_size));
        for (row, &r) in dlast.axis_iter(Axis(0)).zip(&fwd.last) {
            dh.row_mut(r).assign(&row);
        }
        let mask: Array1<F> = mask_values(batch);
        let mut ctx = BackwardCtx {
            hook,
            mask: &mask,
            batch: batch.batch,
            seq_len: batch.seq_len,
        };
        let rope = Rope::<F>::new(batch.seq_len, c.head_dim, c.rope_theta);
        for l in (lowest..self.layers.len()).rev() {
            let layer = &self.layers[l];
            let cache = &fwd.layers[l];
            let need = layer_depth(params, l, lowest, to_input);
            // One site: the base dx (when needed) plus the adapter's part.
            let mut site = |kind: SiteKind,
                            dy: &ArrayView2<'_, F>,
                            x: &Array2<F>,
                            need_dx: bool,
                            ctx: &mut BackwardCtx<'_, '_, F>| {
                let mut dx = need_dx.then(|| {
                    let w = layer.weight(kind);
                    let mut dx = Array2::zeros((dy.nrows(), w.ncols()));
                    par::gemm(F::one(), dy, &w.view(), F::zero(), &mut dx.view_mut());
                    dx
                });
                let id = SiteId::new(l, kind);
                if let (Some(w), Some(sc), Some(g)) = (
                    params.sites.get(&id),
                    cache.sites.get(&kind),
                    grads.sites.get_mut(&id),
                ) {
                    let state = SiteState {
                        weights: w,
                        scale: adapter.scale,
                        cache: sc,
                        grad: g,
                    };
                    lora_backward(dy, x, id, state, ctx, dx.as_mut());
                }
                dx
            };
            // down(act) + residual.
            let Some(dact) = site(
                SiteKind::Output,
                &dh.view(),
                &cache.act,
                need >= 1,
                &mut ctx,
            ) else {
                break;
            };
            let mut dgate = Array2::zeros(dact.raw_dim());
            let mut dup = Array2::zeros(dact.raw_dim());
            Zip::from(&mut dgate)
                .and(&mut dup)
                .and(&dact)
                .and(&cache.gate)
                .and(&cache.up)
                .par_for_each(|dg, du, &d, &g, &u| {
                    let sg = sigmoid(g);
                    *du = d * g * sg;
                    *dg = d * u * sg * (F::one() + g * (F::one() - sg));
                });
            let need_mlp = need >= 2;
            let dxn2_g = site(
                SiteKind::Gate,
                &dgate.view(),
                &cache.xn2,
                need_mlp,
                &mut ctx,
            );
            let dxn2_u = site(
                SiteKind::Intermediate,
                &dup.view(),
                &cache.xn2,
                need_mlp,
                &mut ctx,
            );
            let (Some(mut dxn2), Some(du)) = (dxn2_g, dxn2_u) else {
                break;
            };
            add_assign(&mut dxn2, &du);
            let mut dh1 = rms_backward(&dxn2, &cache.h1, &layer.ffn_norm, &cache.rstd2);
            add_assign(&mut dh1, &dh);
            let Some(dcontext) = site(
                SiteKind::AttentionOutput,
                &dh1.view(),
                &cache.context,
                need >= 3,
                &mut ctx,
            ) else {
                break;
            };
            let (mut dq, mut dk, dv) = self.attention_backward(&dcontext, cache, batch);
            // The LoRA sites sit before the rotary embedding.
            rope.apply(&mut dq, c.head_dim, true);
            rope.apply(&mut dk, c.head_dim, true);
            let need_in = need >= 4;
            let dq_x = site(SiteKind::Query, &dq.view(), &cache.xn, need_in, &mut ctx);
            let dk_x = site(SiteKind::Key, &dk.view(), &cache.xn, need_in, &mut ctx);
            let dv_x = site(SiteKind::Value, &dv.view(), &cache.xn, need_in, &mut ctx);
            let (Some(mut dxn), Some(dkx), Some(dvx)) = (dq_x, dk_x, dv_x) else {
                break;
            };
            add_assign(&mut dxn, &dkx);
            add_assign(&mut dxn, &dvx);
            let mut d = rms_backward(&dxn, &cache.input, &layer.attn_norm, &cache.rstd1);
            add_assign(&mut d, &dh1);
            dh = d;
        }
        Ok((grads, to_input.then_some(dh)))
    }

    /// Next-token logits (T × vocab) of one sequence, causal, without an adapter.
    pub fn logits(&self, ids: &[u32]) -> Result<Array2<F>, ModelError> {
        if ids.is_empty() {
            return Err(ModelError::Input("an empty sequence has no logits".into()));
        }
        let t = ids.len();
        let batch = Batch::from_parts(1, t, ids.to_vec(), vec![0; t], vec![true; t])?;
        let hidden = self
            .run(&batch, None, None, false, &mut Tap::default())?
            .hidden;
        let (x, _) = rms_norm(&hidden, &self.norm, F::from_f32(self.config.rms_eps));
        Ok(x.dot(&self.head_weight().t()))
    }
}
