"""Test-wide environment: keep Flower, Ray and dataset caches out of the user's home."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

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
