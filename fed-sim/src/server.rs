//! The server's side of the rounds, on its own: which clients a round draws, the
//! global layers chosen from the clients' layer reports, aggregation, the byte and
//! simulated-time accounting and the combined evaluation. The simulation's
//! [`crate::engine::Engine`] computes its rounds with these same functions, and
//! [`Federation`] strings them together for a server whose clients run elsewhere (the
//! Flower ServerApp, through the Python bindings): given the same replies, it writes
//! the same [`RoundMetrics`], bit for bit.
//!
//! Owns no model and no data: the clients' sizes arrive in their reports.

use std::collections::BTreeMap;

use anyhow::{Context, Result, anyhow, bail};
use fibecfed_aggregation::{Aggregator, Tensors, Update, message_bytes};
use fibecfed_fisher::{ImportanceReport, LayerSelector};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::{CurriculumUnit, RunConfig, Simulation};
use crate::eval::EvalCounts;
use crate::registry::Registry;
use crate::state::RoundMetrics;

/// Seed of the server's stream (client sampling, dropouts).
const ROUND_DOMAIN: u64 = 0x5E1E_C7ED_0000_0001;

/// The clients a round selected, and what became of them before training.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Draw {
    /// Sampled from the server's seeded stream, ascending.
    pub selected: Vec<usize>,
    /// Selected clients that fail (simulated dropout) and send nothing.
    pub dropped: Vec<usize>,
    /// Selected clients without training data.
    pub empty: Vec<usize>,
    /// The selected clients that train: neither dropped nor empty.
    pub active: Vec<usize>,
}

/// Round t's clients from the server's own stream (the seed and round alone decide
/// it): who is selected, who drops out, who has no training data, and who trains.
pub fn draw(config: &RunConfig, t: usize, has_train: impl Fn(usize) -> bool) -> Draw {
    let f = &config.federation;
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed ^ ROUND_DOMAIN);
    rng.set_stream(t as u64);
    let m = config.clients_per_round();
    let mut selected = rand::seq::index::sample(&mut rng, f.clients, m).into_vec();
    selected.sort_unstable();
    let dropped: Vec<usize> = selected
        .iter()
        .copied()
        .filter(|_| rng.random::<f64>() < f.dropout_probability)
        .collect();
    let empty: Vec<usize> = selected
        .iter()
        .copied()
        .filter(|&k| !has_train(k))
        .collect();
    let active: Vec<usize> = selected
        .iter()
        .copied()
        .filter(|k| !dropped.contains(k) && !empty.contains(k))
        .collect();
    Draw {
        selected,
        dropped,
        empty,
        active,
    }
}

/// Bytes of a client's layer report: n_k and one f64 per layer.
pub fn report_bytes(layers: usize) -> u64 {
    8 * (layers as u64 + 1)
}

/// Round 0's download: the global layers' indices (one f64 each) to every client, when
/// the selector read reports; nothing otherwise (every client derives them itself).
pub fn selection_bytes_down(needs_reports: bool, gal: usize, clients: usize) -> u64 {
    if needs_reports {
        8 * gal as u64 * clients as u64
    } else {
        0
    }
}

/// Round 0's padded tokens and simulated time from each client's (tokens, report
/// bytes): the slowest client's passes and upload.
pub fn round0_cost(sim: Simulation, spent: &[(u64, u64)]) -> (u64, f64) {
    let (mut tokens, mut time) = (0u64, 0.0f64);
    for &(passes, bytes) in spent {
        let mut t = passes as f64 * sim.seconds_per_token;
        if bytes > 0 {
            t += bytes as f64 / sim.upload_bytes_per_second;
        }
        time = time.max(t);
        tokens += passes;
    }
    (tokens, time)
}

