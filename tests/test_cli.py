"""User errors on the command line: one line on stderr, exit status 2, no run directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedsqueeze.cli import EXIT_USAGE, main


def _bad_npz(tmp_path: Path, name: str, **overrides: object) -> str:
    rng = np.random.default_rng(0)
    arrays: dict[str, object] = {
        "x_train": rng.normal(size=(40, 5)).astype(np.float32),
        "y_train": rng.integers(0, 3, size=40),
        "x_test": rng.normal(size=(10, 5)).astype(np.float32),
        "y_test": rng.integers(0, 3, size=10),
    }
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    path = tmp_path / f"{name}.npz"
    np.savez(path, **arrays)
    return f"npz:{path}"


def _cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    nan_x = np.full((40, 5), np.nan, dtype=np.float32)
    not_npz = tmp_path / "junk.npz"
    not_npz.write_bytes(b"this is not a zip file")

    def big_label(label: int) -> np.ndarray:
        y = np.random.default_rng(0).integers(0, 3, size=40)
        y[7] = label
        return y

    return [
        (["--set", f"dataset=npz:{tmp_path / 'missing.npz'}"], "missing.npz"),
        (["--set", f"dataset=npz:{not_npz}"], "junk.npz"),
        (["--set", f"dataset={_bad_npz(tmp_path, 'nokey', y_test=None)}"], "y_test"),
        (["--set", f"dataset={_bad_npz(tmp_path, 'len', y_train=np.zeros(7, int))}"], "7 labels"),
        (["--set", f"dataset={_bad_npz(tmp_path, 'nan', x_train=nan_x)}"], "finite"),
        (["--set", f"dataset={_bad_npz(tmp_path, 'neg', y_train=-np.ones(40, int))}"], "label"),
        (
            ["--set", f"dataset={_bad_npz(tmp_path, 'nat')}", "--set", "partition=natural"],
            "client_train",
        ),
        (["--set", "model=resnet"], "unknown model"),
        (["--set", "num-rounds=-3"], "num-rounds"),
        (["--set", "codec=topk(2.5)+q99"], "codec"),
        (["--set", "nonsense=1"], "unknown config key"),
        ([str(tmp_path / "nope.toml")], "not found"),
        (["--resume", str(tmp_path)], "not a resumable run directory"),
        # Accepted by the old code, then a traceback (or a hang) inside Ray.
        (
            [
                "--set",
                "secagg=true",
                "--set",
                "num-clients=5",
                "--set",
                "clients-per-round=5",
                "--set",
                "secagg-threshold=2",
            ],
            "secagg-threshold",
        ),
        (["--set", f"seed={2**63}"], "seed"),
        (["--set", "node-timeout=0.001"], "node-timeout"),
        (["--set", "dp=central", "--set", "dp-noise-multiplier=1e308"], "dp-noise-multiplier"),
        (["--set", "dp=central", "--set", "dp-epsilon=1e308"], "dp-epsilon"),
        (["--set", f"dataset={_bad_npz(tmp_path, 'huge', y_train=big_label(10**9))}"], "label"),
        (["--set", f"dataset={_bad_npz(tmp_path, 'wide', y_train=big_label(3 * 10**6))}"], "label"),
        # Refused correctly by the old code, but only after Ray had started.
        (["--set", "downlink-codec=ef"], "downlink-codec"),
        (
            [
                "--set",
                "dp=distributed",
                "--set",
                "secagg=true",
                "--set",
                "dp-noise-multiplier=1",
                "--set",
                "num-clients=4",
                "--set",
                "clients-per-round=4",
                "--set",
                "dp-bits=1",
            ],
            "dp-bits",
        ),
        # A field too narrow for the weight coordinate: was a traceback (found by use).
        (["--set", "secagg=true", "--set", "secagg-bits=8"], "secagg-bits"),
    ]


def test_user_errors_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for extra, fragment in _cases(tmp_path):
        out = tmp_path / "run-out"
        code = main(["simulate", *extra, "--out", str(out), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == EXIT_USAGE, (extra, err)
        assert len(err.splitlines()) == 1, (extra, err)
        assert err.startswith("fedsqueeze: error:"), err
        assert fragment.lower() in err.lower(), (extra, err)
        assert not out.exists(), extra


def test_existing_run_directory_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    assert main(["simulate", "--out", str(out)]) == EXIT_USAGE
    assert "already exists" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == "{}\n"


def test_real_process_exit_status(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedsqueeze.cli", "simulate", "--set", "partition=bogus"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "partition" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_report_prints_the_result_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary = {
        "final_accuracy": 0.91234,
        "best_accuracy": 0.95,
        "total_uplink_bytes": 2_500_000,
        "total_downlink_bytes": 7_000_000,
        "num_rounds": 4,
        "wall_s": 12.5,
        "config": {"dataset": "digits", "model": "mlp", "num-clients": 3, "codec": "q8"},
    }
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for fragment in ("0.9123", "2.500 MB", "7.000 MB", "codec q8", "12.5 s", str(tmp_path)):
        assert fragment in out, fragment
    assert main(["report", str(tmp_path / "nope")]) == EXIT_USAGE
    assert "no summary.json" in capsys.readouterr().err


def test_unusable_out_paths_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--out an existing file, a path under a file, an over-long name, a read-only place."""
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    cases = [
        (a_file, "not a directory"),
        (a_file / "run", "cannot create the run directory"),
        (tmp_path / ("x" * 300), "cannot create the run directory"),
        (Path("/proc/fedsqueeze-run"), "cannot create the run directory"),  # even for root
    ]
    for out, fragment in cases:
        code = main(["simulate", "--set", "model=logreg", "--out", str(out), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == EXIT_USAGE, (out, err)
        assert len(err.splitlines()) == 1 and fragment in err, (out, err)
    assert a_file.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_report_of_a_corrupt_summary_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for text in ("{not json", "[1, 2]", '{"num_rounds": 3}', '{"final_accuracy": "x"}'):
        (tmp_path / "summary.json").write_text(text)
        assert main(["report", str(tmp_path)]) == EXIT_USAGE, text
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "not a valid run summary" in err, (text, err)


def test_absurd_model_is_refused_before_it_is_allocated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """20,000 features and a label of 8,999 (both within the dataset's own bounds) make a
    180M-parameter logreg (720 MB per copy): main allocated it and started the run."""
    from fedsqueeze import cli
    from fedsqueeze.contracts.checks import MAX_MODEL_PARAMETERS

    def must_not_start(*args: object, **kwargs: object) -> dict:
        raise AssertionError("the simulation started")

    monkeypatch.setattr(cli, "simulate", must_not_start)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=40)
    labels[5] = 8_999
    wide = _bad_npz(
        tmp_path,
        "wide-x",
        x_train=np.zeros((40, 20_000), np.float32),
        x_test=np.zeros((10, 20_000), np.float32),
        y_train=labels,
    )
    assert MAX_MODEL_PARAMETERS < 20_000 * 9_000
    out = tmp_path / "run"
    args = ["--set", f"dataset={wide}", "--set", "model=logreg", "--out", str(out)]
    code = main(["simulate", *args])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_USAGE and len(err.splitlines()) == 1, err
    assert "180,009,000 parameters" in err and "logreg" in err
    assert not out.exists()


def test_relative_paths_are_recorded_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run directory records its config for --resume: a relative init-model or npz: path
    recorded as typed would name another file (or none) from another directory."""
    import argparse

    from fedsqueeze.cli import _resolve
    from fedsqueeze.config import anchor_paths

    data = _bad_npz(tmp_path, "ok")  # a valid file: only its keys are checked here
    (tmp_path / "work" / "runs" / "pretrained").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    toml = tmp_path / "work" / "run.toml"
    toml.write_text('dataset = "npz:../ok.npz"\ninit-model = "runs/pretrained"\n')
    args = argparse.Namespace(
        sets=["distill-data=npz:../ok.npz"], resume=None, config=str(toml), out="out"
    )
    config, _, _ = _resolve(args)
    work = tmp_path / "work"
    assert config["dataset"] == f"npz:{work / '../ok.npz'}"
    assert Path(config["dataset"][4:]).resolve() == Path(data[4:]).resolve()
    assert config["init-model"] == str(work / "runs/pretrained")
    assert config["distill-data"] == f"npz:{work / '../ok.npz'}"
    # registry names, empty and absolute values are left alone
    kept = {"dataset": "digits", "init-model": "", "distill-data": f"npz:{tmp_path}/x.npz"}
    assert anchor_paths(kept) == kept
