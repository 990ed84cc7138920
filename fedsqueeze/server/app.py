"""The fedsqueeze ServerApp (Flower Message API).

``app`` reads the run config from the Context (``flwr run``); ``fedsqueeze simulate``
builds its own with ``build_server_app(config, run_dir)``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from logging import ERROR, INFO
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.common.logger import log as flwr_log
from flwr.serverapp import Grid, ServerApp

from fedsqueeze.config import resolve_config
from fedsqueeze.server.rounds import FederationError, RoundCallback, run_federation
from fedsqueeze.server.rundir import RunDir


def round_line(row: Mapping[str, Any], num_rounds: int) -> str:
    """One round on one line: what ``flwr run --stream`` / ``flwr log`` show per round."""
    line = (
        f"fedsqueeze round {row['round']}/{num_rounds}: accuracy {row['accuracy']:.4f}, "
        f"loss {row['loss']:.4f}, uplink {row['uplink_bytes']} B, "
        f"downlink {row['downlink_bytes']} B, clients {row['clients']}"
    )
    failed = {k: row.get(k, 0) for k in ("rejected_updates", "dropped_clients")}
    if any(failed.values()):
        line += ", " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in failed.items())
    return line + f", {row['wall_s']:.1f} s"


def default_run_dir(config: Mapping[str, Any], root: str | Path = "runs") -> Path:
    """``runs/<dataset>-<model>-<codec>-<timestamp>`` (or ``out-dir`` when set)."""
    if config.get("out-dir"):
        return Path(str(config["out-dir"]))
    name = f"{config['dataset']}-{config['model']}-{config['codec']}"
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name.replace("npz:", ""))
    return Path(root) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def build_server_app(
    config: Mapping[str, Any] | None = None,
    run_dir: str | Path | None = None,
    on_round: RoundCallback | None = None,
    result: dict[str, Any] | None = None,
) -> ServerApp:
    """Build the ServerApp; ``config=None`` reads the run config from the Context.

    ``result``, when given, receives the run summary under ``"summary"``.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = dict(config) if config is not None else resolve_config(dict(context.run_config))
        path = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
        report = on_round
        if report is None:
            # `flwr run`: each round on one line in the ServerApp's log (Flower's logger is
            # what `flwr run --stream` and `flwr log` show).
            def report(row: dict[str, Any]) -> None:
                flwr_log(INFO, round_line(row, int(cfg["num-rounds"])))

        try:
            summary = run_federation(
                grid, cfg, RunDir(path), on_round=report, node_timeout=float(cfg["node-timeout"])
            )
        except FederationError as err:
            # Before round 1 (the node handshake): one line that says what to change, then
            # the run fails (Flower adds its traceback of the exception).
            flwr_log(ERROR, "fedsqueeze: run stopped before round 1: %s", err)
            raise FederationError(str(err)) from None
        if result is not None:
            result["summary"] = summary
            result["run_dir"] = str(path)

    return app


app = build_server_app()
