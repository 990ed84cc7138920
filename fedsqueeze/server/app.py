"""The fedsqueeze ServerApp (Flower Message API).

``app`` reads the run config from the Context (``flwr run``); ``fedsqueeze simulate``
builds its own with ``build_server_app(config, run_dir)``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedsqueeze.config import resolve_config
from fedsqueeze.server.rounds import RoundCallback, run_federation
from fedsqueeze.server.rundir import RunDir


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
        summary = run_federation(
            grid, cfg, RunDir(path), on_round=on_round, node_timeout=float(cfg["node-timeout"])
        )
        if result is not None:
            result["summary"] = summary
            result["run_dir"] = str(path)

    return app


app = build_server_app()
