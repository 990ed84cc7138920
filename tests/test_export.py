"""Edge export: the ONNX artifact under onnxruntime against the torch model, int8
agreement, export.json, the student of a distillation run, and the torch-free predict."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsqueeze.cli import EXIT_USAGE, main
from fedsqueeze.config import resolve_config, to_toml
from fedsqueeze.federation import dataset_for
from fedsqueeze.models import build_model
from fedsqueeze.models.export import export_run, load_run_model
from fedsqueeze.models.weights import state_to_numpy
from fedsqueeze.server.rundir import CONFIG, Checkpoint, RunDir

REPO = Path(__file__).resolve().parents[1]


def _trained(name: str, cfg: dict) -> torch.nn.Module:
    """A quickly trained model (central SGD on the run's training split): int8 agreement
    is only meaningful for a model with real margins."""
    ds = dataset_for(cfg)
    model = build_model(name, ds.input_shape, ds.num_classes, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(len(x), (64,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _run_dir(
    tmp_path: Path, student: bool = False, qat: bool = False, prune: float = 0.0
) -> tuple[Path, torch.nn.Module]:
    overrides = {"dataset": "digits", "model": "mlp", "qat": "int8" if qat else "none"}
    if prune:
        overrides |= {"prune": "magnitude", "prune-sparsity": prune}
    if student:
        np.savez(tmp_path / "t.npz", x=np.zeros((4, 64), np.float32))
        overrides |= {
            "distill": "student",
            "student-model": "logreg",
            "distill-data": f"npz:{tmp_path / 't.npz'}",
        }
    cfg = resolve_config(overrides)
    run = RunDir(tmp_path / "run")
    run.write_text(CONFIG, to_toml(cfg))
    teacher = _trained("mlp", cfg)
    if prune:  # each weight matrix's smallest |w| zeroed, as a pruned federation leaves them
        with torch.no_grad():
            for p in teacher.parameters():
                if p.dim() > 1:
                    p[p.abs() <= p.abs().flatten().quantile(prune)] = 0.0
    run.save_model(state_to_numpy(teacher))
    if not student:
        return run.path, teacher
    small = _trained("logreg", cfg)
    hooks = {"distill": {"student": state_to_numpy(small), "student_model": "logreg"}}
    ckpt = Checkpoint(
        completed_round=1,
        arrays=state_to_numpy(teacher),
        strategy_state=b"",
        extra={"hooks": hooks},
    )
    run.save_checkpoint(ckpt)
    return run.path, small


def _logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_fp32_and_int8_artifacts_match_the_torch_model(tmp_path: Path) -> None:
    from fedsqueeze.models.export import run_onnx

    run, model = _run_dir(tmp_path)
    report = export_run(run, int8=True, latency_iters=5)
    ds = dataset_for(resolve_config({"dataset": "digits"}))
    want = _logits(model, ds.x_test)
    fp32, int8 = report["artifacts"]["fp32"], report["artifacts"]["int8"]
    np.testing.assert_allclose(run_onnx(Path(fp32["path"]), ds.x_test), want, atol=1e-4, rtol=1e-4)
    got8 = run_onnx(Path(int8["path"]), ds.x_test)
    assert (got8.argmax(1) == want.argmax(1)).mean() >= 0.99
    assert int8["agreement_with_torch"] >= 0.99
    on_disk = json.loads((run / "export.json").read_text())
    assert on_disk["artifacts"]["int8"]["file_bytes"] == Path(int8["path"]).stat().st_size
    assert on_disk["artifacts"]["int8"]["file_bytes"] < fp32["file_bytes"]
    assert not list(run.glob("*.data"))  # one self-contained file per artifact
    for art in (fp32, int8):
        assert set(art["latency_ms"]) == {"batch1", "batch32"}
    assert report["accuracy_torch"] == pytest.approx(float((want.argmax(1) == ds.y_test).mean()))


def test_a_pruned_runs_artifacts_store_only_the_kept_weights(tmp_path: Path) -> None:
    """Magnitude-pruned: each artifact's file holds a bitmap + the kept values (before: every
    zero, 1 byte each in int8), and onnxruntime computes exactly what it did unpacked."""
    from fedsqueeze.models.export import run_onnx

    run, model = _run_dir(tmp_path, prune=0.9)
    report = export_run(run, int8=True, latency_iters=2, fp16_constants=True)
    ds = dataset_for(resolve_config({"dataset": "digits"}))
    weights = sum(p.numel() for p in model.parameters() if p.dim() > 1)
    for kind, itemsize in (("fp32", 4), ("int8", 1)):
        art = report["artifacts"][kind]
        packing = art["sparse_packing"]
        assert art["file_bytes"] == packing["file_bytes_packed"] == Path(art["path"]).stat().st_size
        # the unpacked file stores every weight; the packed one saves most of the zeros' bytes
        assert packing["file_bytes_unpacked"] - art["file_bytes"] > 0.6 * itemsize * weights
        parts = art["byte_breakdown"]
        assert parts["total"] == {
            "file_bytes": art["file_bytes"],
            "zstd_bytes": art["download_bytes"],
        }
    assert report["artifacts"]["fp32"]["sparse_packing"]["outputs_identical_to_unpacked"]
    # int8 with --fp16-constants: the biases and scales in one fp16 vector, kept only at
    # >= 99.5% top-1 agreement with the exact (bit-identical) artifact, and smaller than it
    packing = report["artifacts"]["int8"]["sparse_packing"]
    assert packing["half_floats"]["tensors"] > 0 and packing["agreement_with_exact"] >= 0.995
    assert packing["file_bytes_packed"] < packing["file_bytes_exact"]
    np.testing.assert_allclose(
        run_onnx(Path(report["artifacts"]["fp32"]["path"]), ds.x_test),
        _logits(model, ds.x_test),
        atol=1e-4,
        rtol=1e-4,
    )
    assert report["artifacts"]["int8"]["agreement_with_torch"] >= 0.97


def test_a_student_run_exports_the_student(tmp_path: Path) -> None:
    run, student = _run_dir(tmp_path, student=True)
    model, _, which = load_run_model(run)
    assert which == "student"
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in student.parameters()
    )
    out = tmp_path / "edge.onnx"
    report = export_run(run, out=out, latency_iters=5)
    assert report["model"] == "student" and report["model_name"] == "logreg"
    ds = dataset_for(resolve_config({"dataset": "digits"}))
    from fedsqueeze.models.export import run_onnx

    np.testing.assert_allclose(
        run_onnx(out, ds.x_test), _logits(student, ds.x_test), atol=1e-4, rtol=1e-4
    )


def test_a_qat_run_without_its_scales_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run, _ = _run_dir(tmp_path, qat=True)  # no checkpoint: the QAT scales are missing
    assert main(["export", str(run), "--int8"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "QAT scales" in err[0]


def test_a_qat_runs_student_is_quantized_after_training(tmp_path: Path) -> None:
    run, _ = _run_dir(tmp_path, student=True, qat=True)
    report = export_run(run, int8=True, latency_iters=2)
    assert report["model"] == "student"
    assert report["int8_method"].startswith("onnxruntime static QDQ")  # not the global's scales
    assert "accuracy_int8_federation" not in report


def test_predict_runs_without_torch_or_flower(tmp_path: Path) -> None:
    run, model = _run_dir(tmp_path)
    export_run(run, latency_iters=2)
    ds = dataset_for(resolve_config({"dataset": "digits"}))
    np.savez(tmp_path / "in.npz", x=ds.x_test[:50].reshape(50, -1))  # flat rows are reshaped
    block = (
        "import sys; sys.modules['torch'] = None; sys.modules['flwr'] = None; "
        "from fedsqueeze.cli import main; rc = main(sys.argv[1:]); "
        "assert 'torch' not in [m.split('.')[0] for m in sys.modules if sys.modules[m]]; "
        "sys.exit(rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", block, "predict", str(run / "model.onnx"), str(tmp_path / "in.npz")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    got = [int(line) for line in proc.stdout.split()]
    assert got == list(_logits(model, ds.x_test[:50]).argmax(1))


def test_export_of_a_non_run_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "empty", tmp_path / "missing"):
        assert main(["export", str(target)]) == EXIT_USAGE
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main(["predict", str(tmp_path / "nope.onnx"), str(tmp_path / "x.npz")]) == EXIT_USAGE
