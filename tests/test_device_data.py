"""Device-local data (node config ``data-path``): validation, whole-file training, failures
reported and counted, and a server that never loads client data."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Message
from hypothesis import given, settings
from hypothesis import strategies as st
from inprocess import InProcessGrid

import fedsqueeze.federation as federation
from fedsqueeze.client.app import build_client_app
from fedsqueeze.config import resolve_config
from fedsqueeze.data import DatasetError, load_dataset
from fedsqueeze.data.device import load_device_data
from fedsqueeze.server.rounds import run_federation
from fedsqueeze.server.rundir import RunDir

SHAPE, CLASSES = (1, 8, 8), 10
BASE = {
    "dataset": "digits",
    "model": "logreg",
    "num-clients": 2,
    "clients-per-round": 2,
    "num-rounds": 2,
    "local-epochs": 1,
    "batch-size": 32,
    "lr": 0.1,
    "client-data": "device",
}


def _write(path: Path, **arrays: Any) -> Path:
    np.savez(path, **arrays)
    return path


def _good(path: Path, n: int = 50, seed: int = 0, flat: bool = False) -> Path:
    ds = load_dataset("digits")
    lo = 50 * seed
    x = ds.x_train[lo : lo + n]
    return _write(path, x_train=x.reshape(n, -1) if flat else x, y_train=ds.y_train[lo : lo + n])


# --------------------------------------------------------------------------- validation


def test_a_good_file_loads_flat_features_reshaped_and_float_labels_accepted(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "d.npz",
        x_train=np.arange(3 * 64, dtype=np.uint8).reshape(3, 64),
        y_train=np.array([0.0, 9.0, 3.0]),
        x_test=np.zeros((2, 1, 8, 8), np.float64),
        y_test=np.array([1, 2], np.int32),
    )
    data = load_device_data(path, SHAPE, CLASSES)
    assert data.x_train.shape == (3, 1, 8, 8) and data.x_train.dtype == np.float32
    assert data.y_train.tolist() == [0, 9, 3] and data.y_train.dtype == np.int64
    assert data.x_test is not None and data.x_test.shape == (2, 1, 8, 8)


Z = np.zeros
MALFORMED: dict[str, tuple[dict[str, Any], str]] = {
    "missing y_train": ({"x_train": Z((4, 64))}, "missing array(s) y_train"),
    "wrong feature size": ({"x_train": Z((4, 63)), "y_train": Z(4, int)}, "(63,)"),
    "label out of range": ({"x_train": Z((3, 64)), "y_train": np.array([0, 1, 10])}, "label 10"),
    "negative label": ({"x_train": Z((2, 64)), "y_train": np.array([0, -1])}, "label -1"),
    "NaN feature": ({"x_train": np.full((2, 64), np.nan), "y_train": Z(2, int)}, "non-finite"),
    "string features": ({"x_train": np.array([["a"] * 64] * 2), "y_train": Z(2, int)}, "numeric"),
    "fractional label": ({"x_train": Z((2, 64)), "y_train": np.array([0.5, 1.0])}, "integers"),
    "label count": ({"x_train": Z((3, 64)), "y_train": Z(2, int)}, "shape (3,)"),
    "empty": ({"x_train": Z((0, 64)), "y_train": Z(0, int)}, "empty"),
    "test half": ({"x_train": Z((2, 64)), "y_train": Z(2, int), "x_test": Z((1, 64))}, "together"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_files_are_one_line_errors_naming_the_file(tmp_path: Path, case: str) -> None:
    arrays, expected = MALFORMED[case]
    path = _write(tmp_path / "d.npz", **arrays)
    with pytest.raises(DatasetError) as err:
        load_device_data(path, SHAPE, CLASSES)
    assert expected in str(err.value) and str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_relative_pickled_and_garbage_files(tmp_path: Path) -> None:
    for path, expected in (
        (tmp_path / "none.npz", "file not found"),
        (Path("relative.npz"), "absolute"),
    ):
        with pytest.raises(DatasetError, match=expected):
            load_device_data(path, SHAPE, CLASSES)
    pickled = tmp_path / "p.npz"
    np.savez(pickled, x_train=np.array([object()] * 2, dtype=object), y_train=np.zeros(2, int))
    with pytest.raises(DatasetError, match=r"not a valid \.npz"):
        load_device_data(pickled, SHAPE, CLASSES)


@settings(max_examples=30, deadline=None)
@given(blob=st.binary(max_size=300))
def test_arbitrary_bytes_never_raise_anything_but_dataset_error(
    tmp_path_factory: Any, blob: bytes
) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "d.npz"
    path.write_bytes(blob)
    with pytest.raises(DatasetError):
        load_device_data(path, SHAPE, CLASSES)


# --------------------------------------------------------------------------- federation


def _spy_app(cfg: dict[str, Any], seen: dict[int, Any]) -> Any:
    """The real ClientApp plus an outermost mod recording what each reply carries."""

    def spy(msg: Message, context: Context, call_next: Any) -> Message:
        reply = call_next(msg, context)
        if not reply.has_error() and "metrics" in reply.content:
            seen[context.node_id] = dict(reply.content["metrics"])
        return reply

    return build_client_app(cfg, extra_mods=[spy])


def _run(tmp_path: Path, cfg: dict[str, Any], nodes: dict[int, dict[str, Any]], app: Any = None):
    grid = InProcessGrid(app or build_client_app(cfg), int(cfg["num-clients"]), nodes)
    summary = run_federation(grid, cfg, RunDir(tmp_path / "run"), node_timeout=60)
    return summary, RunDir(tmp_path / "run").read_metrics()


def test_each_device_trains_on_its_whole_file(tmp_path: Path) -> None:
    """Old code ignored data-path and trained on 1/N of the run's dataset."""
    cfg = resolve_config(BASE)
    files = {0: _good(tmp_path / "a.npz", n=37, seed=0), 1: _good(tmp_path / "b.npz", n=91, seed=1)}
    seen: dict[int, Any] = {}
    nodes = {i: {"data-path": str(p)} for i, p in files.items()}
    _, rows = _run(tmp_path, cfg, nodes, _spy_app(cfg, seen))
    assert {n: m["num-examples"] for n, m in seen.items()} == {1000: 37, 1001: 91}
    assert [r["clients"] for r in rows] == [2, 2]