/// Round 0's metrics line from each client's (padded tokens, report bytes), the global
/// layers and the evaluation (accuracy, loss, non-finite outputs); `wall_seconds` is
/// the caller's to set.
pub(crate) fn round0_metrics(
    config: &RunConfig,
    spent: &[(u64, u64)],
    needs_reports: bool,
    gal: &[usize],
    (accuracy, loss, eval_non_finite): (f64, f64, usize),
    pruned: Option<usize>,
) -> RoundMetrics {
    let (tokens, sim) = round0_cost(config.simulation, spent);
    let up: u64 = spent.iter().map(|s| s.1).sum();
    let down = selection_bytes_down(needs_reports, gal.len(), spent.len());
    RoundMetrics {
        round: 0,
        method: config.method.clone(),
        seed: config.seed,
        accuracy: Some(accuracy),
        loss: Some(loss),
        evaluated: true,
        eval_non_finite,
        train_loss: None,
        train_samples: 0,
        tokens,
        bytes_up: up,
        bytes_down: down,
        cum_bytes_up: up,
        cum_bytes_down: down,
        sim_seconds: sim,
        cum_sim_seconds: sim,
        wall_seconds: 0.0,
        selected: Vec::new(),
        dropped: Vec::new(),
        diverged: Vec::new(),
        empty: Vec::new(),
        gal: gal.to_vec(),
        pruned_neurons: pruned,
        curriculum_batches: None,
    }
}

/// How one active client's round ended, as the server sees it.
#[derive(Debug, Clone)]
pub enum Reply {
    Trained {
        /// The tensors of the global layers (`None` when nothing is shared).
        upload: Option<Tensors>,
        /// Σ training loss over its samples.
        loss_sum: f64,
        samples: usize,
        /// Padded tokens it processed (preparation included).
        tokens: u64,
        /// With a batch curriculum: the batches trained on per epoch.
        batches: Option<usize>,
    },
    /// Its loss stopped being finite: left out of the aggregate; its padded tokens.
    Diverged { why: String, tokens: u64 },
}

/// What the trained clients of a round add up to.
#[derive(Debug, Default)]
pub struct Gathered {
    pub updates: Vec<Update>,
    pub diverged: Vec<usize>,
    pub loss_sum: f64,
    pub samples: usize,
    pub tokens: u64,
    pub up: u64,
    pub sim: f64,
    /// Client → curriculum batches per epoch, for the clients that trained.
    pub batches: BTreeMap<usize, usize>,
}

/// Adds up round t's replies in client order (so the sums do not depend on which
/// finished first) and prices their time: download, compute, upload. `n_train(k)` is
/// client k's n_k, the aggregation weight.
pub fn gather(
    t: usize,
    sim: Simulation,
    down_bytes: u64,
    replies: Vec<(usize, Reply)>,
    n_train: impl Fn(usize) -> usize,
) -> Result<Gathered> {
    // A client's simulated time before its upload: download, then its compute.
    let work_time = |tokens: u64| {
        tokens as f64 * sim.seconds_per_token + down_bytes as f64 / sim.download_bytes_per_second
    };
    let mut g = Gathered::default();
    for (k, reply) in replies {
        match reply {
            Reply::Diverged { why, tokens } => {
                eprintln!("round {t}: client {k} left out of the aggregate: {why}");
                g.diverged.push(k);
                g.tokens += tokens;
                g.sim = g.sim.max(work_time(tokens));
            }
            Reply::Trained {
                upload,
                loss_sum,
                samples,
                tokens,
                batches,
            } => {
                let mut time = work_time(tokens);
                if let Some(tensors) = upload {
                    let bytes = message_bytes(&tensors)?;
                    g.up += bytes;
                    time += bytes as f64 / sim.upload_bytes_per_second;
                    g.updates.push(Update {
                        client: k,
                        samples: n_train(k),
                        tensors,
                    });
                }
                g.sim = g.sim.max(time);
                g.loss_sum += loss_sum;
                g.samples += samples;
                g.tokens += tokens;
                if let Some(b) = batches {
                    g.batches.insert(k, b);
                }
            }
        }
    }
    Ok(g)
}

/// Round t's replies gathered ([`gather`]) and aggregated into `global`; with the
/// round's download bytes: the global tensors before aggregation to every selected
/// client with data, even those that fail later (nothing when nothing is global, not
/// even an empty message).
pub fn settle(
    t: usize,
    sim: Simulation,
    aggregator: &mut dyn Aggregator,
    global: &mut Tensors,
    draw: &Draw,
    replies: Vec<(usize, Reply)>,
    n_train: impl Fn(usize) -> usize,
) -> Result<(Gathered, u64)> {
    let down_bytes = if global.is_empty() {
        0
    } else {
        message_bytes(global)?
    };
    let g = gather(t, sim, down_bytes, replies, n_train)?;
    if !g.updates.is_empty() && !global.is_empty() {
        *global = aggregator
            .aggregate(global, &g.updates)
            .with_context(|| format!("round {t}: aggregation"))?;
    }
    let down = down_bytes * (draw.selected.len() - draw.empty.len()) as u64;
    Ok((g, down))
}

