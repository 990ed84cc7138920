"""Client side of secure aggregation: the ``secagg_mod`` and the integer encoding it uses.

Under ``secagg = true`` a round is several ``TRAIN`` messages, each naming its stage in the
``"config"`` record (``secagg-stage``):

``setup``   the ordinary train message plus the SecAgg+ setup fields: the mod lets the
            ClientApp train, turns ``local - start`` into an integer vector in Z_{2^b}
            (clip → scale → unbiased stochastic rounding → shared-seed random-k →
            weighting, or the distributed-DP encoder; with ``codec = "...+ef"`` the
            error-feedback residual is added first, see :func:`encode_with_feedback`),
            keeps it in ``Context.state`` and replies with the advertised public keys;
``share``   → encrypted Shamir shares for the neighbours;
``mask``    → the masked input, bit-packed at b bits;
``unmask``  → the shares the server needs to strip the masks.

Replies carry the core's fields in a compact wire form (:func:`pack_reply`): one bytes
field per stage, fixed-size items concatenated, and no ids the server already sent in its
request (the server glue re-attaches them with :func:`unpack_reply`).

The protocol state (the SecAgg+ client state machine, its private keys, the encoded
input) lives in ``Context.state`` between stages, so it survives in simulation and on a
SuperNode alike. The encoding helpers below are shared with the server
(:mod:`fedsqueeze.server.secure`), which must decode exactly what clients encode.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from fedsqueeze.compression import parse_codec, random_k_indices, stochastic_round
from fedsqueeze.compression.errors import CodecError
from fedsqueeze.compression.stages import ErrorFeedback, RandomK, resolve_k
from fedsqueeze.privacy.distributed import DistributedDPClient, DistributedDPParams, wrap_mod
from fedsqueeze.records import CODEC_META_KEY, CODEC_STATE_KEY, from_record, to_record
from fedsqueeze.secagg import SecAggClient, required_bits, to_field
from fedsqueeze.secagg.client import SHARE_CIPHERTEXT_BYTES
from fedsqueeze.secagg.crypto import KEY_BYTES
from fedsqueeze.secagg.encoding import MAX_BITS
from fedsqueeze.secagg.shamir import SHARE_BYTES

STAGE_KEY = "secagg-stage"
SETUP, SHARE, MASK, UNMASK = "setup", "share", "mask", "unmask"
STAGES = (SETUP, SHARE, MASK, UNMASK)
"""Protocol stages in order; a simulated dropout names the one at which the client fails."""
PROTO_PREFIX = "sa."
"""Config-record keys carrying the SecAgg+ core's message fields."""
REPLY_KEY = "sa"
"""ConfigRecord in a client's stage reply: the core's reply in wire form (:func:`pack_reply`).
Short on purpose: the record name travels in every one of the four replies."""
WIRE_FIELD = "b"
"""The one bytes field of a stage reply."""
COMMIT_BYTES = 32
"""Size of the self-mask seed commitment in a ``share`` reply (SHA-256)."""
EF_STATE_KEY = ErrorFeedback.state_key
"""Key of the residual (flat float32) in the ``CODEC_STATE_KEY`` ArrayRecord."""
STATE_KEY = "fedsqueeze.secagg-state"
"""Client ``Context.state`` ConfigRecord: the protocol state between stages."""
DEFAULT_BITS = 16
"""Field width when neither ``secagg-bits`` nor ``secagg-scale`` is set."""


class SecureConfigError(ValueError):
    """The run config asks for a secure-aggregation setup that cannot work."""


class SimulatedDropout(RuntimeError):
    """Raised by a client told (``simulate-dropout``) to fail at this protocol stage."""


# --- encoding shared by client and server -------------------------------------------------


