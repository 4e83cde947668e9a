//! The frozen base weights of a BERT encoder, read from `model.safetensors`.

use std::path::Path;

use fibecfed_core::{NamedTensors, Real};
use fibecfed_lora::io::read_safetensors_filtered;
use fibecfed_lora::{SiteId, SiteKind, SiteShape};
use ndarray::{Array1, Array2, Ix1, Ix2};

use crate::ModelError;
use crate::config::BertConfig;

/// y = x·Wᵀ + b with W stored out×in, as PyTorch stores it.
#[derive(Debug, Clone)]
pub struct Linear<F> {
    pub weight: Array2<F>,
    pub bias: Array1<F>,
}

#[derive(Debug, Clone)]
pub struct LayerNorm<F> {
    pub gamma: Array1<F>,
    pub beta: Array1<F>,
    pub eps: F,
}

#[derive(Debug, Clone)]
pub struct EncoderLayer<F> {
    /// Query, key and value stacked (3H × H): one GEMM instead of three. Built by
    /// [`EncoderLayer::new`] from the three maps below, which stay for shapes and LoRA.
    pub qkv: Linear<F>,
    pub query: Linear<F>,
    pub key: Linear<F>,
    pub value: Linear<F>,
    pub attention_output: Linear<F>,
    pub attention_norm: LayerNorm<F>,
    pub intermediate: Linear<F>,
    pub output: Linear<F>,
    pub output_norm: LayerNorm<F>,
}

impl<F: Real> EncoderLayer<F> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        query: Linear<F>,
        key: Linear<F>,
        value: Linear<F>,
        attention_output: Linear<F>,
        attention_norm: LayerNorm<F>,
        intermediate: Linear<F>,
        output: Linear<F>,
        output_norm: LayerNorm<F>,
    ) -> Result<Self, ModelError> {
        let stack2 = |a: [&Array2<F>; 3]| {
            ndarray::concatenate(ndarray::Axis(0), &[a[0].view(), a[1].view(), a[2].view()])
        };
        let stack1 = |a: [&Array1<F>; 3]| {
            ndarray::concatenate(ndarray::Axis(0), &[a[0].view(), a[1].view(), a[2].view()])
        };
        let qkv = match (
            stack2([&query.weight, &key.weight, &value.weight]),
            stack1([&query.bias, &key.bias, &value.bias]),
        ) {
            (Ok(weight), Ok(bias)) => Linear { weight, bias },
            _ => {
                return Err(ModelError::Input(format!(
                    "query {:?}, key {:?} and value {:?} weights must share their input width",
                    query.weight.shape(),
                    key.weight.shape(),
                    value.weight.shape()
                )));
            }
        };
        Ok(Self {
            qkv,
            query,
            key,
            value,
            attention_output,
            attention_norm,
            intermediate,
            output,
            output_norm,
        })
    }
}

impl<F> EncoderLayer<F> {
    /// The module of a site kind; `None` for `Gate`, which a BERT block does not have.
    pub fn linear(&self, kind: SiteKind) -> Option<&Linear<F>> {
        Some(match kind {
            SiteKind::Query => &self.query,
            SiteKind::Key => &self.key,
            SiteKind::Value => &self.value,
            SiteKind::AttentionOutput => &self.attention_output,
            SiteKind::Intermediate => &self.intermediate,
            SiteKind::Output => &self.output,
            SiteKind::Gate => return None,
        })
    }
}

#[derive(Debug, Clone)]
pub struct Embeddings<F> {
    pub word: Array2<F>,
    pub position: Array2<F>,
    pub token_type: Array2<F>,
    pub norm: LayerNorm<F>,
}

/// A BERT encoder's frozen weights and its config.
#[derive(Debug, Clone)]
pub struct BertModel<F> {
    pub config: BertConfig,
    pub embeddings: Embeddings<F>,
    pub layers: Vec<EncoderLayer<F>>,
}

/// Reads tensors by name with the checks a user-supplied checkpoint needs.
struct Source<'a> {
    tensors: &'a NamedTensors,
    file: &'a Path,
    prefix: &'a str,
}