/// Personalised accuracy, mean loss over finite outputs and the non-finite count,
/// from every client's evaluation counts and test size, added up in client order.
pub fn combine_evaluations(per_client: &[(EvalCounts, usize)]) -> Result<(f64, f64, usize)> {
    let (mut total, mut n) = (EvalCounts::default(), 0usize);
    for (c, m) in per_client {
        total.correct += c.correct;
        total.loss_sum += c.loss_sum;
        total.non_finite += c.non_finite;
        n += m;
    }
    if n == 0 {
        bail!("no client has test data: the test file is empty or data.limit_test is 0");
    }
    if total.non_finite == n {
        bail!(
            "every client's model gives non-finite outputs on its test data: the run diverged (lower federation.lr)"
        );
    }
    Ok((
        total.correct as f64 / n as f64,
        total.loss_sum / (n - total.non_finite) as f64,
        total.non_finite,
    ))
}

/// One client's answer to the round-0 query: its sizes, and its layer importance
/// when the selector reads reports.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerReport {
    pub client: usize,
    pub train: usize,
    pub test: usize,
    /// I_l^k per layer (only when asked for).
    pub importance: Option<Vec<f64>>,
    /// Padded tokens of its scoring pass.
    pub tokens: u64,
    /// Layers of its model.
    pub layers: usize,
}

/// A server whose clients run elsewhere: it holds the global tensors, the global
/// layers, the aggregator's state and the metrics, and computes each step exactly as
/// the simulation's engine does.
///
/// The order of calls is: [`Federation::select_layers`] with every client's report,
/// [`Federation::start`] with the initial global tensors, the clients' preparation
/// costs and their round-0 evaluation; then per round t = 1..=T
/// [`Federation::draw`], [`Federation::aggregate`] with the active clients' replies,
/// and [`Federation::finish_round`] with every client's evaluation when
/// [`Federation::evaluates`] says so.
pub struct Federation {
    config: RunConfig,
    selector: Box<dyn LayerSelector>,
    aggregator: Box<dyn Aggregator>,
    /// Per client (n_train, n_test), from the reports.
    sizes: Vec<(usize, usize)>,
    /// Round 0's per-client (tokens, report bytes), until `start` prices them.
    spent: Vec<(u64, u64)>,
    gal: Vec<usize>,
    global: Tensors,
    history: Vec<RoundMetrics>,
    /// The round aggregated but not yet finished.
    open: Option<OpenRound>,
    /// A batch curriculum is in use: the metrics list each selected client's batches.
    batch_curriculum: bool,
    /// With `[sparse.prune]`: the most neurons a client pruned (fixed at round 0).
    pruned: Option<usize>,
}

impl std::fmt::Debug for Federation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Federation")
            .field("method", &self.config.method)
            .field("gal", &self.gal)
            .field("rounds", &self.history.len())
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct OpenRound {
    t: usize,
    draw: Draw,
    g: Gathered,
    down: u64,
}

impl Federation {
    /// A server for `config` (a run config's TOML text), its components looked up in
    /// `registry`.
    pub fn new(config: RunConfig, registry: &Registry) -> Result<Self> {
        config.validate()?;
        registry.check(&config)?;
        let selector = registry.selector(&config.sharing.selector, config.seed)?;
        let aggregator = registry.aggregator(&config.aggregator)?;
        // As the engine decides it: a batch curriculum whose pacing holds data back.
        let batch_curriculum = config.curriculum.unit == CurriculumUnit::Batch
            && registry
                .pacing(&config.curriculum.pacing)?
                .fraction(0, config.federation.rounds)
                < 1.0;
        Ok(Self {
            batch_curriculum,
            pruned: None,
            config,
            selector,
            aggregator,
            sizes: Vec::new(),
            spent: Vec::new(),
            gal: Vec::new(),
            global: Tensors::new(),
            history: Vec::new(),
            open: None,
        })
    }

    pub fn config(&self) -> &RunConfig {
        &self.config
    }

    /// Whether the layer selection reads the clients' importance (so they must send
    /// it in their reports).
    pub fn needs_reports(&self) -> bool {
        self.selector.needs_reports()
    }