@dataclass(frozen=True)
class IntegerEncoding:
    """How a float update becomes an integer vector (no-DP and central-DP paths).

    Each client sends ``stochastic_round(scale * w_i * clip(x_i)[positions])`` and, when
    ``weighted``, ``n_i`` as one more coordinate, where ``w_i = n_i / weight_cap <= 1``.
    Every coordinate then lies in ``[-max_abs, max_abs]`` and the sum of ``num_clients`` of
    them fits ``bits`` (two's complement in Z_{2^b}); the server divides the decoded sum by
    ``scale / weight_cap * sum(n_i)`` for the weighted mean.
    """

    clip: float
    scale: float
    bits: int
    weighted: bool
    weight_cap: int
    num_clients: int

    @property
    def coord_bound(self) -> int:
        """Largest |value| of an update coordinate after rounding."""
        return math.ceil(self.scale * self.clip)

    @property
    def max_abs(self) -> int:
        return max(self.coord_bound, self.weight_cap if self.weighted else 0)


def choose_encoding(
    *,
    num_clients: int,
    clip: float,
    bits: int = 0,
    scale: float = 0.0,
    weighted: bool = True,
    weight_cap: int = 1,
) -> IntegerEncoding:
    """Complete (bits, scale): given bits, the largest scale that cannot overflow; given a
    scale, the bits it needs; neither, :data:`DEFAULT_BITS` (more if the weights need it).

    Raises
    ------
    SecureConfigError
        Both given and the sum of ``num_clients`` inputs would wrap around, or the weight
        coordinate alone does not fit the width.
    """
    if num_clients < 2:
        raise SecureConfigError(
            f"secure aggregation needs >= 2 clients per round, got {num_clients}"
        )
    if not (math.isfinite(clip) and clip > 0):
        raise SecureConfigError(f"the clipping range must be > 0, got {clip}")
    cap = int(weight_cap) if weighted else 1
    if cap < 1:
        raise SecureConfigError(f"weight cap must be >= 1, got {weight_cap}")
    if scale > 0:
        coord = math.ceil(scale * clip)
        need = required_bits(num_clients, max(coord, cap if weighted else 0))
        if bits == 0:
            bits = need
        elif need > bits:
            raise SecureConfigError(
                f"secagg overflow: {num_clients} clients x values up to {max(coord, cap)} "
                f"(scale {scale:g} x clip {clip:g}"
                + (f", weights up to {cap}" if weighted else "")
                + f") need {need} bits, but secagg-bits = {bits}; raise secagg-bits or "
                "lower secagg-scale/secagg-clip"
            )
        if bits > MAX_BITS:
            raise SecureConfigError(f"secagg needs {bits} bits, more than the {MAX_BITS} maximum")
        return IntegerEncoding(clip, float(scale), bits, weighted, cap, num_clients)
    auto = bits == 0
    if auto:
        bits = max(DEFAULT_BITS, required_bits(num_clients, 2 * cap if weighted else 2))
    if bits > MAX_BITS:
        raise SecureConfigError(f"secagg needs {bits} bits, more than the {MAX_BITS} maximum")
    per_client = ((1 << (bits - 1)) - 1) // num_clients
    if weighted and cap > per_client:
        raise SecureConfigError(
            f"secagg overflow: the weight coordinate (up to {cap} examples per client) of "
            f"{num_clients} clients needs {required_bits(num_clients, cap)} bits, but "
            f"secagg-bits = {bits}; raise secagg-bits"
        )
    if per_client < 1:
        raise SecureConfigError(
            f"secagg-bits = {bits} cannot hold the sum of {num_clients} clients' values; "
            f"use at least {required_bits(num_clients, 1)} bits"
        )
    # ceil(scale * clip) == per_client exactly (floating point cannot push it over).
    scale = per_client / clip * (1.0 - 1e-12)
    return IntegerEncoding(clip, scale, bits, weighted, cap, num_clients)


def flatten(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays.values()])


