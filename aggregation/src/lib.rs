//! Server-side aggregation over named tensors, and byte accounting of what travels.
//!
//! Owns the arithmetic on a [`Tensors`] map (PEFT tensor name → f32 array: the
//! workspace's `fibecfed_core::NamedTensors`, under the name this crate's API uses):
//! - [`weights`] and [`weighted_mean`]: the FedAvg n_k-weighted mean, accumulated in
//!   f64 in ascending client order, so the result does not depend on arrival order;
//! - the [`Aggregator`] trait with [`FedAvg`], [`FedAdam`] and [`FedYogi`] (Reddi et al.
//!   2021, settings in [`ServerOptConfig`]), whose state can be saved and restored
//!   bit-exactly (configs name them through `fibecfed-sim`'s registry);
//! - [`FedProx`], the client-side proximal term;
//! - [`message_bytes`] and [`payload_bytes`]: what one upload costs on the wire.
//!
//! What it does not do: choose layers or clients, or train. The caller restricts a
//! round to some layers by choosing names ([`restrict`]); the simulator (`fibecfed-sim`)
//! runs the clients and calls the aggregator.
//!
//! ```
//! use fibecfed_aggregation::{Aggregator, FedAvg, Tensors, Update};
//! use ndarray::arr1;
//! let named = |v: [f32; 2]| -> Tensors { [("w".to_string(), arr1(&v).into_dyn())].into() };
//! let global = named([0.0, 0.0]);
//! let updates = [
//!     Update { client: 0, samples: 1, tensors: named([1.0, 4.0]) },
//!     Update { client: 1, samples: 3, tensors: named([5.0, 0.0]) },
//! ];
//! let new = FedAvg.aggregate(&global, &updates).unwrap();
//! // (1·1 + 3·5) / 4 = 4 and (1·4 + 3·0) / 4 = 1.
//! assert_eq!(new["w"].as_slice().unwrap(), &[4.0, 1.0]);
//! ```

mod adaptive;
mod prox;

use std::borrow::Cow;
use std::collections::BTreeMap;

use ndarray::{ArrayD, Zip};

pub use adaptive::{FedAdam, FedYogi, ServerOptConfig};
pub use prox::FedProx;

/// PEFT tensor name → f32 array: the workspace's one named-tensor map, re-exported
/// under the name aggregation code (and `fibecfed-sim`) has always used.
pub use fibecfed_core::NamedTensors as Tensors;

/// One client's upload for a round.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    /// Client id; updates are summed in ascending id order.
    pub client: usize,
    /// Local training samples n_k, the FedAvg weight.
    pub samples: usize,
    pub tensors: Tensors,
}

/// Everything this crate can refuse: the message names the client, tensor or setting.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AggregationError {
    #[error("nothing to aggregate: no clients or no updates")]
    Empty,
    #[error("the clients' sample counts sum to zero, so FedAvg weights are undefined")]
    NoSamples,
    #[error("client {0} sent more than one update this round")]
    DuplicateClient(usize),
    #[error("client {client}, tensor `{tensor}`: {what}")]
    Mismatch {
        client: usize,
        tensor: String,
        what: String,
    },
    #[error("client {client}, tensor `{tensor}`: a value is NaN or infinite")]
    NonFinite { client: usize, tensor: String },
    #[error("aggregation settings: {0}")]
    Config(String),
    #[error("aggregator state: {0}")]
    State(String),
    #[error("lengths differ: {0}")]
    Length(String),
    #[error("safetensors message: {0}")]
    Serialize(String),
}

/// A server aggregation rule. Implementations must be deterministic.
pub trait Aggregator: std::fmt::Debug + Send + Sync {
    /// Short name used in configs and metrics ("fedavg", "fedadam", "fedyogi").
    fn name(&self) -> &str;
    /// The new global tensors from the current global and this round's updates (at
    /// least one). Every update must carry exactly the names and shapes of `global`.
    fn aggregate(
        &mut self,
        global: &Tensors,
        updates: &[Update],
    ) -> Result<Tensors, AggregationError>;
    /// Everything needed to continue bit-exactly after a restart; empty when stateless.
    fn state(&self) -> Tensors;
    /// Restores [`Aggregator::state`]'s output; wrong names or shapes are refused.
    fn load_state(&mut self, state: &Tensors) -> Result<(), AggregationError>;
}

/// Plain FedAvg (McMahan et al. 2017): the new global is [`weighted_mean`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FedAvg;

impl Aggregator for FedAvg {
    fn name(&self) -> &'static str {
        "fedavg"
    }

    fn aggregate(
        &mut self,
        global: &Tensors,
        updates: &[Update],
    ) -> Result<Tensors, AggregationError> {
        weighted_mean(global, updates)
    }

    fn state(&self) -> Tensors {
        Tensors::new()
    }

    fn load_state(&mut self, state: &Tensors) -> Result<(), AggregationError> {
        match state.keys().next() {
            None => Ok(()),
            Some(name) => Err(AggregationError::State(format!(
                "fedavg keeps no state, but `{name}` was given"
            ))),
        }
    }
}