    /// The global layers from every client's report (one per client id
    /// 0..federation.clients, in any order).
    pub fn select_layers(&mut self, reports: &[LayerReport]) -> Result<Vec<usize>> {
        if !self.history.is_empty() || !self.sizes.is_empty() {
            bail!("the global layers were already selected");
        }
        let k = self.config.federation.clients;
        let mut by_client: Vec<Option<&LayerReport>> = vec![None; k];
        for r in reports {
            let slot = by_client.get_mut(r.client).ok_or_else(|| {
                anyhow!(
                    "a report from client {}: the config has federation.clients = {k} (ids 0..{k})",
                    r.client
                )
            })?;
            if slot.replace(r).is_some() {
                bail!("two reports from client {}", r.client);
            }
        }
        let missing: Vec<usize> = (0..k).filter(|&i| by_client[i].is_none()).collect();
        if !missing.is_empty() {
            bail!("no report from clients {missing:?}");
        }
        let reports: Vec<&LayerReport> = by_client.into_iter().flatten().collect();
        let layers = reports[0].layers;
        if let Some(r) = reports.iter().find(|r| r.layers != layers) {
            bail!(
                "client {} has a model of {} layers, client 0 one of {layers}: the clients load different models",
                r.client,
                r.layers
            );
        }
        let needs = self.needs_reports();
        let mut importance = Vec::new();
        for r in &reports {
            let mut bytes = 0;
            match (&r.importance, needs && r.train > 0) {
                (Some(i), _) if i.len() != layers => bail!(
                    "client {}: its report has {} layer scores for a model of {layers} layers",
                    r.client,
                    i.len()
                ),
                (Some(i), _) => {
                    bytes = report_bytes(i.len());
                    importance.push(ImportanceReport {
                        samples: r.train,
                        importance: i.clone(),
                    });
                }
                (None, true) => bail!(
                    "client {}: its report has no layer importance, which sharing.selector needs",
                    r.client
                ),
                (None, false) => {}
            }
            self.spent.push((r.tokens, bytes));
        }
        self.gal = self
            .selector
            .select(&importance, layers)
            .context("sharing.selector")?;
        self.sizes = reports.iter().map(|r| (r.train, r.test)).collect();
        Ok(self.gal.clone())
    }

    /// Round 0: the initial global tensors (the seeded adapter's global layers, which
    /// every client derives identically), each client's preparation tokens after the
    /// selection (its pruning epochs), the most neurons a client pruned (with
    /// `[sparse.prune]`), and every client's evaluation (counts and test size), by
    /// client id.
    pub fn start(
        &mut self,
        initial: Tensors,
        preparation: &[u64],
        pruned: Option<usize>,
        evaluations: &[(EvalCounts, usize)],
    ) -> Result<RoundMetrics> {
        let k = self.config.federation.clients;
        if self.sizes.len() != k {
            bail!("round 0 before the global layers were selected");
        }
        if !self.history.is_empty() {
            bail!("round 0 has already run");
        }
        if preparation.len() != k || evaluations.len() != k {
            bail!(
                "round 0 needs every client's preparation and evaluation: {} and {} for {k} clients",
                preparation.len(),
                evaluations.len()
            );
        }
        let spent: Vec<(u64, u64)> = self
            .spent
            .iter()
            .zip(preparation)
            .map(|(&(tokens, bytes), &p)| (tokens + p, bytes))
            .collect();
        let evaluation = combine_evaluations(evaluations)?;
        self.global = initial;
        self.pruned = pruned;
        let metrics = round0_metrics(
            &self.config,
            &spent,
            self.needs_reports(),
            &self.gal,
            evaluation,
            pruned,
        );
        self.history.push(metrics.clone());
        Ok(metrics)
    }

    /// The next round's number (1-based).
    pub fn next_round(&self) -> usize {
        self.history.len()
    }

    /// Round t's draw (t must be the next round).
    pub fn draw(&self, t: usize) -> Result<Draw> {
        self.check_next(t)?;
        Ok(draw(&self.config, t, |k| self.sizes[k].0 > 0))
    }

    fn check_next(&self, t: usize) -> Result<()> {
        if self.history.is_empty() {
            bail!("round {t} before round 0");
        }
        if t != self.next_round() {
            bail!("round {t} is not the next round ({})", self.next_round());
        }
        if t > self.config.federation.rounds {
            bail!(
                "round {t} is past federation.rounds = {}",
                self.config.federation.rounds
            );
        }
        Ok(())
    }

