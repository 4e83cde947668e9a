//! The native half of the Python package `fibecfed`: a FibecFed client ([`Node`]) and
//! the server's steps ([`Server`]) of `fibecfed-sim`, for a Flower ServerApp and
//! ClientApp (or any other transport) to call.
//!
//! Owns only the crossing between Python and Rust: tensors arrive as
//! `(name, shape, buffer)` triples read through the buffer protocol (one copy, into
//! the Rust-owned array) and leave as `(name, shape, bytes)` triples that the Python
//! half views with `numpy.frombuffer` (no further copy); structured values (reports,
//! replies, metrics) cross as JSON, whose floats round-trip exactly. Every Rust error
//! becomes a `fibecfed.FibecfedError` carrying the message the command-line tool would
//! print. The numerics, the state on disk and the accounting are `fibecfed-sim`'s; the
//! Python half (`python/fibecfed/__init__.py`) gives them a numpy-facing API.

// pyo3 extracts Python arguments into owned values (Vec, PathBuf).
#![allow(clippy::needless_pass_by_value)]

use std::path::PathBuf;

use anyhow::{Context, anyhow};
use fibecfed_aggregation::Tensors;
use fibecfed_sim::config::RunConfig;
use fibecfed_sim::eval::EvalCounts;
use fibecfed_sim::node::{Node as RustNode, NodePaths};
use fibecfed_sim::registry::Registry;
use fibecfed_sim::server::{Federation, LayerReport, Reply};
use ndarray::ArrayD;
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use serde_json::{Value, json};

pyo3::create_exception!(
    fibecfed,
    FibecfedError,
    PyException,
    "An error of the Rust side; the message names the file, key or value at fault."
);

/// The message of an error with its whole context chain on one line, as the
/// command-line tool prints it.
fn py_err(e: &anyhow::Error) -> PyErr {
    FibecfedError::new_err(format!("{e:#}"))
}

/// A tensor as it crosses: name, shape and the f32 values (a buffer on the way in,
/// native-endian bytes on the way out).
type Triple<'py> = (String, Vec<usize>, Bound<'py, PyAny>);
type OutTriple = (String, Vec<usize>, Py<PyBytes>);

fn tensors_in(py: Python<'_>, triples: Vec<Triple<'_>>) -> PyResult<Tensors> {
    let mut out = Tensors::new();
    for (name, shape, data) in triples {
        let buffer = PyBuffer::<f32>::get(&data).map_err(|e| {
            FibecfedError::new_err(format!(
                "tensor {name}: not a buffer of float32 values ({e})"
            ))
        })?;
        let n: usize = shape.iter().product();
        if buffer.item_count() != n {
            return Err(FibecfedError::new_err(format!(
                "tensor {name}: {} values for shape {shape:?}",
                buffer.item_count()
            )));
        }
        if !buffer.is_c_contiguous() {
            return Err(FibecfedError::new_err(format!(
                "tensor {name}: not C-contiguous"
            )));
        }
        let values = buffer.to_vec(py)?;
        let a = ArrayD::from_shape_vec(shape, values)
            .map_err(|e| FibecfedError::new_err(format!("tensor {name}: {e}")))?;
        if out.insert(name.clone(), a).is_some() {
            return Err(FibecfedError::new_err(format!("tensor {name} given twice")));
        }
    }
    Ok(out)
}

fn tensors_out(py: Python<'_>, tensors: &Tensors) -> Vec<OutTriple> {
    tensors
        .iter()
        .map(|(name, a)| {
            let bytes: Vec<u8> = a.iter().flat_map(|v| v.to_ne_bytes()).collect();
            (
                name.clone(),
                a.shape().to_vec(),
                PyBytes::new(py, &bytes).unbind(),
            )
        })
        .collect()
}

fn counts_json(c: &EvalCounts, n: usize) -> Value {
    json!({
        "correct": c.correct,
        "loss_sum": c.loss_sum,
        "non_finite": c.non_finite,
        "n": n,
    })
}

fn counts_of(v: &Value) -> anyhow::Result<(EvalCounts, usize)> {
    let int = |key: &str| {
        v.get(key)
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .ok_or_else(|| anyhow!("evaluation: {key:?} must be a non-negative integer"))
    };
    let loss_sum = v
        .get("loss_sum")
        .and_then(Value::as_f64)
        .ok_or_else(|| anyhow!("evaluation: \"loss_sum\" must be a number"))?;
    Ok((
        EvalCounts {
            correct: int("correct")?,
            loss_sum,
            non_finite: int("non_finite")?,
        },
        int("n")?,
    ))
}

