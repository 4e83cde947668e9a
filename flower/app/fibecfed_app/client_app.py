"""The ClientApp: one FibecFed client per SuperNode, computed by the Rust bindings.

Each SuperNode says which client it is and where its files are in its node config:

    flower-supernode ... --node-config "client-id=0 config='/srv/fibecfed/federation.toml' state-dir='/srv/fibecfed/state'"

    client-id  the client's id, 0 .. federation.clients - 1 (an integer)
    config     the federation's TOML config (the server's file, or a copy of it)
    state-dir  where the client keeps its state between messages (created if missing)
    model-dir, train, test
               optional: override the config's model folder and data files

Flower starts a new ClientApp process for every message, so every message builds the
client from its node config (model and data are read again) and its state from
state-dir; a message sent again after a lost reply gets the same answer. A bad node
config makes every message fail with a ValueError naming the key; Flower passes its
message to the server as the error reply's reason, and the SuperNode goes on.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import fibecfed
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fibecfed_app import records

app = ClientApp()

#: Test hooks: sleep this many milliseconds at the start of every train message, after
#: touching `fit-K-rT` in the marker folder, so that a test can kill the node inside it.
FIT_DELAY_ENV = "FIBECFED_TEST_FIT_DELAY_MS"
FIT_MARKER_ENV = "FIBECFED_TEST_MARKER_DIR"

PATH_KEYS = ("config", "state-dir", "model-dir", "train", "test")


def node_of(context: Context) -> fibecfed.Node:
    """The client this SuperNode serves, from its node config."""
    cfg = context.node_config
    if "client-id" not in cfg:
        raise ValueError(
            "node config client-id is missing: start the SuperNode with "
            "--node-config \"client-id=K config='/path/federation.toml' state-dir='/path/state'\""
        )
    k = cfg["client-id"]
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"node config client-id must be a non-negative integer, got {k!r}")
    paths = {}
    for key in PATH_KEYS:
        value = cfg.get(key)
        if value is None:
            if key in ("config", "state-dir"):
                raise ValueError(f"node config {key} is missing (a quoted path: {key}='/path')")
            continue
        if not isinstance(value, str) or not value:
            raise ValueError(f"node config {key} must be a quoted path, got {value!r}")
        paths[key] = value
    config = Path(paths["config"])
    if not config.is_file():
        raise ValueError(f"node config config: {config} is not a file")
    for key in ("train", "test"):
        if key in paths and not Path(paths[key]).is_file():
            raise ValueError(f"node config {key}: {paths[key]} is not a file")
    if "model-dir" in paths and not Path(paths["model-dir"]).is_dir():
        raise ValueError(f"node config model-dir: {paths['model-dir']} is not a folder")
    try:
        return fibecfed.Node(
            config,
            k,
            model_dir=paths.get("model-dir"),
            train=paths.get("train"),
            test=paths.get("test"),
            state_dir=paths["state-dir"],
        )
    except fibecfed.FibecfedError as e:
        # Name the node config: the message itself names the file or config key.
        raise ValueError(f"node config (client-id={k}, config='{config}'): {e}") from None


def answers(handler):
    """Every failure of a step leaves as an exception Flower reports to the server
    with its message (a Rust panic is a BaseException, which Flower would count as a
    crashed ClientApp instead)."""

    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except (Exception, KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: B036 - a PanicException from the bindings
            raise RuntimeError(f"{type(e).__name__}: {e}") from None

    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


@app.query("report")
@answers
def report(msg: Message, context: Context) -> Message:
    node = node_of(context)
    return Message(RecordDict({"report": records.report_record(node.report())}), reply_to=msg)


@app.query("setup")
@answers
def setup(msg: Message, context: Context) -> Message:
    node = node_of(context)
    gal = [int(g) for g in msg.content["config"]["gal"]]
    meta, initial = node.setup(gal)
    metrics = {"tokens": int(meta["tokens"])}
    if meta["pruned"] is not None:
        metrics["pruned"] = int(meta["pruned"])
    content = RecordDict(
        {"arrays": records.to_record(initial), "metrics": MetricRecord(metrics)}
    )
    return Message(content, reply_to=msg)


@app.train()
@answers
def train(msg: Message, context: Context) -> Message:
    node = node_of(context)
    t = int(msg.content["config"]["round"])
    gal = [int(g) for g in msg.content["config"]["gal"]]
    delay = os.environ.get(FIT_DELAY_ENV)
    if delay:
        marker = os.environ.get(FIT_MARKER_ENV)
        if marker:
            Path(marker, f"fit-{node.client_id}-r{t}").touch()
        time.sleep(int(delay) / 1000)
    arrays, n, metrics = node.fit(records.from_record(msg.content["arrays"]), t, gal)
    m, c = records.fit_records(metrics)
    m["num-examples"] = int(n)
    content = {"metrics": m, "info": c}
    if arrays is not None:
        content["arrays"] = records.to_record(arrays)
    return Message(RecordDict(content), reply_to=msg)


@app.evaluate()
@answers
def evaluate(msg: Message, context: Context) -> Message:
    node = node_of(context)
    t = int(msg.content["config"]["round"])
    counts = node.evaluate_counts(records.from_record(msg.content["arrays"]), t)
    return Message(RecordDict({"metrics": records.counts_record(counts)}), reply_to=msg)
