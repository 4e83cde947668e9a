"""A stock Flower server (flwr 1.42, `flwr.server.start_server`, FedAvg) that also
writes what it received and what it aggregated, so a test can check FedAvg's result
against what the Rust clients sent.

FedAvg's aggregation is flwr's own (`super().aggregate_fit`); the subclass only saves
its inputs and output:

  OUT/round-NNN/received-I-J.npy  tensor J of result I
  OUT/round-NNN/aggregate-J.npy   tensor J of the new global model
  OUT/round-NNN/round.json        num_examples and metrics per result, failure count
  OUT/history.json                losses and metrics of the whole run (at the end)

Usage: python server.py --address 127.0.0.1:PORT --rounds 3 --min-clients 2 --out DIR
       [--wait-for N] [--certificates CA.pem SERVER.pem SERVER.key]
"""

import argparse
import json
import os

import numpy as np
from flwr.common import parameters_to_ndarrays
from flwr.server import ServerConfig, start_server
from flwr.server.strategy import FedAvg


class RecordingFedAvg(FedAvg):
    def __init__(self, out, **kwargs):
        super().__init__(**kwargs)
        self.out = out

    # Sampling sizes itself by the clients connected at that moment; waiting for the
    # expected number first makes the rounds' participants deterministic for the test.
    def configure_fit(self, server_round, parameters, client_manager):
        client_manager.wait_for(self.min_available_clients, timeout=600)
        return super().configure_fit(server_round, parameters, client_manager)

    def configure_evaluate(self, server_round, parameters, client_manager):
        client_manager.wait_for(self.min_available_clients, timeout=600)
        return super().configure_evaluate(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        params, metrics = super().aggregate_fit(server_round, results, failures)
        d = os.path.join(self.out, f"round-{server_round:03d}")
        os.makedirs(d, exist_ok=True)
        received = []
        for i, (proxy, fit_res) in enumerate(results):
            for j, a in enumerate(parameters_to_ndarrays(fit_res.parameters)):
                np.save(os.path.join(d, f"received-{i}-{j}.npy"), a)
            received.append(
                {
                    "num_examples": fit_res.num_examples,
                    "metrics": dict(fit_res.metrics),
                    "cid": proxy.cid,
                }
            )
        if params is not None:
            for j, a in enumerate(parameters_to_ndarrays(params)):
                np.save(os.path.join(d, f"aggregate-{j}.npy"), a)
        info = {
            "round": server_round,
            "results": received,
            "failures": [repr(f) for f in failures],
        }
        # Last: a reader that sees round.json sees every tensor.
        tmp = os.path.join(d, "round.json.tmp")
        with open(tmp, "w") as f:
            json.dump(info, f, indent=1)
        os.replace(tmp, os.path.join(d, "round.json"))
        print(f"server: round {server_round}: {len(results)} results, {len(failures)} failures", flush=True)
        return params, metrics


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--address", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-clients", type=int, default=2)
    p.add_argument("--wait-for", type=int, default=None,
                   help="clients that must be connected before a round starts")
    p.add_argument("--out", required=True)
    p.add_argument("--round-timeout", type=float, default=None)
    p.add_argument("--certificates", nargs=3, metavar=("CA", "CERT", "KEY"),
                   help="PEM files: serve with TLS")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    wait_for = a.wait_for or a.min_clients
    strategy = RecordingFedAvg(
        a.out,
        fraction_fit=1.0,
        fraction_evaluate=1.0,
        min_fit_clients=a.min_clients,
        min_evaluate_clients=a.min_clients,
        min_available_clients=wait_for,
        on_fit_config_fn=lambda rnd: {"server_round": rnd},
        on_evaluate_config_fn=lambda rnd: {"server_round": rnd},
        fit_metrics_aggregation_fn=lambda ms: {},
        evaluate_metrics_aggregation_fn=lambda ms: {
            "accuracy": sum(n * m["accuracy"] for n, m in ms) / max(1, sum(n for n, _ in ms))
        },
    )
    history = start_server(
        server_address=a.address,
        config=ServerConfig(num_rounds=a.rounds, round_timeout=a.round_timeout),
        strategy=strategy,
        certificates=tuple(open(f, "rb").read() for f in a.certificates)
        if a.certificates
        else None,
    )
    with open(os.path.join(a.out, "history.json"), "w") as f:
        json.dump(
            {
                "losses_distributed": history.losses_distributed,
                "metrics_distributed": {k: v for k, v in history.metrics_distributed.items()},
            },
            f,
            indent=1,
        )
    print("server: done", flush=True)


if __name__ == "__main__":
    main()
