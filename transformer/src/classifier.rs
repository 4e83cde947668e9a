//! One type for the two model families a federated run can train: a BERT encoder with
//! its mean-pool head, or a LLaMA decoder that classifies through its frozen LM head's
//! label-word logits. The run code calls these methods and never asks which it has,
//! so the Fisher pass, the curriculum, the layer choices and the sparse update work
//! unchanged on both.

use fibecfed_core::Real;
use fibecfed_lora::{LoraConfig, LoraError, LoraParams, SiteId, SiteShape};
use ndarray::{Array2, Axis};

use crate::ModelError;
use crate::encoder::{Adapter, Dropout, Forward, SiteHook, mean_pool};
use crate::llama::{DecoderForward, LlamaModel};
use crate::tokenize::Batch;
use crate::weights::BertModel;

/// A model with what it classifies through.
#[derive(Debug, Clone)]
pub enum Classifier<F = f32> {
    /// The encoder; logits from the adapter's trained head on the mean-pooled output.
    Bert(BertModel<F>),
    /// The decoder; logits of `labels` (one token id per class, in class order) from the
    /// frozen LM head at each sequence's last token. The adapter's head is never read.
    Llama {
        model: LlamaModel<F>,
        labels: Vec<u32>,
    },
}

/// A training forward pass of either family.
#[derive(Debug, Clone)]
pub enum ClassifierForward<F> {
    Bert(Forward<F>),
    Llama(DecoderForward<F>),
}

impl<F> ClassifierForward<F> {
    /// B × classes.
    pub fn logits(&self) -> &Array2<F> {
        match self {
            Self::Bert(f) => &f.logits,
            Self::Llama(f) => &f.logits,
        }
    }
}

fn mismatch() -> ModelError {
    ModelError::Input(
        "a forward pass of one model family was handed to the other's backward".into(),
    )
}

impl<F: Real> Classifier<F> {
    pub fn num_layers(&self) -> usize {
        match self {
            Self::Bert(m) => m.config.num_hidden_layers,
            Self::Llama { model, .. } => model.config.layers,
        }
    }

    pub fn hidden_size(&self) -> usize {
        match self {
            Self::Bert(m) => m.config.hidden_size,
            Self::Llama { model, .. } => model.config.hidden_size,
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Bert(m) => m.config.vocab_size,
            Self::Llama { model, .. } => model.config.vocab_size,
        }
    }

    /// The id batches are padded with. The decoder never reads padding (right
    /// padding, masked keys), so any id does; 0 is used.
    pub fn pad_token_id(&self) -> u32 {
        match self {
            Self::Bert(m) => m.config.pad_token_id,
            Self::Llama { .. } => 0,
        }
    }

    /// Whether classification trains a head of its own (BERT) or reads the frozen LM
    /// head (LLaMA: `sharing.head = "none"`).
    pub fn has_head(&self) -> bool {
        matches!(self, Self::Bert(_))
    }

    /// The sites `lora`'s targets select in this model, with each family's names
    /// (`query`/`value` for BERT, `q_proj`/`v_proj` for LLaMA).
    pub fn resolve_sites(&self, lora: &LoraConfig) -> Result<Vec<SiteId>, LoraError> {
        match self {
            Self::Bert(m) => lora.resolve_sites(m.config.num_hidden_layers),
            Self::Llama { model, .. } => lora.resolve_llama_sites(model.config.layers),
        }
    }

    /// A site's name as its family's PEFT writes it.
    pub fn site_name(&self, site: SiteId) -> String {
        match self {
            Self::Bert(_) => site.module_path(),
            Self::Llama { .. } => site.llama_module_path(),
        }
    }

    pub fn site_shapes(&self, sites: &[SiteId]) -> Vec<SiteShape> {
        match self {
            Self::Bert(m) => m.site_shapes(sites),
            Self::Llama { model, .. } => model.site_shapes(sites),
        }
    }

    pub fn check_adapter(&self, params: &LoraParams<F>) -> Result<(), ModelError> {
        match self {
            Self::Bert(m) => m.check_adapter(params),
            Self::Llama { model, .. } => model.check_adapter(params),
        }
    }

