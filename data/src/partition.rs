//! Splitting a dataset among K clients: IID, FedPepTAO's Dirichlet split, and label
//! shards. Every sample goes to exactly one client; a client may get none (tiny data or
//! an extreme Dirichlet draw), which the rounds handle.
//!
//! The test split (the dev file) is divided so that each client's test part looks like
//! its training data: the same size share and, for the non-IID splits, the same class
//! prior. Personalised accuracy is measured on those parts.

use rand::Rng;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma};

use serde::{Deserialize, Serialize};

/// How the data is split among clients (the `[partition]` table of a run config).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum PartitionConfig {
    /// Shuffled and cut into near-equal parts.
    Iid {},
    /// FedPepTAO's non-IID split: client sizes ~ Dir(size_concentration·1_K), class
    /// priors ~ Dir(alpha·1_C); the test split is drawn with the same sizes and priors.
    Dirichlet {
        #[serde(default = "default_alpha")]
        alpha: f64,
        #[serde(default = "default_size_concentration")]
        size_concentration: f64,
    },
    /// Sorted by label and cut into clients·shards_per_client shards; each client gets
    /// `shards_per_client` of them (the "pathological" split of McMahan et al.).
    Shards {
        #[serde(default = "default_shards")]
        shards_per_client: usize,
    },
}

fn default_alpha() -> f64 {
    1.0
}
fn default_size_concentration() -> f64 {
    5.0
}
fn default_shards() -> usize {
    2
}

impl Default for PartitionConfig {
    fn default() -> Self {
        Self::Dirichlet {
            alpha: default_alpha(),
            size_concentration: default_size_concentration(),
        }
    }
}

impl PartitionConfig {
    /// Checks the settings; each message names the `[partition]` key.
    pub fn validate(&self) -> Result<()> {
        match *self {
            Self::Dirichlet {
                alpha,
                size_concentration,
            } if !(alpha > 0.0
                && alpha.is_finite()
                && size_concentration > 0.0
                && size_concentration.is_finite()) =>
            {
                Err(PartitionError::Dirichlet {
                    alpha,
                    size_concentration,
                })
            }
            Self::Shards { shards_per_client }
                if shards_per_client == 0 || shards_per_client > 1_000_000 =>
            {
                Err(PartitionError::Shards { shards_per_client })
            }
            _ => Ok(()),
        }
    }
}

/// Why a split could not be made; each names what was wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PartitionError {
    #[error("partition: at least one client is needed")]
    NoClients,
    #[error("partition: label id {label} is not below the class count {classes}")]
    LabelOutOfRange { label: usize, classes: usize },
    #[error(
        "partition: alpha and size_concentration must be positive and finite, got {alpha} and {size_concentration}"
    )]
    Dirichlet { alpha: f64, size_concentration: f64 },
    #[error(
        "partition.shards_per_client: must be between 1 and 1,000,000, got {shards_per_client}"
    )]
    Shards { shards_per_client: usize },
    #[error(
        "partition.shards_per_client = {shards_per_client} with {clients} clients makes {} shards, more than the {examples} training examples and the limit of 1,000,000: lower shards_per_client or federation.clients",
        shards_per_client.saturating_mul(*clients)
    )]
    TooManyShards {
        shards_per_client: usize,
        clients: usize,
        examples: usize,
    },
    #[error("Dirichlet concentration {concentration}: {reason}")]
    Concentration { concentration: f64, reason: String },
}

type Result<T> = std::result::Result<T, PartitionError>;

/// Shards beyond the training examples that a split still makes (empty ones).
pub const MAX_SHARDS: usize = 1_000_000;

/// Sample indices per client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub train: Vec<Vec<usize>>,
    pub test: Vec<Vec<usize>>,
}

