//! Forward and hand-written backward pass of the encoder with LoRA sites and a
//! mean-pool classification head. Only LoRA factors and the head receive gradients;
//! the base model is frozen, so its weight gradients are never formed.

use std::collections::BTreeMap;

use fibecfed_core::Real;
use fibecfed_lora::{Head, LoraParams, LoraWeights, SiteId, SiteKind};
use ndarray::linalg::general_mat_mul;
use ndarray::parallel::prelude::*;
use ndarray::{Array1, Array2, Array3, ArrayView1, ArrayView2, ArrayViewMut2, Axis, s};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::ModelError;
use crate::ops::{
    NormCache, activate, add_assign, layer_norm, layer_norm_backward, masked_softmax_rows,
    mul_assign, softmax_backward_rows,
};
use crate::par;
use crate::tokenize::Batch;
use crate::weights::{BertModel, Linear};

/// Trainable state applied on top of the frozen model.
#[derive(Debug, Clone, Copy)]
pub struct Adapter<'a, F> {
    pub params: &'a LoraParams<F>,
    /// alpha / r (or alpha / √r with rsLoRA).
    pub scale: F,
}

/// What a site hook sees during backward: enough to form the per-sample gradients
/// ∂ℓ/∂A = scale · Σ_t (B·δ_t)... without the encoder knowing about Fisher.
#[derive(Debug)]
pub struct SiteTrace<'a, F> {
    pub site: SiteId,
    /// The LoRA input rows (after LoRA dropout), B·T × d_in, row b·T + t.
    pub x: ArrayView2<'a, F>,
    /// ∂loss/∂(site output) rows, B·T × d_out. Exactly zero on padding rows.
    pub delta: ArrayView2<'a, F>,
    /// 1 for real tokens, 0 for padding, length B·T.
    pub mask: ArrayView1<'a, F>,
    pub batch: usize,
    pub seq_len: usize,
    pub weights: &'a LoraWeights<F>,
    pub scale: F,
    /// x·Aᵀ rows (B·T × r), as the forward pass formed them.
    pub u: ArrayView2<'a, F>,
    /// δ·B rows (B·T × r, without the scale), as backward formed them for ∂A.
    pub db: ArrayView2<'a, F>,
}

/// Receives per-site activations and output gradients during backward. The
/// `fibecfed-fisher` crate implements it; the encoder does not depend on it.
pub trait SiteHook<F> {
    fn site(&mut self, trace: &SiteTrace<'_, F>);
    /// The head's input (mean-pooled features, B×H) and ∂loss/∂logits (B×C).
    fn head(&mut self, _pooled: ArrayView2<'_, F>, _dlogits: ArrayView2<'_, F>) {}
}

/// A hook that does nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHook;
impl<F> SiteHook<F> for NoHook {
    fn site(&mut self, _trace: &SiteTrace<'_, F>) {}
}

#[derive(Debug, Clone)]
pub(crate) struct SiteCache<F> {
    /// LoRA input after dropout; None when dropout is off (then it is the base input).
    x_drop: Option<Array2<F>>,
    /// Dropout multipliers (0 or 1/(1−p)), None when dropout is off.
    drop_mask: Option<Array2<F>>,
    /// u = x_drop · Aᵀ, N × r.
    u: Array2<F>,
}

#[derive(Debug, Clone)]
struct LayerCache<F> {
    input: Array2<F>,
    /// q | k | v side by side, N × 3H (one fused GEMM).
    qkv: Array2<F>,
    probs: Array3<F>,
    context: Array2<F>,
    attention_norm: NormCache<F>,
    h1: Array2<F>,
    act_grad: Array2<F>,
    act: Array2<F>,
    output_norm: NormCache<F>,
    sites: BTreeMap<SiteKind, SiteCache<F>>,
}

/// The result of a training forward pass: logits and what backward needs.
#[derive(Debug, Clone)]
pub struct Forward<F> {
    pub logits: Array2<F>,
    pub pooled: Array2<F>,
    layers: Vec<LayerCache<F>>,
}

/// Optional taps into a forward pass.
#[derive(Debug, Default)]
pub(crate) struct Tap<'a, F> {
    pub embedding_noise: Option<&'a Array2<F>>,
    pub layer_outputs: Option<&'a mut Vec<Array2<F>>>,
}

/// LoRA dropout, as PEFT applies it: on the adapter's input only.
#[derive(Debug)]
pub struct Dropout<'a> {
    pub p: f32,
    pub rng: &'a mut ChaCha8Rng,
}

