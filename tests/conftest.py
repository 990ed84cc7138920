"""Test-wide environment: keep Flower, Ray and dataset caches out of the user's home."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest

# Set before anything imports flwr/ray. A short root keeps Ray's socket paths < 108 chars.
_ROOT = Path(tempfile.mkdtemp(prefix="fsq-"))
for _var, _sub in (("FLWR_HOME", "flwr"), ("RAY_TMPDIR", "ray"), ("FEDSQUEEZE_CACHE", "cache")):
    os.environ.setdefault(_var, str(_ROOT / _sub))
    Path(os.environ[_var]).mkdir(parents=True, exist_ok=True)
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def test_root() -> Path:
    """A per-session scratch directory outside the user's home."""
    return _ROOT


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    """Flower needs a task identity to build a Message outside an app (tests build many)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = 1
    TaskIdentity.task_id = 1
    TaskIdentity.node_id = 1


@pytest.fixture
def torch_one_thread() -> Any:
    """Torch on one thread for the test: tiny models gain nothing from a second thread, and
    on a loaded machine it only contends with the other processes (measured 3.6-4x slower
    there; no difference on a quiet machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def distill_federation(test_root: Path) -> Any:
    """Run a small distillation federation in process: ``run(name, **overrides)``.

    One config for the distillation tests (digits, ``mlp``, 3 clients, 2 rounds, 1 local
    epoch, 60 distillation steps on a transfer set written once per session). Keys are
    run-config names with ``_`` for ``-``. Returns ``(summary, run_dir, grid)``; the path of
    the transfer set is ``run.transfer``.
    """
    import numpy as np

    from fedsqueeze.client.app import build_client_app
    from fedsqueeze.config import resolve_config
    from fedsqueeze.federation import dataset_for
    from fedsqueeze.inprocess import InProcessGrid
    from fedsqueeze.server.rounds import run_federation
    from fedsqueeze.server.rundir import RunDir

    ds = dataset_for(resolve_config({"dataset": "digits"}))
    # A stand-in for public unlabeled data: noisy copies of test inputs (fixture only).
    noise = np.random.default_rng(0).normal(scale=0.3, size=ds.x_test.shape)
    transfer = test_root / "distill-transfer.npz"
    np.savez(transfer, x=ds.x_test + noise.astype(np.float32))
    counter = iter(range(10**6))

    def run(name: str, **overrides: Any) -> tuple[dict[str, Any], RunDir, InProcessGrid]:
        cfg = resolve_config(
            {
                "dataset": "digits",
                "model": "mlp",
                "num-clients": 3,
                "clients-per-round": 3,
                "num-rounds": 2,
                "local-epochs": 1,
                "distill-data": f"npz:{transfer}",
                "distill-steps": 60,
                "distill-lr": 0.01,
            },
            {k.replace("_", "-"): v for k, v in overrides.items()},
        )
        run_dir = RunDir(test_root / "distill-runs" / f"{name}-{next(counter)}")
        grid = InProcessGrid(build_client_app(cfg), int(cfg["num-clients"]))
        return run_federation(grid, cfg, run_dir, node_timeout=5), run_dir, grid

    run.transfer = f"npz:{transfer}"  # type: ignore[attr-defined]
    return run
