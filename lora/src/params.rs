//! Trainable parameters: LoRA factors per site and the classification head.

use std::collections::BTreeMap;

use fibecfed_core::{NamedTensors, Real};
use ndarray::{Array1, Array2, ArrayD, Ix1, Ix2};
use rand::Rng;
use rand_distr::{Distribution, Normal, Uniform};

use crate::LoraError;
use crate::config::{LoraConfig, SiteId, SiteKind};

/// The two LoRA factors of one site: ΔW = scale · B · A.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraWeights<F> {
    /// r × d_in
    pub a: Array2<F>,
    /// d_out × r
    pub b: Array2<F>,
}

/// Linear classification head on the mean-pooled last hidden state.
#[derive(Debug, Clone, PartialEq)]
pub struct Head<F> {
    /// labels × hidden
    pub weight: Array2<F>,
    pub bias: Array1<F>,
}

/// Shape of a site's base linear map, needed to build or check its LoRA factors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SiteShape {
    pub site: SiteId,
    pub d_in: usize,
    pub d_out: usize,
}

/// Everything that trains: LoRA factors of every selected site and the head. The same
/// type holds gradients and optimiser moments, so they line up one-to-one.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraParams<F> {
    pub sites: BTreeMap<SiteId, LoraWeights<F>>,
    pub head: Head<F>,
}

const PREFIX: &str = "base_model.model.";

/// PEFT's tensor name for factor `which` ("lora_A" / "lora_B") of a site.
pub fn peft_site_name(site: SiteId, which: &str) -> String {
    format!("{PREFIX}{}.{which}.weight", site.module_path())
}
pub const PEFT_HEAD_WEIGHT: &str = "base_model.model.classifier.weight";
pub const PEFT_HEAD_BIAS: &str = "base_model.model.classifier.bias";

/// What a PEFT tensor name refers to once adapter names, the `bert.` prefix of
/// task models and `modules_to_save` wrappers are stripped.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PeftKey {
    Site {
        layer: usize,
        kind: SiteKind,
        factor: Factor,
    },
    HeadWeight,
    HeadBias,
    /// LoRA on BertModel's pooler: PEFT's `dense` target selects it, our mean-pool
    /// head never uses it.
    Pooler,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Factor {
    A,
    B,
}

fn parse_peft_key(name: &str) -> Option<PeftKey> {
    let mut rest = name.strip_prefix(PREFIX)?.to_owned();
    for wrapper in [".modules_to_save.default", ".original_module"] {
        rest = rest.replace(wrapper, "");
    }
    let rest = rest.strip_prefix("bert.").unwrap_or(&rest).to_owned();
    match rest.as_str() {
        "classifier.weight" => return Some(PeftKey::HeadWeight),
        "classifier.bias" => return Some(PeftKey::HeadBias),
        _ => {}
    }
    if rest.starts_with("pooler.dense.lora_") {
        return Some(PeftKey::Pooler);
    }
    // BERT's layer paths, or a LLaMA model's (`model.layers.N.self_attn.q_proj`).
    let (rest, llama) = match rest.strip_prefix("encoder.layer.") {
        Some(r) => (r, false),
        None => (rest.strip_prefix("model.layers.")?, true),
    };
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    // PEFT files written with an adapter name keep it: `lora_A.default.weight`.
    let rest = rest.replace(".default.weight", ".weight");
    let (module, factor) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
        (m, Factor::A)
    } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
        (m, Factor::B)
    } else {
        return None;
    };
    // Every kind's `suffix` is distinct, `Gate`'s included, so an adapter of LLaMA sites
    // written with BERT-style paths (as `to_named` writes them) reads back too.
    let kind = SiteKind::LLAMA.into_iter().find(|k| {
        if llama {
            k.llama_suffix() == module
        } else {
            k.suffix() == module
        }
    })?;
    Some(PeftKey::Site {
        layer,
        kind,
        factor,
    })
}

impl<F: Real> LoraParams<F> {
    /// PEFT's initialisation: A ~ Kaiming-uniform(a=√5) = U(±1/√d_in), B = 0; the head
    /// as Hugging Face initialises a classifier: N(0, 0.02²) weights, zero bias.
    pub fn init(
        config: &LoraConfig,
        shapes: &[SiteShape],
        hidden: usize,
        num_labels: usize,
        rng: &mut impl Rng,
    ) -> Self {
        let sites = shapes
            .iter()
            .map(|s| {
                let bound = 1.0 / (s.d_in as f64).sqrt();
                let a = match Uniform::new(-bound, bound) {
                    Ok(u) => Array2::from_shape_simple_fn((config.r, s.d_in), || {
                        F::from_f64(u.sample(rng))
                    }),
                    Err(_) => Array2::zeros((config.r, s.d_in)),
                };
                let b = Array2::zeros((s.d_out, config.r));
                (s.site, LoraWeights { a, b })
            })
            .collect();
        let normal = Normal::new(0.0, 0.02).ok();
        let weight = Array2::from_shape_simple_fn((num_labels, hidden), || {
            normal.map_or(F::zero(), |n| F::from_f64(n.sample(rng)))
        });
        Self {
            sites,
            head: Head {
                weight,
                bias: Array1::zeros(num_labels),
            },
        }
    }