    /// Round t's aggregation from the replies of exactly its active clients; the new
    /// global tensors.
    pub fn aggregate(&mut self, t: usize, mut replies: Vec<(usize, Reply)>) -> Result<&Tensors> {
        if self.open.is_some() {
            bail!("round {t}: the previous round was aggregated but not finished");
        }
        let draw = self.draw(t)?;
        replies.sort_by_key(|(k, _)| *k);
        let got: Vec<usize> = replies.iter().map(|(k, _)| *k).collect();
        if got != draw.active {
            bail!(
                "round {t}: replies from clients {got:?}, but the clients that train are {:?}",
                draw.active
            );
        }
        let sizes = &self.sizes;
        let (g, down) = settle(
            t,
            self.config.simulation,
            self.aggregator.as_mut(),
            &mut self.global,
            &draw,
            replies,
            |k| sizes[k].0,
        )?;
        self.open = Some(OpenRound { t, draw, g, down });
        Ok(&self.global)
    }

    /// Whether round t's models are evaluated (`federation.eval_every`).
    pub fn evaluates(&self, t: usize) -> bool {
        self.config.evaluates(t)
    }

    /// Ends round t with every client's evaluation by client id (`None` in a round
    /// not evaluated); its metrics.
    pub fn finish_round(
        &mut self,
        t: usize,
        evaluations: Option<&[(EvalCounts, usize)]>,
    ) -> Result<RoundMetrics> {
        let open = match self.open.take() {
            Some(o) if o.t == t => o,
            other => {
                self.open = other;
                bail!("round {t} was not aggregated");
            }
        };
        let evaluated = self.evaluates(t);
        let (accuracy, loss, eval_non_finite) = match (evaluated, evaluations) {
            (true, Some(e)) if e.len() == self.sizes.len() => match combine_evaluations(e) {
                Ok((a, l, n)) => (Some(a), Some(l), n),
                Err(err) => {
                    // The round stays aggregated: it is not aggregated twice.
                    self.open = Some(open);
                    return Err(err);
                }
            },
            (true, _) => {
                let n = evaluations.map_or(0, <[_]>::len);
                self.open = Some(open);
                bail!(
                    "round {t} is evaluated: it needs every client's evaluation ({n} for {} clients)",
                    self.sizes.len()
                );
            }
            (false, _) => (None, None, 0),
        };
        let metrics = round_metrics(
            &self.config,
            t,
            open.draw,
            open.g,
            open.down,
            (accuracy, loss, eval_non_finite),
            self.batch_curriculum,
            self.history.last(),
            &self.gal,
            self.pruned,
        )?;
        self.history.push(metrics.clone());
        Ok(metrics)
    }

    pub fn gal(&self) -> &[usize] {
        &self.gal
    }

    pub fn global(&self) -> &Tensors {
        &self.global
    }

    pub fn history(&self) -> &[RoundMetrics] {
        &self.history
    }

    /// Per client (n_train, n_test).
    pub fn sizes(&self) -> &[(usize, usize)] {
        &self.sizes
    }
}