impl Source<'_> {
    fn get(&self, name: &str) -> Result<&ndarray::ArrayD<f32>, ModelError> {
        let full = format!("{}{name}", self.prefix);
        self.tensors
            .get(&full)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.file.to_path_buf(),
                tensor: full,
            })
    }

    /// A corrupt checkpoint with NaN/Inf weights would otherwise surface far away, as
    /// non-finite logits or `null` embeddings.
    fn finite(&self, name: &str) -> Result<&ndarray::ArrayD<f32>, ModelError> {
        let t = self.get(name)?;
        if let Some(v) = t.iter().find(|v| !v.is_finite()) {
            return Err(ModelError::NonFinite(format!(
                "{}: tensor `{}{name}` holds {v}",
                self.file.display(),
                self.prefix
            )));
        }
        Ok(t)
    }

    fn shape_error(&self, name: &str, expected: &[usize], found: &[usize]) -> ModelError {
        ModelError::TensorShape {
            path: self.file.to_path_buf(),
            tensor: format!("{}{name}", self.prefix),
            expected: format!("{expected:?}"),
            found: format!("{found:?}"),
        }
    }

    fn matrix<F: Real>(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Array2<F>, ModelError> {
        let t = self.finite(name)?;
        if t.shape() != [rows, cols] {
            return Err(self.shape_error(name, &[rows, cols], t.shape()));
        }
        let v = t
            .view()
            .into_dimensionality::<Ix2>()
            .map_err(|_| self.shape_error(name, &[rows, cols], t.shape()))?;
        Ok(v.mapv(F::from_f32))
    }

    fn vector<F: Real>(&self, name: &str, len: usize) -> Result<Array1<F>, ModelError> {
        let t = self.finite(name)?;
        if t.shape() != [len] {
            return Err(self.shape_error(name, &[len], t.shape()));
        }
        let v = t
            .view()
            .into_dimensionality::<Ix1>()
            .map_err(|_| self.shape_error(name, &[len], t.shape()))?;
        Ok(v.mapv(F::from_f32))
    }

    fn linear<F: Real>(
        &self,
        name: &str,
        d_out: usize,
        d_in: usize,
    ) -> Result<Linear<F>, ModelError> {
        Ok(Linear {
            weight: self.matrix(&format!("{name}.weight"), d_out, d_in)?,
            bias: self.vector(&format!("{name}.bias"), d_out)?,
        })
    }

    /// Old TensorFlow-converted checkpoints name LayerNorm parameters gamma/beta.
    fn layer_norm<F: Real>(
        &self,
        name: &str,
        d: usize,
        eps: f64,
    ) -> Result<LayerNorm<F>, ModelError> {
        let has = |suffix: &str| {
            self.tensors
                .contains_key(&format!("{}{name}.{suffix}", self.prefix))
        };
        let (g, b) = if !has("weight") && has("gamma") {
            ("gamma", "beta")
        } else {
            ("weight", "bias")
        };
        Ok(LayerNorm {
            gamma: self.vector(&format!("{name}.{g}"), d)?,
            beta: self.vector(&format!("{name}.{b}"), d)?,
            eps: F::from_f64(eps),
        })
    }
}

/// Tensors of a checkpoint that the encoder does not use: pooler, MLM/NSP heads,
/// buffers such as `position_ids` or `token_type_ids` (often stored as I64): only
/// parameters (weight, bias, gamma, beta) of the embeddings and encoder are read.
fn is_encoder_tensor(name: &str) -> bool {
    let name = name.strip_prefix("bert.").unwrap_or(name);
    let parameter = [".weight", ".bias", ".gamma", ".beta"]
        .iter()
        .any(|s| name.ends_with(s));
    parameter && (name.starts_with("embeddings.") || name.starts_with("encoder."))
}

