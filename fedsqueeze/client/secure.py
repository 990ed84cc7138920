"""Client side of secure aggregation: ``secagg_mod``.

Runs the client half of SecAgg+ around any ClientApp's train handler when the server's
message carries a ``fedsqueeze.secagg`` record (see :mod:`fedsqueeze.contracts.secure_wire`
for the five stages). In ``setup`` the mod lets the handler train, turns ``local - start``
into an integer vector with the round's summable encoding
(:mod:`fedsqueeze.contracts.summable`: clipping, weighting, random-k, distributed-DP noise —
whatever the server described), keeps it in ``Context.state`` and replies with its public
keys; the later stages need no handler at all.

With ``feedback`` set (a codec spec ending in ``+ef``) the client keeps what it did not
send in its own state (:func:`~fedsqueeze.contracts.summable.encode_with_feedback`); the
residual is committed only when the masked input leaves (stage ``mask``), so a client that
fails before that keeps all of ``delta + residual`` for its next round.

The protocol state (the SecAgg+ client state machine, its private keys, the encoded input)
lives in ``Context.state`` between stages, so it survives in simulation and on a SuperNode
alike; it never leaves the device.

Security floor, set on the device: the client refuses a setup below its own
:class:`~fedsqueeze.secagg.ClientPolicy`, read from the node config (absent = the defaults):

``secagg-min-threshold``   refuse a Shamir threshold below this (never below the secure
                           ``floor((k+1)/2) + 1``, which no setting can lower);
``secagg-min-neighbours``  refuse a graph degree below ``min(this, n - 1)``; the default is
                           the Bell et al. bound :func:`~fedsqueeze.secagg.secure_neighbours`
                           for the round's ``n`` at 10% dropout.

``secagg-identity-key``    path of this device's Ed25519 private key (32 raw bytes or PEM):
                           the mod signs its key advertisement with it;
``secagg-roster``          path of a text file of trusted Ed25519 identity public keys (hex,
                           one per line, ``#`` comments), e.g. the SuperNode authentication
                           keys of the federation's devices: the client then refuses any
                           peer key not signed by a distinct roster key. Without a roster
                           the server is trusted not to substitute peers' keys.

Replay: the mod refuses a ``setup`` for any round at or below the last round it set up
(kept in ``Context.state`` under :data:`REPLAY_KEY`), so a server cannot obtain a second,
freshly noised encoding of the same update by repeating a round. It checks before training.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from fedsqueeze.client.mods import ModPreconditionError, failed_precondition, single_arrays
from fedsqueeze.compression.stages import ErrorFeedback
from fedsqueeze.contracts.records import (
    CODEC_META_KEY,
    CODEC_STATE_KEY,
    as_int,
    flatten,
    from_record,
    single_metrics,
    to_record,
)
from fedsqueeze.contracts.secure_wire import (
    CHECK,
    ENCODING_PREFIX,
    MASK,
    REPLY_KEY,
    SECAGG_KEY,
    SETUP,
    SHARE,
    UNMASK,
    WIRE_FIELD,
    from_fields,
    pack_reply,
    to_fields,
)
from fedsqueeze.contracts.summable import (
    EncodingError,
    SummableEncoding,
    check_privacy_floor,
    encode_with_feedback,
    encoding_from_fields,
)
from fedsqueeze.secagg import ClientPolicy, SecAggClient, SecAggError
from fedsqueeze.secagg.crypto import load_identity_key
from fedsqueeze.secagg.field import to_field

STATE_KEY = "fedsqueeze.secagg-state"
"""Client ``Context.state`` ConfigRecord: the protocol state between stages."""
EF_STATE_KEY = ErrorFeedback.state_key
"""Key of the residual (flat float32) in the ``CODEC_STATE_KEY`` ArrayRecord."""
GLUE_PREFIX = "glue."
"""Keys of the mod's own per-round values in the :data:`STATE_KEY` record; every other key
is the core's :meth:`SecAggClient.to_state`."""


REPLAY_KEY = "fedsqueeze.secagg-rounds"
"""Client ``Context.state`` ConfigRecord: ``last-setup``, the last round this client set up."""
MIN_THRESHOLD_KEY = "secagg-min-threshold"
"""Node-config key: this device's threshold floor (module doc)."""
MIN_NEIGHBOURS_KEY = "secagg-min-neighbours"
"""Node-config key: this device's graph-degree floor (module doc)."""
IDENTITY_KEY = "secagg-identity-key"
"""Node-config key: path of this device's Ed25519 identity key (module doc)."""
ROSTER_KEY = "secagg-roster"
"""Node-config key: path of the roster of trusted identity public keys (module doc)."""


