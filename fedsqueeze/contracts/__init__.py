"""Contracts shared by the client and the server side, below both.

Nothing here imports ``fedsqueeze.client`` or ``fedsqueeze.server``; both import from here.

- :mod:`~fedsqueeze.contracts.records` — record names and keys of the wire contract,
  array/record conversion, serialized sizes;
- :mod:`~fedsqueeze.contracts.streams` — every random stream of a run, named;
- :mod:`~fedsqueeze.contracts.summable` — summable encodings (client encode → secure sum →
  server decode) for plain, central-DP and distributed-DP secure aggregation;
- :mod:`~fedsqueeze.contracts.secure_wire` — the SecAgg+ stages as Flower messages;
- :mod:`~fedsqueeze.contracts.checks` — which run-config combinations can run.

The signed-integer ↔ Z_2^b map itself is :mod:`fedsqueeze.secagg.field` (a core).
"""
