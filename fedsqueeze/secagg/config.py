"""Protocol parameters, the communication graph, and message-field helpers.

Messages between stages are flat dicts whose values are Flower ``ConfigRecord`` friendly
(``int``, ``bool``, ``str``, ``bytes`` and homogeneous lists of those).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeGuard

from fedsqueeze.secagg import crypto
from fedsqueeze.secagg.errors import SecAggConfigError, SecAggProtocolError
from fedsqueeze.secagg.field import MAX_BITS, MIN_BITS

PROTOCOL = "fedsqueeze-secagg+/1"
MAX_ID = (1 << 64) - 1  # Flower node ids and round seeds are uint64
# The PRG output for one mask is vector_len * 8 bytes at most; keep it sane.
MAX_VECTOR_LEN = 1 << 31
CONFIG_FIELDS = (
    "num_clients",
    "neighbours",
    "threshold",
    "bits",
    "vector_len",
    "round_seed",
    "allow_low_threshold",  # last: the only bool
)


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SecAggConfig:
    """Public parameters of one SecAgg+ round.

    Parameters
    ----------
    num_clients:
        ``n``, the number of clients selected for the round (>= 2).
    neighbours:
        ``k``, the degree of the communication graph; ``n - 1`` is the full graph
        (Bonawitz et al.), smaller values give SecAgg+ (Bell et al.). ``n * k`` must be
        even for a k-regular graph to exist.
    threshold:
        ``t``, shares needed to reconstruct a secret; ``2 <= t <= k + 1`` (each client
        shares among its ``k`` neighbours and itself). Unless ``allow_low_threshold``,
        ``t > (k + 1) / 2`` is required: below it a server that lies about who dropped can
        collect both the self-mask and the mask-key shares of one client from two disjoint
        groups of honest holders and unmask that client's input.
    bits:
        ``b``, inputs and the sum live in Z_{2^b}; 1..62.
    vector_len:
        ``d``, the input length (> 0).
    round_seed:
        Public per-round randomness (uint64): fixes the graph and the session id.
    allow_low_threshold:
        Permit ``t <= (k + 1) / 2`` (only secure against a server that reports dropouts
        honestly).
    """

    num_clients: int
    neighbours: int
    threshold: int
    bits: int
    vector_len: int
    round_seed: int
    allow_low_threshold: bool = False

    def __post_init__(self) -> None:
        n, k, t, b, d = (
            self.num_clients,
            self.neighbours,
            self.threshold,
            self.bits,
            self.vector_len,
        )
        for name in ("num_clients", "neighbours", "threshold", "bits", "vector_len", "round_seed"):
            if not _is_int(getattr(self, name)):
                raise SecAggConfigError(f"{name} must be an int, got {getattr(self, name)!r}")
        if not isinstance(self.allow_low_threshold, bool):
            raise SecAggConfigError("allow_low_threshold must be a bool")
        if n < 2:
            raise SecAggConfigError(f"num_clients must be >= 2, got {n}")
        if not 1 <= k <= n - 1:
            raise SecAggConfigError(f"neighbours must be in 1..{n - 1} (n-1 = full graph), got {k}")
        if (n * k) % 2:
            raise SecAggConfigError(
                f"no {k}-regular graph exists on {n} clients (n*k must be even); "
                f"use neighbours={k + 1 if k + 1 <= n - 1 else k - 1}"
            )
        if not 2 <= t <= k + 1:
            raise SecAggConfigError(
                f"threshold must be in 2..{k + 1} (k+1 share holders per client), got {t}"
            )
        if not self.allow_low_threshold and 2 * t <= k + 1:
            raise SecAggConfigError(
                f"threshold {t} <= (k+1)/2 = {(k + 1) / 2}: a server lying about dropouts "
                f"could unmask a client; use threshold >= {(k + 1) // 2 + 1} "
                "or set allow_low_threshold=True"
            )
        if not MIN_BITS <= b <= MAX_BITS:
            raise SecAggConfigError(f"bits must be in {MIN_BITS}..{MAX_BITS}, got {b}")
        if not 1 <= d <= MAX_VECTOR_LEN:
            raise SecAggConfigError(f"vector_len must be in 1..{MAX_VECTOR_LEN}, got {d}")
        if not 0 <= self.round_seed <= MAX_ID:
            raise SecAggConfigError(f"round_seed must be a uint64, got {self.round_seed}")

    def to_fields(self) -> dict[str, int | bool]:
        """The parameters as flat message fields (setup messages, saved client state)."""
        return {name: getattr(self, name) for name in CONFIG_FIELDS}

    @classmethod
    def from_fields(cls, msg: Mapping[str, Any]) -> SecAggConfig:
        """Inverse of :meth:`to_fields`; type errors raise ``SecAggProtocolError``."""
        return cls(
            **{name: get_int(msg, name) for name in CONFIG_FIELDS[:-1]},
            allow_low_threshold=get_bool(msg, "allow_low_threshold"),
        )

    @staticmethod
    def min_secure_threshold(neighbours: int) -> int:
        """Smallest ``t`` accepted without ``allow_low_threshold``: ``floor((k+1)/2) + 1``."""
        return (neighbours + 1) // 2 + 1


def check_client_ids(client_ids: Sequence[int], num_clients: int) -> list[int]:
    """Validate and return the sorted client ids (distinct uint64 values, ``num_clients``)."""
    ids = list(client_ids)
    if len(ids) != num_clients:
        raise SecAggConfigError(f"expected {num_clients} client ids, got {len(ids)}")
    for cid in ids:
        if not _is_int(cid) or not 0 <= cid <= MAX_ID:
            raise SecAggConfigError(f"client ids must be uint64 ints, got {cid!r}")
    if len(set(ids)) != len(ids):
        raise SecAggConfigError("client ids must be distinct")
    return sorted(ids)


def session_id(config: SecAggConfig, client_ids: Sequence[int]) -> bytes:
    """SHA-256 over every public parameter of the round.

    Bound into every key derivation and every ciphertext's associated data, so nothing from
    another round (or a round with different parameters or participants) is accepted.
    """
    h = hashlib.sha256(PROTOCOL.encode())
    for value in (
        config.num_clients,
        config.neighbours,
        config.threshold,
        config.bits,
        config.vector_len,
        config.round_seed,
        int(config.allow_low_threshold),
    ):
        h.update(value.to_bytes(8, "big"))
    for cid in sorted(client_ids):
        h.update(cid.to_bytes(8, "big"))
    return h.digest()


def neighbour_graph(
    client_ids: Sequence[int], neighbours: int, round_seed: int
) -> dict[int, tuple[int, ...]]:
    """The communication graph of the round: a random k-regular graph from public data only.

    SecAgg+ (Bell et al., CCS 2020, Section 3) replaces the complete graph of Bonawitz et
    al. by a sparse *random* graph; the analysis needs the graph to be random relative to
    who drops out and who is corrupted, so that the survivors' graph stays connected and
    every neighbourhood keeps ``t`` share holders. A ring (Harary graph) over a relabelling
    is not enough: its survivors split into arcs as soon as ``k/2`` consecutive clients
    drop (issue: 19 of 44 rounds leaked partial sums at n=100, k=4, 20% dropout).

    Construction: start from the Harary graph over the sorted ids and randomize it with
    ``10 * |E|`` double-edge switches (replace ``{a,b}, {c,d}`` by ``{a,d}, {c,b}`` when that
    adds no loop or multi-edge), a Markov chain on k-regular graphs whose stationary law is
    uniform. The switch randomness is an AES-CTR stream keyed by SHA-256 of the round seed
    and the ids, so every client recomputes the same graph and the server cannot choose
    whom a client shares with. ``k = n - 1`` yields the complete graph.
    """
    return dict(_graph(tuple(sorted(client_ids)), neighbours, round_seed))


@lru_cache(maxsize=16)
def _graph(ids: tuple[int, ...], k: int, round_seed: int) -> dict[int, tuple[int, ...]]:
    n = len(ids)
    if k >= n - 1:
        return {u: tuple(v for v in ids if v != u) for u in ids}
    offsets: set[int] = set()
    for j in range(1, k // 2 + 1):
        offsets.update((j, n - j))
    if k % 2:
        offsets.add(n // 2)
    adj: list[set[int]] = [{(i + o) % n for o in offsets} for i in range(n)]
    edges = [(i, j) for i in range(n) for j in adj[i] if i < j]
    m = len(edges)
    if m >= 2:
        h = hashlib.sha256(b"fedsqueeze/secagg/v2/graph" + round_seed.to_bytes(8, "big"))
        h.update(k.to_bytes(8, "big"))
        for cid in ids:
            h.update(cid.to_bytes(8, "big"))
        attempts = 10 * m
        words = crypto.prg_words(h.digest(), 3 * attempts, 64).tolist()
        for a_i in range(attempts):
            i = words[3 * a_i] % m
            j = words[3 * a_i + 1] % m
            if i == j:
                continue
            a, b = edges[i]
            c, d = edges[j]
            if words[3 * a_i + 2] & 1:
                c, d = d, c
            if a == d or c == b or d in adj[a] or b in adj[c]:
                continue
            adj[a].discard(b)
            adj[b].discard(a)
            adj[c].discard(d)
            adj[d].discard(c)
            adj[a].add(d)
            adj[d].add(a)
            adj[c].add(b)
            adj[b].add(c)
            edges[i] = (a, d)
            edges[j] = (c, b)
    return {ids[i]: tuple(sorted(ids[j] for j in adj[i])) for i in range(n)}


def is_connected(graph: Mapping[int, Sequence[int]], nodes: Iterable[int]) -> bool:
    """Whether the subgraph of ``graph`` induced by ``nodes`` is connected (empty: False).

    The server learns the sum of every connected component of the survivors' graph (the
    pairwise masks inside a component cancel, and no mask crosses to another one), so it
    may unmask only when the survivors form a single component.
    """
    alive = set(nodes)
    if not alive:
        return False
    start = min(alive)
    seen = {start}
    todo = [start]
    while todo:
        u = todo.pop()
        for v in graph[u]:
            if v in alive and v not in seen:
                seen.add(v)
                todo.append(v)
    return seen == alive


# --- the degree bound -----------------------------------------------------------------

DEFAULT_DROPOUT = 0.1
"""Dropout rate the degree bound assumes unless told otherwise (server and client)."""
DEFAULT_CORRUPT = 0.0
"""Fraction of corrupted (colluding) clients the degree bound assumes unless told otherwise."""
SIGMA = 40
"""Statistical security parameter: security fails with probability at most ``2^-SIGMA``."""
ETA = 30
"""Correctness parameter: a round fails for lack of share holders w.p. at most ``2^-ETA``."""
_SMALL = 1e-14  # keeps float rounding of rate * n from rounding in the insecure direction


def _log2_binom_tail(trials: int, p: float, at_least: int) -> float:
    """``log2 P[Binomial(trials, p) >= at_least]`` (exact sum, in log space)."""
    if at_least <= 0:
        return 0.0
    if at_least > trials or p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return 0.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [
        math.lgamma(trials + 1)
        - math.lgamma(j + 1)
        - math.lgamma(trials - j + 1)
        + j * lp
        + (trials - j) * lq
        for j in range(at_least, trials + 1)
    ]
    top = max(terms)
    return (top + math.log(sum(math.exp(x - top) for x in terms))) / math.log(2)


def _log2_comb(a: int, b: int) -> float:
    return (math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)) / math.log(2)


def _log_add(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    top = max(a, b)
    return top + math.log(math.exp(a - top) + math.exp(b - top))


def _hypergeom_log_pmf(total: int, marked: int, sampled: int) -> tuple[int, list[float]]:
    """``(lo, [ln P[X = lo], ..., ln P[X = hi]])`` for X ~ Hypergeometric(total, marked, sampled).

    X counts the marked items in a uniform sample of ``sampled`` out of ``total`` (without
    replacement): the corrupted, or the surviving, neighbours of one client.
    """
    lo, hi = max(0, sampled - (total - marked)), min(sampled, marked)
    lg = math.lgamma
    const = (
        lg(marked + 1)
        + lg(total - marked + 1)
        + lg(sampled + 1)
        + lg(total - sampled + 1)
        - lg(total + 1)
    )
    return lo, [
        const
        - lg(x + 1)
        - lg(marked - x + 1)
        - lg(sampled - x + 1)
        - lg(total - marked - sampled + x + 1)
        for x in range(lo, hi + 1)
    ]


def _hypergeom_log_tails(total: int, marked: int, sampled: int) -> tuple[list[float], list[float]]:
    """``(below, above)``: ``ln P[X <= x]`` and ``ln P[X > x]`` for ``x = 0..sampled``.

    X ~ Hypergeometric(total, marked, sampled), as in :func:`_hypergeom_log_pmf`.
    """
    lo, pmf = _hypergeom_log_pmf(total, marked, sampled)
    point = [pmf[x - lo] if 0 <= x - lo < len(pmf) else -math.inf for x in range(sampled + 1)]
    below, acc = [], -math.inf
    for value in point:
        acc = _log_add(acc, value)
        below.append(acc)
    above, acc = [-math.inf] * (sampled + 1), -math.inf
    for x in range(sampled, -1, -1):
        above[x] = acc
        acc = _log_add(acc, point[x])
    return below, above


def _ln_harary_disconnected(n: int, k: int, removed: int) -> float:
    """ln of Bell et al.'s union bound on a random Harary graph H(n, k) falling apart.

    Removing ``removed`` clients placed uniformly at random on the ring disconnects the
    (randomly relabelled) Harary graph only if two disjoint runs of ``k/2`` consecutive
    clients are all removed; there are ``n (n - k - 1) / 2`` such pairs and each is removed
    with probability ``C(n - k, removed - k) / C(n, removed)``.
    """
    if k > removed:
        return -math.inf
    lg = math.lgamma
    return (
        math.log(n)
        + math.log(max(n - k - 1, 1))
        - math.log(2)
        + lg(removed + 1)
        + lg(n - k + 1)
        - lg(n + 1)
        - lg(removed - k + 1)
    )


def bell_threshold_range(
    n: int,
    k: int,
    gamma: float,
    delta: float,
    sigma: float = SIGMA,
    eta: float = ETA,
    semi_malicious: bool = True,
) -> tuple[int, int] | None:
    """Thresholds ``(t_min, t_max)`` that Bell et al.'s parameter search accepts for degree k.

    Source: Bell, Bonawitz, Gascón, Lepoint, Raykova, "Secure Single-Server Aggregation with
    (Poly)Logarithmic Overhead" (CCS 2020, IACR ePrint 2020/704), as implemented by the
    authors' group in Google's federated-compute library (``fcp/secagg/server/
    graph_parameter_finder.cc``, ``HararyGraphParameterFinder``); re-implemented here from
    its stated conditions, and checked against the precomputed (k, t) table of its tests.
    The paper's own theorem text was not available to us; the conditions are:

    With ``A = floor(γ n)`` corrupted clients, ``D = floor(δ n)`` drop-outs (both placed
    uniformly at random relative to the graph) and ``S = ceil((1 - δ) n)`` survivors, a
    client's corrupted neighbours ``X ~ Hyp(n, A, k)`` and surviving neighbours
    ``Y ~ Hyp(n, S, k)``:

    1. connectivity: the random Harary graph minus the ``A + D`` removed clients is
       disconnected with probability ``< 2^-(σ+1)`` (:func:`_ln_harary_disconnected`);
    2. privacy: ``t1 = min{x : P[X > x] < 2^-(σ+1) / n}`` (no client has more than ``t1``
       corrupted neighbours); against a *semi-malicious* server, which may lie about who
       dropped out to collect the self-mask and mask-key shares of one client from two
       groups of holders, ``t1`` is raised to ``ceil((t1 + k - 1.25) / 2)``, i.e.
       ``2 t > k + t1``;
    3. correctness: ``t2 = max{x : P[Y <= x - 1] < 2^-η / n}`` (every client keeps ``t2``
       surviving neighbours);

    and ``t`` must lie in ``(t1, t2]`` (and be at least 2). Returns ``None`` when the range
    is empty or condition 1 fails. The library uses η = 20; :data:`ETA` here is 30.
    """
    if not 2 <= k <= n - 1:
        return None
    adversarial = math.floor((gamma + _SMALL) * n)
    dropouts = math.floor((delta + _SMALL) * n)
    survivors = math.ceil((1 - delta - _SMALL) * n)
    if _ln_harary_disconnected(n, k, adversarial + dropouts) >= -(sigma + 1) * math.log(2):
        return None
    t1 = _bell_t1(n, k, gamma, sigma, semi_malicious)
    ln_cor = -eta * math.log(2) - math.log(n)
    below = _hypergeom_log_tails(n, survivors, k)[0]
    # Largest x with P[Y <= x - 1] < 2^-η / n (the condition holds for a prefix of x).
    t2 = max((x for x in range(1, k + 1) if below[x - 1] < ln_cor), default=0)
    # Their acceptance rule, kept so the reference table reproduces; when t1 = 0 and t2 = 1
    # the range is (2, 1): callers that need a live threshold check t <= t_max themselves.
    return (max(t1 + 1, 2), t2) if t2 > t1 else None


def bell_privacy_floor(
    n: int, k: int, gamma: float, sigma: float = SIGMA, semi_malicious: bool = True
) -> int:
    """The lower end of :func:`bell_threshold_range`: ``max(t1 + 1, 2)`` (condition 2)."""
    return max(_bell_t1(n, k, gamma, sigma, semi_malicious) + 1, 2)


def _bell_t1(n: int, k: int, gamma: float, sigma: float, semi_malicious: bool) -> int:
    adversarial = math.floor((gamma + _SMALL) * n)
    ln_sec = -(sigma + 1) * math.log(2) - math.log(n)
    above = _hypergeom_log_tails(n, adversarial, k)[1]
    # Smallest x with P[X > x] < 2^-(σ+1) / n (the condition holds for a suffix of x).
    t1 = min((x for x in range(k) if above[x] < ln_sec), default=k)
    if semi_malicious:
        t1 = math.ceil((t1 + k - 1.25) / 2)
    return t1


@lru_cache(maxsize=256)
def bell_parameters(
    n: int,
    gamma: float,
    delta: float,
    sigma: float = SIGMA,
    eta: float = ETA,
    semi_malicious: bool = True,
) -> tuple[int, int] | None:
    """Bell et al.'s degree and threshold ``(k, t)`` for ``n`` clients, or ``None``.

    The smallest even ``k < n - 1`` for which :func:`bell_threshold_range` is non-empty, and
    its smallest threshold (the authors' search, see there for the exact conditions and the
    source). ``None`` when no sparse graph qualifies (small ``n``, or large ``γ + δ``):
    use the complete graph. The search also refuses instances outside the finder's
    feasibility region: ``γ + 2δ > 0.9`` semi-malicious, ``γ + δ > 0.9`` semi-honest.

    For ``n = 10^4`` and ``γ = δ = 5%`` against a semi-malicious server this gives k = 62,
    t = 44 at η = 20 (k = 74, t = 51 at η = 30): the (k, t) that make the protocol secure
    and live for drop-outs and corruptions placed at random relative to the graph. The
    paper's abstract quotes about 3% of the clients (k ≈ 300) for the same n, γ and δ under
    its stronger semi-malicious guarantee that every included input is summed with at least
    5000 others; that bound is not reproduced here (its statement was not available).
    """
    if not _is_int(n) or n < 2:
        raise SecAggConfigError(f"n must be an int >= 2, got {n!r}")
    if not (0 <= gamma < 1 and 0 <= delta < 1):
        raise SecAggConfigError(f"gamma and delta must be in [0, 1), got {gamma}, {delta}")
    if gamma + (2 if semi_malicious else 1) * delta > 0.9:
        return None
    for k in range(2, n - 1, 2):
        found = bell_threshold_range(n, k, gamma, delta, sigma, eta, semi_malicious)
        if found is not None:
            return k, found[0]
    return None


def corrupt_margin(n: int, k: int, corrupt: float, sigma: float = SIGMA) -> int:
    """Corrupted neighbours one client has, except with probability ``2^-sigma`` over all n.

    The smallest ``c`` with ``n · P[Bin(k, corrupt) > c] <= 2^-sigma``.
    """
    if corrupt <= 0:
        return 0
    if corrupt >= 1:
        return k
    target = (-sigma - math.log2(n)) * math.log(2)
    lp, lq = math.log(corrupt), math.log1p(-corrupt)
    tail = -math.inf  # ln P[Bin > c], accumulated from the top
    for c in range(k - 1, -1, -1):
        j = c + 1
        term = (
            math.lgamma(k + 1) - math.lgamma(j + 1) - math.lgamma(k - j + 1) + j * lp + (k - j) * lq
        )
        tail = _log_add(tail, term)
        if tail > target:
            return c + 1
    return 0


def secure_threshold(n: int, k: int, corrupt: float = DEFAULT_CORRUPT, sigma: float = SIGMA) -> int:
    """Smallest ``t`` an active server cannot beat: ``2(t - c) > k + 1 - c``, and Bell's.

    A server lying about dropouts asks disjoint groups of a client's honest holders for its
    self-mask and its mask-key shares; each corrupted holder (at most ``c``, see
    :func:`corrupt_margin`) gives both. ``c = 0`` is :meth:`SecAggConfig.min_secure_threshold`.
    The result is never below Bell et al.'s semi-malicious lower end ``floor((k + t1)/2) + 1``
    (:func:`bell_threshold_range`, whose ``t1`` counts corrupted neighbours hypergeometrically).
    """
    c = corrupt_margin(n, k, corrupt, sigma)
    ours = (k + 1 + c) // 2 + 1
    return max(ours, bell_privacy_floor(n, k, corrupt, sigma)) if k >= 1 else ours


def _random_graph_ok(n: int, k: int, t: int, rho: float, sigma: float, eta: float) -> bool:
    """Our conditions 2 and 3 of :func:`secure_neighbours` for the random k-regular graph."""
    if math.log2(n) + _log2_binom_tail(k, rho, k + 2 - t) > -eta:
        return False
    m = max(1, int((1 - rho) * n))
    total = 0.0
    for s in range(1, m // 2 + 1):
        term = _log2_comb(m, s) + k * s * math.log2((s + rho * n) / n)
        total += 2.0 ** (term + sigma)
        if total > 1.0:
            return False
    return True


@lru_cache(maxsize=256)
def secure_neighbours(
    n: int,
    dropout: float = DEFAULT_DROPOUT,
    corrupt: float = DEFAULT_CORRUPT,
    sigma: float = SIGMA,
    eta: float = ETA,
) -> int:
    """Smallest degree ``k`` of the random k-regular graph that is safe and live for ``n``.

    ``k`` must satisfy both Bell et al.'s conditions against a semi-malicious server
    (:func:`bell_threshold_range`: with ``δ = dropout``, ``γ = corrupt``, some threshold is
    both private and live, and their random Harary graph stays connected) and our own for
    the graph we actually draw, a random k-regular graph (:func:`neighbour_graph`):

    1. security of the threshold: ``t = secure_threshold(n, k, γ)`` is at most ``k + 1``
       and at most Bell's ``t_max``;
    2. correctness: ``n · P[Bin(k, δ + γ) > k + 1 - t] <= 2^-η`` (every neighbourhood keeps
       ``t`` live holders);
    3. connectivity of the honest survivors (``m = (1 - δ - γ) n`` of them) in the
       configuration model: ``Σ_{s=1}^{m/2} C(m, s) ((s + (δ + γ) n) / n)^{k s} <= 2^-σ``.

    So the default is never less conservative than Bell et al.'s parameters (a larger
    ``k`` than theirs, a threshold inside their range). Returns ``n - 1`` (the complete
    graph, Bonawitz et al.) when no smaller ``k`` qualifies: small ``n``, ``δ + γ >= 1/2``,
    or outside Bell's feasibility region (``γ + 2δ > 0.9``).

    Both analyses assume drop-outs and corruptions that do not depend on the graph; the
    server's lies about drop-outs are covered by the threshold (``2t > k + 1 + c``), and
    the survivors' graph is checked for connectivity before any share is revealed.
    """
    if not _is_int(n) or n < 2:
        raise SecAggConfigError(f"n must be an int >= 2, got {n!r}")
    if not (0 <= dropout <= 1 and 0 <= corrupt <= 1):
        raise SecAggConfigError(f"dropout and corrupt must be in [0, 1], got {dropout}, {corrupt}")
    rho = float(dropout) + float(corrupt)
    if rho >= 0.5 or corrupt + 2 * dropout > 0.9:
        return n - 1
    bell = bell_parameters(n, float(corrupt), float(dropout), sigma, eta)
    if bell is None:
        return n - 1
    for k in range(max(3, bell[0]), n - 1):
        if (n * k) % 2:
            continue
        t = secure_threshold(n, k, corrupt, sigma)
        limits = bell_threshold_range(n, k, corrupt, dropout, sigma, eta)
        if t > k + 1 or limits is None or t > limits[1]:
            continue
        if _random_graph_ok(n, k, t, rho, sigma, eta):
            return k
    return n - 1


def check_neighbours(
    n: int, k: int, dropout: float = DEFAULT_DROPOUT, corrupt: float = DEFAULT_CORRUPT
) -> None:
    """Refuse, in one line, a degree below :func:`secure_neighbours` for ``n`` clients."""
    need = secure_neighbours(n, dropout, corrupt)
    if k < need:
        raise SecAggConfigError(
            f"secagg neighbours = {k} is below the secure degree {need} for {n} clients at "
            f"dropout {dropout:g} and corrupt fraction {corrupt:g} (Bell et al. 2020): the "
            "survivors' graph would disconnect and leak partial sums; use neighbours >= "
            f"{need} or 0 (automatic)"
        )


@dataclass(frozen=True)
class ClientPolicy:
    """A client's own security floor, set on the device (node config), never by the server.

    Parameters
    ----------
    min_threshold:
        Refuse a threshold below this. The floor is never lower than the secure threshold
        ``floor((k+1)/2) + 1`` (:meth:`SecAggConfig.min_secure_threshold`) unless
        ``allow_low_threshold``; a value here can only raise it.
    min_neighbours:
        Refuse a graph degree below ``min(min_neighbours, n - 1)``. ``None`` = the degree
        bound :func:`secure_neighbours` for the round's ``n`` at ``dropout`` / ``corrupt``.
    dropout, corrupt:
        What the default neighbour floor assumes.
    allow_low_threshold:
        Accept thresholds at or below ``(k+1)/2`` (only safe if the server reports dropouts
        honestly). A device-side choice: the server's ``allow_low_threshold`` is ignored.
    roster:
        Raw 32-byte Ed25519 identity public keys of the devices this client trusts. When
        set, every peer's key advertisement must be signed by a distinct roster key, so the
        server cannot substitute its own keys. ``None``: keys are not authenticated (the
        server is trusted not to substitute them).
    """

    min_threshold: int | None = None
    min_neighbours: int | None = None
    dropout: float = DEFAULT_DROPOUT
    corrupt: float = DEFAULT_CORRUPT
    allow_low_threshold: bool = False
    roster: frozenset[bytes] | None = None

    def threshold_floor(self, config: SecAggConfig) -> int:
        floor = (
            2
            if self.allow_low_threshold
            else secure_threshold(config.num_clients, config.neighbours, self.corrupt)
        )
        return max(floor, self.min_threshold or 0)

    def neighbour_floor(self, num_clients: int) -> int:
        if self.min_neighbours is None:
            need = secure_neighbours(num_clients, self.dropout, self.corrupt)
        else:
            need = self.min_neighbours
        return min(need, num_clients - 1)

    def check(self, config: SecAggConfig) -> None:
        """Raise :class:`SecAggProtocolError` (one line) if ``config`` is below this floor."""
        t_floor = self.threshold_floor(config)
        if config.threshold < t_floor:
            raise SecAggProtocolError(
                f"refusing the round: threshold {config.threshold} is below this client's "
                f"floor {t_floor} (k = {config.neighbours})"
            )
        k_floor = self.neighbour_floor(config.num_clients)
        if config.neighbours < k_floor:
            raise SecAggProtocolError(
                f"refusing the round: {config.neighbours} neighbours is below this client's "
                f"floor {k_floor} for {config.num_clients} clients"
            )


# --- message field helpers -------------------------------------------------------------


def get_int(msg: Mapping[str, Any], key: str) -> int:
    value = _get(msg, key)
    if not _is_int(value):
        raise SecAggProtocolError(f"field {key!r} must be an int")
    return value


def get_bool(msg: Mapping[str, Any], key: str) -> bool:
    value = _get(msg, key)
    if not isinstance(value, bool):
        raise SecAggProtocolError(f"field {key!r} must be a bool")
    return value


def get_str(msg: Mapping[str, Any], key: str) -> str:
    value = _get(msg, key)
    if not isinstance(value, str):
        raise SecAggProtocolError(f"field {key!r} must be a str")
    return value


def get_bytes(msg: Mapping[str, Any], key: str, length: int | None = None) -> bytes:
    value = _get(msg, key)
    if not isinstance(value, bytes):
        raise SecAggProtocolError(f"field {key!r} must be bytes")
    if length is not None and len(value) != length:
        raise SecAggProtocolError(f"field {key!r} must be {length} bytes, got {len(value)}")
    return value


def get_id_list(msg: Mapping[str, Any], key: str) -> list[int]:
    """A list of distinct uint64 ids."""
    value = _get(msg, key)
    if not isinstance(value, list) or not all(_is_int(v) and 0 <= v <= MAX_ID for v in value):
        raise SecAggProtocolError(f"field {key!r} must be a list of uint64 ints")
    if len(set(value)) != len(value):
        raise SecAggProtocolError(f"field {key!r} has duplicate ids")
    return list(value)


def get_bytes_list(msg: Mapping[str, Any], key: str, length: int | None = None) -> list[bytes]:
    value = _get(msg, key)
    if not isinstance(value, list) or not all(isinstance(v, bytes) for v in value):
        raise SecAggProtocolError(f"field {key!r} must be a list of bytes")
    if length is not None and any(len(v) != length for v in value):
        raise SecAggProtocolError(f"every item of {key!r} must be {length} bytes")
    return list(value)


def _get(msg: Mapping[str, Any], key: str) -> Any:
    if not isinstance(msg, Mapping):
        raise SecAggProtocolError(f"a message must be a mapping, got {type(msg).__name__}")
    if key not in msg:
        raise SecAggProtocolError(f"message lacks field {key!r}")
    return msg[key]


def protocol_params(
    neighbours: int,
    threshold: int,
    num_clients: int,
    dropout: float = DEFAULT_DROPOUT,
    corrupt: float = DEFAULT_CORRUPT,
) -> tuple[int, int]:
    """(neighbours k, threshold t) for ``num_clients``: the given ones or the defaults.

    Default k is the degree bound of Bell et al. (:func:`~fedsqueeze.secagg.secure_neighbours`
    for ``dropout`` and ``corrupt``; the complete graph when ``n`` is small), default t the
    smallest threshold safe against a server lying about dropouts. A given ``k`` below the
    bound raises :class:`~fedsqueeze.secagg.SecAggConfigError` (one line).
    """
    n = num_clients
    k = min(int(neighbours) or secure_neighbours(n, dropout, corrupt), n - 1)
    if (n * k) % 2:  # no k-regular graph on n nodes: take one more neighbour (or one fewer)
        k = k + 1 if k + 1 <= n - 1 else k - 1
    check_neighbours(n, k, dropout, corrupt)
    t = int(threshold) or secure_threshold(n, k, corrupt)
    return k, min(t, k + 1)
