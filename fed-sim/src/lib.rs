//! The federated simulation and the `fibecfed` command-line tool.
//!
//! Owns the federated rounds of every method: one [`engine::Engine`] driven by a TOML
//! [`config`] whose pluggable parts (difficulty scorer, ordering, pacing, layer
//! selector, aggregator) are looked up by name in a [`registry`]; one client's round
//! (`local`: curriculum subset or batches, masked steps, the one-time pruning mask,
//! what it uploads); checkpoints and resume (`checkpoint`); the Fisher pass that scores
//! a client's samples and layers, and the adversarial layer sensitivity ([`fisher`]);
//! the OpenBLAS kernel family a run asks for ([`blas`]); the server's steps on their
//! own ([`server`], which the engine computes its rounds with) and a client that runs
//! anywhere ([`node`]), for a deployment whose server and clients are apart (the
//! Flower App, through the Python bindings); and the commands of [`cli`]
//! (`run`, `train`, `client`, `fisher`,
//! `embed`). Does not own the numerics (`fibecfed-transformer`, `fibecfed-lora`,
//! `fibecfed-fisher`, `fibecfed-curriculum`, `fibecfed-aggregation`), the data
//! (`fibecfed-data`) or the Flower transport (`fibecfed-flower`).
//!
//! ```no_run
//! use std::path::Path;
//! use fibecfed_sim::config::RunConfig;
//! use fibecfed_sim::registry::Registry;
//!
//! let config = RunConfig::load(Path::new("configs/fibecfed.toml"))?;
//! Registry::builtin().check(&config)?; // every component it names exists
//! # Ok::<(), anyhow::Error>(())
//! ```

pub mod blas;
pub mod cli;
pub mod config;
pub mod engine;
pub mod fisher;
pub mod node;
pub mod registry;
pub mod server;

mod checkpoint;
mod embed;
pub mod eval;
mod local;
mod model;
mod output;
mod participant;
mod run;
mod state;
mod step;
mod train;
