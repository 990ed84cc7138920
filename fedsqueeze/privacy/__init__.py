"""Privacy core: clipping, noise mechanisms, distributed DP encoding, accounting.

Framework-free: numpy here, Opacus (lazily) for accounting. The torch/Opacus DP-SGD helper
lives in :mod:`fedsqueeze.privacy.local` and is not imported by this package.
"""

from .accounting import (
    PrivacyAccountant,
    default_delta,
    fedavg_sample_rate,
    noise_for_budget,
    would_exceed,
)
from .clipping import (
    AdaptiveClipper,
    clip_l2,
    effective_noise_multiplier,
    l2_norm,
    update_noise_multiplier,
)
from .distributed import (
    DistributedDPClient,
    DistributedDPParams,
    bits_for_noise,
    choose_scale,
    choose_scale_and_bits,
    decode_sum,
    rounded_l2_sensitivity,
)
from .errors import (
    BitWidthTooSmall,
    BudgetExceeded,
    InvalidPrivacyParameter,
    NonFiniteUpdateError,
    PrivacyError,
    RoundingFailed,
    ShapeMismatchError,
)
from .mechanisms import (
    RandomizedHadamard,
    discrete_gaussian,
    discrete_gaussian_mechanism,
    discrete_gaussian_variance,
    gaussian_noise,
    skellam_noise,
)

__all__ = [
    "AdaptiveClipper",
    "BitWidthTooSmall",
    "BudgetExceeded",
    "DistributedDPClient",
    "DistributedDPParams",
    "InvalidPrivacyParameter",
    "NonFiniteUpdateError",
    "PrivacyAccountant",
    "PrivacyError",
    "RandomizedHadamard",
    "RoundingFailed",
    "ShapeMismatchError",
    "bits_for_noise",
    "choose_scale",
    "choose_scale_and_bits",
    "clip_l2",
    "decode_sum",
    "default_delta",
    "discrete_gaussian",
    "discrete_gaussian_mechanism",
    "discrete_gaussian_variance",
    "effective_noise_multiplier",
    "fedavg_sample_rate",
    "gaussian_noise",
    "l2_norm",
    "noise_for_budget",
    "rounded_l2_sensitivity",
    "skellam_noise",
    "update_noise_multiplier",
    "would_exceed",
]
