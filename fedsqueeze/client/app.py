"""The fedsqueeze ClientApp (Flower Message API).

Handlers:

- ``train``: load the received global weights, train on this node's data (its partition of
  the run's dataset, or the device's own file: :mod:`fedsqueeze.client.data`), reply
  with the full local weights (``"arrays"``) and ``num-examples`` (DP-SGD with Opacus when
  ``dp = "local"``). Compression and secure aggregation are not done here: the public mods
  ``downlink_mod``, ``secagg_mod`` and ``compress_mod`` do it, exactly as they would for any
  other Flower ClientApp.
- ``evaluate``: federated evaluation on this node's slice of the test split (or its file's
  ``x_test``/``y_test``).
- ``query``: the start-of-run handshake; tells the server this node's partition id so
  that client sampling is reproducible by seed (Flower node ids are random per run), and
  nothing else (not its number of examples).

What a train reply's metrics hold (:func:`train_metrics`): under ``dp = "distributed"``
and ``dp = "local"`` the server is who DP protects against, so nothing exact about the
client's data leaves the device beyond what the mode needs — no training loss; under local
DP the ε/δ its accountant reached (the server reports the largest) and ``num-examples = 1``:
the exact count is not protected by sample-level DP-SGD (one example more changes it by
one), so under local DP FedAvg averages unweighted, as DP-FedAvg (McMahan et al. 2018) does,
rather than spending budget on a noised count. (Under SecAgg without DP the weight travels
inside the mask; the secure mod strips the weight key from the forwarded metrics.) Without
DP and under central DP (trusted server) the reply also carries ``train-loss``. Under local
DP, DP-SGD's noise and Poisson batches come from a fresh generator seeded from OS entropy
every round (:func:`fedsqueeze.client.dp.secret_generator`), never from the run seed, and a
round below the device's own floor (:mod:`fedsqueeze.privacy.floor`) is refused.

A data problem (a device's file missing, malformed or not fitting the model) is one line
in the node's log and an error reply (``CLIENT_APP_RAISED_EXCEPTION``, reason
``"device data ..."``) that the server counts against this client for the round; the node
stays up for the next message.

With ``train-layers`` other than ``"all"``, :func:`~fedsqueeze.client.layers.layers_mod`
hands the handler the full model and the names it may train (``train-tensors`` in the
message's config); the handler freezes the rest, so DP-SGD clips and noises only those.

torch (and Opacus, torchao) is imported by the two handlers that build a model — ``train``
and ``evaluate`` — and by a mod only when its record is in the message, never by importing
this module: a SuperNode starts a fresh process for every message (Flower 1.42 has no warm
ClientApp), and the handshake and the SecAgg+ stages after ``setup`` need no model, so they
run without torch's import (most of the process's start; docs/deployment.md).

The run config comes from ``context.run_config`` (``flwr run``) or, when the app is
built by ``fedsqueeze simulate``, from the resolved config passed to ``build_client_app``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.common.constant import ErrorCode

from fedsqueeze.client.data import data_source
from fedsqueeze.client.layers import layers_mod
from fedsqueeze.client.lowrank import adapter_mod, lowrank_mod
from fedsqueeze.client.mods import compress_mod, downlink_mod
from fedsqueeze.client.pruning import prune_mod
from fedsqueeze.client.qat import qat_mod
from fedsqueeze.client.secure import secagg_mod
from fedsqueeze.client.student import student_mod
from fedsqueeze.config import resolve_config
from fedsqueeze.contracts.records import from_record, to_record
from fedsqueeze.data import DatasetError
from fedsqueeze.models.retrain import TRAIN_TENSORS, set_trainable

log = logging.getLogger(__name__)

MODS = (
    student_mod,
    downlink_mod,
    secagg_mod,
    compress_mod,
    layers_mod,
    prune_mod,
    lowrank_mod,
    adapter_mod,
    qat_mod,
)
"""fedsqueeze's client mods, outermost first: a distilled student the server sends is kept
and taken out of the message; the downlink is decoded before anything else
sees the message; secure aggregation and compression each act on their own request; the
layers, pruning and low-rank mods are innermost, so only the handler sees full tensors (the others
see the trained tensors / kept values / factors only); QAT only wraps the handler's training
in fake quantization."""

Handler = Callable[[Message, Context], Message]


def reports_data_errors(handler: Handler) -> Handler:
    """A :class:`DatasetError` in ``handler`` becomes one log line and an error reply."""

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except DatasetError as err:
            log.error("%s", err)
            error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(err))
            return Message(error, reply_to=msg)

    return wrapped


def node_partition(context: Context) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` from the node config (simulation or SuperNode)."""
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as err:
        raise ValueError(
            "this SuperNode needs --node-config 'partition-id=<i> num-partitions=<n>'"
        ) from err


