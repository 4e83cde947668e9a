//! The data of a federated run: reading the nine TSV dataset layouts ([`tsv`]),
//! tokenised samples and the padded batches made of them ([`samples`]), and splitting
//! a dataset among clients ([`partition`]: IID, FedPepTAO's Dirichlet split, label
//! shards).
//!
//! Owns everything between a dataset file and one client's list of samples. Does not
//! own the model (the tokenizer and the batch type come from `fibecfed-transformer`),
//! training, or the run's config file (`fibecfed-sim` reads the `[partition]` table
//! into [`PartitionConfig`]). A Python binding or another tool can use it on its own.
//!
//! ```no_run
//! use std::path::Path;
//! use fibecfed_data::{PartitionConfig, partition, read_tsv};
//!
//! let ds = read_tsv(Path::new("../shared/data/mr/dev.tsv"))?;
//! assert_eq!(ds.label_names, ["0", "1"]);
//! let labels: Vec<usize> = ds.examples.iter().map(|e| e.label).collect();
//! let parts = partition(&PartitionConfig::default(), &labels, &labels, 2, 10, 42)?;
//! assert_eq!(parts.train.len(), 10);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod partition;
pub mod samples;
pub mod tsv;
pub mod verbalizer;

pub use partition::{Partition, PartitionConfig, PartitionError, apportion, partition};
pub use samples::{
    Sample, TokenizeError, batch_of, by_length, length_batches, limit_samples, padded_tokens,
    tokenize,
};
pub use tsv::{
    DataError, Dataset, Example, GenericLayout, Layout, read_train_eval, read_tsv, read_tsv_with,
};
pub use verbalizer::{Verbalizer, authors_verbalizer};
