"""The run directory: config, per-round metrics, checkpoints, final model, summary, plots.

Every file is written atomically (temporary file + ``os.replace``) so a run killed at
any point leaves either the previous or the new version, never half a file.

Who may read what: ``config.toml``, ``metrics.jsonl``, ``summary.json``, ``model.pt``,
``clients.json`` and the plots are the run's *releases* — under DP they hold only noised
statistics and public parameters, and may be shared. ``checkpoint.pkl`` is the server's
*private* state: under central or distributed DP it holds the secret keys of the noise and
of client sampling (whoever reads it can strip central DP's noise and knows which clients
each round used). It is written owner-only (mode 0600, set on the temporary file before a
byte is written, so the key is never readable by others even for an instant) and must not
be shared; deleting it after the run is safe (it is needed only to resume).
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CHECKPOINT = "checkpoint.pkl"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.toml"
MODEL = "model.pt"
CLIENTS = "clients.json"


PRIVATE_MODE = 0o600
"""File mode of the private checkpoint: owner read/write only."""


def atomic_write(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically; ``mode`` is set before anything is written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class Checkpoint:
    """Server state after a completed round: enough to continue the run exactly."""

    completed_round: int
    arrays: dict[str, np.ndarray]
    strategy_state: bytes
    metrics: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


class RunDir:
    """Reads and writes the files of one run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    def write_text(self, name: str, text: str) -> None:
        atomic_write(self.file(name), text.encode())

    def write_json(self, name: str, obj: Any) -> None:
        self.write_text(name, json.dumps(obj, indent=2, default=_json_default) + "\n")

    def write_metrics(self, rows: list[Mapping[str, Any]]) -> None:
        text = "".join(json.dumps(dict(r), default=_json_default) + "\n" for r in rows)
        self.write_text(METRICS, text)

    def read_metrics(self) -> list[dict[str, Any]]:
        p = self.file(METRICS)
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

    def save_checkpoint(self, ckpt: Checkpoint) -> None:
        """Write the private checkpoint, owner-only (mode 0600; see the module docstring)."""
        data = pickle.dumps(ckpt, protocol=pickle.HIGHEST_PROTOCOL)
        atomic_write(self.file(CHECKPOINT), data, mode=PRIVATE_MODE)

    def load_checkpoint(self) -> Checkpoint | None:
        p = self.file(CHECKPOINT)
        if not p.exists():
            return None
        with p.open("rb") as fh:
            ckpt = pickle.load(fh)  # our own file, written by save_checkpoint
        if not isinstance(ckpt, Checkpoint):
            raise ValueError(f"{p}: not a fedsqueeze checkpoint")
        return ckpt

    def save_model(self, arrays: Mapping[str, np.ndarray]) -> None:
        import io

        import torch

        buf = io.BytesIO()
        torch.save({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}, buf)
        atomic_write(self.file(MODEL), buf.getvalue())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serializable: {type(obj)}")
