//! The state of a run, as the engine keeps it between rounds and a checkpoint saves
//! it: the clients' data and states, the global tensors and the metrics so far.

use fibecfed_aggregation::Tensors;
use fibecfed_data::Sample;
use fibecfed_fisher::FisherMomentum;
use fibecfed_lora::{AdamW, LoraParams, SiteId};
use serde::{Deserialize, Serialize};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundMetrics {
    pub round: usize,
    pub method: String,
    pub seed: u64,
    /// Personalised accuracy: every client's own model on its own test part, weighted
    /// by test size; `null` in a round not evaluated (`federation.eval_every`).
    pub accuracy: Option<f64>,
    /// Mean test loss over the test samples whose logits are finite; `null` in a round
    /// not evaluated.
    pub loss: Option<f64>,
    /// false in the rounds `federation.eval_every` skips (written only then, so runs
    /// that evaluate every round keep their metrics lines as they were).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub evaluated: bool,
    /// Test samples whose logits were not finite (a diverged personalised model):
    /// counted as wrong, left out of `loss`.
    pub eval_non_finite: usize,
    /// Mean training loss over the round's samples (none in round 0).
    pub train_loss: Option<f64>,
    /// Samples trained on this round (summed over clients and epochs).
    pub train_samples: usize,
    /// Padded tokens through forward+backward this round (training and scoring).
    pub tokens: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub cum_bytes_up: u64,
    pub cum_bytes_down: u64,
    /// Simulated round time: the slowest participating client under the cost model.
    pub sim_seconds: f64,
    pub cum_sim_seconds: f64,
    /// Measured; the only field that differs between identical runs.
    pub wall_seconds: f64,
    pub selected: Vec<usize>,
    /// Selected clients that failed (simulated dropout) and sent nothing.
    pub dropped: Vec<usize>,
    /// Clients whose loss became NaN or infinite: left out of the aggregate, their
    /// state rolled back.
    pub diverged: Vec<usize>,
    /// Selected clients without training data.
    pub empty: Vec<usize>,
    /// The global layers.
    pub gal: Vec<usize>,
    /// With `[sparse.prune]`: the LoRA output neurons pruned on each client (the same
    /// count on every client: ⌈ratio·n⌉ of the n neurons of its own layers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pruned_neurons: Option<usize>,
    /// With a batch curriculum: per selected client (in `selected` order), the
    /// curriculum batches it trained on in each epoch; 0 when it did not train.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub curriculum_batches: Option<Vec<usize>>,
}

fn yes() -> bool {
    true
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if lends it
fn is_true(v: &bool) -> bool {
    *v
}

/// A client's data.
#[derive(Debug, Clone)]
pub struct ClientData {
    pub train: Vec<Sample>,
    pub test: Vec<Sample>,
}

/// What a client keeps between rounds.
#[derive(Debug, Clone)]
pub struct ClientState {
    /// Its full adapter: the global tensors are overwritten when it is selected, the
    /// rest is personal.
    pub params: LoraParams<f32>,
    pub opt: AdamW<f32>,
    pub momentum: Option<FisherMomentum<SiteId>>,
    /// Easy → hard order of its training samples, when a curriculum is in use.
    pub order: Option<Vec<usize>>,
    pub last_scored: Option<usize>,
    /// With a batch curriculum: the lengths of the consecutive batches `order` is cut
    /// into (easy → hard).
    pub batch_lens: Option<Vec<usize>>,
    /// With `[sparse.prune]`: per LoRA site, in `params.sites` order, its pruned
    /// output neurons (ascending); empty for the global layers' sites.
    pub pruned: Option<Vec<Vec<usize>>>,
    /// With `federation.prepare = "on_selection"`: the preparation still owed before
    /// the client's first training round (nothing in the default, up-front mode).
    pub pending: Pending,
}

/// Round-0 work a client defers to the first round it trains in; done then with the
/// initial adapter and round 0's seeds, so that it yields what it would have yielded
/// up front.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// The curriculum's scoring pass (and the Fisher momentum's seed).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub score: bool,
    /// The pruning mask's epochs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub prune: bool,
}

impl Pending {
    pub fn any(self) -> bool {
        self.score || self.prune
    }
}

impl ClientState {
    /// The neurons pruned on this client (0 without pruning).
    pub fn pruned_count(&self) -> usize {
        self.pruned
            .as_ref()
            .map_or(0, |p| p.iter().map(Vec::len).sum())
    }
}

/// Everything a checkpoint restores.
#[derive(Debug, Clone)]
pub struct RunState {
    /// Rounds finished (0 = only the initialisation).
    pub round: usize,
    pub gal: Vec<usize>,
    pub global: Tensors,
    pub clients: Vec<ClientState>,
    pub history: Vec<RoundMetrics>,
}

/// What one client's round produced ([`Engine::run_client`]).
#[derive(Debug, Clone)]
pub struct ClientRound {
    /// The tensors of the global layers, by PEFT name (empty when nothing is shared).
    pub upload: Tensors,
    /// Mean training loss over the samples seen.
    pub train_loss: f64,
    /// Samples trained on (over all local epochs).
    pub samples: usize,
    pub tokens: u64,
}
