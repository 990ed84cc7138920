"""The codec: a chain of stages, the self-describing wire format, and spec parsing.

Wire format, version 2 (fixed-size integers little-endian; ``varint`` is unsigned
LEB128, canonical, at most 10 bytes)::

    b"FSQZ"  u8 version=2  u8 flags  varint spec_len  spec (UTF-8, canonical)
    layout:
      flags & 1 == 0 ("full"): the layout table
        varint n_tensors, then per tensor:
          varint name_len  name (UTF-8)  u8 dtype_code  u8 ndim  ndim x varint dim
      flags & 1 == 1 ("hash"): 8-byte BLAKE2b digest of that same table; the decoder
        rebuilds the table from ``expected`` (names, shapes, dtypes, in order)
    varint body_len  body   (body_len is the size before the lossless stage, if any)
    u32 CRC32 of everything above

Version 1 payloads (``u16 spec_len``, ``u32 n_tensors``, ``u16 name_len``, ``u64`` dims and
``u64 body_len``, always the full table) still decode.

The body is the sparsifier section (``u64 k`` + index stream, absent for random-k and
dense codecs) followed by the value section of the quantizer. Every length in a payload
is checked against the declared shapes and the bytes present before anything is
allocated, and the declared shapes are checked against ``expected`` (or, without it,
against ``max_elements``) first.
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedsqueeze.compression._wire import Reader, Writer
from fedsqueeze.compression.bitpack import packed_size
from fedsqueeze.compression.errors import CodecError, CodecSpecError, PayloadError
from fedsqueeze.compression.indexcode import max_encoded_size
from fedsqueeze.compression.stages import (
    EF21,
    QSGD,
    BFloat16,
    ErrorFeedback,
    Feedback,
    Float16,
    Float32,
    Hadamard,
    Layout,
    Lossless,
    Quantize,
    RandomK,
    Sign,
    Sketch,
    Sparsifier,
    Stage,
    Ternary,
    Threshold,
    TopK,
    TopKPerTensor,
    ValueCoder,
    Zlib,
    Zstd,
    group_starts,
)

MAGIC = b"FSQZ"
FORMAT_VERSION = 2
#: Versions :meth:`Codec.decode` accepts (1: fixed-width full layout table).
SUPPORTED_VERSIONS = (1, 2)
#: ``layout=`` modes of :meth:`Codec.encode`.
LAYOUT_MODES = ("full", "hash")
LAYOUT_DIGEST_SIZE = 8
_FLAG_LAYOUT_HASH = 0x01
#: Without ``expected``, payloads declaring more coordinates than this are rejected.
DEFAULT_MAX_ELEMENTS = 1 << 28

_DTYPES: dict[int, str] = {1: "float16", 2: "float32", 3: "float64"}
_DTYPE_CODES = {v: k for k, v in _DTYPES.items()}
_MAX_NDIM = 64
_STAGE_ORDER = ("sparsify", "rotate", "quantize", "feedback", "lossless")

VALID_STAGES = (
    "topk(F), topk_pt(F), randk(F), sketch(F[,rows=R,k=K,momentum=M,gain=G]) (secagg only), "
    "thresh(T), hadamard or hadamard(block=N) then qB (secagg only), "
    "qB or qB(block=N) with B in 1..16, "
    "qsgdB or qsgdB(block=N), sign or sign(block=N), ternary, fp16, bf16, fp32, ef, ef21, "
    "zstd or zstd(level), zlib or zlib(level), none "
    "(F: fraction in (0,1] like 0.01, or integer count >= 1)"
)


@dataclass
class Encoded:
    """Result of :meth:`Codec.encode`."""

    payload: bytes
    #: client state to keep until next round (plain arrays; empty if stateless)
    state: dict[str, np.ndarray] = field(default_factory=dict)
    #: sorted flat positions the payload carries values for (``None``: every coordinate);
    #: what momentum-factor masking (:mod:`fedsqueeze.compression.dgc`) clears
    positions: np.ndarray | None = None


@dataclass
class Decoded:
    """Result of :meth:`Codec.decode`."""

    arrays: dict[str, np.ndarray]
    #: server state to keep for this client (EF21's ``g``; empty otherwise)
    state: dict[str, np.ndarray] = field(default_factory=dict)


class Codec:
    """A chain of stages (see :mod:`fedsqueeze.compression.stages`).

    Parameters
    ----------
    stages
        At most one stage per role. Sparsifier and quantizer must come in that order and
        the lossless stage after both; error feedback may be anywhere (it wraps the whole
        lossy chain). An empty list is the identity codec ``none``.
    """

    def __init__(self, stages: Sequence[Stage] = ()) -> None:
        by_role: dict[str, Stage] = {}
        last_rank = -1
        for stage in stages:
            if not isinstance(stage, Stage):
                raise CodecSpecError(f"not a codec stage: {stage!r}")
            if stage.role in by_role:
                raise CodecSpecError(
                    f"two {stage.role} stages ({by_role[stage.role].spec}, {stage.spec}); "
                    "a codec takes at most one of each"
                )
            by_role[stage.role] = stage
            if stage.role == "feedback":
                continue
            rank = _STAGE_ORDER.index(stage.role)
            if rank < last_rank:
                raise CodecSpecError(
                    f"{stage.spec} is out of order: sparsifier, then quantizer, then zstd/zlib"
                )
            last_rank = rank
        self.sparsifier: Sparsifier | None = by_role.get("sparsify")  # type: ignore[assignment]
        quantizer = by_role.get("quantize")
        self.quantizer: ValueCoder = quantizer if quantizer is not None else Float32()  # type: ignore[assignment]
        self.feedback: Feedback | None = by_role.get("feedback")  # type: ignore[assignment]
        self.lossless: Lossless | None = by_role.get("lossless")  # type: ignore[assignment]
        if isinstance(self.quantizer, Ternary) and self.sparsifier is None:
            raise CodecSpecError("ternary needs a sparsifier before it (e.g. topk(0.01)+ternary)")
        self.rotation: Hadamard | None = by_role.get("rotate")  # type: ignore[assignment]
        if self.rotation is not None and (
            type(self.quantizer) is not Quantize or self.quantizer.block is not None
        ):
            raise CodecSpecError(
                f"{self.rotation.spec} needs an unbiased qB after it (e.g. hadamard+q4), "
                f"not {quantizer.spec if quantizer is not None else 'fp32'}"
            )
        self.stages: tuple[Stage, ...] = tuple(
            s
            for s in (
                self.sparsifier,
                self.rotation,
                by_role.get("quantize"),
                self.feedback,
                self.lossless,
            )
            if s is not None and not isinstance(s, Float32)
        )

    # ------------------------------------------------------------------ properties

    @property
    def spec(self) -> str:
        """Canonical spec string; ``parse_codec(codec.spec)`` is an equivalent codec."""
        return "+".join(s.spec for s in self.stages) or "none"

    @property
    def linear(self) -> bool:
        """Whether every stage commutes with summation of encoded updates (after ``hadamard``
        a ``qB`` rounds with one shared scale, so it does)."""
        shared_scale = (self.quantizer,) if self.rotation is not None else ()
        return all(s.linear for s in (*self.stages, self.quantizer) if s not in shared_scale)

    @property
    def integer_output(self) -> bool:
        """Whether the values travel as integers (``bits`` wide) rather than floats."""
        return self.quantizer.integer_output

    @property
    def bits(self) -> int:
        """Bits per transmitted value (32 for plain float32, 16 for fp16/bf16, B for qB)."""
        return self.quantizer.bits

    @property
    def needs_seed(self) -> bool:
        return any(s.needs_seed for s in self.stages)

    @property
    def stateful_client(self) -> bool:
        return any(s.stateful_client for s in self.stages)

    @property
    def stateful_server(self) -> bool:
        return any(s.stateful_server for s in self.stages)

    def __repr__(self) -> str:
        return f"Codec({self.spec!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Codec) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(self.spec)

    # ---------------------------------------------------------------------- encode

    def encode(
        self,
        arrays: Mapping[str, np.ndarray],
        seed: int | None = None,
        state: Mapping[str, np.ndarray] | None = None,
        rng: np.random.Generator | None = None,
        layout: str = "full",
    ) -> Encoded:
        """Encode an update ``{name: float array}`` into a payload.

        Parameters
        ----------
        arrays
            The update, in order. Floating dtypes only; values must be finite.
        seed
            Shared per-round seed (required when :attr:`needs_seed`).
        state
            Client state returned by the previous round's ``encode`` (or ``None``).
        rng
            Source of the private randomness of stochastic rounding; fresh OS entropy by
            default. Pass one only for reproducibility.
        layout
            ``"full"`` (default) writes the layout table (names, dtypes, shapes), so the
            payload decodes on its own. ``"hash"`` writes only a 64-bit digest of it: for
            peers that both know the layout (the server sent the model); decode then needs
            ``expected`` with the same names, shapes and dtypes, in the same order.
        """
        if layout not in LAYOUT_MODES:
            raise CodecError(f"layout must be one of {LAYOUT_MODES}, got {layout!r}")
        if self.needs_seed and seed is None:
            raise CodecError(f"codec {self.spec} needs the shared round seed")
        table, flat = _flatten(arrays)
        rng = rng if rng is not None else np.random.default_rng()
        previous = self._client_state(state, table)
        if isinstance(self.feedback, ErrorFeedback):
            v = flat + previous
        elif isinstance(self.feedback, EF21):
            v = flat - previous
        else:
            v = flat
        if not np.all(np.isfinite(v)):
            raise CodecError("update plus error-feedback state overflows float32")
        body, positions = self._encode_body(v, table, seed, rng)
        new_state: dict[str, np.ndarray] = {}
        if self.feedback is not None:
            sent = self._decode_body(Reader(body, "body"), table, seed)
            if isinstance(self.feedback, ErrorFeedback):
                new_state[self.feedback.state_key] = v - sent
            else:
                new_state[self.feedback.state_key] = previous + sent
        return Encoded(
            payload=self._envelope(table, body, layout), state=new_state, positions=positions
        )

    def _client_state(self, state: Mapping[str, np.ndarray] | None, layout: Layout) -> np.ndarray:
        d = layout.d
        if self.feedback is None or not state:
            return np.zeros(d, dtype=np.float32)
        key = self.feedback.state_key
        if key not in state:
            raise CodecError(f"client state lacks {key!r} (has {sorted(state)})")
        value = np.asarray(state[key])
        if value.shape != (d,) or value.dtype != np.float32:
            raise CodecError(
                f"client state {key!r} is {value.dtype}{value.shape}, expected float32({d},)"
            )
        return value

    def _encode_body(
        self, v: np.ndarray, layout: Layout, seed: int | None, rng: np.random.Generator
    ) -> tuple[bytes, np.ndarray | None]:
        self._refuse_rotation()
        w = Writer()
        positions: np.ndarray | None = None
        if self.sparsifier is not None:
            positions = self.sparsifier.select(v, layout, seed)
            self.sparsifier.write(positions, layout, w)
            values = v[positions]
            counts = np.diff(np.searchsorted(positions, layout.offsets))
        else:
            values = v
            counts = layout.sizes
        starts = group_starts(counts, self.quantizer.grouping, self.quantizer.block)
        self.quantizer.encode(values, starts, w, rng)
        return w.getvalue(), positions

    def _refuse_rotation(self) -> None:
        if self.rotation is not None:
            raise CodecError(
                f"{self.spec} is a secure-aggregation encoding (the server inverse-rotates the "
                "sum of all clients' integers); use it with secagg = true"
            )

    def _decode_body(self, r: Reader, layout: Layout, seed: int | None) -> np.ndarray:
        self._refuse_rotation()
        bits = self.quantizer.bits
        if self.sparsifier is not None:
            # Each kept value needs at least `bits` bits of the remaining bytes: bounds k
            # before positions are decoded or allocated.
            max_k = 8 * r.remaining // bits
            positions = self.sparsifier.read(r, layout, seed, max_k)
            counts = np.diff(np.searchsorted(positions, layout.offsets))
        else:
            positions = None
            counts = layout.sizes
        count = int(counts.sum())
        if packed_size(count, bits) > r.remaining:
            raise PayloadError(f"payload too short for {count} values of {bits} bits")
        starts = group_starts(counts, self.quantizer.grouping, self.quantizer.block)
        values = self.quantizer.decode(r, count, starts)
        r.expect_end()
        if positions is None:
            return values.astype(np.float32, copy=False)
        flat = np.zeros(layout.d, dtype=np.float32)
        flat[positions] = values
        return flat

    def _envelope(self, layout: Layout, body: bytes, mode: str) -> bytes:
        w = Writer()
        w.raw(MAGIC)
        w.u8(FORMAT_VERSION)
        w.u8(_FLAG_LAYOUT_HASH if mode == "hash" else 0)
        spec = self.spec.encode()
        w.varint(len(spec))
        w.raw(spec)
        w.raw(layout_digest(layout) if mode == "hash" else layout_table(layout))
        w.varint(len(body))
        w.raw(self.lossless.compress(body) if self.lossless is not None else body)
        head = w.getvalue()
        return head + struct.pack("<I", zlib.crc32(head))

    # ---------------------------------------------------------------------- decode

    def decode(
        self,
        payload: bytes,
        seed: int | None = None,
        expected: Mapping[str, tuple[Sequence[int], str]] | None = None,
        state: Mapping[str, np.ndarray] | None = None,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
    ) -> Decoded:
        """Decode a payload into float32 arrays.

        Parameters
        ----------
        payload
            Bytes produced by :meth:`encode` of an equivalent codec.
        seed
            The same round seed the client used (required when :attr:`needs_seed`).
        expected
            ``{name: (shape, dtype_str)}`` the update must match (recommended on servers).
            Required for payloads encoded with ``layout="hash"``: there it must list the
            tensors in the encoder's order, with the dtypes it encoded from.
        state
            EF21 server state for this client from the previous round (or ``None``).
        max_elements
            Cap on the declared number of coordinates when ``expected`` is not given.

        Raises
        ------
        PayloadError
            On any malformed, mismatching or non-finite payload.
        """
        if self.needs_seed and seed is None:
            raise CodecError(f"codec {self.spec} needs the shared round seed")
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise PayloadError(f"payload must be bytes, got {type(payload).__name__}")
        data = memoryview(payload).cast("B") if isinstance(payload, memoryview) else payload
        if len(data) < len(MAGIC) + 1 + 2 + 4 or bytes(data[:4]) != MAGIC:
            raise PayloadError("not a fedsqueeze payload (bad magic or too short)")
        version = data[4]
        if version not in SUPPORTED_VERSIONS:
            raise PayloadError(
                f"unsupported payload format version {version} "
                f"(this decoder reads {', '.join(map(str, SUPPORTED_VERSIONS))})"
            )
        (crc,) = struct.unpack("<I", data[-4:])
        if zlib.crc32(data[:-4]) != crc:
            raise PayloadError("payload checksum mismatch (corrupted or truncated)")
        r = Reader(memoryview(data)[5:-4])
        if version == 1:
            self._check_spec(bytes(r.take(r.u16())))
            layout = _read_layout(r, expected, max_elements, version)
            body_len = r.u64()
        else:
            flags = r.u8()
            if flags & ~_FLAG_LAYOUT_HASH:
                raise PayloadError(f"unknown payload flags 0x{flags:02x}")
            self._check_spec(bytes(r.take(r.varint())))
            if flags & _FLAG_LAYOUT_HASH:
                layout = _match_digest(bytes(r.take(LAYOUT_DIGEST_SIZE)), expected)
            else:
                layout = _read_layout(r, expected, max_elements, version)
            body_len = r.varint()
        d = layout.d
        if body_len > _max_body_size(self, d):
            raise PayloadError(f"declared body of {body_len} bytes impossible for {d} values")
        if self.lossless is not None:
            body: bytes | memoryview = self.lossless.decompress(r.take(r.remaining), body_len)
        else:
            body = r.take(body_len)
            r.expect_end()
        with np.errstate(all="ignore"):
            flat = self._decode_body(Reader(body, "body"), layout, seed)
            new_state: dict[str, np.ndarray] = {}
            if isinstance(self.feedback, EF21):
                g = self._server_state(state, d)
                flat = g + flat
                new_state[self.feedback.state_key] = flat
        if not np.all(np.isfinite(flat)):
            raise PayloadError("payload decodes to non-finite values")
        out_flat = flat.copy() if new_state else flat
        offsets = layout.offsets
        arrays = {
            name: out_flat[offsets[i] : offsets[i + 1]].reshape(shape)
            for i, (name, shape) in enumerate(zip(layout.names, layout.shapes, strict=True))
        }
        return Decoded(arrays=arrays, state=new_state)

    def _check_spec(self, spec_bytes: bytes) -> None:
        if spec_bytes != self.spec.encode():
            raise PayloadError(
                f"payload was encoded with codec {spec_bytes.decode('utf-8', 'replace')!r}, "
                f"this codec is {self.spec!r}"
            )

    def _server_state(self, state: Mapping[str, np.ndarray] | None, d: int) -> np.ndarray:
        assert self.feedback is not None
        if not state:
            return np.zeros(d, dtype=np.float32)
        key = self.feedback.state_key
        if key not in state:
            raise CodecError(f"server state lacks {key!r} (has {sorted(state)})")
        g = np.asarray(state[key])
        if g.dtype != np.float32 or g.shape != (d,):
            raise PayloadError(
                f"payload has {d} values but the server state {key!r} is {g.dtype}{g.shape}"
            )
        return g


def _flatten(arrays: Mapping[str, np.ndarray]) -> tuple[Layout, np.ndarray]:
    if not isinstance(arrays, Mapping):
        raise CodecError(f"update must be a mapping name -> array, got {type(arrays).__name__}")
    names, shapes, dtypes, parts = [], [], [], []
    for name, value in arrays.items():
        if not isinstance(name, str):
            raise CodecError(f"tensor names must be strings, got {name!r}")
        try:
            raw_name = name.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise CodecError(f"tensor name {name!r} is not valid UTF-8") from exc
        if len(raw_name) > 0xFFFF:
            raise CodecError("tensor name longer than 65535 bytes")
        a = np.asarray(value)
        if a.dtype.name not in _DTYPE_CODES:
            raise CodecError(f"tensor {name!r}: dtype {a.dtype} not supported (use float32)")
        if a.ndim > _MAX_NDIM:
            raise CodecError(f"tensor {name!r} has too many dimensions")
        names.append(name)
        shapes.append(tuple(int(s) for s in a.shape))
        dtypes.append(a.dtype.name)
        parts.append(a.astype(np.float32, copy=False).reshape(-1))
    if len(names) > 0xFFFFFFFF:
        raise CodecError("too many tensors")
    flat = np.concatenate([np.zeros(0, dtype=np.float32), *parts])
    if not np.all(np.isfinite(flat)):
        raise CodecError("update contains non-finite values (NaN or Inf)")
    return Layout(tuple(names), tuple(shapes), tuple(dtypes)), flat


def layout_table(layout: Layout) -> bytes:
    """The canonical (format version 2) layout table: names, dtypes, shapes, in order."""
    w = Writer()
    w.varint(len(layout.names))
    for name, shape, dtype in zip(layout.names, layout.shapes, layout.dtypes, strict=True):
        raw_name = name.encode("utf-8")
        w.varint(len(raw_name))
        w.raw(raw_name)
        w.u8(_DTYPE_CODES[dtype])
        w.u8(len(shape))
        for dim in shape:
            w.varint(dim)
    return w.getvalue()


def layout_digest(layout: Layout) -> bytes:
    """64-bit BLAKE2b digest of :func:`layout_table`, sent by ``layout="hash"`` payloads."""
    return hashlib.blake2b(layout_table(layout), digest_size=LAYOUT_DIGEST_SIZE).digest()


def layout_from_expected(expected: Mapping[str, tuple[Sequence[int], str]]) -> Layout:
    """The :class:`Layout` an ``expected`` mapping describes (its order is the tensor order)."""
    if not isinstance(expected, Mapping):
        raise CodecError(f"expected must be a mapping name -> (shape, dtype), got {expected!r}")
    names, shapes, dtypes = [], [], []
    for name, entry in expected.items():
        try:
            exp_shape, exp_dtype = entry
            shape = tuple(int(s) for s in exp_shape)
            dtype = np.dtype(exp_dtype).name
        except (TypeError, ValueError) as exc:
            raise CodecError(f"bad expected entry for {name!r}: {entry!r}") from exc
        if not isinstance(name, str) or dtype not in _DTYPE_CODES or min(shape, default=0) < 0:
            raise CodecError(f"bad expected entry for {name!r}: {entry!r}")
        if len(shape) > _MAX_NDIM:
            raise CodecError(f"expected tensor {name!r} has too many dimensions")
        names.append(name)
        shapes.append(shape)
        dtypes.append(dtype)
    return Layout(tuple(names), tuple(shapes), tuple(dtypes))


def _match_digest(
    digest: bytes, expected: Mapping[str, tuple[Sequence[int], str]] | None
) -> Layout:
    if expected is None:
        raise PayloadError(
            "payload carries only a layout digest (layout='hash'); decode it with expected="
        )
    layout = layout_from_expected(expected)
    if layout_digest(layout) != digest:
        raise PayloadError(
            "payload layout digest does not match expected (tensor names, shapes, dtypes "
            "or order differ from what the client encoded)"
        )
    return layout


def _read_layout(
    r: Reader,
    expected: Mapping[str, tuple[Sequence[int], str]] | None,
    max_elements: int,
    version: int,
) -> Layout:
    v1 = version == 1
    n = r.u32() if v1 else r.varint()
    # each tensor takes at least 4 (v1) or 3 (v2) bytes of the table
    if n > r.remaining // (4 if v1 else 3):
        raise PayloadError(f"payload declares {n} tensors, more than fit in it")
    names, shapes, dtypes = [], [], []
    total = 0
    for _ in range(n):
        try:
            name = bytes(r.take(r.u16() if v1 else r.varint())).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PayloadError("tensor name is not valid UTF-8") from exc
        code = r.u8()
        if code not in _DTYPES:
            raise PayloadError(f"unknown dtype code {code}")
        ndim = r.u8()
        if ndim > _MAX_NDIM:
            raise PayloadError(f"tensor {name!r} declares {ndim} dimensions")
        shape = tuple((r.u64() if v1 else r.varint()) for _ in range(ndim))
        # Zero-size tensors count their non-zero dimensions too: numpy cannot even
        # represent a (0, 2**63) array.
        span = math.prod(max(s, 1) for s in shape)
        total += math.prod(shape)
        if expected is None and max(total, span) > max_elements:
            raise PayloadError(f"payload declares more than max_elements={max_elements} values")
        if max(total, span) > (1 << 48):
            raise PayloadError("payload declares an impossible number of values")
        names.append(name)
        shapes.append(shape)
        dtypes.append(_DTYPES[code])
    if len(set(names)) != len(names):
        raise PayloadError("payload repeats a tensor name")
    layout = Layout(tuple(names), tuple(shapes), tuple(dtypes))
    if expected is not None:
        _check_expected(layout, expected)
    return layout


def _check_expected(layout: Layout, expected: Mapping[str, tuple[Sequence[int], str]]) -> None:
    if set(layout.names) != set(expected):
        missing = sorted(set(expected) - set(layout.names))
        extra = sorted(set(layout.names) - set(expected))
        raise PayloadError(
            f"payload tensors differ from expected: missing {missing}, extra {extra}"
        )
    for name, shape, dtype in zip(layout.names, layout.shapes, layout.dtypes, strict=True):
        exp_shape, exp_dtype = expected[name]
        try:
            exp = (tuple(int(s) for s in exp_shape), np.dtype(exp_dtype))
        except (TypeError, ValueError) as exc:
            raise CodecError(f"bad expected entry for {name!r}: {expected[name]!r}") from exc
        if (shape, np.dtype(dtype)) != exp:
            raise PayloadError(
                f"tensor {name!r} is {dtype}{shape} in the payload, expected {exp[1]}{exp[0]}"
            )


def _max_body_size(codec: Codec, d: int) -> int:
    index = 8 + max_encoded_size(d, d) if codec.sparsifier is not None else 0
    return index + codec.quantizer.max_section_size(d)


# ------------------------------------------------------------------------- spec parsing

_TOKEN = re.compile(r"^([a-z_][a-z0-9_]*)\s*(?:\((.*)\))?$", re.DOTALL)
_NUMBERED = re.compile(r"^(q|qsgd)(\d+)$")


def _parse_number(text: str, stage: str) -> float | int:
    text = text.strip()
    try:
        if re.fullmatch(r"[+-]?\d+", text):
            return int(text)
        value = float(text)
    except ValueError:
        raise CodecSpecError(f"{stage}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise CodecSpecError(f"{stage}: {text!r} is not a finite number")
    return value


def _parse_int(text: str, stage: str, what: str) -> int:
    value = _parse_number(text, stage)
    if not isinstance(value, int):
        raise CodecSpecError(f"{stage}: {what} must be an integer, got {text!r}")
    return value


def _build_stage(name: str, args: list[str], kwargs: dict[str, str]) -> Stage | None:
    def no_args() -> None:
        if args or kwargs:
            raise CodecSpecError(f"{name} takes no arguments")

    def one_amount() -> float | int:
        if len(args) != 1 or kwargs:
            raise CodecSpecError(f"{name} takes exactly one argument, e.g. {name}(0.01)")
        return _parse_number(args[0], name)

    def block_only() -> int | None:
        if args or set(kwargs) - {"block"}:
            raise CodecSpecError(f"{name} takes only block=N")
        return _parse_int(kwargs["block"], name, "block") if "block" in kwargs else None

    def level() -> int | None:
        if len(args) > 1 or set(kwargs) - {"level"} or (args and kwargs):
            raise CodecSpecError(f"{name} takes one optional level")
        text = args[0] if args else kwargs.get("level")
        return None if text is None else _parse_int(text, name, "level")

    def bare(factory: Callable[[], Stage]) -> Callable[[], Stage]:
        def make() -> Stage:
            no_args()
            return factory()

        return make

    def sketch() -> Stage:
        if len(args) != 1 or set(kwargs) - {"rows", "k", "momentum", "gain"}:
            raise CodecSpecError("sketch takes a size and optional rows=, k=, momentum=, gain=")
        momentum = _parse_number(kwargs["momentum"], name) if "momentum" in kwargs else None
        gain = _parse_number(kwargs["gain"], name) if "gain" in kwargs else None
        return Sketch(
            _parse_number(args[0], name),
            rows=_parse_int(kwargs["rows"], name, "rows") if "rows" in kwargs else None,
            k=_parse_int(kwargs["k"], name, "k") if "k" in kwargs else None,
            momentum=None if momentum is None else float(momentum),
            gain=None if gain is None else float(gain),
        )

    simple: dict[str, Callable[[], Stage]] = {
        "sketch": sketch,
        "hadamard": lambda: Hadamard(block_only()),
        "topk": lambda: TopK(one_amount()),
        "topk_pt": lambda: TopKPerTensor(one_amount()),
        "randk": lambda: RandomK(one_amount()),
        "thresh": lambda: Threshold(one_amount()),
        "sign": lambda: Sign(block_only()),
        "ternary": bare(Ternary),
        "fp16": bare(Float16),
        "bf16": bare(BFloat16),
        "fp32": bare(Float32),
        "ef": bare(ErrorFeedback),
        "ef21": bare(EF21),
        "zstd": lambda: Zstd(level()),
        "zlib": lambda: Zlib(level()),
    }
    if name in simple:
        return simple[name]()
    m = _NUMBERED.match(name)
    if m:
        bits = int(m.group(2))
        return (Quantize if m.group(1) == "q" else QSGD)(bits, block_only())
    raise CodecSpecError(f"unknown codec stage {name!r}; valid stages: {VALID_STAGES}")


def parse_codec(spec: str) -> Codec:
    """Build a :class:`Codec` from a spec string such as ``"topk(0.01)+q4+ef"``.

    Stages are joined with ``+``; arguments are positional or ``key=value``. ``none`` (or
    an empty chain) is the identity codec. Raises :class:`CodecSpecError` (listing the
    valid stages) for anything unknown or invalid.
    """
    if not isinstance(spec, str):
        raise CodecSpecError(f"codec spec must be a string, got {type(spec).__name__}")
    tokens = [t.strip().lower() for t in spec.split("+")]
    if not spec.strip() or any(not t for t in tokens):
        raise CodecSpecError(f"empty stage in codec spec {spec!r}; valid stages: {VALID_STAGES}")
    if "none" in tokens:
        if tokens != ["none"]:
            raise CodecSpecError("'none' is the identity codec and must be used alone")
        return Codec([])
    stages: list[Stage] = []
    for token in tokens:
        m = _TOKEN.match(token)
        if not m:
            raise CodecSpecError(f"cannot parse stage {token!r}; valid stages: {VALID_STAGES}")
        name, arg_text = m.group(1), m.group(2)
        args: list[str] = []
        kwargs: dict[str, str] = {}
        if arg_text is not None:
            for part in arg_text.split(","):
                part = part.strip()
                if not part:
                    raise CodecSpecError(f"empty argument in {token!r}")
                if "=" in part:
                    key, _, value = part.partition("=")
                    key = key.strip()
                    if key in kwargs:
                        raise CodecSpecError(f"repeated argument {key!r} in {token!r}")
                    kwargs[key] = value.strip()
                elif kwargs:
                    raise CodecSpecError(f"positional argument after keyword in {token!r}")
                else:
                    args.append(part)
        stage = _build_stage(name, args, kwargs)
        if stage is not None:
            stages.append(stage)
    return Codec(stages)