def load_roster(path: str) -> frozenset[bytes]:
    """Trusted Ed25519 public keys from a text file: hex, one per line, ``#`` comments."""
    keys = set()
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ModPreconditionError(f"cannot read the secagg roster {path!r}: {exc}") from exc
    for line in lines:
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            key = bytes.fromhex(text)
        except ValueError as exc:
            raise ModPreconditionError(f"roster {path!r}: {text!r} is not hex") from exc
        if len(key) != 32:
            raise ModPreconditionError(f"roster {path!r}: {text!r} is not a 32-byte key")
        keys.add(key)
    return frozenset(keys)


def load_identity(node_config: Mapping[str, Any]) -> Ed25519PrivateKey | None:
    """This device's identity key from the node config (None if not configured)."""
    path = node_config.get(IDENTITY_KEY)
    if not path:
        return None
    try:
        return load_identity_key(Path(str(path)).read_bytes())
    except OSError as exc:
        raise ModPreconditionError(f"cannot read the secagg identity key: {exc}") from exc


def client_policy(node_config: Mapping[str, Any]) -> ClientPolicy:
    """The device's :class:`ClientPolicy` from its node config (absent keys = defaults)."""
    values: dict[str, int | None] = {}
    for key, name in ((MIN_THRESHOLD_KEY, "min_threshold"), (MIN_NEIGHBOURS_KEY, "min_neighbours")):
        raw = node_config.get(key)
        if raw is None or raw == "":
            values[name] = None
            continue
        try:
            value = int(raw)
        except (TypeError, ValueError) as exc:
            raise ModPreconditionError(f"node config {key} = {raw!r} is not an int") from exc
        if value < 0 or (isinstance(raw, float) and raw != value):
            raise ModPreconditionError(f"node config {key} = {raw!r} must be an int >= 0")
        values[name] = value
    roster_path = node_config.get(ROSTER_KEY)
    return ClientPolicy(
        min_threshold=values["min_threshold"],
        min_neighbours=values["min_neighbours"],
        roster=load_roster(str(roster_path)) if roster_path else None,
    )


class SimulatedDropout(RuntimeError):
    """Raised by a client told (``drop-stage``) to fail at this protocol stage."""


def _save(client: SecAggClient, extra: Mapping[str, Any]) -> ConfigRecord:
    rec: dict[str, Any] = dict(client.to_state())
    rec.update(to_fields(extra, GLUE_PREFIX))
    return ConfigRecord(rec)


def _load(
    record: ConfigRecord, client_id: int, policy: ClientPolicy | None = None
) -> tuple[SecAggClient, dict[str, Any]]:
    state = {k: v for k, v in record.items() if not k.startswith(GLUE_PREFIX)}
    client = SecAggClient.from_state(state, policy=policy)
    if client.client_id != client_id:
        raise ModPreconditionError(
            f"saved secagg state belongs to node {client.client_id}, not this node {client_id}"
        )
    return client, from_fields(record, GLUE_PREFIX)


def load_residual(context: Context, spec: str, d: int) -> np.ndarray:
    """The stored residual of codec ``spec`` (zeros if none, another codec's, or resized)."""
    meta = context.state.config_records.get(CODEC_META_KEY)
    if meta is None or meta.get("codec") != spec or CODEC_STATE_KEY not in context.state:
        return np.zeros(d, dtype=np.float32)
    stored = from_record(context.state.array_records[CODEC_STATE_KEY]).get(EF_STATE_KEY)
    if stored is None or stored.shape != (d,):
        return np.zeros(d, dtype=np.float32)
    return stored.astype(np.float32)


def store_residual(context: Context, spec: str, residual: np.ndarray) -> None:
    context.state[CODEC_STATE_KEY] = to_record({EF_STATE_KEY: residual.astype(np.float32)})
    context.state[CODEC_META_KEY] = ConfigRecord({"codec": spec})


def _maybe_drop(glue: Mapping[str, Any], stage: str) -> None:
    if str(glue.get("drop-stage", "")) == stage:
        raise SimulatedDropout(f"simulate-dropout: this client fails at stage {stage!r}")


def _reply(
    msg: Message,
    stage: str,
    out: Mapping[str, Any],
    request: Mapping[str, Any],
    metrics: tuple[str, MetricRecord] | None = None,
) -> Message:
    content = RecordDict({REPLY_KEY: ConfigRecord({WIRE_FIELD: pack_reply(stage, out, request)})})
    if metrics is not None:
        content[metrics[0]] = metrics[1]
    return Message(content=content, reply_to=msg)


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run the client side of SecAgg+ around the ClientApp's train handler (module doc)."""
    if (
        msg.metadata.message_type != MessageType.TRAIN
        or SECAGG_KEY not in msg.content.config_records
    ):
        return call_next(msg, context)
    record = msg.content.config_records[SECAGG_KEY]
    stage = str(record.get("stage", ""))
    try:
        if stage == SETUP:
            return _setup_stage(msg, context, call_next, record)
        return _later_stage(msg, context, record, stage)
    except (ModPreconditionError, EncodingError, SecAggError, KeyError, TypeError) as err:
        return failed_precondition(msg, "secagg_mod", f"stage {stage!r}: {err}")


