//! The federated-simulation glue and the `fibecfed` command-line tool.
//!
//! Owns: reading the nine TSV dataset layouts ([`data`]), partitioning them among
//! clients ([`partition`]), the federated rounds of every method ([`engine`], driven by a
//! TOML [`config`] whose pluggable parts are looked up in a [`registry`]), per-round
//! [`checkpoint`]s and the `fibecfed run` command ([`run`]), centralised LoRA training
//! ([`train`]), the Fisher pass that scores a client's samples and layers ([`fisher`]),
//! sentence embeddings ([`embed`]), safe output files ([`output`]) and the Flower
//! participant of `fibecfed client` ([`participant`]). The numerics live
//! in `fibecfed-transformer`, `fibecfed-lora`, `fibecfed-fisher`, `fibecfed-curriculum`
//! and `fibecfed-aggregation`.
//!
//! ```no_run
//! use std::path::Path;
//! let ds = fibecfed_sim::data::read_tsv(Path::new("../shared/data/mr/dev.tsv"))?;
//! assert_eq!(ds.label_names, ["0", "1"]);
//! # Ok::<(), fibecfed_sim::data::DataError>(())
//! ```

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod embed;
pub mod engine;
pub mod fisher;
pub mod output;
pub mod participant;
pub mod partition;
pub mod registry;
pub mod run;
pub mod train;
