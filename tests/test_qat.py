"""Quantization-aware training: fake quantization in training, the int8 model, the client mod,
the server wrapper in a federation (with codecs and pruning, and under SecAgg), and the int8
artifact against the federation's reported int8 accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

from fedsqueeze.client.qat import qat_mod
from fedsqueeze.config import ConfigError, resolve_config
from fedsqueeze.contracts.records import to_record
from fedsqueeze.models import build_model
from fedsqueeze.models.export import export_onnx, export_run, run_onnx
from fedsqueeze.models.qat import (
    QAT_KEY,
    QATError,
    QDQLayer,
    calibrate,
    check_supported,
    int8_model,
    qat_training,
    weight_scales,
)

TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = 1


def _fake_quant_linear(layer: nn.Linear, x: torch.Tensor, fq_x: torch.Tensor) -> torch.Tensor:
    s = weight_scales(layer.weight)
    w = torch.clamp(torch.round(layer.weight / s[:, None]), -127, 127) * s[:, None]
    return torch.nn.functional.linear(fq_x, w, layer.bias)


def test_training_under_qat_fake_quantizes_and_keeps_the_state_dict() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10, seed=0)
    keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    x = torch.randn(32, 1, 8, 8)
    plain = model(x).detach()
    with qat_training():
        out = model(x)
        # the first layer saw int8 weights: its output equals the manual fake-quant product
        # (the input of fc1 is quantized on an observer fed with this very batch)
        seen: dict[str, torch.Tensor] = {}
        h = model.fc1.register_forward_hook(lambda m, a, o: seen.update(inp=a[0], out=o))
        model(x)
        h.remove()
        expected = _fake_quant_linear(model.fc1, x.flatten(1), seen["inp"])
        torch.testing.assert_close(seen["out"], expected, atol=1e-5, rtol=1e-5)
        assert not torch.equal(seen["inp"], x.flatten(1))  # the activation was quantized too
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        before = model.fc1.weight.detach().clone()
        out.sum().backward()
        assert model.fc1.weight.grad is not None  # straight-through: gradients reach fp32
        opt.step()
        assert not torch.equal(before, model.fc1.weight.detach())
    assert not torch.allclose(out.detach(), plain)
    # the exchanged arrays keep their names and shapes; nothing is left on the model
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == keys
    assert "weight" not in model.fc1.__dict__
    after = model(x).detach()
    w = model.fc1.weight
    assert torch.equal(
        after,
        model.fc3(
            model.act2(model.fc2(model.act1(nn.functional.linear(x.flatten(1), w, model.fc1.bias))))
        ),
    )


class _WithNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc(x))


def test_an_unsupported_layer_is_a_one_line_error_naming_it() -> None:
    with pytest.raises(QATError, match="'norm' \\(LayerNorm\\)") as err:
        check_supported(_WithNorm())
    assert "\n" not in str(err.value)
    with qat_training(), pytest.raises(QATError, match="LayerNorm"):
        _WithNorm()(torch.zeros(2, 4))


@pytest.mark.parametrize("name,shape", [("mlp", (1, 8, 8)), ("cnn1d", (1, 40))])
def test_int8_model_is_int8_and_its_onnx_artifact_computes_the_same(
    tmp_path: Path, name: str, shape: tuple[int, ...]
) -> None:
    import onnx

    model = build_model(name, shape, 10, seed=1).eval()
    x = np.random.default_rng(0).normal(size=(200, *shape)).astype(np.float32)
    scales = calibrate(model, x[:100])
    q = int8_model(model, scales)
    layers = [m for m in q.modules() if isinstance(m, QDQLayer)]
    assert len(layers) == sum(isinstance(m, nn.Linear | nn.Conv1d) for m in model.modules())
    assert all(m.weight_int8.dtype == torch.int8 for m in layers)
    assert all(int(m.weight_int8.abs().max()) == 127 for m in layers)  # symmetric, full range
    with torch.no_grad():
        fp32, int8 = model(torch.from_numpy(x)).numpy(), q(torch.from_numpy(x)).numpy()
    assert 0 < np.abs(fp32 - int8).max() < 0.1 * np.abs(fp32).max()
    path = export_onnx(q, shape, tmp_path / "m.onnx")
    graph = onnx.load(str(path)).graph
    weights = [t for t in graph.initializer if t.data_type == 3 and len(t.dims) >= 2]  # INT8
    assert not [t.name for t in graph.initializer if t.data_type == 1 and len(t.dims) >= 2]
    assert sum(int(np.prod(t.dims)) for t in weights) == sum(m.weight_int8.numel() for m in layers)
    ort = run_onnx(path, x)
    np.testing.assert_allclose(ort, int8, atol=2e-2)
    assert (ort.argmax(1) == int8.argmax(1)).mean() >= 0.99


def _train_msg(content: RecordDict) -> Message:
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


def test_qat_mod_runs_the_handler_under_fake_quant_only_when_asked() -> None:
    from fedsqueeze.models import qat as qat_core

    seen = []

    def handler(msg: Message, context: Context) -> Message:
        seen.append((qat_core._ACTIVE.get() is not None, QAT_KEY in msg.content))
        return Message(content=RecordDict(), reply_to=msg)

    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    arrays = RecordDict({"arrays": to_record({"w": np.zeros(2, np.float32)})})
    qat_mod(_train_msg(arrays), ctx, handler)
    asked = RecordDict({**arrays, QAT_KEY: ConfigRecord({"scheme": "int8"})})
    qat_mod(_train_msg(asked), ctx, handler)
    assert seen == [(False, False), (True, False)]
    bad = RecordDict({**arrays, QAT_KEY: ConfigRecord({"scheme": "int4"})})
    reply = qat_mod(_train_msg(bad), ctx, handler)
    assert reply.has_error() and "int4" in reply.error.reason

    def failing(msg: Message, context: Context) -> Message:
        _WithNorm()(torch.zeros(1, 4))
        raise AssertionError("unreachable")

    reply = qat_mod(_train_msg(asked), ctx, failing)
    assert reply.has_error() and "LayerNorm" in reply.error.reason


def test_qat_with_local_dp_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match="qat"):
        resolve_config({"qat": "int8", "dp": "local", "dp-noise-multiplier": 1.0})


def _federate(tmp_path: Path, **overrides: object) -> tuple[Path, list[dict]]:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from inprocess import InProcessGrid

    from fedsqueeze.client.app import build_client_app
    from fedsqueeze.server.rounds import run_federation
    from fedsqueeze.server.rundir import RunDir

    cfg = resolve_config(
        {
            "model": "mlp",
            "num-clients": 3,
            "clients-per-round": 3,
            "num-rounds": 2,
            "local-epochs": 1,
            "qat": "int8",
            **overrides,
        }
    )
    out = tmp_path / "run"
    run_federation(InProcessGrid(build_client_app(cfg), 3), cfg, RunDir(out), node_timeout=60)
    return out, RunDir(out).read_metrics()


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """QAT from round 2 with a q8 uplink and downlink and 50% magnitude pruning."""
    return _federate(
        tmp_path_factory.mktemp("qat"),
        **{
            "qat-start-round": 2,
            "codec": "q8",
            "downlink-codec": "q8",
            "prune": "magnitude",
            "prune-sparsity": 0.5,
        },
    )


def test_a_qat_federation_reports_int8_accuracy_each_round(qat_run: tuple[Path, list]) -> None:
    run, rows = qat_run
    assert [r["round"] for r in rows] == [1, 2]
    assert [r["qat"] for r in rows] == [False, True]
    for r in rows:
        assert r["clients"] == 3 and r["rejected_updates"] == 0
        assert 0.2 < r["int8_accuracy"] <= 1 and abs(r["int8_accuracy"] - r["accuracy"]) < 0.05
        assert r["model_bytes_int8"] < r["model_bytes_dense"] / 3.5
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_int8_accuracy"] == rows[-1]["int8_accuracy"]


def test_pruned_weights_stay_zero_in_the_int8_model(qat_run: tuple[Path, list]) -> None:
    from fedsqueeze.models.export import load_run_model
    from fedsqueeze.server.rundir import RunDir

    run, _ = qat_run
    model, _, _ = load_run_model(run)
    scales = RunDir(run).load_checkpoint().extra["hooks"]["qat"]["scales"]
    q = int8_model(model, {k: (v[0], v[1]) for k, v in scales.items()})
    for name, layer in model.named_modules():
        if isinstance(layer, nn.Linear):
            zero = layer.weight == 0
            assert zero.float().mean() > 0.2
            assert bool((q.get_submodule(name).weight_int8[zero] == 0).all())


def test_the_int8_artifact_matches_the_federations_int8_accuracy(
    qat_run: tuple[Path, list],
) -> None:
    run, rows = qat_run
    report = export_run(run, int8=True, latency_iters=2)
    assert report["int8_method"].startswith("QAT scales")
    int8 = report["artifacts"]["int8"]
    # Tolerance: the artifact is the very module the server evaluated; onnxruntime's int8
    # kernels may round a handful of logits differently — at most 0.5% of the test split.
    assert report["accuracy_int8_federation"] == rows[-1]["int8_accuracy"]
    assert report["accuracy_int8_torch"] == rows[-1]["int8_accuracy"]
    assert abs(int8["accuracy_onnxruntime"] - rows[-1]["int8_accuracy"]) <= 0.005
    assert report["int8_agreement_with_int8_torch"] >= 0.99
    # The run is pruned, so both artifacts store only kept weights: int8 is smaller than the
    # packed fp32 file and well below the dense fp32 parameters.
    assert int8["file_bytes"] < report["artifacts"]["fp32"]["file_bytes"]
    assert int8["file_ratio_to_fp32_model"] > 2.5
    saved = json.loads((run / "export.json").read_text())
    assert saved["int8_method"] == report["int8_method"]


def test_qat_under_secure_aggregation(tmp_path: Path) -> None:
    _run, rows = _federate(tmp_path, **{"num-rounds": 1, "secagg": True, "secagg-clip": 5.0})
    assert rows[0]["clients"] == 3 and rows[0]["qat"] is True
    assert 0.3 < rows[0]["int8_accuracy"] <= 1
