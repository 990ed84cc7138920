"""Secure aggregation: SecAgg+ (Bell et al., CCS 2020), full graph = Bonawitz et al. (CCS 2017).

Framework-free (``cryptography`` + numpy). Typical round::

    cfg = SecAggConfig(num_clients=n, neighbours=k, threshold=t, bits=b, vector_len=d,
                       round_seed=s)
    server = SecAggServer(cfg, client_ids)
    setup = server.setup()                                   # {cid: msg}
    clients = {cid: SecAggClient(cid, setup[cid]) for cid in setup}
    out = server.collect_keys({c: clients[c].advertise_keys() for c in clients})
    out = server.collect_shares({c: clients[c].share_keys(out[c]) for c in out})
    out = server.collect_masked({c: clients[c].masked_input(out[c], x[c]) for c in out})
    result = server.finish({c: clients[c].unmask(out[c]) for c in out})

Clients absent from a dict are treated as dropped at that stage. The graph is a random
k-regular graph from the round seed; ``secure_neighbours(n, dropout, corrupt)`` is the degree
bound (never below ``bell_parameters``, Bell et al. CCS 2020's parameter search) and
``check_neighbours`` refuses a smaller ``k``. Each
client enforces its own floor, ``SecAggClient(cid, msg, policy=ClientPolicy(...))``, and
refuses requests that would let an active server strip its masks (see ``client.py``).

Between stages a client can be saved with ``state = client.to_state()`` (flat, fits a
Flower ``ConfigRecord``) and resumed with ``SecAggClient.from_state(state)``.
"""

from fedsqueeze.secagg.client import SecAggClient
from fedsqueeze.secagg.config import (
    ClientPolicy,
    SecAggConfig,
    bell_parameters,
    check_neighbours,
    is_connected,
    neighbour_graph,
    secure_neighbours,
    secure_threshold,
)
from fedsqueeze.secagg.errors import (
    SecAggAbort,
    SecAggConfigError,
    SecAggDecryptionError,
    SecAggError,
    SecAggInputError,
    SecAggOverflowError,
    SecAggProtocolError,
)
from fedsqueeze.secagg.field import check_no_overflow, from_field, required_bits, to_field
from fedsqueeze.secagg.server import SecAggResult, SecAggServer

__all__ = [
    "ClientPolicy",
    "SecAggAbort",
    "SecAggClient",
    "SecAggConfig",
    "SecAggConfigError",
    "SecAggDecryptionError",
    "SecAggError",
    "SecAggInputError",
    "SecAggOverflowError",
    "SecAggProtocolError",
    "SecAggResult",
    "SecAggServer",
    "bell_parameters",
    "check_neighbours",
    "check_no_overflow",
    "from_field",
    "is_connected",
    "neighbour_graph",
    "required_bits",
    "secure_neighbours",
    "secure_threshold",
    "to_field",
]
