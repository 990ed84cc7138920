"""Offline datasets and client partitioning.

>>> ds = load_dataset("digits")
>>> parts = partition_indices(ds, "dirichlet", num_clients=10, seed=0, alpha=0.5)
"""

from fedsqueeze.data.core import Dataset, DatasetError
from fedsqueeze.data.loaders import DATASET_NAMES, default_cache_dir, load_dataset
from fedsqueeze.data.partition import PARTITION_SCHEMES, partition_indices, partition_stats

__all__ = [
    "DATASET_NAMES",
    "PARTITION_SCHEMES",
    "Dataset",
    "DatasetError",
    "default_cache_dir",
    "load_dataset",
    "partition_indices",
    "partition_stats",
]