/// x·Wᵀ + b, parallel over row blocks.
fn linear<F: Real>(x: &ArrayView2<F>, lin: &Linear<F>) -> Array2<F> {
    par::linear(x, &lin.weight, &lin.bias)
}

/// Adds scale·(x_drop·Aᵀ)·Bᵀ to `y` and returns what backward needs.
pub(crate) fn lora_forward<F: Real>(
    x: &Array2<F>,
    w: &LoraWeights<F>,
    scale: F,
    dropout: &mut Option<Dropout<'_>>,
    y: &mut ArrayViewMut2<'_, F>,
) -> SiteCache<F> {
    let (x_drop, drop_mask) = match dropout.as_mut().filter(|d| d.p > 0.0) {
        Some(d) => {
            let keep = F::from_f64(1.0 / (1.0 - f64::from(d.p)));
            let mask = Array2::from_shape_simple_fn(x.raw_dim(), || {
                if d.rng.random::<f32>() < d.p {
                    F::zero()
                } else {
                    keep
                }
            });
            (Some(x * &mask), Some(mask))
        }
        None => (None, None),
    };
    let xin = x_drop.as_ref().unwrap_or(x);
    let mut u = Array2::zeros((x.nrows(), w.a.nrows()));
    general_mat_mul(F::one(), xin, &w.a.t(), F::zero(), &mut u);
    par::gemm(scale, &u.view(), &w.b.t(), F::one(), y);
    SiteCache {
        x_drop,
        drop_mask,
        u,
    }
}

/// An adapted site during backward: its factors, what forward kept, its gradient.
pub(crate) struct SiteState<'a, F> {
    pub weights: &'a LoraWeights<F>,
    pub scale: F,
    pub cache: &'a SiteCache<F>,
    pub grad: &'a mut LoraWeights<F>,
}

/// The adapter's part of one site's backward: accumulates dA and dB, shows the hook
/// (x, δ), and adds the adapter's share of dx when the caller needs dx.
pub(crate) fn lora_backward<F: Real>(
    dy: &ArrayView2<'_, F>,
    x: &Array2<F>,
    site: SiteId,
    state: SiteState<'_, F>,
    ctx: &mut BackwardCtx<'_, '_, F>,
    dx: Option<&mut Array2<F>>,
) {
    let SiteState {
        weights: w,
        scale,
        cache,
        grad,
    } = state;
    let xin = cache.x_drop.as_ref().unwrap_or(x);
    // dy·B (N×r) serves both dA and the adapter's share of dx.
    let dyb = dy.dot(&w.b);
    general_mat_mul(scale, &dyb.t(), xin, F::one(), &mut grad.a);
    general_mat_mul(scale, &dy.t(), &cache.u, F::one(), &mut grad.b);
    if let Some(dx) = dx {
        match &cache.drop_mask {
            None => par::gemm(
                scale,
                &dyb.view(),
                &w.a.view(),
                F::one(),
                &mut dx.view_mut(),
            ),
            Some(m) => {
                let through = dyb.dot(&w.a) * m;
                dx.scaled_add(scale, &through);
            }
        }
    }
    ctx.hook.site(&SiteTrace {
        site,
        x: xin.view(),
        delta: dy.view(),
        mask: ctx.mask.view(),
        batch: ctx.batch,
        seq_len: ctx.seq_len,
        weights: w,
        scale,
        u: cache.u.view(),
        db: dyb.view(),
    });
}

pub(crate) struct BackwardCtx<'h, 'm, F> {
    pub hook: &'h mut dyn SiteHook<F>,
    pub mask: &'m Array1<F>,
    pub batch: usize,
    pub seq_len: usize,
}

/// How far down a layer's backward must go: 0 = output dense (LLaMA: down), 1 =
/// intermediate (LLaMA: gate and up), 2 = attention output, 3 = q/k/v, 4 = the layer's
/// input. The encoder and the decoder share the order.
fn depth(kind: SiteKind) -> u8 {
    match kind {
        SiteKind::Output => 0,
        SiteKind::Intermediate | SiteKind::Gate => 1,
        SiteKind::AttentionOutput => 2,
        SiteKind::Query | SiteKind::Key | SiteKind::Value => 3,
    }
}

