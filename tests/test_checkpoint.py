"""Checkpoints hold no code, resume bit for bit, refuse changed settings and survive a full disk.

The resume tests drive the real command (``fedsqueeze.cli.main``) with the federation on the
in-process grid instead of Ray: the claim is about the checkpoint, not about the engine (the
Ray kill-and-resume test in test_simulation.py covers the engine once).
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import stat
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from inprocess import InProcessGrid

import fedsqueeze.cli as cli
from fedsqueeze.cli import EXIT_FAILURE, EXIT_USAGE, main
from fedsqueeze.client.app import build_client_app
from fedsqueeze.server import rundir
from fedsqueeze.server.rounds import CRASH_ENV, run_federation
from fedsqueeze.server.rundir import (
    CHECKPOINT,
    LEGACY_CHECKPOINT,
    Checkpoint,
    CheckpointError,
    RunDir,
    pack_state,
    unpack_state,
)

SETS = {
    "dataset": "digits",
    "model": "logreg",
    "num-clients": 4,
    "clients-per-round": 2,
    "num-rounds": 3,
    "local-epochs": 1,
    "batch-size": 64,
    "lr": 0.1,
}


class _Killed(BaseException):
    """Stands in for SIGKILL in process: nothing after it runs, no handler catches it."""


def _in_process_simulate(config: Any, run_dir: Path, quiet: bool = False) -> dict[str, Any]:
    grid = InProcessGrid(build_client_app(dict(config)), int(config["num-clients"]))

    def on_round(row: dict[str, Any]) -> None:
        if os.environ.get(CRASH_ENV) == str(row["round"]):
            raise _Killed

    return run_federation(grid, config, RunDir(run_dir), on_round=on_round, node_timeout=60)


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "simulate", _in_process_simulate)


def _sets(**over: Any) -> list[str]:
    out: list[str] = []
    for key, value in {**SETS, **over}.items():
        out += ["--set", f"{key}={value}"]
    return out


def _rows(path: Path) -> list[dict[str, Any]]:
    timing = ("wall_s", "elapsed_s")
    return [{k: v for k, v in r.items() if k not in timing} for r in RunDir(path).read_metrics()]


def _same_model(a: Path, b: Path) -> bool:
    ma, mb = torch.load(a / "model.pt"), torch.load(b / "model.pt")
    return list(ma) == list(mb) and all(torch.equal(ma[k], mb[k]) for k in ma)


# ---- the format ------------------------------------------------------------------------------


def test_state_packs_to_json_and_arrays_and_back() -> None:
    state = {
        "key": b"\x00\xffsecret",
        "m": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)},
        "history": [1.0, 0.5, 3],
        "z": np.float64(0.1),
        "n": np.int64(7),
        "flag": np.bool_(True),
        "pair": (1, None),
        "nan": float("nan"),
    }
    arrays: dict[str, np.ndarray] = {}
    packed = pack_state(state, arrays)
    text = json.dumps(packed)  # nothing but JSON left
    back = unpack_state(json.loads(text), arrays)
    assert back["key"] == state["key"]
    np.testing.assert_array_equal(back["m"]["w"], state["m"]["w"])
    assert back["m"]["w"].dtype == np.float32
    assert back["history"] == [1.0, 0.5, 3] and back["z"] == 0.1 and back["n"] == 7
    assert back["pair"] == [1, None] and np.isnan(back["nan"]) and back["flag"] is True
    for bad in ({"s": {1, 2}}, {"o": np.array([object()])}, {1: "int key"}, {"f": len}):
        with pytest.raises(TypeError):
            pack_state(bad, {})


def test_checkpoint_round_trips_and_refuses_other_versions(tmp_path: Path) -> None:
    ckpt = Checkpoint(
        3,
        {"b": np.ones(2, np.float32), "a": np.zeros((2, 2), np.float64)},
        {"class": "FedAdam", "m_t": {"dict": {"b": np.full(2, 0.5, np.float32)}}},
        [{"round": 1, "accuracy": 0.5}],
        {"hooks": {"sampling": {"key": b"k" * 32}}},
        {"seed": 1},
    )
    run = RunDir(tmp_path)
    run.save_checkpoint(ckpt)
    back = run.load_checkpoint()
    assert back is not None and back.completed_round == 3 and list(back.arrays) == ["b", "a"]
    assert back.arrays["a"].dtype == np.float64
    assert back.extra == ckpt.extra and back.metrics == ckpt.metrics and back.config == {"seed": 1}
    np.testing.assert_array_equal(back.strategy_state["m_t"]["dict"]["b"], np.full(2, 0.5))
    # Another format version, a truncated file, a non-zip: one clear error each.
    with zipfile.ZipFile(tmp_path / CHECKPOINT) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    meta = json.loads(np.load(io.BytesIO(members["meta.npy"])).tobytes())
    meta["version"] = 99
    buf = io.BytesIO()
    np.save(buf, np.frombuffer(json.dumps(meta).encode(), np.uint8))
    with zipfile.ZipFile(tmp_path / CHECKPOINT, "w") as zf:
        for name, data in {**members, "meta.npy": buf.getvalue()}.items():
            zf.writestr(name, data)
    with pytest.raises(CheckpointError, match="version 99"):
        run.load_checkpoint()
    for junk in (b"", b"not a zip", ckpt.to_bytes()[:100]):
        (tmp_path / CHECKPOINT).write_bytes(junk)
        with pytest.raises(CheckpointError, match="not a usable checkpoint"):
            run.load_checkpoint()


class _RunsCode:
    """Unpickling this runs ``os.system`` (what a hostile checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickle_checkpoint_runs_no_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Adversary: whoever hands the user a run directory (a shared artefact). The old
    ``--resume`` unpickled ``checkpoint.pkl`` and ran its ``os.system`` as the user."""
    marker = tmp_path / "pwned"
    run = tmp_path / "shared-run"
    run.mkdir()
    (run / "config.toml").write_text('dataset = "digits"\nmodel = "logreg"\n')
    (run / LEGACY_CHECKPOINT).write_bytes(pickle.dumps(_RunsCode(marker)))
    assert main(["simulate", "--resume", str(run), "--quiet"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pickle checkpoint" in err, err
    assert not marker.exists()
    # The same payload as an object array inside the npz: numpy refuses to unpickle it.
    buf = io.BytesIO()
    np.savez(buf, meta=np.array([_RunsCode(marker)], dtype=object))
    (run / CHECKPOINT).write_bytes(buf.getvalue())
    assert main(["simulate", "--resume", str(run), "--quiet"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a usable checkpoint" in err, err
    assert not marker.exists()


# ---- resume ------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["fedadam", "fedavgm"])
def test_killed_run_resumes_bit_identically(
    strategy: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The strategy's state (FedOpt's moments, FedAvgM's momentum) comes back exactly."""
    sets = _sets(strategy=strategy, **{"server-lr": 0.05})
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["simulate", *sets, "--out", str(full), "--quiet"]) == 0
    monkeypatch.setenv(CRASH_ENV, "2")
    with pytest.raises(_Killed):
        main(["simulate", *sets, "--out", str(part), "--quiet"])
    monkeypatch.delenv(CRASH_ENV)
    assert [r["round"] for r in _rows(part)] == [1, 2]
    assert stat.S_IMODE(os.stat(part / CHECKPOINT).st_mode) == 0o600
    assert main(["simulate", "--resume", str(part), "--quiet"]) == 0
    assert _rows(part) == _rows(full)
    assert _same_model(full, part)