def unflatten(flat: np.ndarray, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out, pos = {}, 0
    for name, ref in like.items():
        out[name] = flat[pos : pos + ref.size].reshape(ref.shape).astype(np.float32)
        pos += ref.size
    return out


def clip_flat(x: np.ndarray, clip: float) -> np.ndarray:
    """``x`` scaled to L2 norm at most ``clip`` (the flat-vector form of ``privacy.clip_l2``)."""
    norm = float(np.linalg.norm(x))
    return x * (clip / norm) if norm > clip else x


def encode_integers(
    flat_delta: np.ndarray,
    enc: IntegerEncoding,
    num_examples: int,
    positions: np.ndarray | None,
    rng: np.random.Generator,
) -> np.ndarray:
    """Signed int64 input of one client (see :class:`IntegerEncoding`)."""
    x = clip_flat(np.asarray(flat_delta, dtype=np.float64), enc.clip)
    if positions is not None:
        x = x[positions]
    if enc.weighted:
        n = min(int(num_examples), enc.weight_cap)
        ints = stochastic_round(x * (enc.scale * n / enc.weight_cap), rng)
        ints = np.concatenate([ints, np.array([n], dtype=np.int64)])
    else:
        ints = stochastic_round(x * enc.scale, rng)
    bound = enc.max_abs
    return np.clip(ints, -bound, bound)  # no-op unless float rounding nudged an edge value


def decode_integers(int_sum: np.ndarray, enc: IntegerEncoding) -> tuple[np.ndarray, int]:
    """Signed integer sum → (float sum of the weighted updates / ``weight_cap``, sum of n_i).

    Weighted: divide the first result by ``sum_n / weight_cap`` for the weighted mean, i.e.
    ``mean = values * weight_cap / sum_n``. Unweighted: the float sum of clipped updates
    and 0.
    """
    s = np.asarray(int_sum, dtype=np.int64)
    if enc.weighted:
        return s[:-1].astype(np.float64) / enc.scale, int(s[-1])
    return s.astype(np.float64) / enc.scale, 0


def randk_fraction(config: Mapping[str, Any]) -> float | int:
    """The random-k amount of a secure run: ``secagg-randk`` or the codec's ``randk(F)``."""
    frac: float | int = float(config.get("secagg-randk", 1.0))
    try:
        codec = parse_codec(str(config.get("codec", "none")))
    except CodecError:
        return frac
    if isinstance(codec.sparsifier, RandomK):
        amount = codec.sparsifier.amount
        if frac < 1.0 and amount != frac:
            raise SecureConfigError(
                f"codec {codec.spec!r} and secagg-randk = {frac} both set random-k; use one"
            )
        return amount
    return frac


def randk_positions(d: int, amount: float | int, seed: int) -> np.ndarray | None:
    """Shared random-k positions (None = dense)."""
    k = resolve_k(amount, d)
    return None if k >= d else random_k_indices(d, k, seed)


def check_secure_config(config: Mapping[str, Any]) -> None:
    """Refuse run configs secure aggregation cannot honour, naming the culprit.

    Raises
    ------
    SecureConfigError
        ``dp = "distributed"`` without ``secagg``; under ``secagg`` a codec stage that is not
        linear with integer output (the secure path integerizes itself), fewer than two
        clients per round, conflicting random-k settings, or a bit width that overflows.
    """
    secagg = bool(config.get("secagg", False))
    dp = str(config.get("dp", "none"))
    if dp == "distributed" and not secagg:
        raise SecureConfigError(
            'dp = "distributed" needs secagg = true (noise is split among clients)'
        )
    if not secagg:
        if float(config.get("simulate-dropout", 0.0)) > 0:
            raise SecureConfigError(
                "simulate-dropout needs secagg = true (it drops protocol stages)"
            )
        return
    n = int(config.get("clients-per-round", 2))
    if n < 2:
        raise SecureConfigError(f"secagg needs clients-per-round >= 2, got {n}")
    codec = parse_codec(str(config.get("codec", "none")))
    for stage in codec.stages:
        if isinstance(stage, RandomK | ErrorFeedback):
            continue
        if stage.role == "feedback":
            raise SecureConfigError(
                f"codec stage {stage.spec!r} cannot run under secagg = true: the server would "
                "need each client's own state, but it only sees the masked sum; use "
                '"randk(F)+ef" (client-only error feedback)'
            )
        why = (
            "it is not linear (clients' encodings cannot be summed)"
            if not stage.linear
            else "it keeps per-client state or compresses bytes that masking makes uniform"
        )
        raise SecureConfigError(
            f"codec stage {stage.spec!r} cannot run under secagg = true: {why}; the secure "
            "path already clips, scales and rounds to secagg-bits integers — use codec = "
            '"none", "randk(F)" or "randk(F)+ef"'
        )
    # Error feedback is allowed with dp = "central" and "local". Central: every round the
    # server sees (and the accountant charges for) the sum of contributions each clipped to
    # dp-clip, plus Gaussian noise; the residual is the client's own data and past public
    # outputs, and client-level DP-FedAvg already allows any client-side function of those
    # as long as the contribution is clipped — the sensitivity per round stays dp-clip.
    # Local: the residual is post-processing of the Opacus-trained (already DP) updates.
    if isinstance(codec.feedback, ErrorFeedback) and dp == "distributed":
        # The distributed-DP encoder rotates and adds each client's noise before rounding;
        # what was "sent" is not separable from that noise without decoding the rotation, and
        # a residual that absorbed the noise would make the client cancel its own noise
        # next round. Not supported until that is worked out.
        raise SecureConfigError(
            'codec error feedback ("+ef") cannot be combined with dp = "distributed" under '
            'secagg; use dp = "central" or drop "+ef"'
        )
    randk_fraction(config)
    neighbours = int(config.get("secagg-neighbours", 0))
    if neighbours > n - 1:
        raise SecureConfigError(
            f"secagg-neighbours = {neighbours} exceeds clients-per-round - 1 = {n - 1}"
        )
    threshold = int(config.get("secagg-threshold", 0))
    if threshold and threshold > (neighbours or n - 1) + 1:
        raise SecureConfigError(
            f"secagg-threshold = {threshold} exceeds neighbours + 1 = {(neighbours or n - 1) + 1}"
        )
    if dp != "distributed":
        clip = float(config["dp-clip"]) if dp == "central" else float(config["secagg-clip"])
        # The weight coordinate depends on the partition sizes; checked again per round.
        choose_encoding(
            num_clients=n,
            clip=clip,
            bits=int(config.get("secagg-bits", 0)),
            scale=float(config.get("secagg-scale", 0.0)),
            weighted=False,
        )


# --- protocol-message <-> ConfigRecord ----------------------------------------------------


def to_fields(msg: Mapping[str, Any], prefix: str = PROTO_PREFIX) -> dict[str, Any]:
    return {prefix + k: v for k, v in msg.items()}


def from_fields(record: Mapping[str, Any], prefix: str = PROTO_PREFIX) -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in record.items() if k.startswith(prefix)}