/// The lowest layer a backward pass visits: layer 0 when it goes on to the input,
/// else the lowest adapted layer; `None` when nothing is adapted and the input is not
/// asked for.
pub(crate) fn lowest_layer<F>(params: &LoraParams<F>, to_input: bool) -> Option<usize> {
    if to_input {
        return Some(0);
    }
    params.sites.keys().map(|s| s.layer).min()
}

/// How deep layer `l`'s backward must go ([`depth`]): all the way above the lowest
/// layer or on the way to the input, else as deep as that layer's deepest site.
pub(crate) fn layer_depth<F>(
    params: &LoraParams<F>,
    l: usize,
    lowest: usize,
    to_input: bool,
) -> u8 {
    if l > lowest || to_input {
        return 4;
    }
    params
        .sites
        .keys()
        .filter(|s| s.layer == l)
        .map(|s| depth(s.kind))
        .max()
        .unwrap_or(0)
}

/// 1 for real tokens, 0 for padding: the hook's mask.
pub(crate) fn mask_values<F: Real>(batch: &Batch) -> Array1<F> {
    batch
        .mask
        .iter()
        .map(|&m| if m { F::one() } else { F::zero() })
        .collect()
}

const QKV: [SiteKind; 3] = [SiteKind::Query, SiteKind::Key, SiteKind::Value];

impl<F: Real> BertModel<F> {
    fn check_batch(&self, batch: &Batch) -> Result<(), ModelError> {
        let c = &self.config;
        if batch.seq_len > c.max_position_embeddings {
            return Err(ModelError::Input(format!(
                "sequence length {} exceeds max_position_embeddings {}",
                batch.seq_len, c.max_position_embeddings
            )));
        }
        if let Some((i, id)) = batch
            .input_ids
            .iter()
            .enumerate()
            .find(|&(_, &id)| id as usize >= c.vocab_size)
        {
            return Err(ModelError::Input(format!(
                "token id {id} (sequence {}, position {}) is outside the vocabulary of {} entries: \
                 tokenizer and model do not match",
                i / batch.seq_len,
                i % batch.seq_len,
                c.vocab_size
            )));
        }
        if let Some(&t) = batch
            .token_type_ids
            .iter()
            .find(|&&t| t as usize >= c.type_vocab_size)
        {
            return Err(ModelError::Input(format!(
                "token type {t} exceeds type_vocab_size {}",
                c.type_vocab_size
            )));
        }
        Ok(())
    }

    /// Checks that every adapter site exists in this model with fitting shapes and
    /// that the head reads this hidden size.
    pub fn check_adapter(&self, params: &LoraParams<F>) -> Result<(), ModelError> {
        for (site, w) in &params.sites {
            let Some(layer) = self.layers.get(site.layer) else {
                return Err(ModelError::Input(format!(
                    "adapter site {site} is outside this {}-layer model",
                    self.layers.len()
                )));
            };
            let Some(lin) = layer.linear(site.kind) else {
                return Err(ModelError::Input(format!(
                    "adapter site {site}: a BERT block has no gate projection"
                )));
            };
            let r = w.a.nrows();
            if w.a.ncols() != lin.weight.ncols()
                || w.b.nrows() != lin.weight.nrows()
                || w.b.ncols() != r
            {
                return Err(ModelError::Input(format!(
                    "adapter site {site}: A is {:?} and B is {:?}, but the base weight is {:?} (expected A [r, {}], B [{}, r])",
                    w.a.shape(),
                    w.b.shape(),
                    lin.weight.shape(),
                    lin.weight.ncols(),
                    lin.weight.nrows()
                )));
            }
        }
        let h = self.config.hidden_size;
        if params.head.weight.ncols() != h || params.head.bias.len() != params.head.weight.nrows() {
            return Err(ModelError::Input(format!(
                "classifier weight is {:?} and bias {:?}, expected [labels, {h}] and [labels]",
                params.head.weight.shape(),
                params.head.bias.shape()
            )));
        }
        Ok(())
    }