    /// Logits for evaluation (no dropout, nothing kept).
    pub fn logits(&self, batch: &Batch, adapter: Adapter<'_, F>) -> Result<Array2<F>, ModelError> {
        match self {
            Self::Bert(m) => m.logits(batch, adapter),
            Self::Llama { model, labels } => model.label_logits(batch, Some(adapter), labels),
        }
    }

    /// Training forward pass.
    pub fn forward(
        &self,
        batch: &Batch,
        adapter: Adapter<'_, F>,
        dropout: Option<Dropout<'_>>,
    ) -> Result<ClassifierForward<F>, ModelError> {
        Ok(match self {
            Self::Bert(m) => ClassifierForward::Bert(m.forward(batch, adapter, dropout)?),
            Self::Llama { model, labels } => {
                ClassifierForward::Llama(model.forward(batch, adapter, dropout, labels)?)
            }
        })
    }

    /// Gradients of every LoRA factor (and the BERT head) from ∂loss/∂logits; the hook
    /// sees every site.
    pub fn backward(
        &self,
        batch: &Batch,
        adapter: Adapter<'_, F>,
        fwd: &ClassifierForward<F>,
        dlogits: &Array2<F>,
        hook: &mut dyn SiteHook<F>,
    ) -> Result<LoraParams<F>, ModelError> {
        match (self, fwd) {
            (Self::Bert(m), ClassifierForward::Bert(f)) => {
                m.backward(batch, adapter, f, dlogits, hook)
            }
            (Self::Llama { model, .. }, ClassifierForward::Llama(f)) => {
                model.backward(batch, adapter, f, dlogits, hook)
            }
            _ => Err(mismatch()),
        }
    }

    /// The gradient at the embeddings the first layer reads.
    pub fn embedding_gradient(
        &self,
        batch: &Batch,
        adapter: Adapter<'_, F>,
        fwd: &ClassifierForward<F>,
        dlogits: &Array2<F>,
    ) -> Result<Array2<F>, ModelError> {
        match (self, fwd) {
            (Self::Bert(m), ClassifierForward::Bert(f)) => {
                m.embedding_gradient(batch, adapter, f, dlogits)
            }
            (Self::Llama { model, .. }, ClassifierForward::Llama(f)) => {
                model.embedding_gradient(batch, adapter, f, dlogits)
            }
            _ => Err(mismatch()),
        }
    }

    /// Every layer's output with `noise` added to the input embeddings.
    pub fn layer_outputs(
        &self,
        batch: &Batch,
        adapter: Option<Adapter<'_, F>>,
        noise: Option<&Array2<F>>,
    ) -> Result<Vec<Array2<F>>, ModelError> {
        match self {
            Self::Bert(m) => m.layer_outputs(batch, adapter, noise),
            Self::Llama { model, .. } => model.layer_outputs(batch, adapter, noise),
        }
    }

    /// A layer's output at what the classifier reads (B × hidden): the mean over real
    /// tokens for BERT, each sequence's last real token for LLaMA (the authors' hidden
    /// state at the classification position).
    pub fn pool(&self, hidden: &Array2<F>, batch: &Batch) -> Array2<F> {
        match self {
            Self::Bert(_) => mean_pool(hidden, batch),
            Self::Llama { .. } => {
                // Right-padded (the decoder refuses other batches): the last real
                // token of sequence b is row b·T + len − 1.
                let t = batch.seq_len;
                let mut out = Array2::zeros((batch.batch, hidden.ncols()));
                for (b, (mut row, len)) in
                    out.axis_iter_mut(Axis(0)).zip(batch.lengths()).enumerate()
                {
                    row.assign(&hidden.row(b * t + len.max(1) - 1));
                }
                out
            }
        }
    }

    /// The encoder, for what only it does (sentence embeddings).
    pub fn as_bert(&self) -> Option<&BertModel<F>> {
        match self {
            Self::Bert(m) => Some(m),
            Self::Llama { .. } => None,
        }
    }
}
