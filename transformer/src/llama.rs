//! A LLaMA-architecture decoder loaded from a GGUF file: the forward pass to next-token
//! logits, in f32, as transformers' `LlamaForCausalLM` computes it (the reference of the
//! tests: logits within 1e-4 on SmolLM2-135M).
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
//! Not yet here: LoRA sites, the backward pass and the per-site hook (the encoder has
//! them), padded batches; this is the forward of one sequence.

use std::path::Path;

use fibecfed_gguf::Gguf;
use ndarray::{Array1, Array2, ArrayView2, Axis, s};

use crate::ModelError;

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
        let kv_heads = int("llama.attention.head_count_kv")?;
        let bad = |problem: String| ModelError::Config {
            path: g.path().to_path_buf(),
            problem,
        };
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
            rope_theta: g.get_f64("llama.rope.freq_base").unwrap_or(10_000.0),
        })
    }
}

/// One decoder layer's weights, row-major (out × in) as in PyTorch.
#[derive(Debug)]
struct Layer {
    attn_norm: Array1<f32>,
    q: Array2<f32>,
    k: Array2<f32>,
    v: Array2<f32>,
    o: Array2<f32>,
    ffn_norm: Array1<f32>,
    gate: Array2<f32>,
    up: Array2<f32>,
    down: Array2<f32>,
}

/// A LLaMA decoder with its weights dequantised to f32.
#[derive(Debug)]
pub struct LlamaModel {
    pub config: LlamaConfig,
    embed: Array2<f32>,
    layers: Vec<Layer>,
    norm: Array1<f32>,
    /// `output.weight` when the file has one; else the embeddings (tied).
    head: Option<Array2<f32>>,
}

fn matrix(g: &Gguf, name: &str, rows: usize, cols: usize) -> Result<Array2<f32>, ModelError> {
    let (shape, values) = g.dequantize(name)?;
    if shape != [rows, cols] {
        return Err(ModelError::TensorShape {
            path: g.path().to_path_buf(),
            tensor: name.to_owned(),
            expected: format!("[{rows}, {cols}]"),
            found: format!("{shape:?}"),
        });
    }
    Array2::from_shape_vec((rows, cols), values).map_err(|e| ModelError::Config {
        path: g.path().to_path_buf(),
        problem: format!("{name}: {e}"),
    })
}

fn vector(g: &Gguf, name: &str, len: usize) -> Result<Array1<f32>, ModelError> {
    let (shape, values) = g.dequantize(name)?;
    if shape != [len] {
        return Err(ModelError::TensorShape {
            path: g.path().to_path_buf(),
            tensor: name.to_owned(),
            expected: format!("[{len}]"),
            found: format!("{shape:?}"),
        });
    }
    Ok(Array1::from_vec(values))
}

/// Undoes llama.cpp's permutation of a q or k projection's rows: within each head the
/// file holds row 2i + j where the rotate-half form wants row j·(d/2) + i.
fn unpermute(w: &Array2<f32>, heads: usize) -> Array2<f32> {
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

/// x / sqrt(mean(x²) + ε) · w per row, in f32 as HF's LlamaRMSNorm.
fn rms_norm(x: &Array2<f32>, w: &Array1<f32>, eps: f32) -> Array2<f32> {
    let mut out = x.clone();
    for mut row in out.rows_mut() {
        let mean = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
        let inv = 1.0 / (mean + eps).sqrt();
        for (v, g) in row.iter_mut().zip(w) {
            *v = g * (*v * inv);
        }
    }
    out
}

/// Rotary embeddings on the heads of `x` (T × heads·d), rotate-half form: for position
/// p and i < d/2, with θ_i = base^(−2i/d): (x_i, x_{i+d/2}) ↦ (x_i cos − x_{i+d/2} sin,
/// x_{i+d/2} cos + x_i sin), angles p·θ_i.
fn rope(x: &mut Array2<f32>, heads: usize, head_dim: usize, theta: f64) {
    let half = head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| (1.0 / theta.powf((2 * i) as f64 / head_dim as f64)) as f32)
        .collect();
    for (p, mut row) in x.rows_mut().into_iter().enumerate() {
        for h in 0..heads {
            let base = h * head_dim;
            for (i, &f) in inv.iter().enumerate() {
                let angle = p as f32 * f;
                let (sin, cos) = angle.sin_cos();
                let (a, b) = (row[base + i], row[base + i + half]);
                row[base + i] = a * cos - b * sin;
                row[base + i + half] = b * cos + a * sin;
            }
        }
    }
}

/// Head `h`'s columns of a (T × heads·d) matrix.
fn cols(m: &Array2<f32>, h: usize, d: usize) -> ArrayView2<'_, f32> {
    m.slice(s![.., h * d..(h + 1) * d])
}

impl LlamaModel {
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

    /// Next-token logits (T × vocab) of one sequence, causal.
    pub fn logits(&self, ids: &[u32]) -> Result<Array2<f32>, ModelError> {
        let c = &self.config;
        if ids.is_empty() {
            return Err(ModelError::Input("an empty sequence has no logits".into()));
        }
        let t = ids.len();
        let mut h = Array2::<f32>::zeros((t, c.hidden_size));
        for (row, &id) in ids.iter().enumerate() {
            let id = id as usize;
            if id >= c.vocab_size {
                return Err(ModelError::Input(format!(
                    "token id {id} at position {row} is outside the vocabulary of {}",
                    c.vocab_size
                )));
            }
            h.row_mut(row).assign(&self.embed.row(id));
        }
        let group = c.heads / c.kv_heads;
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        for layer in &self.layers {
            let x = rms_norm(&h, &layer.attn_norm, c.rms_eps);
            let mut q = x.dot(&layer.q.t());
            let mut k = x.dot(&layer.k.t());
            let v = x.dot(&layer.v.t());
            rope(&mut q, c.heads, c.head_dim, c.rope_theta);
            rope(&mut k, c.kv_heads, c.head_dim, c.rope_theta);
            let mut attn = Array2::<f32>::zeros((t, c.hidden_size));
            for head in 0..c.heads {
                let kvh = head / group;
                let mut scores = cols(&q, head, c.head_dim).dot(&cols(&k, kvh, c.head_dim).t());
                for (i, mut row) in scores.axis_iter_mut(Axis(0)).enumerate() {
                    // Causal: position i sees 0..=i.
                    let max = row
                        .iter()
                        .take(i + 1)
                        .fold(f32::NEG_INFINITY, |m, &v| m.max(v * scale));
                    let mut sum = 0.0f32;
                    for (j, v) in row.iter_mut().enumerate() {
                        *v = if j <= i {
                            (*v * scale - max).exp()
                        } else {
                            0.0
                        };
                        sum += *v;
                    }
                    row.mapv_inplace(|v| v / sum);
                }
                let out = scores.dot(&cols(&v, kvh, c.head_dim));
                attn.slice_mut(s![.., head * c.head_dim..(head + 1) * c.head_dim])
                    .assign(&out);
            }
            h += &attn.dot(&layer.o.t());
            let x = rms_norm(&h, &layer.ffn_norm, c.rms_eps);
            let mut g = x.dot(&layer.gate.t());
            let u = x.dot(&layer.up.t());
            g.zip_mut_with(&u, |a, &b| *a = *a / (1.0 + (-*a).exp()) * b);
            h += &g.dot(&layer.down.t());
        }
        let x = rms_norm(&h, &self.norm, c.rms_eps);
        Ok(x.dot(&self.head.as_ref().unwrap_or(&self.embed).t()))
    }
}
