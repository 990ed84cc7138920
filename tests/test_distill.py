"""Server-side distillation: the core step, the transfer data, the config checks and a
student run through the real ClientApp and strategy chain (in process, with and without
secure aggregation)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedsqueeze.cli import EXIT_USAGE, main
from fedsqueeze.client.student import held_student, student_mod, student_model
from fedsqueeze.config import ConfigError, resolve_config
from fedsqueeze.distill import (
    DistillError,
    distill,
    ensemble_probs,
    load_transfer_data,
    teacher_probs,
)
from fedsqueeze.federation import dataset_for
from fedsqueeze.models import build_model, count_parameters
from fedsqueeze.server.distill import DistillStrategy
from fedsqueeze.server.hooks import strategy_chain
from fedsqueeze.server.strategies import build_chain

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _agreement(a: torch.nn.Module, b: torch.nn.Module, x: np.ndarray) -> float:
    with torch.no_grad():
        xt = torch.from_numpy(x)
        return float((a(xt).argmax(1) == b(xt).argmax(1)).float().mean())


def test_distill_makes_the_student_agree_with_its_teacher() -> None:
    x = np.random.default_rng(0).normal(size=(512, 1, 12)).astype(np.float32)
    teacher = build_model("logreg", (1, 12), 4, seed=1)  # one the student can represent
    student = build_model("logreg", (1, 12), 4, seed=2)
    before = _agreement(teacher, student, x)
    out = distill(
        student,
        x,
        teacher_probs(teacher, x, 2.0),
        steps=150,
        temperature=2.0,
        lr=0.01,
        batch_size=64,
        seed=0,
    )
    assert out["loss_last"] < out["loss_first"]
    assert _agreement(teacher, student, x) > max(before, 0.9)


def test_ensemble_target_is_the_weighted_mean_of_tempered_softmaxes() -> None:
    x = np.random.default_rng(1).normal(size=(20, 1, 6)).astype(np.float32)
    models = [build_model("logreg", (1, 6), 3, seed=s) for s in (1, 2)]
    got = ensemble_probs(models, x, 3.0, weights=[1.0, 3.0])
    want = 0.25 * teacher_probs(models[0], x, 3.0) + 0.75 * teacher_probs(models[1], x, 3.0)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got.sum(1), torch.ones(20))


def test_builtin_mnist1d_slice_is_disjoint_from_train_and_test() -> None:
    ds = dataset_for(resolve_config({"dataset": "mnist1d"}))
    x = load_transfer_data("", "mnist1d", ds.input_shape)
    assert x.shape[1:] == ds.input_shape and len(x) >= 1000
    seen = {row.tobytes() for row in np.round(np.concatenate([ds.x_train, ds.x_test]), 3)}
    assert not any(row.tobytes() in seen for row in np.round(x, 3))


def test_transfer_npz_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.npz"
    np.savez(path, x=np.zeros((5, 7), np.float32))
    with pytest.raises(DistillError, match="expected"):
        load_transfer_data(f"npz:{path}", "digits", (1, 8, 8))
    with pytest.raises(DistillError, match="no built-in"):
        load_transfer_data("", "digits", (1, 8, 8))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"distill": "feddf", "secagg": True}, "secure aggregation"),
        ({"distill": "feddf", "dp": "central", "dp-noise-multiplier": 1.0}, "central DP"),
        ({"distill": "student"}, "student-model"),
        ({"distill": "student", "student-model": "resnet"}, "unknown model"),
        ({"distill": "student", "student-model": "logreg", "dataset": "digits"}, "npz:PATH"),
        ({"distill": "feddf", "distill-data": "npz:/nonexistent.npz"}, "not found"),
        ({"distill": "teacher"}, "must be one of"),
    ],
)
def test_bad_distill_settings_are_refused_before_anything_starts(
    overrides: dict[str, Any], match: str
) -> None:
    base = {"dataset": "mnist1d", "clients-per-round": 4, "num-clients": 4}
    with pytest.raises(ConfigError, match=match):
        resolve_config(base, overrides)


def test_feddf_under_secagg_is_one_line_exit_2(tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "run"
    sets = [
        "dataset=mnist1d",
        "distill=feddf",
        "secagg=true",
        "num-clients=4",
        "clients-per-round=4",
    ]
    code = main(["simulate", "--out", str(out), *[a for s in sets for a in ("--set", s)]])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and len(err.strip().splitlines()) == 1 and "feddf" in err
    assert not out.exists()


# --- whole rounds through the real ClientApp ------------------------------------------------


@pytest.mark.parametrize("secagg", [False, True])
def test_student_run_reports_teacher_and_student_every_round(
    distill_federation: Any, secagg: bool
) -> None:
    extra = {"secagg": True, "secagg_clip": 5.0} if secagg else {}
    summary, run_dir, _ = distill_federation(
        "student", distill="student", student_model="logreg", **extra
    )
    rows = run_dir.read_metrics()
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert row["teacher_accuracy"] == row["accuracy"]
        assert 0 <= row["student_accuracy"] <= 1 and row["distill_s"] > 0
    # The student learned from the teacher: far better than chance on 10 classes.
    assert summary["student_final_accuracy"] > 0.5
    assert summary["student_parameters"] * 5 <= summary["teacher_parameters"]
    ckpt = run_dir.load_checkpoint()
    assert ckpt is not None and ckpt.extra["hooks"]["distill"]["student"] is not None


def test_distill_wrapper_sits_inside_the_decoder_and_outside_dp(distill_federation: Any) -> None:
    cfg = resolve_config(
        {
            "dataset": "digits",
            "distill-data": distill_federation.transfer,
            "distill": "student",
            "student-model": "logreg",
            "secagg": True,
            "dp": "central",
            "dp-noise-multiplier": 1.0,
            "num-clients": 4,
            "clients-per-round": 4,
        }
    )
    names = [type(s).__name__ for s in strategy_chain(build_chain(cfg))]
    assert names.index("CompressedStrategy") < names.index("DistillStrategy")
    assert names.index("DistillStrategy") < names.index("SecAggStrategy")
    assert names.index("SecAggStrategy") < names.index("CentralDP")
    assert isinstance(strategy_chain(build_chain(cfg))[1], DistillStrategy)


def test_feddf_fine_tunes_the_aggregate_towards_the_client_ensemble(
    distill_federation: Any,
) -> None:
    _, run_dir, _ = distill_federation(
        "feddf", distill="feddf", partition="dirichlet", dirichlet_alpha=0.1
    )
    for row in run_dir.read_metrics():
        assert {"pre_distill_accuracy", "ensemble_accuracy", "distill_s"} <= row.keys()
        # the released model is the fine-tuned one, not the plain average
        assert row["accuracy"] != row["pre_distill_accuracy"]


# --- the student on the downlink ------------------------------------------------------------


def test_clients_receive_the_student_once_per_version_and_pay_for_it(
    distill_federation: Any,
) -> None:
    student = {"distill": "student", "student_model": "logreg", "distill_every": 2}
    _, run_dir, grid = distill_federation("student", num_rounds=4, **student)
    _, plain_dir, _ = distill_federation("plain", num_rounds=4)
    rows, plain = run_dir.read_metrics(), plain_dir.read_metrics()
    # distilled after rounds 2 and 4: version 2 goes out with round 3's messages, once each
    assert [r["student_downlink"] for r in rows] == [0, 0, 3, 0]
    extra = [r["downlink_bytes"] - p["downlink_bytes"] for r, p in zip(rows, plain, strict=True)]
    logreg_bytes = 4 * (64 * 10 + 10)
    assert extra[0] == extra[1] == extra[3] == 0
    assert 3 * logreg_bytes < extra[2] < 3 * logreg_bytes + 3 * 1024
    for context in grid.contexts.values():
        held = held_student(context)
        assert held is not None and held[:2] == ("logreg", 2)
        model = student_model(context, (1, 8, 8), 10)
        assert model is not None and count_parameters(model) == 650


@pytest.mark.parametrize("secagg", [False, True])
def test_clients_hold_the_servers_final_student(distill_federation: Any, secagg: bool) -> None:
    # With federated evaluation, the student distilled after the last round reaches the
    # clients with that round's evaluation messages: they hold exactly the server's.
    extra = {"secagg": True, "secagg_clip": 5.0} if secagg else {}
    _, run_dir, grid = distill_federation(
        "student",
        num_rounds=2,
        fraction_evaluate=0.99,  # all 3 clients
        distill="student",
        student_model="logreg",
        **extra,
    )
    ckpt = run_dir.load_checkpoint()
    assert ckpt is not None
    server = ckpt.extra["hooks"]["distill"]["student"]
    assert [r["student_downlink"] for r in run_dir.read_metrics()] == [3, 3]
    for context in grid.contexts.values():
        held = held_student(context)
        assert held is not None and held[1] == 2
        for key, value in server.items():
            np.testing.assert_array_equal(held[2][key], value)


def test_student_record_that_does_not_decode_is_a_mod_error() -> None:
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from fedsqueeze.contracts.records import STUDENT_KEY

    bad = ConfigRecord(
        {"payload": b"\x00garbage", "codec": "none", "seed": 0, "version": 1, "model": "mlp"}
    )
    msg = Message(RecordDict({STUDENT_KEY: bad}), dst_node_id=1, message_type="train")
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    called = []
    reply = student_mod(msg, context, lambda m, c: called.append(m) or m)
    assert reply.has_error() and "student_mod" in reply.error.reason
    assert not called and held_student(context) is None


def test_more_public_samples_extend_the_builtin_slice_and_keep_its_first_4000() -> None:
    ds = dataset_for(resolve_config({"dataset": "mnist1d"}))
    base = load_transfer_data("", "mnist1d", ds.input_shape)
    more = load_transfer_data("", "mnist1d", ds.input_shape, builtin_samples=len(base) + 200)
    assert more.shape == (len(base) + 200, *ds.input_shape)
    np.testing.assert_array_equal(more[: len(base)], base)  # calibration data unchanged
    seen = {row.tobytes() for row in np.round(np.concatenate([ds.x_train, ds.x_test, base]), 3)}
    assert not any(row.tobytes() in seen for row in np.round(more[len(base) :], 3))


def test_cosine_schedule_decays_the_distillation_lr_to_zero(monkeypatch: Any) -> None:
    seen: list[float] = []
    adam_step = torch.optim.Adam.step

    def step(self: torch.optim.Adam, *args: Any, **kwargs: Any) -> Any:
        seen.append(self.param_groups[0]["lr"])
        return adam_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    x = np.random.default_rng(0).normal(size=(64, 1, 6)).astype(np.float32)
    teacher, student = (build_model("logreg", (1, 6), 3, seed=s) for s in (1, 2))
    args = {"temperature": 2.0, "lr": 0.01, "batch_size": 16, "seed": 0}
    distill(student, x, teacher_probs(teacher, x, 2.0), steps=50, schedule="cosine", **args)
    assert seen[0] == 0.01 and all(b < a for a, b in itertools.pairwise(seen))
    assert seen[-1] < 1e-4
    seen.clear()
    distill(student, x, teacher_probs(teacher, x, 2.0), steps=5, **args)
    assert seen == [0.01] * 5
    with pytest.raises(DistillError, match="schedule"):
        distill(student, x, teacher_probs(teacher, x, 2.0), steps=5, schedule="step", **args)


def test_the_last_rounds_distillation_runs_distill_final_steps(distill_federation: Any) -> None:
    _, run_dir, _ = distill_federation(
        "final-steps",
        distill="student",
        student_model="logreg",
        distill_steps=5,
        distill_final_steps=9,
        distill_schedule="cosine",
    )
    assert [r["distill_steps"] for r in run_dir.read_metrics()] == [5, 9]
