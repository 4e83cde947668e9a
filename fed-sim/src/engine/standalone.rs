//! The engine's API for one participant running on its own (a Flower client): its
//! start, its round, its evaluation and its saved state, without the server's loop.
//! Each computes exactly what the simulated client of the same id would.

use anyhow::{Context, Result, anyhow, bail};
use fibecfed_aggregation::Tensors;

use super::Engine;
use crate::checkpoint::{self, Contents};
use crate::config::Prepare;
use crate::local::Outcome;
use crate::server::Reply;
use crate::state::{ClientRound, ClientState};

impl Engine {
    /// The global layers when they can be chosen without the clients' reports (a
    /// selector such as `fixed`, `random`, `all` or `none`): what a participant that
    /// runs on its own (a Flower client) computes identically to every other one.
    pub fn standalone_gal(&self) -> Result<Vec<usize>> {
        if self.selector.needs_reports() {
            bail!(
                "sharing.selector needs every client's layer importance at the server, which a stock Flower server does not gather; fix the global layers with selector = {{ kind = \"fixed\", layers = [...] }} (for example the top layers of `fibecfed fisher --layer-importance` on a sample of the data)"
            );
        }
        self.selector
            .select(&[], self.layers())
            .context("sharing.selector")
    }

    /// Client k's state before its first round: the initial adapter and, where the
    /// config uses them, its curriculum order and Fisher momentum from one scoring
    /// pass, and its pruning mask. Returns the padded tokens they cost.
    pub fn start_client(&self, k: usize) -> Result<(ClientState, u64)> {
        let data = self.train_of(k)?;
        let (mut state, _, mut tokens) = self
            .trainer()
            // Up front whatever `federation.prepare` says: a participant's start is its
            // round 0.
            .first_state(k, data, false, false)
            .with_context(|| format!("client {k}: scoring pass"))?;
        if self.config.sparse.prune.is_some() {
            let gal = self.standalone_gal()?;
            tokens += self
                .trainer()
                .prune(k, data, &mut state, &gal)
                .with_context(|| format!("client {k}: pruning mask"))?;
        }
        Ok((state, tokens))
    }

    /// Client k's work in round t (1-based) on its own: download `global`, train, and
    /// the upload (the tensors of the global layers). A diverged client gives an
    /// error naming why; its state is left as it was.
    pub fn run_client(
        &self,
        k: usize,
        t: usize,
        state: &mut ClientState,
        global: &Tensors,
        gal: &[usize],
    ) -> Result<ClientRound> {
        if k >= self.data.len() || t == 0 {
            bail!("client {k}, round {t}: no such client or round (rounds count from 1)");
        }
        let data = &self.data[k].train;
        if data.is_empty() {
            bail!("client {k} has no training data");
        }
        match self
            .trainer()
            .train(k, t, data, state.clone(), global, gal)?
        {
            Outcome::Diverged(why, _) => bail!("client {k} diverged: {why}"),
            Outcome::Trained(tr) => {
                *state = tr.state;
                Ok(ClientRound {
                    upload: tr.upload.unwrap_or_default(),
                    train_loss: tr.loss_sum / tr.samples.max(1) as f64,
                    samples: tr.samples,
                    tokens: tr.tokens,
                })
            }
        }
    }

    /// Client k's round t on its own, as the server sees it: the [`Reply`] (upload,
    /// summed loss, samples, tokens, batches; or why it diverged) and the client's new
    /// state: after training, or, for a client that diverged, after the round-0 work it
    /// had deferred (`federation.prepare = "on_selection"`), which the simulation keeps
    /// too; `None` when nothing changed.
    pub fn client_reply(
        &self,
        k: usize,
        t: usize,
        state: &ClientState,
        global: &Tensors,
        gal: &[usize],
    ) -> Result<(Reply, Option<ClientState>)> {
        if k >= self.data.len() || t == 0 {
            bail!("client {k}, round {t}: no such client or round (rounds count from 1)");
        }
        let data = &self.data[k].train;
        if data.is_empty() {
            bail!("client {k} has no training data");
        }
        // As the engine's round does: the deferred preparation first, kept even if
        // the training diverges, its tokens counted in the round.
        let mut base = state.clone();
        let prepared = base.pending.any();
        let prep = if prepared {
            self.trainer()
                .prepare_pending(k, data, &mut base, gal)
                .with_context(|| format!("round {t}, client {k}: deferred preparation"))?
        } else {
            0
        };
        let (reply, trained) = self
            .trainer()
            .train(k, t, data, base.clone(), global, gal)?
            .into_reply(prep);
        Ok((reply, trained.or_else(|| prepared.then_some(base))))
    }

    /// Client k's round-0 step once the global layers `gal` are known, as the engine
    /// takes it: its pruning mask now (the padded tokens it cost), or marked for its
    /// first round with `federation.prepare = "on_selection"` (no tokens now); and the
    /// neurons it prunes (`None` without `[sparse.prune]`).
    pub fn client_setup(
        &self,
        k: usize,
        state: &mut ClientState,
        gal: &[usize],
    ) -> Result<(u64, Option<usize>)> {
        if self.config.sparse.prune.is_none() {
            return Ok((0, None));
        }
        if self.config.federation.prepare == Prepare::OnSelection {
            state.pending.prune = true;
            return Ok((0, Some(self.trainer().prune_count(gal))));
        }
        let data = self.train_of(k)?;
        let tokens = self
            .trainer()
            .prune(k, data, state, gal)
            .with_context(|| format!("client {k}: pruning mask"))?;
        Ok((tokens, Some(state.pruned_count())))
    }

    /// Client k's state before its first round with its layer report: the initial
    /// adapter, its scoring pass where the config uses one (with the layer importance
    /// when the selector reads reports; deferred to its first round, as the engine
    /// defers it, with `federation.prepare = "on_selection"`), and the padded tokens it
    /// cost. The pruning mask waits for the global layers ([`Self::client_setup`]).
    pub fn client_first(&self, k: usize) -> Result<(ClientState, Option<Vec<f64>>, u64)> {
        let data = self.train_of(k)?;
        let defer = self.config.federation.prepare == Prepare::OnSelection;
        self.trainer()
            .first_state(k, data, self.selector.needs_reports(), defer)
            .with_context(|| format!("client {k}: scoring pass"))
    }

    /// Client k's training samples.
    fn train_of(&self, k: usize) -> Result<&[fibecfed_data::Sample]> {
        self.data
            .get(k)
            .map(|d| d.train.as_slice())
            .ok_or_else(|| anyhow!("client {k} does not exist ({} clients)", self.data.len()))
    }

    /// Training and test examples of client k.
    pub fn client_sizes(&self, k: usize) -> Option<(usize, usize)> {
        self.data.get(k).map(|d| (d.train.len(), d.test.len()))
    }

    /// The digest of every client's data ([`checkpoint::data_digest`]): a saved state
    /// made on other data is refused.
    pub fn data_digest(&self) -> &str {
        &self.digest
    }

    /// One client's state as checkpoint contents (names prefixed `client{k}/`).
    pub fn client_snapshot(&self, k: usize, client: &ClientState) -> Result<Contents> {
        checkpoint::client_snapshot(k, client)
    }

    /// The inverse of [`Self::client_snapshot`], checked against client k's data.
    pub fn client_restore(&self, k: usize, c: &Contents) -> Result<ClientState> {
        checkpoint::client_restore(&self.shapes(), k, c)
    }
}
