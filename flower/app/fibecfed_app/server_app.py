"""The ServerApp: FibecFed's server on Flower's deployment runtime.

The Rust `fibecfed.Server` computes every server step exactly as `fibecfed run` does;
this file only moves messages:

round 0   `query.report` to every node: each answers with its client id, data sizes
          and layer report; nodes whose node config is bad answer with an error,
          which is logged (events.jsonl) and the node left out. Once every client id
          0..K-1 is served, the server chooses the global layers from the reports
          (the consensus), sends them (`query.setup`: the clients prune and return the
          initial global tensors, which must agree bit for bit) and evaluates
          every client (`evaluate`).
round t   the clients that `Server.draw(t)` samples (simulated dropouts stay silent)
          train on the global tensors (`train`), the Rust aggregator aggregates,
          and every client is evaluated when the config evaluates round t.

A client whose node goes away is waited for: when a new node answers `query.report`
for the same client id (a restarted SuperNode registers under a new node id), the
message is sent again there, and the client, which keeps its state on disk, answers
as it would have. Flower itself reports the lost message only when the dead node
misses its heartbeats (NODE_UNAVAILABLE, 40-60 s later); that error also leads to the
wait. A ClientApp that crashed on a node still online (CLIENT_APP_CRASHED) is asked
again there, up to 3 times. A node that claims a client already served must hold that
client's state (its global layers, and a round no older than the client's last), else
it is refused. Any other error reply stops the run with the client's message.

Writes `metrics.jsonl` (the lines of `fibecfed run`'s metrics.jsonl; the bytes are
its accounting: the global tensors each selected client downloads and each
trained client uploads, and the round-0 reports) and `events.jsonl` to the run
config's `out` folder.
"""

from __future__ import annotations

import json
import os
import time
from logging import INFO, WARNING
from typing import Optional

import fibecfed
import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fibecfed_app import records

app = ServerApp()

#: Error codes that mean the node (or its ClientApp) went away, not that the client
#: refused: the message is sent again once a node serves the client.
LOST = {
    ErrorCode.NODE_UNAVAILABLE,
    ErrorCode.CLIENT_APP_CRASHED,
    ErrorCode.MESSAGE_UNAVAILABLE,
    ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
}
POLL_SECONDS = 1.0
#: Answers lost to a crashed ClientApp before a node (report) or a message gives up.
MAX_TRIES = 3


class RunFailed(RuntimeError):
    pass


