"""Update codecs: sparsification, quantization, error feedback and lossless packing.

Pure numpy (plus ``zstandard`` and the standard library): no torch, no Flower.

>>> codec = parse_codec("topk(0.01)+q4+ef")
>>> enc = codec.encode(update, seed=round_seed, state=client_state)  # doctest: +SKIP
>>> dec = codec.decode(enc.payload, seed=round_seed, expected=shapes)  # doctest: +SKIP

Peers that both know the model's layout send ``encode(..., layout="hash")``: an 8-byte
digest instead of the names/dtypes/shapes table; ``decode`` then needs ``expected``.
"""

from fedsqueeze.compression.bitpack import pack_bits, packed_size, unpack_bits
from fedsqueeze.compression.codec import (
    DEFAULT_MAX_ELEMENTS,
    FORMAT_VERSION,
    LAYOUT_MODES,
    SUPPORTED_VERSIONS,
    VALID_STAGES,
    Codec,
    Decoded,
    Encoded,
    parse_codec,
)
from fedsqueeze.compression.errors import CodecError, CodecSpecError, PayloadError
from fedsqueeze.compression.indexcode import decode_positions, encode_positions, log2_binomial
from fedsqueeze.compression.sampling import random_k_indices, stochastic_round
from fedsqueeze.compression.stages import (
    EF21,
    QSGD,
    BFloat16,
    ErrorFeedback,
    Float16,
    Float32,
    Hadamard,
    Quantize,
    RandomK,
    Sign,
    Sketch,
    Stage,
    Ternary,
    Threshold,
    TopK,
    TopKPerTensor,
    Zlib,
    Zstd,
)

__all__ = [
    "DEFAULT_MAX_ELEMENTS",
    "EF21",
    "FORMAT_VERSION",
    "LAYOUT_MODES",
    "QSGD",
    "SUPPORTED_VERSIONS",
    "VALID_STAGES",
    "BFloat16",
    "Codec",
    "CodecError",
    "CodecSpecError",
    "Decoded",
    "Encoded",
    "ErrorFeedback",
    "Float16",
    "Float32",
    "Hadamard",
    "PayloadError",
    "Quantize",
    "RandomK",
    "Sign",
    "Sketch",
    "Stage",
    "Ternary",
    "Threshold",
    "TopK",
    "TopKPerTensor",
    "Zlib",
    "Zstd",
    "decode_positions",
    "encode_positions",
    "log2_binomial",
    "pack_bits",
    "packed_size",
    "parse_codec",
    "random_k_indices",
    "stochastic_round",
    "unpack_bits",
]