/// Splits `train_labels` and `test_labels` (class ids < `classes`) among `clients`.
pub fn partition(
    config: &PartitionConfig,
    train_labels: &[usize],
    test_labels: &[usize],
    classes: usize,
    clients: usize,
    seed: u64,
) -> Result<Partition> {
    if clients == 0 {
        return Err(PartitionError::NoClients);
    }
    if let Some(&y) = train_labels
        .iter()
        .chain(test_labels)
        .find(|&&y| y >= classes)
    {
        return Err(PartitionError::LabelOutOfRange { label: y, classes });
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    match *config {
        PartitionConfig::Iid {} => Ok(Partition {
            train: iid(train_labels.len(), clients, &mut rng),
            test: iid(test_labels.len(), clients, &mut rng),
        }),
        PartitionConfig::Dirichlet {
            alpha,
            size_concentration,
        } => {
            let shares = dirichlet(&vec![size_concentration; clients], &mut rng)?;
            let priors: Vec<Vec<f64>> = (0..clients)
                .map(|_| dirichlet(&vec![alpha; classes], &mut rng))
                .collect::<Result<_>>()?;
            let train = draw(train_labels, classes, &shares, &priors, &mut rng);
            let test = draw(test_labels, classes, &shares, &priors, &mut rng);
            Ok(Partition { train, test })
        }
        PartitionConfig::Shards { shards_per_client } => {
            // Checked before anything is allocated: one piece per shard. More shards
            // than examples only leaves some clients empty (configs that did so ran
            // before, and still do), up to a count whose pieces fit in memory.
            if shards_per_client.saturating_mul(clients) > train_labels.len().max(MAX_SHARDS) {
                return Err(PartitionError::TooManyShards {
                    shards_per_client,
                    clients,
                    examples: train_labels.len(),
                });
            }
            let train = shards(train_labels, clients, shards_per_client, &mut rng);
            // Each client's test part follows its training classes and size.
            let sizes: Vec<f64> = train.iter().map(|c| c.len() as f64).collect();
            let total: f64 = sizes.iter().sum();
            let shares: Vec<f64> = sizes.iter().map(|s| s / total.max(1.0)).collect();
            let priors: Vec<Vec<f64>> = train
                .iter()
                .map(|ids| {
                    let mut h = vec![0.0; classes];
                    for &i in ids {
                        h[train_labels[i]] += 1.0;
                    }
                    h
                })
                .collect();
            let test = draw(test_labels, classes, &shares, &priors, &mut rng);
            Ok(Partition { train, test })
        }
    }
}

/// A shuffle cut into near-equal parts (sizes differ by at most one).
fn iid(n: usize, clients: usize, rng: &mut ChaCha8Rng) -> Vec<Vec<usize>> {
    let mut ids: Vec<usize> = (0..n).collect();
    ids.shuffle(rng);
    cut(&ids, &apportion(&vec![1.0; clients], n))
}

/// Consecutive pieces of `ids` of the given sizes (which sum to its length).
fn cut(ids: &[usize], sizes: &[usize]) -> Vec<Vec<usize>> {
    let mut out = Vec::with_capacity(sizes.len());
    let mut rest = ids;
    for &s in sizes {
        let (head, tail) = rest.split_at(s.min(rest.len()));
        out.push(head.to_vec());
        rest = tail;
    }
    out
}

/// A draw from Dir(concentration) by normalised Gamma variates.
fn dirichlet(concentration: &[f64], rng: &mut ChaCha8Rng) -> Result<Vec<f64>> {
    let mut g = Vec::with_capacity(concentration.len());
    for &c in concentration {
        let gamma = Gamma::new(c, 1.0).map_err(|e| PartitionError::Concentration {
            concentration: c,
            reason: e.to_string(),
        })?;
        g.push(gamma.sample(rng));
    }
    let sum: f64 = g.iter().sum();
    if sum > 0.0 && sum.is_finite() {
        Ok(g.into_iter().map(|v| v / sum).collect())
    } else {
        // Every variate underflowed (tiny concentrations): fall back to uniform.
        Ok(vec![1.0 / concentration.len() as f64; concentration.len()])
    }
}

/// Sizes proportional to `shares` that sum to exactly `n` (largest remainders, ties to
/// the lower index).
pub fn apportion(shares: &[f64], n: usize) -> Vec<usize> {
    let total: f64 = shares.iter().sum();
    let exact: Vec<f64> = shares
        .iter()
        .map(|s| {
            if total > 0.0 {
                s / total * n as f64
            } else {
                0.0
            }
        })
        .collect();
    let mut sizes: Vec<usize> = exact.iter().map(|e| e.floor() as usize).collect();
    let given: usize = sizes.iter().sum();
    let mut order: Vec<usize> = (0..shares.len()).collect();
    order.sort_by(|&a, &b| {
        let (ra, rb) = (exact[a] - exact[a].floor(), exact[b] - exact[b].floor());
        rb.total_cmp(&ra).then(a.cmp(&b))
    });
    for &k in order.iter().cycle().take(n.saturating_sub(given)) {
        sizes[k] += 1;
    }
    sizes
}

/// Client k draws its share of `labels` class by class from its prior, renormalised
/// over the classes that still have samples; a client whose classes are exhausted takes
/// from the rest in proportion to what is left. Every sample is drawn exactly once.
fn draw(
    labels: &[usize],
    classes: usize,
    shares: &[f64],
    priors: &[Vec<f64>],
    rng: &mut ChaCha8Rng,
) -> Vec<Vec<usize>> {
    let mut pools: Vec<Vec<usize>> = vec![Vec::new(); classes];
    for (i, &y) in labels.iter().enumerate() {
        pools[y].push(i);
    }
    for p in &mut pools {
        p.shuffle(rng);
    }
    let sizes = apportion(shares, labels.len());
    let mut out = Vec::with_capacity(sizes.len());
    for (k, &size) in sizes.iter().enumerate() {
        let mut mine = Vec::with_capacity(size);
        for _ in 0..size {
            let weights: Vec<f64> = (0..classes)
                .map(|c| {
                    if pools[c].is_empty() {
                        0.0
                    } else {
                        priors[k][c]
                    }
                })
                .collect();
            let weights = if weights.iter().sum::<f64>() > 0.0 {
                weights
            } else {
                pools.iter().map(|p| p.len() as f64).collect()
            };
            let c = pick(&weights, rng);
            if let Some(i) = pools[c].pop() {
                mine.push(i);
            }
        }
        mine.sort_unstable();
        out.push(mine);
    }
    out
}

/// An index drawn with probability ∝ `weights` (some weight is positive).
fn pick(weights: &[f64], rng: &mut ChaCha8Rng) -> usize {
    let total: f64 = weights.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (i, &w) in weights.iter().enumerate() {
        if w > 0.0 {
            if u < w {
                return i;
            }
            u -= w;
        }
    }
    // Float rounding left u at the very top: the last class with weight.
    weights.iter().rposition(|&w| w > 0.0).unwrap_or(0)
}

/// Sorted by label (ties shuffled), cut into clients·per_client near-equal shards, the
/// shards dealt out at random.
fn shards(
    labels: &[usize],
    clients: usize,
    per_client: usize,
    rng: &mut ChaCha8Rng,
) -> Vec<Vec<usize>> {
    let mut ids: Vec<usize> = (0..labels.len()).collect();
    ids.shuffle(rng);
    ids.sort_by_key(|&i| labels[i]);
    let count = clients * per_client;
    let mut pieces = cut(&ids, &apportion(&vec![1.0; count], ids.len()));
    pieces.shuffle(rng);
    pieces
        .chunks(per_client)
        .map(|group| {
            let mut mine: Vec<usize> = group.concat();
            mine.sort_unstable();
            mine
        })
        .collect()
}