class Events:
    """events.jsonl: what happened to the nodes, one JSON object a line."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.start = time.monotonic()

    def __call__(self, kind: str, **fields) -> None:
        line = {"event": kind, "seconds": round(time.monotonic() - self.start, 3), **fields}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
        level = WARNING if kind in ("node_refused", "message_lost") else INFO
        log(level, "[fibecfed] %s", json.dumps(line))


def _reason(reply: Message) -> str:
    return f"{reply.error.reason} (Flower error code {reply.error.code})"


class Nodes:
    """Which node serves which client id, and the exchanges with them."""

    def __init__(self, grid: Grid, server: fibecfed.Server, events: Events, node_wait: float, reply_timeout: float) -> None:
        self.grid = grid
        self.server = server
        self.events = events
        self.node_wait = node_wait
        self.reply_timeout = reply_timeout
        self.node_of: dict[int, int] = {}
        self.reports: dict[int, dict] = {}
        self.refused: set[int] = set()
        self.retired: set[int] = set()
        #: Report questions not yet answered: message id -> node.
        self.asking: dict[str, int] = {}
        #: Lost or crashed answers to report questions, per node.
        self.failures: dict[int, int] = {}
        #: Per client, the last round it answered a train message for, and the clients
        #: that answered the setup: a node that takes a client over must be as far.
        self.acked: dict[int, int] = {}
        self.set_up: set[int] = set()
        #: The data digest every node must report, and the client that reported it first.
        self.data_digest: Optional[tuple[str, int]] = None

    def _known(self) -> set[int]:
        return set(self.node_of.values()) | self.refused | self.retired | set(self.asking.values())

    def _refuse(self, node: int, reason: str) -> None:
        self.refused.add(node)
        self.events("node_refused", node=str(node), reason=reason)

    def _objection(self, report: dict) -> Optional[str]:
        """Why a node's report disqualifies it, if it does."""
        k = report["client"]
        if report["config_digest"] != self.server.config_digest:
            return (
                f"client {k} runs another config than the server (digest "
                f"{report['config_digest']}, the server's {self.server.config_digest})"
            )
        if self.data_digest is not None and report["data_digest"] != self.data_digest[0]:
            digest, first = self.data_digest
            return (
                f"client {k} read other data files than client {first}, the first node to join "
                f"(data digest {report['data_digest']}, not {digest}): one of them has other files"
            )
        if k not in self.node_of and (report["round"] > 0 or report["set_up"]):
            return (
                f"client {k}'s state folder holds an earlier run (after round {report['round']}): "
                "a new run needs new state folders"
            )
        if k in self.node_of:
            # A node that takes over a client must hold that client's state: a restart
            # on the same state folder, not a second node for the same id.
            if k in self.set_up and not report["set_up"]:
                return f"it claims client {k}, but its state folder has no global layers: client {k}'s node has them"
            if report["round"] < self.acked.get(k, 0):
                return (
                    f"it claims client {k}, but its state is after round {report['round']}, "
                    f"and client {k} has trained in round {self.acked[k]}"
                )
        return None

    def discover(self) -> list[int]:
        """Asks every node not seen before for its report (once), reads the answers
        that have come, and returns the client ids a node now serves anew. Never
        waits."""
        new = [n for n in self.grid.get_node_ids() if n not in self._known()]
        if new:
            msgs = [Message(RecordDict(), node, records.REPORT) for node in new]
            for node, mid in zip(new, self.grid.push_messages(msgs)):
                if mid:  # "": the SuperLink refused it (the node left); asked again later
                    self.asking[mid] = node
        if not self.asking:
            return []
        moved = []
        for reply in self.grid.pull_messages(list(self.asking)):
            node = self.asking.pop(reply.metadata.reply_to_message_id, None)
            if node is None:
                continue
            if reply.has_error():
                if reply.error.code in LOST:
                    # Gone, or its ClientApp died: asked again while it is listed,
                    # a few times.
                    self.failures[node] = self.failures.get(node, 0) + 1
                    if self.failures[node] >= MAX_TRIES:
                        self._refuse(node, f"no answer after {MAX_TRIES} tries: {_reason(reply)}")
                    continue
                self._refuse(node, _reason(reply))
                continue
            report = records.report_of(reply.content["report"])
            objection = self._objection(report)
            if objection:
                self._refuse(node, objection)
                continue
            k = report["client"]
            if self.data_digest is None:
                self.data_digest = (report["data_digest"], k)
            old = self.node_of.get(k)
            if old is not None:
                self.retired.add(old)
                self.events("client_moved", client=k, node=str(node), was=str(old))
            else:
                self.events("client_joined", client=k, node=str(node))
            self.node_of[k] = node
            self.reports.setdefault(k, report)
            moved.append(k)
        return moved

    def join_all(self) -> list[dict]:
        """Waits until every client id is served; their reports by client id."""
        deadline = time.monotonic() + self.node_wait
        k = self.server.clients
        while len(self.node_of) < k:
            self.discover()
            if len(self.node_of) < k:
                if time.monotonic() > deadline:
                    missing = sorted(set(range(k)) - set(self.node_of))
                    raise RunFailed(
                        f"no node serves clients {missing} after {self.node_wait:.0f} s (node-wait); "
                        f"{len(self.refused)} node(s) refused (events.jsonl says why)"
                    )
                time.sleep(POLL_SECONDS)
        return [self.reports[i] for i in range(k)]

    def exchange(self, kind: str, contents: dict[int, RecordDict], what: str, answered=None) -> dict[int, Message]:
        """Sends contents[k] to client k's node and waits for every reply, calling
        `answered(k, reply)` as each arrives. A message whose ClientApp crashed goes
        again to the same node (a few times); one lost with its node goes to the node
        that serves the client next (or to the same node, if it comes back)."""
        pending: dict[str, int] = {}
        replies: dict[int, Message] = {}
        waiting: dict[int, float] = {}
        crashes: dict[int, int] = {}

        def lose(k: int, reason: str) -> None:
            self.events("message_lost", client=k, node=str(self.node_of[k]), message=what, reason=reason)
            self.retired.add(self.node_of[k])
            waiting[k] = time.monotonic() + self.node_wait

        def push(ks: list[int]) -> None:
            msgs = [Message(contents[k], self.node_of[k], kind) for k in ks]
            for k, mid in zip(ks, self.grid.push_messages(msgs)):
                if mid:
                    pending[mid] = k
                else:
                    lose(k, "the SuperLink refused the message: the node is not registered")

        push(sorted(contents))
        deadline = time.monotonic() + self.reply_timeout
        while pending or waiting:
            for reply in self.grid.pull_messages(list(pending)) if pending else []:
                k = pending.pop(reply.metadata.reply_to_message_id, None)
                if k is None:
                    continue
                if not reply.has_error():
                    replies[k] = reply
                    if answered is not None:
                        answered(k, reply)
                    continue
                node = self.node_of[k]
                code = reply.error.code
                if code not in LOST:
                    raise RunFailed(f"{what}: client {k} (node {node}) failed: {_reason(reply)}")
                crashes[k] = crashes.get(k, 0) + 1
                if (
                    code != ErrorCode.NODE_UNAVAILABLE
                    and crashes[k] < MAX_TRIES
                    and node in self.grid.get_node_ids()
                ):
                    self.events("message_resent", client=k, node=str(node), message=what, reason=_reason(reply))
                    push([k])
                else:
                    lose(k, _reason(reply))
            # A node that missed its heartbeats and reconnected keeps its node id.
            if waiting:
                listed = set(self.grid.get_node_ids())
                for k in [k for k in waiting if self.node_of[k] in listed]:
                    self.retired.discard(self.node_of[k])
                    del waiting[k]
                    self.events("message_resent", client=k, node=str(self.node_of[k]), message=what, reason="its node is back")
                    push([k])
            # A restarted node serves its client under a new node id: send it there,
            # whether or not Flower has reported the old node gone yet.
            for k in self.discover():
                if k in contents and k not in replies:
                    for mid in [mid for mid, c in pending.items() if c == k]:
                        del pending[mid]
                    waiting.pop(k, None)
                    self.events("message_resent", client=k, node=str(self.node_of[k]), message=what)
                    push([k])
            now = time.monotonic()
            for k, until in waiting.items():
                if now > until:
                    raise RunFailed(f"{what}: client {k}'s node left and no node served it again within {self.node_wait:.0f} s")
            if now > deadline:
                raise RunFailed(f"{what}: no reply from clients {sorted(set(pending.values()))} within {self.reply_timeout:.0f} s")
            if pending or waiting:
                time.sleep(POLL_SECONDS)
        return replies


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(
        a[n].shape == b[n].shape and a[n].tobytes() == b[n].tobytes() for n in a
    )


