"""The records FibecFed's messages carry, in one place for both apps.

Tensors travel as an ArrayRecord keyed by PEFT's names (float32, bit for bit).
Numbers travel in MetricRecords (int is a signed 64-bit integer, float a double, so
sums such as the evaluation's loss arrive exactly); strings and lists of layer
indices in ConfigRecords.

Message types:
    query.report  round 0: the client's layer report (and who it is)
    query.setup   round 0: the global layers; the client prunes and returns the
                  initial global tensors
    train         round t: the global tensors; the client's upload and its counts
    evaluate      the global tensors; the client's evaluation counts
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Optional

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

REPORT = "query.report"
SETUP = "query.setup"
TRAIN = "train"
EVALUATE = "evaluate"


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(OrderedDict((name, Array(np.asarray(a))) for name, a in arrays.items()))


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def report_record(report: dict) -> ConfigRecord:
    rec = {
        "client": int(report["client"]),
        "train": int(report["train"]),
        "test": int(report["test"]),
        "tokens": int(report["tokens"]),
        "layers": int(report["layers"]),
        "config-digest": str(report["config_digest"]),
        "data-digest": str(report["data_digest"]),
        "round": int(report["round"]),
        "set-up": bool(report["set_up"]),
    }
    if report.get("importance") is not None:
        rec["importance"] = [float(x) for x in report["importance"]]
    return ConfigRecord(rec)


def report_of(rec: ConfigRecord) -> dict:
    return {
        "client": int(rec["client"]),
        "train": int(rec["train"]),
        "test": int(rec["test"]),
        "tokens": int(rec["tokens"]),
        "layers": int(rec["layers"]),
        "config_digest": str(rec["config-digest"]),
        "data_digest": str(rec["data-digest"]),
        "round": int(rec["round"]),
        "set_up": bool(rec["set-up"]),
        "importance": [float(x) for x in rec["importance"]] if "importance" in rec else None,
    }


def fit_records(metrics: dict) -> tuple[MetricRecord, ConfigRecord]:
    m = {"tokens": int(metrics["tokens"])}
    c = {}
    if metrics.get("diverged") is not None:
        c["diverged"] = str(metrics["diverged"])
    else:
        m["loss-sum"] = float(metrics["loss_sum"])
        m["samples"] = int(metrics["samples"])
        if metrics.get("batches") is not None:
            m["batches"] = int(metrics["batches"])
    return MetricRecord(m), ConfigRecord(c)


def fit_metrics(m: MetricRecord, c: Optional[ConfigRecord]) -> dict:
    out = {"tokens": int(m["tokens"]), "diverged": None, "batches": None}
    if c is not None and "diverged" in c:
        out["diverged"] = str(c["diverged"])
        return out
    out["loss_sum"] = float(m["loss-sum"])
    out["samples"] = int(m["samples"])
    if "batches" in m:
        out["batches"] = int(m["batches"])
    return out


def counts_record(c: dict) -> MetricRecord:
    return MetricRecord(
        {
            "correct": int(c["correct"]),
            "loss-sum": float(c["loss_sum"]),
            "non-finite": int(c["non_finite"]),
            "num-examples": int(c["n"]),
        }
    )


def counts_of(m: MetricRecord) -> dict:
    return {
        "correct": int(m["correct"]),
        "loss_sum": float(m["loss-sum"]),
        "non_finite": int(m["non-finite"]),
        "n": int(m["num-examples"]),
    }