fn parse(text: &str, what: &str) -> anyhow::Result<Value> {
    serde_json::from_str(text).with_context(|| format!("{what}: not JSON"))
}

/// One FibecFed client: `Node(config, client_id, model_dir=None, train=None,
/// test=None, state_dir=None)`. With `state_dir`, each step reads and writes the
/// client's state there (so a new process can continue it); without, it lives in
/// memory. `model_dir` overrides the config's model path: its folder, or for a LLaMA
/// config (`model.kind = "llama"`) its GGUF file.
#[pyclass(module = "fibecfed._native")]
struct Node {
    inner: RustNode,
}

#[pymethods]
impl Node {
    #[new]
    #[pyo3(signature = (config, client_id, model_dir=None, train=None, test=None, state_dir=None))]
    fn new(
        py: Python<'_>,
        config: PathBuf,
        client_id: usize,
        model_dir: Option<PathBuf>,
        train: Option<PathBuf>,
        test: Option<PathBuf>,
        state_dir: Option<PathBuf>,
    ) -> PyResult<Self> {
        let paths = NodePaths {
            model_dir,
            train,
            test,
            state_dir,
        };
        let inner = py
            .detach(|| RustNode::new(&config, client_id, &paths, &Registry::builtin()))
            .map_err(|e| py_err(&e))?;
        Ok(Self { inner })
    }

    /// The client id.
    #[getter]
    fn client_id(&self) -> usize {
        self.inner.client()
    }

    /// (training examples, test examples) of this client.
    #[getter]
    fn sizes(&self) -> (usize, usize) {
        self.inner.sizes()
    }

    /// SHA-256 of the config without its paths: the server checks every node runs
    /// its config.
    #[getter]
    fn config_digest(&self) -> String {
        self.inner.config_digest().to_owned()
    }

    /// The layer report (JSON): client, train, test, importance, tokens, layers, and
    /// what a server checks: config_digest, data_digest, round (the last it trained
    /// in) and set_up (whether it has its global layers).
    fn report_json(&mut self, py: Python<'_>) -> PyResult<String> {
        let (r, round, set_up) = py.detach(|| self.inner.report()).map_err(|e| py_err(&e))?;
        Ok(json!({
            "data_digest": self.inner.data_digest(),
            "round": round,
            "set_up": set_up,
            "client": r.client,
            "train": r.train,
            "test": r.test,
            "importance": r.importance,
            "tokens": r.tokens,
            "layers": r.layers,
            "config_digest": self.inner.config_digest(),
        })
        .to_string())
    }

    /// Round 0 once the global layers are known: (JSON {tokens, pruned}, initial
    /// global tensors).
    fn setup(&mut self, py: Python<'_>, gal: Vec<usize>) -> PyResult<(String, Vec<OutTriple>)> {
        let s = py
            .detach(|| self.inner.setup(&gal))
            .map_err(|e| py_err(&e))?;
        let meta = json!({"tokens": s.tokens, "pruned": s.pruned}).to_string();
        Ok((meta, tensors_out(py, &s.initial)))
    }

    /// Round t on the global tensors (of the global layers `gal`, when given):
    /// (JSON {loss_sum, samples, tokens, batches, diverged}, uploaded tensors or None).
    #[pyo3(signature = (round, global, gal=None))]
    fn fit(
        &mut self,
        py: Python<'_>,
        round: usize,
        global: Vec<Triple<'_>>,
        gal: Option<Vec<usize>>,
    ) -> PyResult<(String, Option<Vec<OutTriple>>)> {
        let global = tensors_in(py, global)?;
        let reply = py
            .detach(|| self.inner.fit(round, &global, gal.as_deref()))
            .map_err(|e| py_err(&e))?;
        Ok(match reply {
            Reply::Trained {
                upload,
                loss_sum,
                samples,
                tokens,
                batches,
            } => (
                json!({
                    "loss_sum": loss_sum,
                    "samples": samples,
                    "tokens": tokens,
                    "batches": batches,
                    "diverged": null,
                })
                .to_string(),
                upload.map(|u| tensors_out(py, &u)),
            ),
            Reply::Diverged { why, tokens } => {
                (json!({"tokens": tokens, "diverged": why}).to_string(), None)
            }
        })
    }

