"""FibecFed's federated LoRA fine-tuning, computed by the Rust implementation.

Two classes carry the whole method, so that any transport — a Flower ServerApp and
ClientApp (``flower/app``), or a plain loop as below — computes exactly what
``fibecfed run`` computes for the same config and seed:

* :class:`Node`, one client: its layer report (round 0), its pruning mask once the
  global layers are known, its rounds (curriculum, sparse Fisher-masked updates) and
  its evaluation. With ``state_dir`` every step reads and writes its state there, so a
  new process continues it, and a round asked again gives the same reply.
* :class:`Server`, the server's steps: the global layers from the reports, client
  sampling for round t, aggregation, the byte and simulated-time accounting, the
  combined evaluation and each round's metrics.

Tensors are ``dict[str, numpy.ndarray]`` of float32, keyed by PEFT's names. Every
error of the Rust side is a :class:`FibecfedError` whose message names the file, key
or value at fault. Built as an abi3 wheel: one build serves CPython 3.11 and later.

A whole federation in one process (``python/examples/federate.py`` runs this)::

    import fibecfed

    server = fibecfed.Server.from_file("federation.toml")
    nodes = [fibecfed.Node("federation.toml", k) for k in range(server.clients)]
    gal = server.select_layers([node.report() for node in nodes])
    setups = [node.setup(gal) for node in nodes]
    initial = setups[0][1]
    pruned = [s["pruned"] for s, _ in setups if s["pruned"] is not None]
    history = [server.start(
        initial,
        [s["tokens"] for s, _ in setups],
        max(pruned) if pruned else None,
        [node.evaluate_counts(initial) for node in nodes],
    )]
    for t in range(1, server.rounds + 1):
        global_ = server.global_arrays()
        replies = []
        for k in server.draw(t)["active"]:
            arrays, n, metrics = nodes[k].fit(global_, t)
            replies.append((k, metrics, arrays))
        new_global = server.aggregate(t, replies)
        evaluations = None
        if server.evaluates(t):
            evaluations = [node.evaluate_counts(new_global) for node in nodes]
        history.append(server.finish_round(t, evaluations))
    print(history[-1]["accuracy"], history[-1]["cum_bytes_up"])
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping, Optional

import numpy as np

from . import _native
from ._native import FibecfedError, __version__

__all__ = ["Node", "Server", "FibecfedError", "__version__"]

Arrays = dict[str, np.ndarray]


def _uint(name: str, value: Any) -> int:
    """A non-negative integer argument (numpy integers too), else a FibecfedError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise FibecfedError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as Python numbers and lists, for json.dumps."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise FibecfedError(f"cannot send a {type(value).__name__} to the Rust side")


def _json(value: Any) -> str:
    return json.dumps(value, default=_plain)


