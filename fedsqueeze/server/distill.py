"""Server-side distillation as a strategy wrapper that is also a round hook.

``DistillStrategy`` sits directly inside ``CompressedStrategy`` (see
:func:`with_distill`), so it sees exactly what that wrapper hands on: decoded client
models ("global + delta") without secure aggregation, and what ``SecAggStrategy`` and the
DP wrappers release (the noised aggregate) with it. It never sees anything else:

- ``distill = "student"``: after aggregation (every ``distill-every`` rounds and at the
  last round) the released global model is the teacher of a compact ``student-model``,
  trained on the public transfer data. Post-processing of the aggregate: valid with
  secure aggregation and every DP mode.
- ``distill = "feddf"``: FedDF (Lin et al., NeurIPS 2020) — the aggregate is fine-tuned to
  match the mean tempered softmax of the round's decoded client models. Needs the
  individual models: refused under secure aggregation and central DP
  (:func:`fedsqueeze.contracts.checks.check_distill_config`).

Clients receive the student (``student_mod`` on their side keeps it for on-device
inference): from the round after each distillation, a train (or federated-evaluation)
message carries the current student (``fedsqueeze.student``, the full model encoded with
the run's downlink codec) to every client that does not hold that version yet — a client
holds it once it answered a message that carried it without an error. The record travels in
the Flower message, so its bytes are in ``downlink_bytes``; ``student_downlink`` counts the
copies sent per round.

Per round it adds ``distill_s`` (server time of the step), ``distill_steps`` (``distill-steps``,
or ``distill-final-steps`` at the last round), ``teacher_accuracy``,
``student_accuracy`` (student mode) or ``pre_distill_accuracy`` (FedDF: the aggregate's
accuracy before fine-tuning; ``accuracy`` is after it) to ``metrics.jsonl``. The student's
weights are hook state (checkpoint) and ``export`` exports them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsqueeze import downlink
from fedsqueeze.compression import parse_codec
from fedsqueeze.contracts.records import STUDENT_KEY, RecordNames, from_record, to_record
from fedsqueeze.contracts.streams import Stream, round_seed
from fedsqueeze.distill import distill, ensemble_probs, load_transfer_data, teacher_probs
from fedsqueeze.federation import dataset_for
from fedsqueeze.models import build_model, count_parameters
from fedsqueeze.models.weights import evaluate, load_numpy_state, state_to_numpy
from fedsqueeze.server.compose import DelegatingStrategy
from fedsqueeze.server.hooks import RoundHook

log = logging.getLogger(__name__)

STUDENT_STATE = "student"
"""Key of the student's weights in this hook's checkpoint state (read by ``export``)."""


@dataclass(frozen=True)
class DistillSettings:
    """The ``distill-*`` keys of a run: one reading for the distillation hook and for clients
    of different sizes (:class:`~fedsqueeze.server.hetero.HeteroStrategy`)."""

    steps: int
    final_steps: int
    schedule: str
    temperature: float
    lr: float
    batch_size: int
    seed: int
    num_rounds: int

    @classmethod
    def of(cls, config: Mapping[str, Any]) -> DistillSettings:
        steps = int(config["distill-steps"])
        return cls(
            steps=steps,
            final_steps=int(config["distill-final-steps"]) or steps,
            schedule=str(config["distill-schedule"]),
            temperature=float(config["distill-temperature"]),
            lr=float(config["distill-lr"]),
            batch_size=int(config["distill-batch-size"]),
            seed=int(config["seed"]),
            num_rounds=int(config["num-rounds"]),
        )

    def step_args(self, server_round: int) -> dict[str, Any]:
        """Keyword arguments of :func:`fedsqueeze.distill.distill` for ``server_round``."""
        return {
            "steps": self.final_steps if server_round == self.num_rounds else self.steps,
            "schedule": self.schedule,
            "temperature": self.temperature,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "seed": self.seed * 100_003 + server_round,
        }


def transfer_data(config: Mapping[str, Any]) -> np.ndarray:
    """The unlabeled transfer set (``distill-data``, else the built-in public slice of
    ``distill-public-samples``)."""
    ds = dataset_for(config)
    return load_transfer_data(
        str(config["distill-data"]),
        str(config["dataset"]),
        ds.input_shape,
        builtin_samples=int(config["distill-public-samples"]),
    )


class DistillStrategy(DelegatingStrategy, RoundHook):
    """Wrap ``inner``; distill after its aggregation as ``config["distill"]`` says."""

    hook_name = "distill"

    def __init__(self, inner: Strategy, config: Mapping[str, Any]) -> None:
        self.inner = inner
        self.mode = str(config["distill"])
        self.every = int(config["distill-every"])
        self.settings = DistillSettings.of(config)
        self.num_rounds, self.seed = self.settings.num_rounds, self.settings.seed
        ds = dataset_for(config)
        self._test = (ds.x_test, ds.y_test)
        self.transfer = transfer_data(config)
        self._build = lambda name, seed=None: build_model(
            name, ds.input_shape, ds.num_classes, seed=seed
        )
        self.teacher_name = str(config["model"])
        self.student_name = str(config["student-model"]) if self.mode == "student" else ""
        self.student = (
            state_to_numpy(self._build(self.student_name, self.seed + 1))
            if self.student_name
            else None
        )
        self.names = RecordNames.of(inner)
        self.codec = parse_codec(str(config["downlink-codec"]))
        self.version = 0
        """Round the current student was distilled in (0: none yet)."""
        self._payload: ConfigRecord | None = None
        self._held: dict[int, int] = {}
        self._offered: dict[int, int] = {}
        self._sent_copies = 0
        self._global: dict[str, np.ndarray] = {}
        self._row: dict[str, Any] = {}

    # ---- delegation -----------------------------------------------------------------------
    def summary(self) -> None:
        log.info("DistillStrategy(%s)", self.mode)
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = from_record(arrays)
        self._sent_copies = 0
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        return self._offer_student(messages)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.inner.configure_evaluate(server_round, arrays, config, grid))
        return self._offer_student(messages)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = list(replies)
        self._note_holders(replies)
        return self.inner.aggregate_evaluate(server_round, replies)

    # ---- the student on the downlink ------------------------------------------------------
    def _offer_student(self, messages: list[Message]) -> list[Message]:
        """Attach the current student to the messages of nodes that do not hold it."""
        self._offered = {}
        if self.student is None or self.version == 0:
            return messages
        if self._payload is None:
            seed = round_seed(self.seed, self.version, Stream.DOWNLINK_CODEC)
            self._payload = ConfigRecord(
                {
                    "payload": downlink.encode(self.codec, self.student, seed),
                    "codec": self.codec.spec,
                    "seed": seed,
                    "version": self.version,
                    "model": self.student_name,
                }
            )
        for msg in messages:
            node = msg.metadata.dst_node_id
            if self._held.get(node) == self.version:
                continue
            content = RecordDict(dict(msg.content.items()))  # broadcasts share one RecordDict
            content[STUDENT_KEY] = self._payload
            msg.content = content
            self._offered[node] = self.version
            self._sent_copies += 1
        return messages

    def _note_holders(self, replies: list[Message]) -> None:
        """A node that answered a message carrying the student without an error holds it."""
        for msg in replies:
            node = msg.metadata.src_node_id
            if node in self._offered and not msg.has_error():
                self._held[node] = self._offered[node]

    # ---- the distillation step ------------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self._note_holders(replies)
        clients = client_models(replies, self.names) if self.mode == "feddf" else []
        agg, metrics = self.inner.aggregate_train(server_round, replies)
        self._row = {}
        teacher = from_record(agg) if agg is not None else self._global
        if self.mode == "feddf" and agg is not None and clients:
            agg = to_record(self._feddf(server_round, teacher, clients))
        elif self.mode == "student" and (
            server_round % self.every == 0 or server_round == self.num_rounds
        ):
            self._distill_student(server_round, teacher)
        return agg, metrics

    def _feddf(
        self,
        server_round: int,
        aggregate: dict[str, np.ndarray],
        clients: list[tuple[dict[str, np.ndarray], float]],
    ) -> dict[str, np.ndarray]:
        t0 = time.process_time()
        models = []
        for arrays, _ in clients:
            m = self._build(self.teacher_name)
            load_numpy_state(m, arrays)
            models.append(m)
        target = ensemble_probs(
            models, self.transfer, self.settings.temperature, [w for _, w in clients]
        )
        model = self._build(self.teacher_name)
        load_numpy_state(model, aggregate)
        self._row["pre_distill_accuracy"] = evaluate(model, *self._test)[1]
        self._row["ensemble_accuracy"] = ensemble_accuracy(models, self._test)
        step = self.settings.step_args(server_round)
        distill(model, self.transfer, target, **step)
        self._row["distill_s"] = round(time.process_time() - t0, 4)
        self._row["distill_steps"] = step["steps"]
        out = state_to_numpy(model)
        if not all(np.isfinite(a).all() for a in out.values()):
            log.warning("round %d: FedDF gave non-finite weights; aggregate kept", server_round)
            return aggregate
        return out

    def _distill_student(self, server_round: int, teacher_arrays: dict[str, np.ndarray]) -> None:
        assert self.student is not None
        t0 = time.process_time()
        teacher = self._build(self.teacher_name)
        load_numpy_state(teacher, teacher_arrays)
        target = teacher_probs(teacher, self.transfer, self.settings.temperature)
        student = self._build(self.student_name)
        load_numpy_state(student, self.student)
        step = self.settings.step_args(server_round)
        distill(student, self.transfer, target, **step)
        self._row["distill_s"] = round(time.process_time() - t0, 4)
        self._row["distill_steps"] = step["steps"]
        self._row["teacher_accuracy"] = evaluate(teacher, *self._test)[1]
        self._row["student_accuracy"] = evaluate(student, *self._test)[1]
        self.student = state_to_numpy(student)
        self.version, self._payload = server_round, None

    # ---- round hook -----------------------------------------------------------------------
    def after_round(self, server_round: int, row: dict[str, Any]) -> None:
        row.update(self._row)
        if self.mode == "student":
            row["student_downlink"] = self._sent_copies

    def state(self) -> dict[str, Any]:
        # Which node holds which version is not kept: node ids are new after a restart, so a
        # resumed run sends the student to each client once more.
        return {
            STUDENT_STATE: self.student,
            "student_model": self.student_name,
            "student_version": self.version,
        }

    def restore(self, state: dict[str, Any]) -> None:
        if state.get(STUDENT_STATE) is not None:
            self.student = state[STUDENT_STATE]
            self.version = int(state.get("student_version", 0))

    def summary_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"distill": self.mode}
        if self.student is not None:
            student = self._build(self.student_name)
            load_numpy_state(student, self.student)
            teacher = self._build(self.teacher_name)
            out["student_model"] = self.student_name
            out["student_parameters"] = count_parameters(student)
            out["teacher_parameters"] = count_parameters(teacher)
            out["student_final_accuracy"] = evaluate(student, *self._test)[1]
        return out


def client_models(
    replies: Iterable[Message], names: RecordNames
) -> list[tuple[dict[str, np.ndarray], float]]:
    """The client models of decoded train replies and their weights (``num-examples``)."""
    out = []
    for msg in replies:
        if msg.has_error() or names.arrays not in msg.content.array_records:
            continue
        metrics = next(iter(msg.content.metric_records.values()), MetricRecord())
        weight = float(metrics.get(names.weight, 1.0))  # type: ignore[arg-type]
        out.append((from_record(msg.content.array_records[names.arrays]), weight))
    return out


def ensemble_accuracy(models: list[Any], test: tuple[np.ndarray, np.ndarray]) -> float:
    """Test accuracy of the models' mean softmax."""
    import torch

    x, y = test
    with torch.no_grad():
        probs = sum(torch.softmax(m(torch.from_numpy(x)), dim=1) for m in models)
    assert isinstance(probs, torch.Tensor)
    return float((probs.argmax(dim=1).numpy() == y).mean())


def with_distill(strategy: Strategy, config: Mapping[str, Any]) -> Strategy:
    """``strategy`` wrapped in :class:`DistillStrategy` when ``config["distill"]`` asks."""
    return strategy if str(config["distill"]) == "none" else DistillStrategy(strategy, config)