    fn embed(&self, batch: &Batch) -> Array2<F> {
        let e = &self.embeddings;
        let h = self.config.hidden_size;
        let mut x = Array2::zeros((batch.batch * batch.seq_len, h));
        for (i, mut row) in x.axis_iter_mut(Axis(0)).enumerate() {
            let t = i % batch.seq_len;
            row.assign(&e.word.row(batch.input_ids[i] as usize));
            row += &e.position.row(t);
            row += &e.token_type.row(batch.token_type_ids[i] as usize);
        }
        layer_norm(x, &e.norm, false).0
    }

    /// Multi-head self-attention over keys that are not padding, one sequence per
    /// task. Returns the context (N×H) and, with `record`, the probabilities
    /// (B·heads × T × T).
    fn attention(&self, qkv: &Array2<F>, batch: &Batch, record: bool) -> (Array2<F>, Array3<F>) {
        let (t, hid) = (batch.seq_len, self.config.hidden_size);
        let heads = self.config.num_attention_heads;
        let dh = self.config.head_dim();
        let scale = F::one() / F::from_f64((dh as f64).sqrt());
        let mut ctx = Array2::zeros((batch.batch * t, hid));
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
                    let col = |j: usize| s![rows.clone(), j * hid + h * dh..j * hid + (h + 1) * dh];
                    let (qh, kh, vh) = (qkv.slice(col(0)), qkv.slice(col(1)), qkv.slice(col(2)));
                    general_mat_mul(scale, &qh, &kh.t(), F::zero(), &mut sc);
                    masked_softmax_rows(&mut sc, key_mask);
                    let mut ch = ctx_b.slice_mut(s![.., h * dh..(h + 1) * dh]);
                    general_mat_mul(F::one(), &sc, &vh, F::zero(), &mut ch);
                    if record {
                        probs_b.index_axis_mut(Axis(0), h).assign(&sc);
                    }
                }
            });
        (ctx, probs)
    }

    /// Gradients of q | k | v (N × 3H) from the context gradient, one sequence per task.
    fn attention_backward(
        &self,
        dctx: &Array2<F>,
        cache: &LayerCache<F>,
        batch: &Batch,
    ) -> Array2<F> {
        let (t, hid) = (batch.seq_len, self.config.hidden_size);
        let heads = self.config.num_attention_heads;
        let dh = self.config.head_dim();
        let scale = F::one() / F::from_f64((dh as f64).sqrt());
        let mut dqkv = Array2::zeros((batch.batch * t, 3 * hid));
        dqkv.axis_chunks_iter_mut(Axis(0), t)
            .into_par_iter()
            .enumerate()
            .for_each(|(bi, mut d_b)| {
                let rows = bi * t..(bi + 1) * t;
                let mut dp = Array2::zeros((t, t));
                for h in 0..heads {
                    let cols = h * dh..(h + 1) * dh;
                    let col = |j: usize| s![rows.clone(), j * hid + h * dh..j * hid + (h + 1) * dh];
                    let p = cache.probs.index_axis(Axis(0), bi * heads + h);
                    let dc = dctx.slice(s![rows.clone(), cols.clone()]);
                    let (qh, kh, vh) = (
                        cache.qkv.slice(col(0)),
                        cache.qkv.slice(col(1)),
                        cache.qkv.slice(col(2)),
                    );
                    let local = |j: usize| s![.., j * hid + h * dh..j * hid + (h + 1) * dh];
                    general_mat_mul(F::one(), &dc, &vh.t(), F::zero(), &mut dp);
                    general_mat_mul(
                        F::one(),
                        &p.t(),
                        &dc,
                        F::zero(),
                        &mut d_b.slice_mut(local(2)),
                    );
                    softmax_backward_rows(&mut dp, &p, scale);
                    general_mat_mul(F::one(), &dp, &kh, F::zero(), &mut d_b.slice_mut(local(0)));
                    general_mat_mul(
                        F::one(),
                        &dp.t(),
                        &qh,
                        F::zero(),
                        &mut d_b.slice_mut(local(1)),
                    );
                }
            });
        dqkv
    }

    /// Runs the encoder; with `record`, keeps what backward needs.
    fn run(
        &self,
        batch: &Batch,
        adapter: Option<Adapter<'_, F>>,
        dropout: Option<Dropout<'_>>,
        record: bool,
    ) -> Result<(Array2<F>, Vec<LayerCache<F>>), ModelError> {
        self.run_tapped(batch, adapter, dropout, record, &mut Tap::default())
    }

    /// [`BertModel::run`] with `tap`: noise added to the embeddings, layer outputs kept.
    fn run_tapped(
        &self,
        batch: &Batch,
        adapter: Option<Adapter<'_, F>>,
        mut dropout: Option<Dropout<'_>>,
        record: bool,
        tap: &mut Tap<'_, F>,
    ) -> Result<(Array2<F>, Vec<LayerCache<F>>), ModelError> {
        par::init();
        self.check_batch(batch)?;
        if let Some(a) = adapter {
            self.check_adapter(a.params)?;
        }
        let hid = self.config.hidden_size;
        let mut x = self.embed(batch);
        if let Some(noise) = tap.embedding_noise {
            if noise.dim() != x.dim() {
                return Err(ModelError::Input(format!(
                    "embedding noise is {:?} but the embeddings are {:?}",
                    noise.dim(),
                    x.dim()
                )));
            }
            add_assign(&mut x, noise);
        }
        let mut caches = Vec::with_capacity(if record { self.layers.len() } else { 0 });
        for (l, layer) in self.layers.iter().enumerate() {
            let mut sites = BTreeMap::new();
            let weights = |kind: SiteKind| {
                adapter.and_then(|a| {
                    a.params
                        .sites
                        .get(&SiteId::new(l, kind))
                        .map(|w| (w, a.scale))
                })
            };
            // Adds a site's adapter to its output `y` and keeps its cache when recording.
            let mut adapt = |input: &Array2<F>,
                             kind: SiteKind,
                             y: &mut ArrayViewMut2<'_, F>,
                             dropout: &mut Option<Dropout<'_>>| {
                if let Some((w, scale)) = weights(kind) {
                    let c = lora_forward(input, w, scale, dropout, y);
                    if record {
                        sites.insert(kind, c);
                    }
                }
            };
            let mut qkv = linear(&x.view(), &layer.qkv);
            for (j, kind) in QKV.into_iter().enumerate() {
                let mut y = qkv.slice_mut(s![.., j * hid..(j + 1) * hid]);
                adapt(&x, kind, &mut y, &mut dropout);
            }
            let mut fwd = |input: &Array2<F>,
                           kind: SiteKind,
                           lin: &Linear<F>,
                           dropout: &mut Option<Dropout<'_>>| {
                let mut y = linear(&input.view(), lin);
                adapt(input, kind, &mut y.view_mut(), dropout);
                y
            };
            let (context, probs) = self.attention(&qkv, batch, record);
            let mut a = fwd(
                &context,
                SiteKind::AttentionOutput,
                &layer.attention_output,
                &mut dropout,
            );
            add_assign(&mut a, &x);
            let (h1, attention_norm) = layer_norm(a, &layer.attention_norm, record);
            let mut act = fwd(
                &h1,
                SiteKind::Intermediate,
                &layer.intermediate,
                &mut dropout,
            );
            let act_grad = activate(&mut act, self.config.hidden_act, record);
            let mut o = fwd(&act, SiteKind::Output, &layer.output, &mut dropout);
            add_assign(&mut o, &h1);
            let (h2, output_norm) = layer_norm(o, &layer.output_norm, record);
            if let (Some(attention_norm), Some(act_grad), Some(output_norm)) =
                (attention_norm, act_grad, output_norm)
            {
                caches.push(LayerCache {
                    input: x,
                    qkv,
                    probs,
                    context,
                    attention_norm,
                    h1,
                    act_grad,
                    act,
                    output_norm,
                    sites,
                });
            }
            if let Some(out) = tap.layer_outputs.as_mut() {
                out.push(h2.clone());
            }
            x = h2;
        }
        Ok((x, caches))
    }

    /// The last hidden state, B·T × H (row b·T + t), with an optional adapter.
    pub fn encode(
        &self,
        batch: &Batch,
        adapter: Option<Adapter<'_, F>>,
    ) -> Result<Array2<F>, ModelError> {
        Ok(self.run(batch, adapter, None, false)?.0)
    }

    /// Every layer's output (B·T × H each, layer 0 first) with `noise` (B·T × H) added to
    /// the input embeddings: what the perturbation-sensitivity importance compares.
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
        self.run_tapped(batch, adapter, None, false, &mut tap)?;
        Ok(outputs)
    }

    /// Logits for evaluation (no dropout, nothing kept for backward).
    pub fn logits(&self, batch: &Batch, adapter: Adapter<'_, F>) -> Result<Array2<F>, ModelError> {
        let hidden = self.encode(batch, Some(adapter))?;
        let pooled = mean_pool(&hidden, batch);
        Ok(head_forward(&pooled, &adapter.params.head))
    }

    /// Training forward pass: logits plus the cache for [`BertModel::backward`].
    pub fn forward(
        &self,
        batch: &Batch,
        adapter: Adapter<'_, F>,
        dropout: Option<Dropout<'_>>,
    ) -> Result<Forward<F>, ModelError> {
        let (hidden, layers) = self.run(batch, Some(adapter), dropout, true)?;
        let pooled = mean_pool(&hidden, batch);
        let logits = head_forward(&pooled, &adapter.params.head);
        Ok(Forward {
            logits,
            pooled,
            layers,
        })
    }

    /// Gradients of the loss whose ∂/∂logits is `dlogits` with respect to every LoRA
    /// factor and the head. The hook sees each site's (x, δ) as they are formed.
    pub fn backward(
        &self,
        batch: &Batch,
        adapter: Adapter<'_, F>,
        fwd: &Forward<F>,
        dlogits: &Array2<F>,
        hook: &mut dyn SiteHook<F>,
    ) -> Result<LoraParams<F>, ModelError> {
        Ok(self
            .backward_through(batch, adapter, fwd, dlogits, hook, false)?
            .0)
    }

    /// The gradient of the loss whose ∂/∂logits is `dlogits` with respect to the
    /// embeddings the first layer reads (B·T × H: the point where
    /// [`BertModel::layer_outputs`] adds its noise), with the adapter in place.
    pub fn embedding_gradient(
        &self,
        batch: &Batch,
        adapter: Adapter<'_, F>,
        fwd: &Forward<F>,
        dlogits: &Array2<F>,
    ) -> Result<Array2<F>, ModelError> {
        let (_, dx) = self.backward_through(batch, adapter, fwd, dlogits, &mut NoHook, true)?;
        dx.ok_or_else(|| ModelError::Input("the backward pass did not reach the embeddings".into()))
    }

    /// [`BertModel::backward`], and with `to_input` on through every layer down to the
    /// embeddings, whose gradient it then returns as well.
    fn backward_through(
        &self,
        batch: &Batch,
        adapter: Adapter<'_, F>,
        fwd: &Forward<F>,
        dlogits: &Array2<F>,
        hook: &mut dyn SiteHook<F>,
        to_input: bool,
    ) -> Result<(LoraParams<F>, Option<Array2<F>>), ModelError> {
        let params = adapter.params;
        if dlogits.dim() != fwd.logits.dim() || fwd.layers.len() != self.layers.len() {
            return Err(ModelError::Input(format!(
                "dlogits is {:?} but the forward pass produced logits {:?}",
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
                "adapter site {site} was not part of the forward pass: backward needs the adapter forward ran with"
            )));
        }
        let hid = self.config.hidden_size;
        let mut grads = params.zeros_like();
        // Head: logits = pooled·Wᵀ + b.
        general_mat_mul(
            F::one(),
            &dlogits.t(),
            &fwd.pooled,
            F::zero(),
            &mut grads.head.weight,
        );
        grads.head.bias = dlogits.sum_axis(Axis(0));
        hook.head(fwd.pooled.view(), dlogits.view());
        let Some(lowest) = lowest_layer(params, to_input) else {
            return Ok((grads, None));
        };
        let mask: Array1<F> = mask_values(batch);
        let mut dh = pool_backward(&dlogits.dot(&params.head.weight), batch, &mask);
        let mut ctx = BackwardCtx {
            hook,
            mask: &mask,
            batch: batch.batch,
            seq_len: batch.seq_len,
        };
        for l in (lowest..self.layers.len()).rev() {
            let layer = &self.layers[l];
            let cache = &fwd.layers[l];
            let need = layer_depth(params, l, lowest, to_input);
            // One site: base dx (when needed) plus the adapter's part.
            let mut site = |kind: SiteKind,
                            dy: &ArrayView2<'_, F>,
                            x: &Array2<F>,
                            mut dx: Option<Array2<F>>,
                            ctx: &mut BackwardCtx<'_, '_, F>| {
                let id = SiteId::new(l, kind);
                if let (Some(w), Some(c), Some(g)) = (
                    params.sites.get(&id),
                    cache.sites.get(&kind),
                    grads.sites.get_mut(&id),
                ) {
                    let state = SiteState {
                        weights: w,
                        scale: adapter.scale,
                        cache: c,
                        grad: g,
                    };
                    lora_backward(dy, x, id, state, ctx, dx.as_mut());
                }
                dx
            };
            let base_dx = |dy: &ArrayView2<'_, F>, lin: &Linear<F>, need_dx: bool| {
                need_dx.then(|| {
                    let mut dx = Array2::zeros((dy.nrows(), lin.weight.ncols()));
                    par::gemm(
                        F::one(),
                        dy,
                        &lin.weight.view(),
                        F::zero(),
                        &mut dx.view_mut(),
                    );
                    dx
                })
            };
            let d_o = layer_norm_backward(&dh, &layer.output_norm, &cache.output_norm);
            let dx = base_dx(&d_o.view(), &layer.output, need >= 1);
            let Some(mut d_act) = site(SiteKind::Output, &d_o.view(), &cache.act, dx, &mut ctx)
            else {
                break;
            };
            mul_assign(&mut d_act, &cache.act_grad);
            let mut dh1 = d_o;
            let dx = base_dx(&d_act.view(), &layer.intermediate, need >= 2);
            match site(
                SiteKind::Intermediate,
                &d_act.view(),
                &cache.h1,
                dx,
                &mut ctx,
            ) {
                Some(d) => add_assign(&mut dh1, &d),
                None => break,
            }
            let dz1 = layer_norm_backward(&dh1, &layer.attention_norm, &cache.attention_norm);
            let dx = base_dx(&dz1.view(), &layer.attention_output, need >= 3);
            let Some(dctx) = site(
                SiteKind::AttentionOutput,
                &dz1.view(),
                &cache.context,
                dx,
                &mut ctx,
            ) else {
                break;
            };
            let dqkv = self.attention_backward(&dctx, cache, batch);
            let need_dx = need >= 4;
            let mut dx = base_dx(&dqkv.view(), &layer.qkv, need_dx);
            for (j, kind) in QKV.into_iter().enumerate() {
                dx = site(
                    kind,
                    &dqkv.slice(s![.., j * hid..(j + 1) * hid]),
                    &cache.input,
                    dx,
                    &mut ctx,
                );
            }
            match dx {
                Some(mut d) => {
                    add_assign(&mut d, &dz1);
                    dh = d;
                }
                None => break,
            }
        }
        // Below the lowest site `dh` is the gradient at layer `lowest`'s input, which
        // is the embeddings' when the pass went down to layer 0.
        Ok((grads, to_input.then_some(dh)))
    }
}

