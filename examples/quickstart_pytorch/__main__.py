"""Run the example in Flower's Simulation Engine: ``python -m quickstart_pytorch --mode MODE``."""

from __future__ import annotations

import argparse

from flwr.simulation import run_simulation

from .client_app import app as client_app
from .server_app import DEFAULTS, MODES, build_server_app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m quickstart_pytorch")
    parser.add_argument("--mode", choices=MODES, default=DEFAULTS["mode"])
    parser.add_argument("--rounds", type=int, default=DEFAULTS["num-server-rounds"])
    parser.add_argument("--clients", type=int, default=DEFAULTS["num-clients"])
    parser.add_argument("--out", default="", help="write the run's report (JSON) here")
    args = parser.parse_args()
    run_config = {
        "mode": args.mode,
        "num-server-rounds": args.rounds,
        "num-clients": args.clients,
        "out": args.out,
    }
    run_simulation(
        server_app=build_server_app(run_config),
        client_app=client_app,
        num_supernodes=args.clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )


if __name__ == "__main__":
    main()