def run(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    config, out = str(cfg.get("config", "")), str(cfg.get("out", ""))
    if not config:
        raise RunFailed("run config config is empty: flwr run ... --run-config \"config='/path/federation.toml' out='/path/out'\"")
    if not out:
        raise RunFailed("run config out is empty: name a folder for metrics.jsonl")
    os.makedirs(out, exist_ok=True)
    metrics_path = os.path.join(out, "metrics.jsonl")
    if os.path.exists(metrics_path):
        raise RunFailed(f"run config out: {metrics_path} exists; choose a new folder")
    events = Events(os.path.join(out, "events.jsonl"))
    server = fibecfed.Server.from_file(config)
    nodes = Nodes(grid, server, events, float(cfg.get("node-wait", 600)), float(cfg.get("reply-timeout", 3600)))
    k_all = list(range(server.clients))

    def write(metrics: dict, clock: float) -> None:
        metrics["wall_seconds"] = time.monotonic() - clock
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")
        log(INFO, "[fibecfed] round %d: accuracy %s, bytes up %d", metrics["round"], metrics["accuracy"], metrics["bytes_up"])

    def evaluate(global_arrays: dict, t: int) -> list[dict]:
        record = records.to_record(global_arrays)
        content = {k: RecordDict({"arrays": record, "config": ConfigRecord({"round": t})}) for k in k_all}
        replies = nodes.exchange(records.EVALUATE, content, f"round {t} evaluation")
        return [records.counts_of(replies[k].content["metrics"]) for k in k_all]

    clock = time.monotonic()
    reports = nodes.join_all()
    gal = server.select_layers(reports)
    events("layers_selected", gal=gal, selector_reads_reports=server.needs_reports)
    setups = nodes.exchange(
        records.SETUP,
        {k: RecordDict({"config": ConfigRecord({"gal": [int(g) for g in gal]})}) for k in k_all},
        "round 0 setup",
        lambda k, _: nodes.set_up.add(k),
    )
    initial = records.from_record(setups[0].content["arrays"])
    for k in k_all:
        if not _same(initial, records.from_record(setups[k].content["arrays"])):
            raise RunFailed(f"client {k}'s initial global tensors differ from client 0's: the nodes load different models")
    pruned = [int(setups[k].content["metrics"]["pruned"]) for k in k_all if "pruned" in setups[k].content["metrics"]]
    write(
        server.start(
            initial,
            [int(setups[k].content["metrics"]["tokens"]) for k in k_all],
            max(pruned) if pruned else None,
            evaluate(initial, 0),
        ),
        clock,
    )
    for t in range(1, server.rounds + 1):
        clock = time.monotonic()
        draw = server.draw(t)
        record = records.to_record(server.global_arrays())
        content = {
            k: RecordDict({"arrays": record, "config": ConfigRecord({"round": t, "gal": [int(g) for g in gal]})})
            for k in draw["active"]
        }
        replies = nodes.exchange(
            records.TRAIN, content, f"round {t} training", lambda k, _, t=t: nodes.acked.__setitem__(k, t)
        )
        gathered = []
        for k in draw["active"]:
            c = replies[k].content
            metrics = records.fit_metrics(c["metrics"], c.get("info"))
            arrays = records.from_record(c["arrays"]) if "arrays" in c else None
            gathered.append((k, metrics, arrays))
        new_global = server.aggregate(t, gathered)
        evaluations = evaluate(new_global, t) if server.evaluates(t) else None
        write(server.finish_round(t, evaluations), clock)
    events("finished", rounds=server.rounds)


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        run(grid, context)
    except (RunFailed, fibecfed.FibecfedError) as e:
        log(WARNING, "[fibecfed] the run failed: %s", e)
        raise