def test_resume_refuses_changed_settings_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Finding 6: clients-per-round=3 on a 2-client run hung; model=mlp was a traceback."""
    part = tmp_path / "part"
    monkeypatch.setenv(CRASH_ENV, "1")
    with pytest.raises(_Killed):
        main(["simulate", *_sets(), "--out", str(part), "--quiet"])
    monkeypatch.delenv(CRASH_ENV)
    before = (part / CHECKPOINT).read_bytes()
    for change, fragment in (
        ("clients-per-round=3", "clients-per-round"),
        ("model=mlp", "model"),
        ("strategy=fedadam", "strategy"),
        ("num-rounds=0", "num-rounds"),
    ):
        code = main(["simulate", "--resume", str(part), "--set", change, "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == EXIT_USAGE, (change, err)
        assert len(err.splitlines()) == 1 and fragment in err, err
    # Fewer rounds than already completed is refused too; the run stays resumable.
    monkeypatch.setenv(CRASH_ENV, "2")
    with pytest.raises(_Killed):
        main(["simulate", "--resume", str(part), "--quiet"])
    monkeypatch.delenv(CRASH_ENV)
    code = main(["simulate", "--resume", str(part), "--set", "num-rounds=1", "--quiet"])
    assert code == EXIT_USAGE and "already completed 2" in capsys.readouterr().err
    assert (part / CHECKPOINT).read_bytes() != before
    # Keys that may change: more rounds, another timeout.
    sets = ["--set", "num-rounds=5", "--set", "node-timeout=30"]
    assert main(["simulate", "--resume", str(part), *sets, "--quiet"]) == 0
    assert [r["round"] for r in _rows(part)] == [1, 2, 3, 4, 5]


def test_run_killed_in_round_one_can_be_resumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Finding 7: the directory left by a kill in round 1 was neither new nor resumable."""

    def killed(config: Any, run_dir: Path, quiet: bool = False) -> dict[str, Any]:
        raise _Killed  # before the first checkpoint

    out = tmp_path / "run"
    monkeypatch.setattr(cli, "simulate", killed)
    with pytest.raises(_Killed):
        main(["simulate", *_sets(), "--out", str(out), "--quiet"])
    monkeypatch.setattr(cli, "simulate", _in_process_simulate)
    assert not (out / CHECKPOINT).exists()
    assert main(["simulate", *_sets(), "--out", str(out), "--quiet"]) == EXIT_USAGE
    assert f"--resume {out}" in capsys.readouterr().err
    assert main(["simulate", "--resume", str(out), "--quiet"]) == 0
    assert [r["round"] for r in _rows(out)] == [1, 2, 3]