    pub fn zeros_like(&self) -> Self {
        Self {
            sites: self
                .sites
                .iter()
                .map(|(&id, w)| {
                    (
                        id,
                        LoraWeights {
                            a: Array2::zeros(w.a.raw_dim()),
                            b: Array2::zeros(w.b.raw_dim()),
                        },
                    )
                })
                .collect(),
            head: Head {
                weight: Array2::zeros(self.head.weight.raw_dim()),
                bias: Array1::zeros(self.head.bias.raw_dim()),
            },
        }
    }

    pub fn num_labels(&self) -> usize {
        self.head.weight.nrows()
    }

    /// Number of trainable scalars.
    pub fn len(&self) -> usize {
        self.slices().iter().map(|s| s.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All tensors as flat slices in a fixed order (sites by (layer, kind), A before B,
    /// then head weight and bias), so optimisers and reductions walk them in lockstep.
    pub fn slices(&self) -> Vec<&[F]> {
        let mut out = Vec::with_capacity(2 * self.sites.len() + 2);
        for w in self.sites.values() {
            out.push(w.a.as_slice().unwrap_or(&[]));
            out.push(w.b.as_slice().unwrap_or(&[]));
        }
        out.push(self.head.weight.as_slice().unwrap_or(&[]));
        out.push(self.head.bias.as_slice().unwrap_or(&[]));
        out
    }

    pub fn slices_mut(&mut self) -> Vec<&mut [F]> {
        let mut out = Vec::with_capacity(2 * self.sites.len() + 2);
        for w in self.sites.values_mut() {
            out.push(w.a.as_slice_mut().unwrap_or(&mut []));
            out.push(w.b.as_slice_mut().unwrap_or(&mut []));
        }
        out.push(self.head.weight.as_slice_mut().unwrap_or(&mut []));
        out.push(self.head.bias.as_slice_mut().unwrap_or(&mut []));
        out
    }

    pub fn cast<G: Real>(&self) -> LoraParams<G> {
        let c2 = |a: &Array2<F>| a.mapv(|x| G::from_f64(x.as_f64()));
        LoraParams {
            sites: self
                .sites
                .iter()
                .map(|(&id, w)| {
                    (
                        id,
                        LoraWeights {
                            a: c2(&w.a),
                            b: c2(&w.b),
                        },
                    )
                })
                .collect(),
            head: Head {
                weight: c2(&self.head.weight),
                bias: self.head.bias.mapv(|x| G::from_f64(x.as_f64())),
            },
        }
    }

    /// PEFT tensor names → f32 arrays, ready for `adapter_model.safetensors`.
    pub fn to_named(&self) -> NamedTensors {
        let f = |a: &Array2<F>| a.mapv(Real::as_f32).into_dyn();
        let mut out = NamedTensors::new();
        for (&site, w) in &self.sites {
            out.insert(peft_site_name(site, "lora_A"), f(&w.a));
            out.insert(peft_site_name(site, "lora_B"), f(&w.b));
        }
        out.insert(PEFT_HEAD_WEIGHT.to_owned(), f(&self.head.weight));
        out.insert(
            PEFT_HEAD_BIAS.to_owned(),
            self.head.bias.mapv(Real::as_f32).into_dyn(),
        );
        out
    }

    /// Builds parameters from PEFT-named tensors, checking that they are exactly the
    /// sites `shapes` lists, with the right shapes for rank `r` and this model's
    /// hidden size. `source` names the file in errors. Returns the names that were
    /// ignored (pooler LoRA, which the mean-pool head does not use).
    pub fn from_named(
        tensors: &NamedTensors,
        r: usize,
        shapes: &[SiteShape],
        hidden: usize,
        source: &str,
    ) -> Result<(Self, Vec<String>), LoraError> {
        let mismatch = |name: &str, expected: String, found: &[usize]| LoraError::Shape {
            file: source.to_owned(),
            tensor: name.to_owned(),
            expected,
            found: format!("{found:?}"),
        };
        let wanted: BTreeMap<SiteId, SiteShape> = shapes.iter().map(|s| (s.site, *s)).collect();
        let mut a_of: BTreeMap<SiteId, Array2<F>> = BTreeMap::new();
        let mut b_of: BTreeMap<SiteId, Array2<F>> = BTreeMap::new();
        let (mut head_w, mut head_b) = (None, None);
        let mut ignored = Vec::new();
        for (name, t) in tensors {
            if let Some(v) = t.iter().find(|v| !v.is_finite()) {
                return Err(LoraError::NonFinite {
                    file: source.to_owned(),
                    tensor: name.clone(),
                    value: *v,
                });
            }
            let Some(key) = parse_peft_key(name) else {
                return Err(LoraError::UnexpectedTensor {
                    file: source.to_owned(),
                    tensor: name.clone(),
                    why:
                        "not a LoRA factor or head of a BERT encoder; is this adapter for another \
                          model family?"
                            .into(),
                });
            };
            match key {
                PeftKey::Pooler => ignored.push(name.clone()),
                PeftKey::HeadWeight => {
                    head_w = Some(
                        to2::<F>(t)
                            .ok_or_else(|| mismatch(name, "2 dimensions".into(), t.shape()))?,
                    );
                }
                PeftKey::HeadBias => {
                    head_b = Some(
                        to1::<F>(t)
                            .ok_or_else(|| mismatch(name, "1 dimension".into(), t.shape()))?,
                    );
                }
                PeftKey::Site {
                    layer,
                    kind,
                    factor,
                } => {
                    let site = SiteId::new(layer, kind);
                    let Some(shape) = wanted.get(&site) else {
                        return Err(LoraError::UnexpectedTensor {
                            file: source.to_owned(),
                            tensor: name.clone(),
                            why: format!(
                                "the model and adapter config have no LoRA site {site} (adapter for \
                                 another model, or target_modules does not list it)"
                            ),
                        });
                    };
                    let expected = match factor {
                        Factor::A => [r, shape.d_in],
                        Factor::B => [shape.d_out, r],
                    };
                    if t.shape() != expected {
                        return Err(mismatch(name, format!("{expected:?}"), t.shape()));
                    }
                    let arr = to2::<F>(t)
                        .ok_or_else(|| mismatch(name, format!("{expected:?}"), t.shape()))?;
                    match factor {
                        Factor::A => a_of.insert(site, arr),
                        Factor::B => b_of.insert(site, arr),
                    };
                }
            }
        }
        let mut sites = BTreeMap::new();
        for s in shapes {
            let a = a_of
                .remove(&s.site)
                .ok_or_else(|| LoraError::MissingTensor {
                    file: source.to_owned(),
                    tensor: peft_site_name(s.site, "lora_A"),
                })?;
            let b = b_of
                .remove(&s.site)
                .ok_or_else(|| LoraError::MissingTensor {
                    file: source.to_owned(),
                    tensor: peft_site_name(s.site, "lora_B"),
                })?;
            sites.insert(s.site, LoraWeights { a, b });
        }
        let weight = head_w.ok_or_else(|| LoraError::MissingTensor {
            file: source.to_owned(),
            tensor: PEFT_HEAD_WEIGHT.into(),
        })?;
        let bias = head_b.ok_or_else(|| LoraError::MissingTensor {
            file: source.to_owned(),
            tensor: PEFT_HEAD_BIAS.into(),
        })?;
        if weight.ncols() != hidden || weight.nrows() == 0 {
            return Err(mismatch(
                PEFT_HEAD_WEIGHT,
                format!("[labels, {hidden}]"),
                weight.shape(),
            ));
        }
        if bias.len() != weight.nrows() {
            return Err(mismatch(
                PEFT_HEAD_BIAS,
                format!("[{}]", weight.nrows()),
                bias.shape(),
            ));
        }
        Ok((
            Self {
                sites,
                head: Head { weight, bias },
            },
            ignored,
        ))
    }
}

fn to2<F: Real>(t: &ArrayD<f32>) -> Option<Array2<F>> {
    t.view()
        .into_dimensionality::<Ix2>()
        .ok()
        .map(|v| v.mapv(F::from_f32))
}

fn to1<F: Real>(t: &ArrayD<f32>) -> Option<Array1<F>> {
    t.view()
        .into_dimensionality::<Ix1>()
        .ok()
        .map(|v| v.mapv(F::from_f32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_peft_names() {
        assert_eq!(
            parse_peft_key("base_model.model.encoder.layer.3.attention.self.value.lora_B.weight"),
            Some(PeftKey::Site {
                layer: 3,
                kind: SiteKind::Value,
                factor: Factor::B
            })
        );
        assert_eq!(
            parse_peft_key(
                "base_model.model.bert.encoder.layer.0.output.dense.lora_A.default.weight"
            ),
            Some(PeftKey::Site {
                layer: 0,
                kind: SiteKind::Output,
                factor: Factor::A
            })
        );
        assert_eq!(
            parse_peft_key("base_model.model.encoder.layer.0.attention.output.dense.lora_A.weight"),
            Some(PeftKey::Site {
                layer: 0,
                kind: SiteKind::AttentionOutput,
                factor: Factor::A
            })
        );
        assert_eq!(
            parse_peft_key("base_model.model.classifier.modules_to_save.default.weight"),
            Some(PeftKey::HeadWeight)
        );
        assert_eq!(
            parse_peft_key("base_model.model.pooler.dense.lora_A.weight"),
            Some(PeftKey::Pooler)
        );
        assert_eq!(
            parse_peft_key("model.layers.0.self_attn.q_proj.lora_A.weight"),
            None
        );
    }
}