impl<F: Real> BertModel<F> {
    /// Loads `config.json` and `model.safetensors` from a Hugging Face model folder.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let config = BertConfig::from_file(&dir.join("config.json"))?;
        let weights = dir.join("model.safetensors");
        if !weights.exists() {
            return Err(ModelError::MissingFile {
                path: weights,
                hint: "this loader reads safetensors checkpoints; convert pytorch_model.bin with \
                       transformers' save_pretrained(safe_serialization=True)",
            });
        }
        let tensors = read_safetensors_filtered(&weights, is_encoder_tensor)?;
        Self::from_tensors(config, &tensors, &weights)
    }

    /// Builds the model from named f32 tensors, checking every name and shape against
    /// the config. Task checkpoints (`BertForSequenceClassification`) carry a `bert.`
    /// prefix; both layouts load.
    pub fn from_tensors(
        config: BertConfig,
        tensors: &NamedTensors,
        file: &Path,
    ) -> Result<Self, ModelError> {
        let prefix = if tensors.contains_key("embeddings.word_embeddings.weight") {
            ""
        } else {
            "bert."
        };
        let src = Source {
            tensors,
            file,
            prefix,
        };
        let (h, i, eps) = (
            config.hidden_size,
            config.intermediate_size,
            config.layer_norm_eps,
        );
        let embeddings = Embeddings {
            word: src.matrix("embeddings.word_embeddings.weight", config.vocab_size, h)?,
            position: src.matrix(
                "embeddings.position_embeddings.weight",
                config.max_position_embeddings,
                h,
            )?,
            token_type: src.matrix(
                "embeddings.token_type_embeddings.weight",
                config.type_vocab_size,
                h,
            )?,
            norm: src.layer_norm("embeddings.LayerNorm", h, eps)?,
        };
        let layers = (0..config.num_hidden_layers)
            .map(|l| {
                let p = format!("encoder.layer.{l}");
                EncoderLayer::new(
                    src.linear(&format!("{p}.attention.self.query"), h, h)?,
                    src.linear(&format!("{p}.attention.self.key"), h, h)?,
                    src.linear(&format!("{p}.attention.self.value"), h, h)?,
                    src.linear(&format!("{p}.attention.output.dense"), h, h)?,
                    src.layer_norm(&format!("{p}.attention.output.LayerNorm"), h, eps)?,
                    src.linear(&format!("{p}.intermediate.dense"), i, h)?,
                    src.linear(&format!("{p}.output.dense"), h, i)?,
                    src.layer_norm(&format!("{p}.output.LayerNorm"), h, eps)?,
                )
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        Ok(Self {
            config,
            embeddings,
            layers,
        })
    }

    /// Base shapes of the given sites, for building or checking LoRA factors.
    pub fn site_shapes(&self, sites: &[SiteId]) -> Vec<SiteShape> {
        sites
            .iter()
            .filter_map(|&site| {
                let lin = self.layers.get(site.layer)?.linear(site.kind)?;
                Some(SiteShape {
                    site,
                    d_in: lin.weight.ncols(),
                    d_out: lin.weight.nrows(),
                })
            })
            .collect()
    }

    /// The same model in another float type (tests run the f64 twin).
    pub fn cast<G: Real>(&self) -> BertModel<G> {
        let m = |a: &Array2<F>| a.mapv(|x| G::from_f64(x.as_f64()));
        let v = |a: &Array1<F>| a.mapv(|x| G::from_f64(x.as_f64()));
        let lin = |l: &Linear<F>| Linear {
            weight: m(&l.weight),
            bias: v(&l.bias),
        };
        let ln = |n: &LayerNorm<F>| LayerNorm {
            gamma: v(&n.gamma),
            beta: v(&n.beta),
            eps: G::from_f64(n.eps.as_f64()),
        };
        BertModel {
            config: self.config.clone(),
            embeddings: Embeddings {
                word: m(&self.embeddings.word),
                position: m(&self.embeddings.position),
                token_type: m(&self.embeddings.token_type),
                norm: ln(&self.embeddings.norm),
            },
            layers: self
                .layers
                .iter()
                .map(|l| EncoderLayer {
                    qkv: lin(&l.qkv),
                    query: lin(&l.query),
                    key: lin(&l.key),
                    value: lin(&l.value),
                    attention_output: lin(&l.attention_output),
                    attention_norm: ln(&l.attention_norm),
                    intermediate: lin(&l.intermediate),
                    output: lin(&l.output),
                    output_norm: ln(&l.output_norm),
                })
                .collect(),
        }
    }
}

impl<F: Real> BertModel<F> {
    /// A model of the given shape with random weights (N(0, 0.02²) matrices, LayerNorm
    /// near identity): for benchmarks and tests that need the architecture, not the
    /// knowledge.
    pub fn random(config: BertConfig, rng: &mut impl rand::Rng) -> Result<Self, ModelError> {
        use rand_distr::{Distribution, Normal};
        let normal = Normal::new(0.0_f64, 0.02).ok();
        let mut draw = |shape: (usize, usize)| {
            Array2::from_shape_simple_fn(shape, || {
                normal.map_or(F::zero(), |n| F::from_f64(n.sample(rng)))
            })
        };
        let (h, i, eps) = (
            config.hidden_size,
            config.intermediate_size,
            F::from_f64(config.layer_norm_eps),
        );
        let ln = || LayerNorm {
            gamma: Array1::ones(h),
            beta: Array1::zeros(h),
            eps,
        };
        let mut lin = |o: usize, n: usize| Linear {
            weight: draw((o, n)),
            bias: Array1::zeros(o),
        };
        let layers = (0..config.num_hidden_layers)
            .map(|_| {
                let (q, k, v, o) = (lin(h, h), lin(h, h), lin(h, h), lin(h, h));
                let (inter, out) = (lin(i, h), lin(h, i));
                EncoderLayer::new(q, k, v, o, ln(), inter, out, ln())
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let mut draw2 = |shape: (usize, usize)| {
            Array2::from_shape_simple_fn(shape, || {
                normal.map_or(F::zero(), |n| F::from_f64(n.sample(rng)))
            })
        };
        let embeddings = Embeddings {
            word: draw2((config.vocab_size, h)),
            position: draw2((config.max_position_embeddings, h)),
            token_type: draw2((config.type_vocab_size, h)),
            norm: ln(),
        };
        Ok(Self {
            config,
            embeddings,
            layers,
        })
    }
}

impl BertConfig {
    /// all-MiniLM-L6-v2's shape: 6 layers, hidden 384, 12 heads, FFN 1536.
    pub fn minilm_l6() -> Self {
        Self {
            vocab_size: 30522,
            hidden_size: 384,
            num_hidden_layers: 6,
            num_attention_heads: 12,
            intermediate_size: 1536,
            hidden_act: crate::config::Activation::Gelu,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            pad_token_id: 0,
        }
    }
}
