"""Server side of pruning: a strategy wrapper (and round hook) that decides and sends the mask.

Magnitude (unstructured) or channel (structured) pruning; both are a mask to this wrapper.

``PruningStrategy(inner, sparsity=0.9, start_round=1, end_round=10)`` wraps the rest of the
chain (``CompressedStrategy(...)``, ``SecAggStrategy(...)`` inside it, ...). Each round it

1. decides the mask from the global model by magnitude
   (:func:`fedsqueeze.models.pruning.magnitude_masks`) with the sparsity of Zhu & Gupta's
   cubic schedule for that round — between ``start_round`` and ``end_round``; the mask is
   frozen from ``end_round`` on — and never lets a pruned position back in;
2. hands the wrapped chain only the kept values of the global model
   (:func:`fedsqueeze.compression.masked.gather`), so the downlink codec, the uplink codec and
   secure aggregation all work on kept positions only, without knowing about pruning, and
   adds the mask to every train/evaluate message (``fedsqueeze.prune``): the coded mask, or
   only its digest to a client that holds it (the mask is counted in the downlink bytes like
   everything else in the message);
3. turns the aggregate of kept values back into the full model, exactly zero at every
   pruned position (:func:`~fedsqueeze.compression.masked.scatter`).

Clients need ``prune_mod`` (``fedsqueeze.client.pruning``) as their innermost mod.

The wrapped stock strategy must keep no per-coordinate state (FedAvg, FedProx): FedAvgM's
momentum and FedAdam's moments have the shape of the kept values, which changes along the
schedule. While the mask may still change, downlink acknowledgements are withheld from the
wrapped chain, so a compressed downlink sends the full (kept) model rather than a delta
against a model of another shape.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi, Strategy

from fedsqueeze.compression.masked import (
    Masks,
    decode_mask,
    encode_mask,
    gather,
    kept_count,
    mask_digest,
    scatter,
)
from fedsqueeze.contracts.records import (
    DOWNLINK_ACK_KEY,
    PRUNE_KEY,
    from_record,
    to_record,
    without,
)
from fedsqueeze.models.channels import channel_masks
from fedsqueeze.models.pruning import cubic_sparsity, magnitude_masks, sparsity_of
from fedsqueeze.server.compose import refuse_below
from fedsqueeze.server.hooks import RoundHook

log = logging.getLogger(__name__)

STATEFUL_STRATEGIES = (FedAvgM, FedAdam, FedYogi, FedAdagrad)


class PruningStrategy(Strategy, RoundHook):
    """Magnitude pruning with a server-decided mask; see the module docstring.

    Parameters
    ----------
    inner
        The rest of the strategy chain.
    sparsity
        Final fraction of prunable weights removed, in ``[0, 1)``.
    start_round, end_round
        The schedule's first and last round (sparsity 0 before ``start_round``; the final
        sparsity is reached in ``end_round``).
    scope
        ``"global"`` (one magnitude threshold for all layers) or ``"layer"``.
    include_biases
        Also prune 1-D tensors (biases) (magnitude pruning).
    method
        ``"magnitude"`` (unstructured) or ``"channel"`` (whole output channels of every hidden
        layer by L2 norm, :func:`fedsqueeze.models.channels.channel_masks`; the model then
        shrinks physically, :func:`fedsqueeze.models.channels.shrink`, and is stored without
        a mask).
    """

    hook_name = "pruning"

    def __init__(
        self,
        inner: Strategy,
        sparsity: float,
        start_round: int = 1,
        end_round: int = 1,
        scope: str = "global",
        include_biases: bool = False,
        method: str = "magnitude",
    ) -> None:
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        if not 1 <= start_round <= end_round:
            raise ValueError(f"need 1 <= start_round <= end_round, got {start_round}, {end_round}")
        if method not in ("magnitude", "channel"):
            raise ValueError(f"method must be 'magnitude' or 'channel', got {method!r}")
        self.method = method
        self.inner = inner
        refuse_below(
            self,
            STATEFUL_STRATEGIES,
            "its server state has the shape of the kept weights, which changes while pruning",
        )
        self.sparsity, self.scope, self.include_biases = sparsity, scope, include_biases
        self.start_round, self.end_round = start_round, end_round
        self.masks: Masks | None = None
        self.coded = b""
        self.digest = ""
        self._holds: dict[int, str] = {}

    def summary(self) -> None:
        log.info(
            "PruningStrategy(%s, sparsity=%s, rounds %d..%d, scope=%s)",
            self.method,
            self.sparsity,
            self.start_round,
            self.end_round,
            self.scope,
        )
        self.inner.summary()

    # ---- the mask -----------------------------------------------------------------------
    def _update_mask(self, server_round: int, arrays: dict[str, np.ndarray]) -> None:
        if server_round < self.start_round:
            return
        if self.masks is not None and server_round > self.end_round:
            return  # frozen
        target = cubic_sparsity(server_round, self.sparsity, self.start_round, self.end_round)
        # once pruned, always pruned: the previous mask's pruned positions go first
        if self.method == "channel":
            masks = channel_masks(arrays, target, self.masks)
        else:
            masks = magnitude_masks(arrays, target, self.scope, self.include_biases, self.masks)
        coded = encode_mask(masks)
        if coded != self.coded:
            self.masks, self.coded, self.digest = masks, coded, mask_digest(coded)

    def _moving(self, server_round: int) -> bool:
        """Whether next round's mask (so the kept values' shapes) may differ from this one's."""
        return self.start_round <= server_round + 1 <= self.end_round

    def _send(self, messages: list[Message]) -> list[Message]:
        for msg in messages:
            fields: dict[str, Any] = {"digest": self.digest}
            if self._holds.get(msg.metadata.dst_node_id) != self.digest:
                fields["mask"] = self.coded
            msg.content[PRUNE_KEY] = ConfigRecord(fields)
        return messages

    def _receive(self, replies: list[Message], server_round: int) -> list[Message]:
        """Note which clients hold the mask; strip what the wrapped chain must not see.

        A reply without error is the acknowledgement: ``prune_mod`` stores the mask before
        the handler runs and refuses a digest it does not hold, so a client that answered a
        message naming this round's mask holds it. No acknowledgement record is needed —
        one would not survive mods that rebuild the reply (``secagg_mod`` lets only protocol
        fields out in the clear), and without it the full mask was resent every round under
        secure aggregation.
        """
        for msg in replies:
            if msg.has_error():
                self._holds.pop(msg.metadata.src_node_id, None)
                continue
            self._holds[msg.metadata.src_node_id] = self.digest
            if self._moving(server_round) and DOWNLINK_ACK_KEY in msg.content:
                msg.content = without(msg.content, DOWNLINK_ACK_KEY)
        return replies

    # ---- training and evaluation ---------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._update_mask(server_round, from_record(arrays))
        if self.masks is None:
            return self.inner.configure_train(server_round, arrays, config, grid)
        kept = to_record(gather(from_record(arrays), self.masks))
        return self._send(list(self.inner.configure_train(server_round, kept, config, grid)))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = self._receive(list(replies), server_round)
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if arrays is None or self.masks is None:
            return arrays, metrics
        return to_record(scatter(from_record(arrays), self.masks)), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.masks is None:
            return self.inner.configure_evaluate(server_round, arrays, config, grid)
        kept = to_record(gather(from_record(arrays), self.masks))
        return self._send(list(self.inner.configure_evaluate(server_round, kept, config, grid)))

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(
            server_round, self._receive(list(replies), server_round)
        )

    # ---- round hook ----------------------------------------------------------------------
    def _stored_bytes(self, kept: int) -> int:
        """The model as stored: fp32 kept values plus the coded mask — or, channel-pruned,
        the physically smaller dense model, which needs no mask."""
        return 4 * kept + (0 if self.method == "channel" else len(self.coded))

    def after_round(self, server_round: int, row: dict[str, Any]) -> None:
        if self.masks is None:
            row["sparsity"] = 0.0
            return
        kept = kept_count(self.masks)
        dense = sum(m.size for m in self.masks.values())
        row.update(
            {
                "sparsity": round(sparsity_of(self.masks, self.include_biases), 6),
                "nonzero_params": kept,
                "model_bytes_dense": 4 * dense,
                "model_bytes_sparse": self._stored_bytes(kept),
                "mask_bytes": len(self.coded),
            }
        )

    def state(self) -> dict[str, Any]:
        return {"mask": self.coded}

    def restore(self, state: dict[str, Any]) -> None:
        if state.get("mask"):
            self.coded = bytes(state["mask"])
            self.masks, self.digest = decode_mask(self.coded), mask_digest(self.coded)

    def summary_fields(self) -> dict[str, Any]:
        if self.masks is None:
            return {"sparsity": 0.0}
        kept = kept_count(self.masks)
        return {
            "sparsity": sparsity_of(self.masks, self.include_biases),
            "nonzero_params": kept,
            "model_bytes_sparse": self._stored_bytes(kept),
        }


def pruning_from_config(inner: Strategy, config: Any) -> Strategy:
    """``inner`` wrapped in :class:`PruningStrategy` when the run config asks (``prune``)."""
    if str(config.get("prune", "none")) == "none":
        return inner
    return PruningStrategy(
        inner,
        sparsity=float(config["prune-sparsity"]),
        start_round=int(config["prune-start-round"]),
        end_round=int(config["prune-end-round"]),
        scope=str(config["prune-scope"]),
        include_biases=bool(config["prune-biases"]),
        method=str(config["prune"]),
    )