    /// Its personalised model on its test part: JSON {correct, loss_sum, non_finite,
    /// n}. With `round`, refused when the client's state is past that round.
    #[pyo3(signature = (global, round=None))]
    fn evaluate_json(
        &mut self,
        py: Python<'_>,
        global: Vec<Triple<'_>>,
        round: Option<usize>,
    ) -> PyResult<String> {
        let global = tensors_in(py, global)?;
        let (c, n) = py
            .detach(|| self.inner.evaluate(&global, round))
            .map_err(|e| py_err(&e))?;
        Ok(counts_json(&c, n).to_string())
    }

    /// Writes the client's state (and its progress) to one file.
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        py.detach(|| self.inner.save(&path)).map_err(|e| py_err(&e))
    }

    /// Replaces the client's state with one `save` wrote (same config, client and
    /// data).
    fn load(&mut self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        py.detach(|| self.inner.load(&path)).map_err(|e| py_err(&e))
    }
}

/// The server's steps: `Server(config_toml_text)`.
#[pyclass(module = "fibecfed._native")]
struct Server {
    inner: Federation,
    digest: String,
}

#[pymethods]
impl Server {
    #[new]
    fn new(config_text: &str) -> PyResult<Self> {
        let build = || -> anyhow::Result<Self> {
            let config = RunConfig::parse(config_text)?;
            let digest = config.federation_digest()?;
            Ok(Self {
                inner: Federation::new(config, &Registry::builtin())?,
                digest,
            })
        };
        build().map_err(|e| py_err(&e))
    }

    #[getter]
    fn config_digest(&self) -> String {
        self.digest.clone()
    }

    /// federation.clients.
    #[getter]
    fn clients(&self) -> usize {
        self.inner.config().federation.clients
    }

    /// federation.rounds.
    #[getter]
    fn rounds(&self) -> usize {
        self.inner.config().federation.rounds
    }

    #[getter]
    fn seed(&self) -> u64 {
        self.inner.config().seed
    }

    /// Whether the layer selection reads the clients' importance.
    #[getter]
    fn needs_reports(&self) -> bool {
        self.inner.needs_reports()
    }

    /// The global layers from every client's report (a JSON list of reports).
    fn select_layers(&mut self, reports_json: &str) -> PyResult<Vec<usize>> {
        let mut run = || -> anyhow::Result<Vec<usize>> {
            let v = parse(reports_json, "reports")?;
            let list = v.as_array().ok_or_else(|| anyhow!("reports: not a list"))?;
            let mut reports = Vec::with_capacity(list.len());
            // Every node must have read the same data (each cuts its own part out of
            // the same files).
            let mut data: Option<(&str, u64)> = None;
            for r in list {
                let client = r.get("client").and_then(Value::as_u64).unwrap_or(u64::MAX);
                if let Some(d) = r.get("data_digest").and_then(Value::as_str) {
                    match data {
                        Some((first, k)) if first != d => anyhow::bail!(
                            "client {client} read other data than client {k} (data digest {d}, not {first}): give every node the same data files"
                        ),
                        None => data = Some((d, client)),
                        Some(_) => {}
                    }
                }
                let int = |key: &str| {
                    r.get(key)
                        .and_then(Value::as_u64)
                        .ok_or_else(|| anyhow!("report: {key:?} must be a non-negative integer"))
                };
                if let Some(d) = r.get("config_digest").and_then(Value::as_str)
                    && d != self.digest
                {
                    anyhow::bail!(
                        "client {} runs another config than the server (digest {d}, the server's {}): give every node and the server the same config file",
                        int("client")?,
                        self.digest
                    );
                }
                let importance = match r.get("importance") {
                    None | Some(Value::Null) => None,
                    Some(v) => Some(
                        serde_json::from_value::<Vec<f64>>(v.clone())
                            .context("report: \"importance\" must be a list of numbers")?,
                    ),
                };
                reports.push(LayerReport {
                    client: int("client")? as usize,
                    train: int("train")? as usize,
                    test: int("test")? as usize,
                    importance,
                    tokens: int("tokens")?,
                    layers: int("layers")? as usize,
                });
            }
            self.inner.select_layers(&reports)
        };
        run().map_err(|e| py_err(&e))
    }

    /// Round 0: the initial global tensors, per client id its preparation tokens,
    /// the most neurons a client pruned (or None), and per client id its evaluation
    /// (JSON list). Returns round 0's metrics (JSON).
    fn start(
        &mut self,
        py: Python<'_>,
        initial: Vec<Triple<'_>>,
        preparation: Vec<u64>,
        pruned: Option<usize>,
        evaluations_json: &str,
    ) -> PyResult<String> {
        let initial = tensors_in(py, initial)?;
        let run = || -> anyhow::Result<String> {
            let evals = evaluations(evaluations_json)?;
            let m = self.inner.start(initial, &preparation, pruned, &evals)?;
            Ok(serde_json::to_string(&m)?)
        };
        run().map_err(|e| py_err(&e))
    }