def test_full_disk_ends_with_one_line_and_keeps_the_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Finding 9: a full disk mid-run was a traceback. The write of round 3's checkpoint
    fails with ENOSPC; round 2's stays, and the run resumes from it."""
    real = rundir._atomic_write
    checkpoints = 0

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def disk_fills(path: Path, data: bytes, mode: int | None) -> None:
        nonlocal checkpoints
        checkpoints += path.name == CHECKPOINT
        with monkeypatch.context() as patch:
            if checkpoints == 3 and path.name == CHECKPOINT:
                patch.setattr(os, "fsync", no_space)  # the bytes are written, then no space
            real(path, data, mode)

    monkeypatch.setattr(rundir, "_atomic_write", disk_fills)
    out = tmp_path / "run"
    code = main(["simulate", *_sets(), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_FAILURE
    assert len(err.splitlines()) == 1 and "No space left on device" in err, err
    assert f"--resume {out}" in err
    ckpt = RunDir(out).load_checkpoint()
    assert ckpt is not None and ckpt.completed_round == 2
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no tmp left
    monkeypatch.setattr(rundir, "_atomic_write", real)
    assert main(["simulate", "--resume", str(out), "--quiet"]) == 0
    assert [r["round"] for r in _rows(out)] == [1, 2, 3]


def test_resume_of_a_local_dp_run_is_refused() -> None:
    """Clients' accountants live on the clients: a resumed local-DP run would count epsilon
    from zero again and report less than was spent."""
    from fedsqueeze.config import resolve_config

    cfg = resolve_config({"dp": "local", "dp-noise-multiplier": 1.0})
    with pytest.raises(rundir.ResumeError, match="dp = 'local'"):
        rundir.check_resume_config(cfg, cfg, 1)
    plain = resolve_config({})
    rundir.check_resume_config(plain, plain, 1)  # the same config resumes without DP