def train_metrics(
    cfg: Mapping[str, Any], num_examples: int, loss: float, dp_metrics: Mapping[str, float]
) -> dict[str, int | float]:
    """The train reply's metrics: nothing un-noised about the data under distributed or
    local DP (see the module docstring)."""
    out: dict[str, int | float] = {"num-examples": int(num_examples)}
    if str(cfg["dp"]) == "local":
        # DP-SGD protects one example; the exact count changes by one with it (ε = ∞ for
        # that statistic). Weight 1 makes FedAvg the unweighted mean, as DP-FedAvg does.
        out["num-examples"] = 1
        out.update({k: float(dp_metrics[k]) for k in ("epsilon", "delta") if k in dp_metrics})
    elif str(cfg["dp"]) != "distributed":
        out["train-loss"] = float(loss)
    return out


def build_client_app(
    config: Mapping[str, Any] | None = None, extra_mods: Sequence[Mod] = ()
) -> ClientApp:
    """Build the ClientApp; ``config=None`` reads the run config from the Context.

    Mods, outermost first: ``extra_mods`` (they see what travels on the wire), then
    :data:`MODS` — each a no-op unless the server's message asks for it.
    """
    app = ClientApp(mods=[*extra_mods, *MODS])

    def run_config(context: Context) -> dict[str, Any]:
        if config is not None:
            return dict(config)
        return resolve_config(dict(context.run_config))

    @app.train()
    @reports_data_errors
    def train(msg: Message, context: Context) -> Message:
        from fedsqueeze.client.training import (
            load_numpy_state,
            make_generator,
            state_to_numpy,
            train_local,
        )

        cfg = run_config(context)
        pid, num_parts = node_partition(context)
        round_cfg = msg.content["config"]
        source = data_source(cfg, context.node_config, round_cfg, (pid, num_parts))
        x, y = source.train_data()
        server_round = int(round_cfg.get("server-round", 0))
        model = source.model()
        load_numpy_state(model, from_record(msg.content["arrays"]))
        set_trainable(model, round_cfg.get(TRAIN_TENSORS))  # type: ignore[arg-type]
        dp_metrics: dict[str, float] = {}
        if cfg["dp"] == "local":
            # DP-SGD; the client's accountant history is kept in context.state across rounds.
            from fedsqueeze.client.dp import train_local_dp
            from fedsqueeze.privacy.floor import PrivacyFloor

            # DP-SGD's noise and batches: a fresh secret generator (never the run seed); the
            # device's own floor (node config) refuses a round with less noise than it accepts.
            floor = PrivacyFloor.from_node_config(context.node_config)
            loss, dp_metrics = train_local_dp(model, x, y, cfg, context.state, floor=floor)
        else:
            loss = train_local(
                model,
                x,
                y,
                epochs=int(cfg["local-epochs"]),
                batch_size=int(cfg["batch-size"]),
                lr=float(cfg["lr"]),
                momentum=float(cfg["momentum"]),
                weight_decay=float(cfg["weight-decay"]),
                proximal_mu=float(round_cfg.get("proximal-mu", 0.0)),
                generator=make_generator(int(cfg["seed"]), server_round, pid),
            )
        content = RecordDict(
            {
                "arrays": to_record(state_to_numpy(model)),
                "metrics": MetricRecord(train_metrics(cfg, len(x), loss, dp_metrics)),
            }
        )
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    @reports_data_errors
    def evaluate_handler(msg: Message, context: Context) -> Message:
        from fedsqueeze.client.training import evaluate, load_numpy_state

        cfg = run_config(context)
        source = data_source(
            cfg, context.node_config, msg.content["config"], node_partition(context)
        )
        x, y = source.test_data()
        model = source.model()
        load_numpy_state(model, from_record(msg.content["arrays"]))
        loss, acc = evaluate(model, x, y)
        metrics = MetricRecord({"num-examples": len(x), "eval-loss": loss, "eval-acc": acc})
        return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        pid, num_parts = node_partition(context)
        # No num-examples: the server derives partition sizes from the dataset itself where
        # it needs them (the secure weight cap), and a device's count is its own.
        info = ConfigRecord({"partition-id": pid, "num-partitions": num_parts})
        return Message(content=RecordDict({"node": info}), reply_to=msg)

    return app


app = build_client_app()