    /// Round t's draw (JSON {selected, dropped, empty, active}).
    fn draw_json(&self, round: usize) -> PyResult<String> {
        let d = self.inner.draw(round).map_err(|e| py_err(&e))?;
        Ok(json!({
            "selected": d.selected,
            "dropped": d.dropped,
            "empty": d.empty,
            "active": d.active,
        })
        .to_string())
    }

    /// Round t's aggregation from the active clients' replies: a list of
    /// (client, reply JSON as `Node.fit` gives it, tensors or None). Returns the new
    /// global tensors.
    fn aggregate(
        &mut self,
        py: Python<'_>,
        round: usize,
        replies: Vec<(usize, String, Option<Vec<Triple<'_>>>)>,
    ) -> PyResult<Vec<OutTriple>> {
        let mut parsed = Vec::with_capacity(replies.len());
        for (k, meta, tensors) in replies {
            let upload = tensors.map(|t| tensors_in(py, t)).transpose()?;
            let reply = reply_of(k, &meta, upload).map_err(|e| py_err(&e))?;
            parsed.push((k, reply));
        }
        let global = py
            .detach(|| self.inner.aggregate(round, parsed).cloned())
            .map_err(|e| py_err(&e))?;
        Ok(tensors_out(py, &global))
    }

    /// Whether round t is evaluated (`federation.eval_every`).
    fn evaluates(&self, round: usize) -> bool {
        self.inner.evaluates(round)
    }

    /// Ends round t with every client's evaluation (JSON list by client id, or None
    /// in a round not evaluated); its metrics (JSON).
    fn finish_round(&mut self, round: usize, evaluations_json: Option<&str>) -> PyResult<String> {
        let mut run = || -> anyhow::Result<String> {
            let evals = evaluations_json.map(evaluations).transpose()?;
            let m = self.inner.finish_round(round, evals.as_deref())?;
            Ok(serde_json::to_string(&m)?)
        };
        run().map_err(|e| py_err(&e))
    }

    /// The global tensors now.
    fn global_tensors(&self, py: Python<'_>) -> Vec<OutTriple> {
        tensors_out(py, self.inner.global())
    }

    /// The global layers.
    #[getter]
    fn gal(&self) -> Vec<usize> {
        self.inner.gal().to_vec()
    }

    /// Bytes of a message carrying these tensors, as the accounting counts them.
    #[staticmethod]
    fn message_bytes(py: Python<'_>, tensors: Vec<Triple<'_>>) -> PyResult<u64> {
        let t = tensors_in(py, tensors)?;
        fibecfed_aggregation::message_bytes(&t).map_err(|e| FibecfedError::new_err(e.to_string()))
    }
}

fn evaluations(text: &str) -> anyhow::Result<Vec<(EvalCounts, usize)>> {
    let v = parse(text, "evaluations")?;
    v.as_array()
        .ok_or_else(|| anyhow!("evaluations: not a list"))?
        .iter()
        .map(counts_of)
        .collect()
}

fn reply_of(k: usize, meta: &str, upload: Option<Tensors>) -> anyhow::Result<Reply> {
    let v = parse(meta, "reply")?;
    let tokens = v
        .get("tokens")
        .and_then(Value::as_u64)
        .ok_or_else(|| anyhow!("client {k}: reply without \"tokens\""))?;
    if let Some(why) = v.get("diverged").and_then(Value::as_str) {
        return Ok(Reply::Diverged {
            why: why.to_owned(),
            tokens,
        });
    }
    Ok(Reply::Trained {
        upload,
        loss_sum: v
            .get("loss_sum")
            .and_then(Value::as_f64)
            .ok_or_else(|| anyhow!("client {k}: reply without \"loss_sum\""))?,
        samples: v
            .get("samples")
            .and_then(Value::as_u64)
            .ok_or_else(|| anyhow!("client {k}: reply without \"samples\""))?
            as usize,
        tokens,
        batches: v.get("batches").and_then(Value::as_u64).map(|b| b as usize),
    })
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Node>()?;
    m.add_class::<Server>()?;
    m.add("FibecfedError", m.py().get_type::<FibecfedError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