# --- compact wire form of the stage replies ----------------------------------------------


class SecureWireError(ValueError):
    """A stage reply does not have the size its stage and the server's request imply."""


def pack_reply(stage: str, out: Mapping[str, Any], request: Mapping[str, Any]) -> bytes:
    """The core's reply for ``stage`` as one byte string (the inverse of :func:`unpack_reply`).

    ``setup``  ``c_pk || s_pk``;
    ``share``  ``b_commit || ciphertext_1 || ...`` for the recipients in ascending id order,
               which are exactly the ``peer_ids`` of the server's request (the core shares
               among the live neighbours it was sent);
    ``mask``   the bit-packed masked vector;
    ``unmask`` ``b shares || s shares``, in the ascending order of the request's
               ``survivor_ids`` and ``dropped_ids``.

    Nothing secret is dropped: only ids the server itself chose, and list framing. Each
    ciphertext stays bound to its sender and recipient by AES-GCM's associated data, so a
    server that re-attached the wrong ids would fail to get shares decrypted, not learn more.
    """
    if stage == SETUP:
        return bytes(out["c_pk"]) + bytes(out["s_pk"])
    if stage == SHARE:
        if list(out["recipients"]) != sorted(int(v) for v in request["peer_ids"]):
            raise SecureWireError("share recipients differ from the peers the server sent")
        return bytes(out["b_commit"]) + b"".join(bytes(c) for c in out["ciphertexts"])
    if stage == MASK:
        return bytes(out["masked"])
    if stage == UNMASK:
        if list(out["b_ids"]) != sorted(int(v) for v in request["survivor_ids"]) or list(
            out["s_ids"]
        ) != sorted(int(v) for v in request["dropped_ids"]):
            raise SecureWireError("unmask ids differ from the server's request")
        return b"".join(bytes(x) for x in [*out["b_shares"], *out["s_shares"]])
    raise SecureWireError(f"unknown secagg stage {stage!r}")


