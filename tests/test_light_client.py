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
    "onnxruntime",
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


# ``None`` in sys.modules is how Python marks a module as not importable: ``import x`` raises
# ModuleNotFoundError and ``importlib.util.find_spec("x")`` returns None, as for a package
# that is not installed (torch probes optional packages that way).
BLOCKER = f"""
import sys
for name in {NOT_ON_DEVICE!r}:
    sys.modules[name] = None
"""


DEVICE_ROUND = """
import sys
import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from fedsqueeze.client.app import build_client_app
from fedsqueeze.config import resolve_config
from fedsqueeze.contracts.records import from_record, to_record
from fedsqueeze.models import build_model
from fedsqueeze.models.retrain import spec_config
from fedsqueeze.models.weights import state_to_numpy

TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = 1
rng = np.random.default_rng(0)
np.savez(sys.argv[1], x_train=rng.normal(size=(40, 64)).astype(np.float32),
         y_train=rng.integers(0, 10, 40))
cfg = resolve_config({"model": "logreg", "client-data": "device", "local-epochs": 1})
app = build_client_app(cfg)
arrays = state_to_numpy(build_model("logreg", (64,), 10, seed=0))
content = RecordDict({"arrays": to_record(arrays),
                      "config": ConfigRecord({"server-round": 1, **spec_config((64,), 10)})})
msg = Message(content, dst_node_id=1, message_type=MessageType.TRAIN)
node = {"partition-id": 0, "num-partitions": 1, "data-path": sys.argv[1]}
ctx = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
reply = app(msg, ctx)
assert not reply.has_error(), reply.error
new = from_record(reply.content["arrays"])
assert any(not np.array_equal(new[k], arrays[k]) for k in arrays)
print("trained", reply.content["metrics"]["num-examples"])
# Server-side commands on a device install: one line naming the extra, exit status 2.
from fedsqueeze.cli import main
print("exit", main(["simulate", "--out", sys.argv[2]]), main(["predict", "m.onnx", "x.npz"]))
"""


def test_a_device_without_the_extras_trains_on_its_own_file(tmp_path: Path) -> None:
    """What a device runs: a train message, node config ``data-path``; nothing of the
    server/simulation extras importable. Commands that need an extra say which."""
    code = BLOCKER + DEVICE_ROUND
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "device.npz"), str(tmp_path / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-2:] == ["trained 40", "exit 2 2"]
    errors = [line for line in out.stderr.splitlines() if line.startswith("fedsqueeze: error:")]
    assert len(errors) == 2
    assert errors[0].endswith("pip install 'fedsqueeze[simulation]'")
    assert "needs onnxruntime" in errors[1] and errors[1].endswith("'fedsqueeze[edge]'")
    assert not (tmp_path / "run").exists()


def test_the_blocker_really_blocks() -> None:
    """The test above would pass vacuously if the blocker let the packages through."""
    out = _python(BLOCKER + "import sklearn\n")
    assert out.returncode != 0
    assert "ModuleNotFoundError: import of sklearn halted" in out.stderr


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


# --------------------------------------------------------------------------- torch per message

# A deployed SuperNode starts a fresh ClientApp process for every message, and importing torch
# is most of that process's start. Only a message that builds a model (train, evaluate,
# SecAgg+ `setup`) may import it: the handshake and the later SecAgg+ stages must not.
NO_MODEL_STAGES = """
import pickle, sys
for name in ("torch", "opacus", "torchao"):
    sys.modules[name] = None  # as if not installed: any import of them raises
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.serde import context_from_proto, message_from_proto
from flwr.proto.message_pb2 import Context as ContextProto, Message as MessageProto
from flwr.supercore.task_identity import TaskIdentity
from fedsqueeze.client.app import app  # what `flwr-clientapp` loads on a SuperNode
TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = 1  # as a SuperNode sets
ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 5},
              state=RecordDict(), run_config={})
query = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=7,
                message_type=MessageType.QUERY)
reply = app(query, ctx)
assert not reply.has_error(), reply.error
print("query", dict(reply.content["node"]))
for stage, raw_msg, raw_ctx in pickle.load(open(sys.argv[1], "rb")):
    msg = message_from_proto(MessageProto.FromString(raw_msg))
    ctx = context_from_proto(ContextProto.FromString(raw_ctx))
    reply = app(msg, ctx)
    assert not reply.has_error(), (stage, reply.error)
    print(stage, sorted(reply.content.config_records))
"""


def test_handshake_and_secagg_stages_after_setup_run_without_torch(tmp_path: Path) -> None:
    """Replays one node's SecAgg+ ``share``/``mask``/``check``/``unmask`` messages, each
    with the ``Context`` it had (serialized as Flower passes them to a ClientApp process),
    in a fresh interpreter where torch, Opacus and torchao cannot be imported."""
    import pickle

    from flwr.common.serde import context_to_proto, message_to_proto
    from test_secure_glue import InProcessGrid, _run

    from fedsqueeze.contracts.secure_wire import SECAGG_KEY, SETUP, STAGES

    class Recorder(InProcessGrid):
        """Keeps node 1000's stage messages after setup, with its state before each."""

        def __init__(self, config: dict, num_nodes: int) -> None:
            super().__init__(config, num_nodes)
            self.kept: list[tuple[str, bytes, bytes]] = []

        def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
            messages = list(messages)
            for msg in messages:
                stage = str(msg.content.config_records[SECAGG_KEY]["stage"])
                if msg.metadata.dst_node_id == 1000 and stage != SETUP:
                    ctx = context_to_proto(self.contexts[1000]).SerializeToString()
                    self.kept.append((stage, message_to_proto(msg).SerializeToString(), ctx))
            return super().send_and_receive(messages, timeout=timeout)

    run = _run({}, grid_type=Recorder)
    assert run.rounds[0].row["secagg_included"] == 5  # the recorded round completed
    kept = run.grid.kept
    assert [stage for stage, _, _ in kept] == [s for s in STAGES if s != SETUP]
    (tmp_path / "stages.pkl").write_bytes(pickle.dumps(kept))
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    out = subprocess.run(
        [sys.executable, "-c", NO_MODEL_STAGES, str(tmp_path / "stages.pkl")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "query {'partition-id': 0, 'num-partitions': 5}"
    assert [line.split()[0] for line in lines[1:]] == [s for s, _, _ in kept]
    assert all("'sa'" in line for line in lines[1:])  # each stage replied with its record


def test_the_torch_blocker_really_blocks() -> None:
    """The test above would pass vacuously if a stage could import torch anyway."""
    out = _python(NO_MODEL_STAGES.split("from flwr.app")[0] + "import fedsqueeze.models.zoo\n")
    assert out.returncode != 0
    assert "ModuleNotFoundError: import of torch halted" in out.stderr