/// Mean of the hidden states over each sequence's real tokens.
pub fn mean_pool<F: Real>(hidden: &Array2<F>, batch: &Batch) -> Array2<F> {
    let t = batch.seq_len;
    let mut pooled = Array2::zeros((batch.batch, hidden.ncols()));
    for (b, mut out) in pooled.axis_iter_mut(Axis(0)).enumerate() {
        let mut count = 0usize;
        for i in b * t..(b + 1) * t {
            if batch.mask[i] {
                out += &hidden.row(i);
                count += 1;
            }
        }
        out /= F::from_f64(count.max(1) as f64);
    }
    pooled
}

fn pool_backward<F: Real>(dpooled: &Array2<F>, batch: &Batch, mask: &Array1<F>) -> Array2<F> {
    let t = batch.seq_len;
    let mut dh = Array2::zeros((batch.batch * t, dpooled.ncols()));
    for (i, mut row) in dh.axis_iter_mut(Axis(0)).enumerate() {
        let b = i / t;
        if mask[i] > F::zero() {
            let count = batch.mask[b * t..(b + 1) * t]
                .iter()
                .filter(|&&m| m)
                .count();
            row.assign(&(&dpooled.row(b) / F::from_f64(count as f64)));
        }
    }
    dh
}

fn head_forward<F: Real>(pooled: &Array2<F>, head: &Head<F>) -> Array2<F> {
    let mut logits = pooled.dot(&head.weight.t());
    logits += &head.bias;
    logits
}