def _triples(arrays: Mapping[str, Any]) -> list:
    """Named arrays as (name, shape, float32 C-contiguous buffer): no copy when the
    array already is one."""
    if not isinstance(arrays, Mapping):
        raise FibecfedError(
            f"tensors must be a mapping of name to numpy array, got {type(arrays).__name__}"
        )
    out = []
    for name, a in arrays.items():
        try:
            a = np.ascontiguousarray(a, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise FibecfedError(f"tensor {name}: not an array of numbers ({e})") from None
        out.append((str(name), [int(d) for d in a.shape], a))
    return out


def _arrays(triples: Optional[Iterable]) -> Optional[Arrays]:
    """(name, shape, bytes) triples as read-only numpy views of the bytes."""
    if triples is None:
        return None
    return {
        name: np.frombuffer(data, dtype=np.float32).reshape(shape)
        for name, shape, data in triples
    }


def _path(p: Optional[os.PathLike | str]) -> Optional[str]:
    return None if p is None else os.fspath(p)


class Node:
    """One FibecFed client: client ``client_id``'s part of the data a config names
    (the part ``fibecfed run`` gives it), its model and its state.

    ``model_dir``, ``train`` and ``test`` override the config's paths; with
    ``state_dir`` the state lives on disk there (created if missing) instead of in
    memory.
    """

    def __init__(
        self,
        config: os.PathLike | str,
        client_id: int,
        *,
        model_dir: Optional[os.PathLike | str] = None,
        train: Optional[os.PathLike | str] = None,
        test: Optional[os.PathLike | str] = None,
        state_dir: Optional[os.PathLike | str] = None,
    ) -> None:
        self._node = _native.Node(
            os.fspath(config),
            _uint("client_id", client_id),
            _path(model_dir),
            _path(train),
            _path(test),
            _path(state_dir),
        )

    @property
    def client_id(self) -> int:
        return self._node.client_id

    @property
    def config_digest(self) -> str:
        """SHA-256 of the config without its paths; the server compares it."""
        return self._node.config_digest

    def report(self) -> dict:
        """Round 0's layer report: ``client``, ``train`` and ``test`` sizes, the layer
        ``importance`` (a list, or None when the selector reads none), the scoring
        pass's padded ``tokens``, the model's ``layers``; and what a server checks:
        ``config_digest``, ``data_digest``, ``round`` (the last round it trained in) and
        ``set_up`` (whether it has its global layers)."""
        return json.loads(self._node.report_json())

    def setup(self, gal: Iterable[int]) -> tuple[dict, Arrays]:
        """Round 0 after the server chose the global layers ``gal``: the pruning mask
        (with ``[sparse.prune]``). Returns ({``tokens``, ``pruned``}, the initial
        global tensors)."""
        meta, initial = self._node.setup([_uint("gal", g) for g in gal])
        return json.loads(meta), _arrays(initial)

    def fit(
        self, global_arrays: Mapping[str, Any], round: int, gal: Optional[Iterable[int]] = None
    ) -> tuple[Optional[Arrays], int, dict]:
        """Round ``round`` (from 1) on the global tensors. Returns (the uploaded
        tensors, or None when nothing is shared or the client diverged; n_k, its
        number of training examples; metrics: ``loss_sum``, ``samples``, ``tokens``,
        ``batches``, ``diverged`` (why, or None) and ``train_loss``). ``gal``, when
        given, must be the global layers of :meth:`setup`."""
        gal = None if gal is None else [_uint("gal", g) for g in gal]
        meta, upload = self._node.fit(_uint("round", round), _triples(global_arrays), gal)
        metrics = json.loads(meta)
        if metrics.get("samples"):
            metrics["train_loss"] = metrics["loss_sum"] / metrics["samples"]
        return _arrays(upload), self._node.sizes[0], metrics

    def evaluate_counts(self, global_arrays: Mapping[str, Any], round: Optional[int] = None) -> dict:
        """Its personalised model (its state with the global tensors laid over) on its
        test part: ``correct``, ``loss_sum`` (over finite outputs), ``non_finite`` and
        ``n``: what the server adds up, exactly. With ``round``, refused when the
        client's state is already past that round."""
        r = None if round is None else _uint("round", round)
        return json.loads(self._node.evaluate_json(_triples(global_arrays), r))

    def evaluate(self, global_arrays: Mapping[str, Any], round: Optional[int] = None) -> tuple[float, float, int]:
        """(loss, accuracy, n) of :meth:`evaluate_counts`."""
        c = self.evaluate_counts(global_arrays, round)
        finite = c["n"] - c["non_finite"]
        loss = c["loss_sum"] / finite if finite else float("inf")
        accuracy = c["correct"] / c["n"] if c["n"] else float("nan")
        return loss, accuracy, c["n"]

    def save(self, path: os.PathLike | str) -> None:
        """Writes the client's state and progress to one file."""
        self._node.save(os.fspath(path))

    def load(self, path: os.PathLike | str) -> None:
        """Replaces the client's state with a file :meth:`save` wrote."""
        self._node.load(os.fspath(path))


class Server:
    """The server's steps for a config (its TOML text; :meth:`from_file` reads one).

    Call :meth:`select_layers`, :meth:`start`, then per round t = 1..rounds
    :meth:`draw`, :meth:`aggregate` with the active clients' replies, and
    :meth:`finish_round` with every client's evaluation when :meth:`evaluates`.
    """

    def __init__(self, config_text: str) -> None:
        self._server = _native.Server(config_text)

    @classmethod
    def from_file(cls, path: os.PathLike | str) -> "Server":
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise FibecfedError(f"cannot read config {os.fspath(path)}: {e.strerror}") from e
        try:
            return cls(text)
        except FibecfedError as e:
            raise FibecfedError(f"config {os.fspath(path)}: {e}") from None

    clients = property(lambda self: self._server.clients, doc="federation.clients")
    rounds = property(lambda self: self._server.rounds, doc="federation.rounds")
    seed = property(lambda self: self._server.seed, doc="the config's seed")
    needs_reports = property(
        lambda self: self._server.needs_reports,
        doc="whether the layer selection reads the clients' importance",
    )
    config_digest = property(lambda self: self._server.config_digest)
    gal = property(lambda self: self._server.gal, doc="the global layers")

    def select_layers(self, reports: Iterable[dict]) -> list[int]:
        """The global layers from every client's :meth:`Node.report`."""
        return self._server.select_layers(_json(list(reports)))

    def start(
        self,
        initial: Mapping[str, Any],
        preparation: Iterable[int],
        pruned: Optional[int],
        evaluations: Iterable[dict],
    ) -> dict:
        """Round 0's metrics, from the initial global tensors, per client id its
        setup ``tokens``, the most neurons a client pruned (None without pruning) and
        per client id its :meth:`Node.evaluate_counts`."""
        return json.loads(
            self._server.start(
                _triples(initial),
                [_uint("preparation", p) for p in preparation],
                None if pruned is None else _uint("pruned", pruned),
                _json(list(evaluations)),
            )
        )

    def draw(self, round: int) -> dict:
        """Round t's ``selected``, ``dropped`` (simulated failures), ``empty`` and
        ``active`` clients (the ones that train)."""
        return json.loads(self._server.draw_json(_uint("round", round)))

    def aggregate(self, round: int, replies: Iterable[tuple]) -> Arrays:
        """Round t's aggregation from (client, metrics, tensors) of exactly the active
        clients, as :meth:`Node.fit` returns them; the new global tensors."""
        native = []
        for k, metrics, arrays in replies:
            meta = {key: metrics.get(key) for key in ("loss_sum", "samples", "tokens", "batches", "diverged")}
            native.append((_uint("client", k), _json(meta), None if arrays is None else _triples(arrays)))
        return _arrays(self._server.aggregate(_uint("round", round), native))

    def evaluates(self, round: int) -> bool:
        return self._server.evaluates(_uint("round", round))

    def finish_round(self, round: int, evaluations: Optional[Iterable[dict]]) -> dict:
        """Round t's metrics, with every client's evaluation by client id (None in a
        round ``federation.eval_every`` skips)."""
        e = None if evaluations is None else _json(list(evaluations))
        return json.loads(self._server.finish_round(_uint("round", round), e))

    def global_arrays(self) -> Arrays:
        return _arrays(self._server.global_tensors())

    @staticmethod
    def message_bytes(arrays: Mapping[str, Any]) -> int:
        """Bytes of a message carrying these tensors, as the accounting counts them."""
        return _native.Server.message_bytes(_triples(arrays))