/// FedAvg weights n_k / Σ n, each computed in f64.
pub fn weights(samples: &[usize]) -> Result<Vec<f64>, AggregationError> {
    if samples.is_empty() {
        return Err(AggregationError::Empty);
    }
    let total = total_samples(samples.iter().copied())?;
    Ok(samples.iter().map(|&n| n as f64 / total).collect())
}

/// Σ n as f64; summed in u128 so that no count can overflow before the conversion.
fn total_samples(samples: impl Iterator<Item = usize>) -> Result<f64, AggregationError> {
    let total: u128 = samples.map(|n| n as u128).sum();
    if total == 0 {
        return Err(AggregationError::NoSamples);
    }
    Ok(total as f64)
}

/// The tensors whose names satisfy `keep`.
pub fn restrict(tensors: &Tensors, keep: impl Fn(&str) -> bool) -> Tensors {
    tensors
        .iter()
        .filter(|(name, _)| keep(name))
        .map(|(name, t)| (name.clone(), t.clone()))
        .collect()
}

/// The n_k-weighted mean of the updates, which must carry exactly the names and shapes
/// of `reference` (the current global) and only finite values.
///
/// Σ n_k·x_k is accumulated in f64 in ascending client id order and divided by Σ n_k
/// once, so the result is independent of arrival order and identical updates give
/// back their values exactly (n·x is exact in f64 for an f32 x and any realistic n).
pub fn weighted_mean(reference: &Tensors, updates: &[Update]) -> Result<Tensors, AggregationError> {
    Ok(mean_f64(reference, updates)?
        .into_iter()
        .map(|(name, t)| (name, t.mapv(|x| x as f32)))
        .collect())
}

/// [`weighted_mean`] before rounding to f32, so that FedAdam/FedYogi's pseudo-gradient
/// carries no extra rounding.
pub(crate) fn mean_f64(
    reference: &Tensors,
    updates: &[Update],
) -> Result<BTreeMap<String, ArrayD<f64>>, AggregationError> {
    let mut order: Vec<&Update> = updates.iter().collect();
    order.sort_by_key(|u| u.client);
    if let Some(pair) = order.windows(2).find(|p| p[0].client == p[1].client) {
        return Err(AggregationError::DuplicateClient(pair[0].client));
    }
    if order.is_empty() {
        return Err(AggregationError::Empty);
    }
    for update in &order {
        check_update(reference, update)?;
    }
    let total = total_samples(order.iter().map(|u| u.samples))?;
    let mut mean = BTreeMap::new();
    for (name, global) in reference {
        // −0 is the additive identity in IEEE arithmetic (+0 is not: −0 + +0 = +0), so
        // identical updates of −0 come back as −0 and the identity holds bitwise.
        let mut acc = ArrayD::<f64>::from_elem(global.raw_dim(), -0.0);
        for update in &order {
            let n = update.samples as f64;
            Zip::from(&mut acc)
                .and(&update.tensors[name])
                .for_each(|a, &x| *a += n * f64::from(x));
        }
        acc.mapv_inplace(|a| a / total);
        mean.insert(name.clone(), acc);
    }
    Ok(mean)
}

fn check_update(reference: &Tensors, update: &Update) -> Result<(), AggregationError> {
    let mismatch = |tensor: &str, what: String| AggregationError::Mismatch {
        client: update.client,
        tensor: tensor.to_string(),
        what,
    };
    for (name, global) in reference {
        let Some(t) = update.tensors.get(name) else {
            return Err(mismatch(name, "missing from the update".into()));
        };
        if t.shape() != global.shape() {
            return Err(mismatch(
                name,
                format!(
                    "shape {:?}, but the global has {:?}",
                    t.shape(),
                    global.shape()
                ),
            ));
        }
        if !t.iter().all(|x| x.is_finite()) {
            return Err(AggregationError::NonFinite {
                client: update.client,
                tensor: name.clone(),
            });
        }
    }
    match update
        .tensors
        .keys()
        .find(|name| !reference.contains_key(*name))
    {
        Some(extra) => Err(mismatch(extra, "not among the global tensors".into())),
        None => Ok(()),
    }
}

/// Data bytes of one message: 4 per f32 element, without the safetensors header.
pub fn payload_bytes(tensors: &Tensors) -> u64 {
    tensors.values().map(|t| 4 * t.len() as u64).sum()
}

/// Exact size in bytes of one message carrying `tensors` as a safetensors file (8-byte
/// header length, padded JSON header, f32 little-endian data). Measured by serialising:
/// the header's JSON (names, shapes, offsets, padding) is only exact that way, and LoRA
/// messages are small.
pub fn message_bytes(tensors: &Tensors) -> Result<u64, AggregationError> {
    let views = tensors.iter().map(|(name, t)| (name.as_str(), F32View(t)));
    let bytes = safetensors::serialize(views, None)
        .map_err(|e| AggregationError::Serialize(e.to_string()))?;
    Ok(bytes.len() as u64)
}

/// An f32 array seen as safetensors data, in logical (row-major) order whatever its layout.
struct F32View<'a>(&'a ArrayD<f32>);

impl safetensors::View for F32View<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        self.0.shape()
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.0.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    fn data_len(&self) -> usize {
        4 * self.0.len()
    }
}
