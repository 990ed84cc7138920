"""mypy over the framework-free cores (compression, secagg, privacy) and the shared contracts.

The strictness lives in ``[tool.mypy]`` in pyproject.toml; this test only runs it.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORES = [
    "fedsqueeze/compression",
    "fedsqueeze/secagg",
    "fedsqueeze/privacy",
    "fedsqueeze/contracts",
]


@pytest.mark.skipif(
    importlib.util.find_spec("mypy") is None,
    reason="mypy is not installed (pip install -e '.[dev]')",
)
def test_cores_type_check(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "mypy-cache"), *CORES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"mypy failed:\n{proc.stdout}\n{proc.stderr}"
    assert "Success" in proc.stdout