def test_malformed_file_is_reported_counted_and_the_round_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = resolve_config(BASE, {"num-rounds": 1})
    bad = _write(tmp_path / "bad.npz", x_train=np.zeros((5, 64)), y_train=np.full(5, 12))
    nodes = {0: {"data-path": str(_good(tmp_path / "a.npz"))}, 1: {"data-path": str(bad)}}
    with caplog.at_level(logging.ERROR, logger="fedsqueeze.client.app"):
        _, rows = _run(tmp_path, cfg, nodes)
    assert rows[0]["clients"] == 1 and rows[0]["dropped_clients"] == 1
    assert np.isfinite(rows[0]["accuracy"])
    lines = [r.getMessage() for r in caplog.records if str(bad) in r.getMessage()]
    assert lines and all("\n" not in line and "label 12" in line for line in lines)


def test_the_server_never_loads_client_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With client-data = device, neither side partitions the run's dataset."""

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("client data loaded from the run's dataset")

    monkeypatch.setattr(federation, "_partitions", forbidden)
    monkeypatch.setattr(federation, "client_train_data", forbidden)
    monkeypatch.setattr(federation, "partition_indices", forbidden)
    cfg = resolve_config(BASE, {"fraction-evaluate": 0.5})
    nodes = {i: {"data-path": str(_good(tmp_path / f"{i}.npz", seed=i))} for i in range(2)}
    summary, rows = _run(tmp_path, cfg, nodes)
    assert summary["num_rounds"] == 2 and rows[-1]["clients"] == 2
    assert (tmp_path / "run" / "clients.json").read_text().strip() == "[]"


def test_a_node_without_data_path_in_a_device_federation_is_refused(tmp_path: Path) -> None:
    cfg = resolve_config(BASE, {"num-rounds": 1})
    nodes = {0: {"data-path": str(_good(tmp_path / "a.npz"))}}
    _, rows = _run(tmp_path, cfg, nodes)
    assert rows[0]["clients"] == 1 and rows[0]["dropped_clients"] == 1


@pytest.mark.parametrize(
    ("dp", "secagg", "weight"), [("none", False, 50), ("local", False, 1), ("none", True, None)]
)
def test_what_the_server_learns_of_a_device_size(
    tmp_path: Path, dp: str, secagg: bool, weight: Any
) -> None:
    """Adversary: the server reading replies. Exact count only without DP and SecAgg."""
    over = {"dp": dp, "dp-noise-multiplier": 1.0, "secagg": secagg, "num-rounds": 1}
    cfg = resolve_config(BASE, over)
    seen: dict[int, Any] = {}
    nodes = {i: {"data-path": str(_good(tmp_path / f"{i}.npz", seed=i))} for i in range(2)}
    _run(tmp_path, cfg, nodes, _spy_app(cfg, seen))
    assert seen and all(m.get("num-examples") == weight for m in seen.values())
