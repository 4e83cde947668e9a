"""A whole FibecFed federation in one Python process, through the `fibecfed` bindings.

    python federate.py CONFIG [--out metrics.jsonl] [--state-dir DIR]

The same steps as the Flower ServerApp and ClientApp in flower/app, without the
transport: the server's `Server` and one `Node` per client. Writes one JSON line of
metrics per round, as `fibecfed run` writes metrics.jsonl; wall_seconds aside, the
lines equal `fibecfed run`'s for the same config.
"""

import argparse
import json
import os
import sys
import time

import fibecfed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--out", help="write the metrics here (JSON lines)")
    parser.add_argument("--state-dir", help="keep client k's state in DIR/client-k")
    args = parser.parse_args()
    try:
        server = fibecfed.Server.from_file(args.config)
        nodes = [
            fibecfed.Node(
                args.config,
                k,
                state_dir=None if args.state_dir is None else os.path.join(args.state_dir, f"client-{k}"),
            )
            for k in range(server.clients)
        ]
        history = run(server, nodes)
    except fibecfed.FibecfedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lines = "".join(json.dumps(m) + "\n" for m in history)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(lines)
    else:
        sys.stdout.write(lines)
    return 0


def run(server: "fibecfed.Server", nodes: list) -> list:
    clock = time.monotonic()
    gal = server.select_layers([node.report() for node in nodes])
    setups = [node.setup(gal) for node in nodes]
    initial = setups[0][1]
    pruned = [s["pruned"] for s, _ in setups if s["pruned"] is not None]
    round0 = server.start(
        initial,
        [s["tokens"] for s, _ in setups],
        max(pruned) if pruned else None,
        [node.evaluate_counts(initial, 0) for node in nodes],
    )
    round0["wall_seconds"] = time.monotonic() - clock
    history = [round0]
    for t in range(1, server.rounds + 1):
        clock = time.monotonic()
        global_arrays = server.global_arrays()
        replies = []
        for k in server.draw(t)["active"]:
            arrays, _n, metrics = nodes[k].fit(global_arrays, t, gal)
            replies.append((k, metrics, arrays))
        new_global = server.aggregate(t, replies)
        evaluations = None
        if server.evaluates(t):
            evaluations = [node.evaluate_counts(new_global, t) for node in nodes]
        metrics = server.finish_round(t, evaluations)
        metrics["wall_seconds"] = time.monotonic() - clock
        history.append(metrics)
        print(
            f"round {t}: accuracy {metrics['accuracy']}, bytes up {metrics['bytes_up']}",
            file=sys.stderr,
        )
    return history


if __name__ == "__main__":
    sys.exit(main())