def _chunks(blob: bytes, size: int, count: int, what: str) -> list[bytes]:
    if len(blob) != size * count:
        raise SecureWireError(f"{what}: expected {count} x {size} bytes, got {len(blob)}")
    return [blob[i * size : (i + 1) * size] for i in range(count)]


def unpack_reply(stage: str, blob: bytes, request: Mapping[str, Any]) -> dict[str, Any]:
    """The core's reply fields from :func:`pack_reply`'s bytes and the request sent for it.

    Raises
    ------
    SecureWireError
        The length does not match what the stage and the request imply.
    """
    if stage == SETUP:
        c_pk, s_pk = _chunks(blob, KEY_BYTES, 2, "public keys")
        return {"c_pk": c_pk, "s_pk": s_pk}
    if stage == SHARE:
        recipients = sorted(int(v) for v in request["peer_ids"])
        commit, rest = blob[:COMMIT_BYTES], blob[COMMIT_BYTES:]
        if len(commit) != COMMIT_BYTES:
            raise SecureWireError("share reply shorter than the seed commitment")
        cts = _chunks(rest, SHARE_CIPHERTEXT_BYTES, len(recipients), "encrypted shares")
        return {"recipients": recipients, "ciphertexts": cts, "b_commit": commit}
    if stage == MASK:
        return {"masked": bytes(blob)}
    if stage == UNMASK:
        b_ids = sorted(int(v) for v in request["survivor_ids"])
        s_ids = sorted(int(v) for v in request["dropped_ids"])
        shares = _chunks(blob, SHARE_BYTES, len(b_ids) + len(s_ids), "unmask shares")
        return {
            "b_ids": b_ids,
            "b_shares": shares[: len(b_ids)],
            "s_ids": s_ids,
            "s_shares": shares[len(b_ids) :],
        }
    raise SecureWireError(f"unknown secagg stage {stage!r}")


# --- client state in Context.state --------------------------------------------------------


GLUE_PREFIX = "glue."
"""Keys of the glue's own per-round values in the :data:`STATE_KEY` record; every other key
is the core's :meth:`SecAggClient.to_state`."""


def _save(client: SecAggClient, extra: Mapping[str, Any]) -> ConfigRecord:
    """Everything the state machine needs for its next stage, as a ConfigRecord."""
    rec: dict[str, Any] = dict(client.to_state())
    rec.update(to_fields(extra, GLUE_PREFIX))
    return ConfigRecord(rec)


def _load(record: ConfigRecord, client_id: int) -> tuple[SecAggClient, dict[str, Any]]:
    state = {k: v for k, v in record.items() if not k.startswith(GLUE_PREFIX)}
    client = SecAggClient.from_state(state)
    if client.client_id != client_id:
        raise RuntimeError(
            f"saved secagg state belongs to node {client.client_id}, not this node {client_id}"
        )
    return client, from_fields(record, GLUE_PREFIX)


