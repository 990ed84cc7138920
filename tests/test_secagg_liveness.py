"""One misbehaving client under SecAgg+ (issue 10, finding 4 and finding 3 under SecAgg).

Adversary: one client of five that deviates from the protocol (a hostile ClientApp: here
its replies are rewritten on their way out, or its encoder is replaced). The honest server
must name it, count it as rejected, and finish the round with the others; a forged hidden
weight must not scale the update up. Each probe aborted the round (or blamed nobody, or
took over the model) on the code before this change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from test_secure_glue import SMALL, InProcessGrid, _plain_fedavg_delta, _run

import fedsqueeze.client.secure as client_secure
from fedsqueeze.contracts.secure_wire import COMMIT_BYTES, REPLY_KEY, SECAGG_KEY, WIRE_FIELD
from fedsqueeze.contracts.summable import choose_integer_encoding
from fedsqueeze.secagg.crypto import KEY_BYTES
from fedsqueeze.secagg.deals import DEAL_BYTES
from fedsqueeze.server.secure import outside_honest_range

Tamper = Callable[[bytes], bytes]


def hostile(stage: str, tamper: Tamper) -> type[InProcessGrid]:
    """A grid whose first node rewrites its ``stage`` reply with ``tamper``."""

    class Hostile(InProcessGrid):
        def send_and_receive(
            self, messages: Iterable[Message], *, timeout: float | None = None
        ) -> Iterable[Message]:
            messages = list(messages)
            replies = list(super().send_and_receive(messages, timeout=timeout))
            target = min(self.get_node_ids())
            for i, (msg, reply) in enumerate(zip(messages, replies, strict=True)):
                record = msg.content.config_records.get(SECAGG_KEY)
                if record is None or record["stage"] != stage or reply.has_error():
                    continue
                if msg.metadata.dst_node_id != target:
                    continue
                blob = bytes(reply.content.config_records[REPLY_KEY][WIRE_FIELD])
                content = RecordDict(dict(reply.content.items()))
                content[REPLY_KEY] = ConfigRecord({WIRE_FIELD: tamper(blob)})
                replies[i] = Message(content=content, reply_to=msg)
            return replies

    return Hostile


def _zero_key(blob: bytes) -> bytes:
    return bytes(32) + blob[32:]


def _same_ciphertext(blob: bytes) -> bytes:
    first = blob[COMMIT_BYTES : COMMIT_BYTES + DEAL_BYTES]
    count = (len(blob) - COMMIT_BYTES) // DEAL_BYTES
    return blob[:COMMIT_BYTES] + first * count


def _flip_last_share(blob: bytes) -> bytes:
    # The receive key of the highest survivor id's share: outside the first t + 1 shares
    # the server uses to reconstruct (the old server, revealing shares, never looked at it).
    last = int.from_bytes(blob[-KEY_BYTES:], "big") ^ 1
    return blob[:-KEY_BYTES] + last.to_bytes(KEY_BYTES, "big")


@pytest.mark.parametrize(
    ("stage", "tamper", "reason"),
    [
        ("setup", _zero_key, "low-order"),
        ("share", _same_ciphertext, "not signed"),
        ("unmask", _flip_last_share, "not the advertised receive key"),
    ],
)
def test_one_misbehaving_client_is_named_and_the_round_goes_on(
    stage: str, tamper: Tamper, reason: str
) -> None:
    run = _run({"secagg-clip": 100.0, "secagg-bits": 24}, grid_type=hostile(stage, tamper))
    (r,) = run.rounds
    row = r.row
    culprit = str(min(run.grid.get_node_ids()))
    assert r.arrays is not None, "the honest clients' round must complete"
    assert list(row["secagg_rejected"]) == [culprit] and reason in row["secagg_rejected"][culprit]
    if stage == "unmask":  # its masked input was already in the sum: included, but flagged
        assert row["clients"] == 5 and row["secagg_flagged"] == 1
    else:
        assert row["clients"] == 4 and row["rejected_updates"] == 1
    assert row["clients"] + row["rejected_updates"] + row["dropped_clients"] == 5


def _forging_encoder(node: int, forge: Callable[[int], int]) -> Any:
    """``_encode_input`` of a client that replaces its hidden weight (the last coordinate)."""
    honest = client_secure._encode_input

    def encode(encoding: Any, delta: Any, weight: int, feedback: str, context: Any, glue: Any):
        x = honest(encoding, delta, weight, feedback, context, glue)
        if int(context.node_id) == node:
            x = x.copy()
            x[-1] = np.uint64(forge(weight) % (1 << encoding.bits))
        return x

    return encode


@pytest.mark.parametrize("forge", [lambda w: -(10**6), lambda w: 1 - 4 * w])
def test_forged_hidden_weight_cannot_scale_up_the_update(
    monkeypatch: pytest.MonkeyPatch, forge: Callable[[int], int]
) -> None:
    """The issue's probe: one client forges its hidden weight so that the summed weight is
    non-positive (the old server threw the round away counting nobody) or about 1 (the old
    server divided by it: the update multiplied by up to the weight cap)."""
    cfg = {"secagg-clip": 100.0, "secagg-bits": 30}
    plain = _plain_fedavg_delta(cfg)
    plain_norm = float(np.sqrt(sum(np.sum(v**2) for v in plain.values())))
    node = min(InProcessGrid({**SMALL, **cfg}, 5).get_node_ids())
    monkeypatch.setattr(client_secure, "_encode_input", _forging_encoder(node, forge))
    run = _run(cfg)
    (r,) = run.rounds
    assert r.row["clients"] + r.row["secagg_discarded"] + r.row["dropped_clients"] == 5
    if r.arrays is None:
        assert r.row["secagg_refused"] == 1 and r.row["secagg_discarded"] == 5
    else:
        step = np.concatenate([(run.arrays[k] - run.start[k]).ravel() for k in run.start])
        assert float(np.linalg.norm(step)) <= 1.5 * plain_norm


def test_honest_range_check_on_the_decoded_sum() -> None:
    enc = choose_integer_encoding(dim=50, num_clients=4, clip=1.0, bits=24, weight_cap=100)
    rng = np.random.default_rng(0)
    ints = [enc.encode(rng.normal(0, 1, 50), w, rng) for w in (10, 50, 100, 100)]
    honest = np.sum(ints, axis=0)
    assert outside_honest_range(enc, honest, 4) == ""
    forged = honest.copy()
    forged[-1] = 0
    assert "summed weight 0" in outside_honest_range(enc, forged, 4)
    forged = honest.copy()
    forged[-1] = 1  # tiny weight: the vector no longer fits clip x weight
    assert "exceeds" in outside_honest_range(enc, forged, 4)
    huge = honest.copy()
    huge[3] += 10 * int(enc.scale)
    assert "coordinate sum" in outside_honest_range(enc, huge, 4)
    spread = honest.copy()
    spread[:-1] += int(enc.scale * 0.5)  # every coordinate in range, the norm is not
    assert "norm" in outside_honest_range(enc, spread, 4)
    unweighted = choose_integer_encoding(dim=50, num_clients=4, clip=1.0, bits=24)
    total = np.sum([unweighted.encode(rng.normal(0, 1, 50), 1, rng) for _ in range(4)], axis=0)
    assert outside_honest_range(unweighted, total, 4) == ""
    assert "norm" in outside_honest_range(unweighted, total * 3, 4)


def test_a_copied_public_key_gets_both_advertisers_named_not_the_round_aborted() -> None:
    """A client replaying another's key would make every peer refuse the round (keys must
    be distinct); the server names both advertisers and goes on with the other three."""
    from fedsqueeze.secagg import SecAggClient, SecAggConfig, SecAggServer

    ids = [1, 2, 3, 4, 5]
    cfg = SecAggConfig(
        num_clients=5, neighbours=4, threshold=3, bits=16, vector_len=4, round_seed=3
    )
    server = SecAggServer(cfg, ids)
    setup = server.setup()
    clients = {c: SecAggClient(c, setup[c]) for c in ids}
    keys = {c: clients[c].advertise_keys() for c in ids}
    keys[5] = {**keys[5], "s_pk": keys[4]["s_pk"]}
    out = server.collect_keys(keys)
    assert sorted(out) == [1, 2, 3]
    assert "also advertised" in server.rejected[4] and "also advertised" in server.rejected[5]
    out = server.collect_shares({c: clients[c].share_keys(out[c]) for c in out})
    x = np.arange(4, dtype=np.uint64)
    requests = server.collect_masked({c: clients[c].masked_input(out[c], x) for c in out})
    requests = server.collect_signatures(
        {c: clients[c].check_survivors(requests[c]) for c in requests}
    )
    result = server.finish({c: clients[c].unmask(requests[c]) for c in requests})
    assert result.total.tolist() == (3 * x).tolist()
    assert server.counts(result.included) == {
        "clients": 3,
        "rejected": 2,
        "dropped": 0,
        "discarded": 0,
        "flagged": 0,
    }