/// A finished round's metrics line: its draw, what its clients added up to, its
/// download bytes and its evaluation (accuracy, loss, non-finite outputs). With a
/// batch curriculum (`batch_curriculum`), the batches of each selected client.
#[allow(clippy::too_many_arguments)] // one line of metrics has this many sources
pub(crate) fn round_metrics(
    config: &RunConfig,
    t: usize,
    draw: Draw,
    g: Gathered,
    down: u64,
    (accuracy, loss, eval_non_finite): (Option<f64>, Option<f64>, usize),
    batch_curriculum: bool,
    prev: Option<&RoundMetrics>,
    gal: &[usize],
    pruned: Option<usize>,
) -> Result<RoundMetrics> {
    let prev = prev.ok_or_else(|| anyhow!("run state without round 0"))?;
    let curriculum_batches = batch_curriculum.then(|| {
        draw.selected
            .iter()
            .map(|k| g.batches.get(k).copied().unwrap_or(0))
            .collect()
    });
    Ok(RoundMetrics {
        round: t,
        method: config.method.clone(),
        seed: config.seed,
        accuracy,
        loss,
        evaluated: config.evaluates(t),
        eval_non_finite,
        train_loss: (g.samples > 0).then(|| g.loss_sum / g.samples as f64),
        train_samples: g.samples,
        tokens: g.tokens,
        bytes_up: g.up,
        bytes_down: down,
        cum_bytes_up: prev.cum_bytes_up + g.up,
        cum_bytes_down: prev.cum_bytes_down + down,
        sim_seconds: g.sim,
        cum_sim_seconds: prev.cum_sim_seconds + g.sim,
        wall_seconds: 0.0,
        selected: draw.selected,
        dropped: draw.dropped,
        diverged: g.diverged,
        curriculum_batches,
        empty: draw.empty,
        gal: gal.to_vec(),
        pruned_neurons: pruned,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn federation(selector: &str) -> Federation {
        let config = RunConfig::parse(&format!(
            "method = \"t\"\nseed = 3\n[federation]\nclients = 3\nrounds = 2\n[sharing]\nselector = {selector}\n"
        ))
        .unwrap();
        Federation::new(config, &Registry::builtin()).unwrap()
    }

    fn report(client: usize, importance: Option<Vec<f64>>) -> LayerReport {
        LayerReport {
            client,
            train: 10,
            test: 5,
            importance,
            tokens: 7,
            layers: 2,
        }
    }

    fn error(r: Result<impl std::fmt::Debug>) -> String {
        format!("{:#}", r.unwrap_err())
    }

    #[test]
    fn the_reports_must_come_from_every_client_once() {
        let consensus = r#"{ kind = "consensus_top_k", fraction = 0.5 }"#;
        let mut f = federation(consensus);
        let imp = || Some(vec![0.3, 0.7]);
        let two = [report(0, imp()), report(2, imp())];
        assert!(error(f.select_layers(&two)).contains("no report from clients [1]"));
        let dup = [report(0, imp()), report(0, imp()), report(1, imp())];
        assert!(error(f.select_layers(&dup)).contains("two reports from client 0"));
        let out = [report(0, imp()), report(1, imp()), report(5, imp())];
        assert!(error(f.select_layers(&out)).contains("client 5"));
        let none = [report(0, imp()), report(1, None), report(2, imp())];
        assert!(
            error(f.select_layers(&none)).contains("client 1: its report has no layer importance")
        );
        let short = [
            report(0, imp()),
            report(1, Some(vec![1.0])),
            report(2, imp()),
        ];
        assert!(error(f.select_layers(&short)).contains("1 layer scores for a model of 2 layers"));
        let all = [report(0, imp()), report(1, imp()), report(2, imp())];
        assert_eq!(f.select_layers(&all).unwrap(), vec![1]);
        assert!(error(f.select_layers(&all)).contains("already selected"));
    }

    #[test]
    fn rounds_come_in_order_with_the_replies_of_their_clients() {
        let mut f = federation(r#"{ kind = "fixed", layers = [1] }"#);
        assert!(error(f.draw(1)).contains("round 1 before round 0"));
        let reports: Vec<LayerReport> = (0..3).map(|k| report(k, None)).collect();
        f.select_layers(&reports).unwrap();
        let eval = (
            EvalCounts {
                correct: 3,
                loss_sum: 2.5,
                non_finite: 0,
            },
            5,
        );
        assert!(
            error(f.start(Tensors::new(), &[0; 2], None, &[eval; 3]))
                .contains("every client's preparation")
        );
        let m0 = f
            .start(Tensors::new(), &[1, 2, 3], None, &[eval; 3])
            .unwrap();
        assert_eq!(
            (m0.accuracy, m0.loss, m0.tokens),
            (Some(0.6), Some(0.5), 27)
        );
        assert!(error(f.draw(2)).contains("round 2 is not the next round (1)"));
        let draw = f.draw(1).unwrap();
        assert_eq!(draw.selected, draw.active);
        let trained = |k| {
            (
                k,
                Reply::Trained {
                    upload: None,
                    loss_sum: 1.0,
                    samples: 4,
                    tokens: 10,
                    batches: None,
                },
            )
        };
        assert!(error(f.aggregate(1, vec![])).contains("the clients that train are"));
        assert!(error(f.finish_round(1, Some(&[eval; 3]))).contains("round 1 was not aggregated"));
        f.aggregate(1, draw.active.iter().rev().map(|&k| trained(k)).collect())
            .unwrap();
        assert!(
            error(f.finish_round(1, Some(&[eval; 2])))
                .contains("needs every client's evaluation (2 for 3 clients)")
        );
        let m1 = f.finish_round(1, Some(&[eval; 3])).unwrap();
        assert_eq!(m1.train_loss, Some(0.25));
        assert_eq!(m1.train_samples, 4 * draw.active.len());
        assert_eq!(f.next_round(), 2);
    }
}