def _later_stage(msg: Message, context: Context, record: ConfigRecord, stage: str) -> Message:
    if STATE_KEY not in context.state:
        raise ModPreconditionError("arrived before this client's setup")
    client, glue = _load(
        context.state.config_records[STATE_KEY],
        int(context.node_id),
        client_policy(context.node_config),
    )
    if as_int(glue["round"]) != as_int(record.get("round", -1), "round"):
        raise ModPreconditionError("for another round than this client's setup")
    _maybe_drop(glue, stage)
    request = from_fields(record)
    if stage == SHARE:
        out = client.share_keys(request, load_identity(context.node_config))
    elif stage == MASK:
        x = np.frombuffer(bytes(glue["input"]), dtype="<u8").astype(np.uint64)
        out = client.masked_input(request, x)
        if "ef-spec" in glue:
            # The masked input is leaving: from now on it is in the sum (or the round aborts
            # for everyone), so the residual becomes what this input leaves unsent.
            pending = np.frombuffer(bytes(glue["ef-pending"]), dtype="<f4")
            store_residual(context, str(glue["ef-spec"]), pending)
        glue = {k: v for k, v in glue.items() if k not in ("input", "ef-pending")}
    elif stage == CHECK:
        out = client.check_survivors(request, load_identity(context.node_config))
    elif stage == UNMASK:
        out = client.unmask(request)
    else:
        raise ModPreconditionError("unknown stage")
    context.state[STATE_KEY] = _save(client, glue)
    return _reply(msg, stage, out, request)


def _encode_input(
    encoding: SummableEncoding,
    delta: np.ndarray,
    weight: int,
    feedback: str,
    context: Context,
    glue: dict[str, Any],
) -> np.ndarray:
    """The field vector this client masks; with ``feedback`` also its pending residual."""
    rng = np.random.default_rng()  # private: rounding and noise must not be predictable
    if not feedback:
        ints = encoding.encode(delta, weight, rng)
    else:
        residual = load_residual(context, feedback, delta.size)
        ints, pending = encode_with_feedback(encoding, delta, residual, weight, rng)
        store_residual(context, feedback, delta + residual)
        glue["ef-spec"] = feedback
        glue["ef-pending"] = pending.astype("<f4").tobytes()
    return to_field(ints, encoding.bits, wrap=True)


def _setup_stage(
    msg: Message, context: Context, call_next: ClientAppCallable, record: ConfigRecord
) -> Message:
    server_round = as_int(record["round"], "round")
    replay = context.state.config_records.get(REPLAY_KEY)
    last = as_int(replay["last-setup"]) if replay is not None else None
    if last is not None and server_round <= last:
        raise ModPreconditionError(
            f"refusing setup for round {server_round}: this client already set up round {last} "
            "(a repeated round would release a second encoding of the same update)"
        )
    policy = client_policy(context.node_config)
    client = SecAggClient(int(context.node_id), from_fields(record), policy=policy)  # validates
    context.state[REPLAY_KEY] = ConfigRecord({"last-setup": server_round})
    encoding = encoding_from_fields(from_fields(record, ENCODING_PREFIX))
    check_privacy_floor(encoding, context.node_config, client.config.threshold)
    start = from_record(single_arrays(msg.content, "the train message")[1])
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    local = from_record(single_arrays(reply.content, "the train reply")[1])
    if list(start) != list(local) or any(start[k].shape != local[k].shape for k in start):
        raise ModPreconditionError("reply weights do not match the received model's names/shapes")
    metrics = single_metrics(reply.content)
    weight_key = str(record.get("weight-key", "num-examples"))
    weight = int(metrics[1].get(weight_key, 1)) if metrics is not None else 1
    glue: dict[str, Any] = {
        "round": server_round,
        "drop-stage": str(record.get("drop-stage", "")),
    }
    delta = flatten(local) - flatten(start)
    x = _encode_input(encoding, delta, weight, str(record.get("feedback", "")), context, glue)
    glue["input"] = x.astype("<u8").tobytes()
    _maybe_drop(glue, SETUP)
    out = client.advertise_keys(load_identity(context.node_config))
    context.state[STATE_KEY] = _save(client, glue)
    public = None
    if metrics is not None:
        # The weight travels inside the masked vector (or not at all), never in the clear.
        name, values = metrics
        public = (name, MetricRecord({k: v for k, v in values.items() if k != weight_key}))
    return _reply(msg, SETUP, out, {}, public)
