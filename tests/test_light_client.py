"""The light device client: what `pip install fedsqueeze` installs and what the ClientApp imports.

A device installs the base dependencies only (no Ray, pyarrow, scikit-learn, matplotlib,
flwr-datasets, onnx): the ClientApp must import and build without them. Checked in fresh
interpreters, once by looking at ``sys.modules`` after the import and once with those
packages made unimportable (as on a device that never installed them).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

# Top-level modules of packages a device does not install (server/simulation/export extras).
NOT_ON_DEVICE = (
    "ray",
    "sklearn",
    "matplotlib",
    "flwr_datasets",
    "datasets",
    "pyarrow",
    "pandas",
    "mnist1d",
    "onnx",
    "onnxscript",
)
CLIENT_MODULES = ("fedsqueeze.client", "fedsqueeze.client.app", "fedsqueeze.device")


def _python(code: str) -> subprocess.CompletedProcess[str]:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


def test_importing_the_client_app_imports_no_server_or_simulation_package() -> None:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in CLIENT_MODULES)
        + "from fedsqueeze.client.app import app\n"
        + f"print(sorted(m for m in {NOT_ON_DEVICE!r} if m in sys.modules))\n"
    )
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


BLOCKER = f"""
import importlib.abc, sys
class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {NOT_ON_DEVICE!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not installed on a device)")
        return None
sys.meta_path.insert(0, _Absent())
"""


def test_the_client_app_builds_with_the_extras_absent() -> None:
    code = BLOCKER + (
        "from fedsqueeze.client.app import app, build_client_app\n"
        "from fedsqueeze.config import resolve_config\n"
        "build_client_app(resolve_config())\n"
        "import fedsqueeze.cli\n"
        "print('ok')\n"
    )
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_the_blocker_really_blocks() -> None:
    """The test above would pass vacuously if the blocker let the packages through."""
    out = _python(BLOCKER + "import sklearn\n")
    assert out.returncode != 0
    assert "not installed on a device" in out.stderr


# --------------------------------------------------------------------------- dependencies


def _names(reqs: list[str]) -> set[str]:
    return {Requirement(r).name.lower() for r in reqs}


def test_base_install_is_the_device_client() -> None:
    base = PYPROJECT["project"]["dependencies"]
    names = _names(base)
    assert {"torch", "flwr", "opacus", "cryptography", "numpy", "zstandard"} <= names
    heavy = {"ray", "scikit-learn", "matplotlib", "flwr-datasets", "mnist1d", "onnx", "onnxscript"}
    assert not names & heavy
    flwr = next(Requirement(r) for r in base if Requirement(r).name == "flwr")
    assert not flwr.extras, "flwr[simulation] pulls Ray: it belongs to the simulation extra"
    torch = next(Requirement(r) for r in base if Requirement(r).name == "torch")
    # A range (devices take their platform's wheel) that the CPU wheel here satisfies and
    # that stops before the newest torch the index serves (a CUDA build, several GB).
    assert torch.specifier.contains(Version("2.13.0"))
    assert torch.specifier.contains(Version("2.6.0"))
    assert not torch.specifier.contains(Version("2.14.1"))


def test_extras_hold_the_rest() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    simulation = extras["simulation"]
    assert any(
        Requirement(r).name == "flwr" and "simulation" in Requirement(r).extras for r in simulation
    )
    server = _names(extras["server"])
    assert {"flwr-datasets", "scikit-learn", "mnist1d", "matplotlib"} <= server
    assert "onnxruntime" in _names(extras["edge"])
    assert {"onnx", "onnxscript"} <= _names(extras["export"])
    everything = Requirement(extras["all"][0])
    assert everything.name == "fedsqueeze"
    assert set(everything.extras) == {"simulation", "export", "dev"}


def test_make_setup_installs_everything_with_the_cpu_torch_first() -> None:
    makefile = (REPO / "Makefile").read_text()
    torch_line = makefile.index("torch==2.13.0")
    all_line = makefile.index("-e '.[all]'")
    assert torch_line < all_line