# --- the mod ------------------------------------------------------------------------------


def _dp_params(cfg: Mapping[str, Any]) -> DistributedDPParams:
    return DistributedDPParams(
        dim=int(cfg["dp.dim"]),
        clip=float(cfg["dp.clip"]),
        scale=float(cfg["dp.scale"]),
        bits=int(cfg["dp.bits"]),
        num_clients=int(cfg["dp.num_clients"]),
        noise_multiplier=float(cfg["dp.noise_multiplier"]),
        mechanism=str(cfg["dp.mechanism"]),  # type: ignore[arg-type]
        conditional_rounding=bool(cfg["dp.conditional_rounding"]),
        beta=float(cfg["dp.beta"]),
    )


def encode_update(
    cfg: Mapping[str, Any],
    flat_delta: np.ndarray,
    num_examples: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """The field vector (uint64 in Z_{2^b}) one client feeds to SecAgg+, from the setup config."""
    mode = str(cfg["secagg-mode"])
    d = flat_delta.size
    if int(cfg["secagg-dim"]) != d:
        raise ValueError(f"model has {d} parameters, the server expects {cfg['secagg-dim']}")
    positions = randk_positions(d, _amount(cfg), int(cfg["secagg-randk-seed"]))
    if mode == "distributed":
        params = _dp_params(cfg)
        x = clip_flat(np.asarray(flat_delta, dtype=np.float64), params.clip)
        if positions is not None:
            x = x[positions]
        ints = DistributedDPClient(params).encode(x, rng, int(cfg["secagg-rotation-seed"]))
        return wrap_mod(ints, params.bits).astype(np.uint64)
    enc = _plain_encoding(cfg)
    return to_field(encode_integers(flat_delta, enc, num_examples, positions, rng), enc.bits)


def _plain_encoding(cfg: Mapping[str, Any]) -> IntegerEncoding:
    return IntegerEncoding(
        clip=float(cfg["secagg-clip"]),
        scale=float(cfg["secagg-scale"]),
        bits=int(cfg["sa.bits"]),
        weighted=bool(cfg["secagg-weighted"]),
        weight_cap=int(cfg["secagg-weight-cap"]),
        num_clients=int(cfg["sa.num_clients"]),
    )


def encode_with_feedback(
    cfg: Mapping[str, Any],
    flat_delta: np.ndarray,
    residual: np.ndarray,
    num_examples: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Error feedback under secure aggregation: (field vector, residual after sending it).

    Error feedback is client-local: the client knows exactly what it contributes to the
    masked sum (the selected coordinates after clipping and rounding, before masking), so
    it can carry the rest to the next round while the server side stays unchanged. With
    ``v = delta + residual``:

    - the shared-seed random-k positions are taken from ``v``, and that selected sub-vector
      (what travels) is clipped to L2 norm ``C`` — the bound protects what is sent: the
      overflow check and a DP sensitivity both concern the sent vector only. Clipping all of
      ``v`` first would shrink the sent part by the growing norm of the unsent residual;
    - the selected values are weighted, scaled and rounded exactly as without feedback;
    - ``sent`` is what those integers mean in update units: ``ints / (scale * w)`` with
      ``w = n / W`` (weighted FedAvg) or 1, at the kept positions and zero elsewhere;
    - the new residual is ``v - sent``: everything unsent, clipped off or rounded away.

    The residual is kept in *unweighted* update units, like ``compress_mod``'s: the weight
    ``n / W`` multiplies the whole ``v`` (delta and carried residual alike) when it is sent,
    so the server's weighted mean of ``sent`` plus the weighted residuals equals the weighted
    mean of the true updates, as in FedAvg with error feedback in the clear. ``n`` is the
    client's partition size, the same every round, so no weight drifts between rounds.

    Hence, over any number of rounds: ``sum(sent) + residual == sum(delta)`` (up to the
    float32 storage of the residual).
    """
    if str(cfg["secagg-mode"]) == "distributed":
        raise SecureConfigError('error feedback is not supported with dp = "distributed"')
    d = flat_delta.size
    if int(cfg["secagg-dim"]) != d:
        raise ValueError(f"model has {d} parameters, the server expects {cfg['secagg-dim']}")
    if residual.shape != (d,):
        raise ValueError(f"residual has shape {residual.shape}, the model has {d} parameters")
    enc = _plain_encoding(cfg)
    v = np.asarray(flat_delta, dtype=np.float64) + np.asarray(residual, dtype=np.float64)
    positions = randk_positions(d, _amount(cfg), int(cfg["secagg-randk-seed"]))
    selected = v if positions is None else v[positions]
    ints = encode_integers(selected, enc, num_examples, None, rng)  # clips what is sent
    if enc.weighted:
        w = min(int(num_examples), enc.weight_cap) / enc.weight_cap
        sent = ints[:-1].astype(np.float64) / (enc.scale * w)
    else:
        sent = ints.astype(np.float64) / enc.scale
    new_residual = v.copy()
    if positions is None:
        new_residual -= sent
    else:
        new_residual[positions] -= sent
    return to_field(ints, enc.bits), new_residual


def uses_feedback(cfg: Mapping[str, Any]) -> str | None:
    """The codec spec if the round's codec has client-side error feedback (``+ef``), else None."""
    try:
        codec = parse_codec(str(cfg.get("codec", "none")))
    except CodecError:
        return None
    return codec.spec if isinstance(codec.feedback, ErrorFeedback) else None


def load_residual(context: Context, spec: str, d: int) -> np.ndarray:
    """The stored residual of codec ``spec`` (zeros if none, another codec's, or resized)."""
    meta = context.state.config_records.get(CODEC_META_KEY)
    if meta is None or meta.get("codec") != spec or CODEC_STATE_KEY not in context.state:
        return np.zeros(d, dtype=np.float32)
    stored = from_record(context.state[CODEC_STATE_KEY]).get(EF_STATE_KEY)
    if stored is None or stored.shape != (d,):
        return np.zeros(d, dtype=np.float32)
    return stored.astype(np.float32)


def store_residual(context: Context, spec: str, residual: np.ndarray) -> None:
    context.state[CODEC_STATE_KEY] = to_record({EF_STATE_KEY: residual.astype(np.float32)})
    context.state[CODEC_META_KEY] = ConfigRecord({"codec": spec})


def _amount(cfg: Mapping[str, Any]) -> float | int:
    value = cfg["secagg-randk"]
    return value if isinstance(value, int) else float(value)


def _maybe_drop(cfg: Mapping[str, Any], stage: str) -> None:
    if str(cfg.get("secagg-drop-stage", "")) == stage:
        raise SimulatedDropout(f"simulate-dropout: this client fails at stage {stage!r}")


def _reply(
    msg: Message,
    stage: str,
    out: Mapping[str, Any],
    request: Mapping[str, Any],
    metrics: MetricRecord | None = None,
) -> Message:
    content = RecordDict({REPLY_KEY: ConfigRecord({WIRE_FIELD: pack_reply(stage, out, request)})})
    if metrics is not None:
        content["metrics"] = metrics
    return Message(content=content, reply_to=msg)


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run the client side of SecAgg+ around the ClientApp's train handler (see module doc)."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    cfg = msg.content.config_records.get("config", ConfigRecord())
    if not bool(cfg.get("secagg", False)):
        return call_next(msg, context)
    stage = str(cfg.get(STAGE_KEY, SETUP))
    node = int(context.node_id)
    if stage == SETUP:
        return _setup_stage(msg, context, call_next, cfg, node)
    if STATE_KEY not in context.state:
        raise RuntimeError(f"secagg stage {stage!r} arrived before this client's setup")
    client, glue = _load(context.state[STATE_KEY], node)
    if int(glue["round"]) != int(cfg.get("server-round", -1)):
        raise RuntimeError(f"secagg stage {stage!r} for another round than this client's setup")
    _maybe_drop(glue, stage)
    request = from_fields(cfg)
    if stage == SHARE:
        out = client.share_keys(request)
    elif stage == MASK:
        x = np.frombuffer(bytes(glue["input"]), dtype="<u8").astype(np.uint64)
        out = client.masked_input(request, x)
        if "ef-spec" in glue:
            # The masked input is leaving: from now on it is in the sum (or the round aborts
            # for everyone), so the residual becomes what this input leaves unsent.
            pending = np.frombuffer(bytes(glue["ef-pending"]), dtype="<f4")
            store_residual(context, str(glue["ef-spec"]), pending)
        glue = {k: v for k, v in glue.items() if k not in ("input", "ef-pending")}
    elif stage == UNMASK:
        out = client.unmask(request)
    else:
        raise RuntimeError(f"unknown secagg stage {stage!r}")
    context.state[STATE_KEY] = _save(client, glue)
    return _reply(msg, stage, out, request)


def _setup_stage(
    msg: Message,
    context: Context,
    call_next: ClientAppCallable,
    cfg: ConfigRecord,
    node: int,
) -> Message:
    setup = from_fields(cfg)
    client = SecAggClient(node, setup)  # validates the parameters before training
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    if "arrays" not in reply.content or "arrays" not in msg.content:
        raise RuntimeError("secagg_mod needs full weights in the train message and its reply")
    start = from_record(msg.content["arrays"])
    local = from_record(reply.content["arrays"])
    if list(start) != list(local) or any(start[k].shape != local[k].shape for k in start):
        raise RuntimeError("train reply weights do not match the received model's names/shapes")
    delta = flatten(local) - flatten(start)
    metrics = reply.content.metric_records.get("metrics", MetricRecord())
    num_examples = int(metrics.get("num-examples", 1))
    rng = np.random.default_rng()  # private: rounding and noise must not be predictable
    glue: dict[str, Any] = {
        "round": int(cfg.get("server-round", 0)),
        "secagg-drop-stage": str(cfg.get("secagg-drop-stage", "")),
    }
    spec = uses_feedback(cfg)
    if spec is None:
        x = encode_update(cfg, delta, num_examples, rng)
    else:
        residual = load_residual(context, spec, delta.size)
        x, pending = encode_with_feedback(cfg, delta, residual, num_examples, rng)
        # Nothing is sent until the masked input leaves (stage "mask"): a client failing
        # before that keeps all of delta + residual for its next round.
        store_residual(context, spec, delta + residual)
        glue["ef-spec"] = spec
        glue["ef-pending"] = pending.astype("<f4").tobytes()
    glue["input"] = x.astype("<u8").tobytes()
    _maybe_drop(glue, SETUP)
    out = client.advertise_keys()
    context.state[STATE_KEY] = _save(client, glue)
    # num-examples travels inside the masked vector, not in the clear.
    public = MetricRecord({k: v for k, v in metrics.items() if k != "num-examples"})
    return _reply(msg, SETUP, out, {}, public)


def simulated_dropouts(
    seed: int, server_round: int, node_ids: Sequence[int], fraction: float
) -> dict[int, str]:
    """Which sampled clients fail this round, and at which stage (seeded by seed and round)."""
    if fraction <= 0 or not node_ids:
        return {}
    rng = np.random.default_rng([seed, server_round, 0xD809])
    count = round(fraction * len(node_ids))
    ids = sorted(node_ids)
    chosen = rng.choice(len(ids), size=count, replace=False) if count else []
    return {ids[int(i)]: STAGES[int(rng.integers(len(STAGES)))] for i in chosen}
