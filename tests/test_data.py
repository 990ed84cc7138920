"""Tests for fedsqueeze.data: offline loaders, npz validation and partitioning."""

from __future__ import annotations

import dataclasses
import io
import random
import zipfile
from pathlib import Path

import mnist1d.data
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsqueeze.data import (
    DATASET_NAMES,
    PARTITION_SCHEMES,
    Dataset,
    DatasetError,
    default_cache_dir,
    load_dataset,
    partition_indices,
    partition_stats,
)

# --------------------------------------------------------------------------- helpers


def _synthetic(
    n: int = 600, num_classes: int = 10, seed: int = 0, client_ids: np.ndarray | None = None
) -> Dataset:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, size=n).astype(np.int64)
    y[:num_classes] = np.arange(num_classes)  # every class present
    return Dataset(
        name="synthetic",
        x_train=rng.normal(size=(n, 3)).astype(np.float32),
        y_train=y,
        x_test=rng.normal(size=(10, 3)).astype(np.float32),
        y_test=rng.integers(0, num_classes, size=10).astype(np.int64),
        client_train=client_ids,
        num_classes=num_classes,
        input_shape=(3,),
    )


def _valid_arrays(rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    rng = rng or np.random.default_rng(0)
    return {
        "x_train": rng.normal(size=(12, 2, 3)),
        "y_train": np.array([0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3]),
        "x_test": rng.normal(size=(5, 2, 3)),
        "y_test": np.array([0, 1, 2, 3, 4]),  # label 4 appears only in the test set
        "client_train": np.array([5, 5, 9, 9, 9, 2, 2, 5, 9, 2, 2, 5]),
    }


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> str:
    np.savez(path, **arrays)
    return f"npz:{path}"


def _assert_one_line_error(exc: pytest.ExceptionInfo[DatasetError], *needles: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"


def _fake_make_dataset(calls: list[int]):
    """A fast stand-in for mnist1d.data.make_dataset that reseeds globals like the real one."""

    def fake(args=None, template=None):
        calls.append(1)
        np.random.seed(42)
        random.seed(42)
        rng = np.random.default_rng(len(calls))
        return {
            "x": rng.normal(size=(40, 40)),
            "y": np.arange(40) % 10,
            "x_test": rng.normal(size=(10, 40)),
            "y_test": np.arange(10),
            "t": np.zeros(40),
            "templates": None,
        }

    return fake


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


@pytest.fixture(scope="module")
def mnist(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return load_dataset("mnist1d", cache_dir=tmp_path_factory.mktemp("mnist1d-cache"))


# --------------------------------------------------------------------------- loaders


def test_digits_shapes_dtypes_and_split(digits: Dataset) -> None:
    assert digits.input_shape == (1, 8, 8)
    assert digits.num_classes == 10
    assert digits.x_train.dtype == np.float32 and digits.y_train.dtype == np.int64
    assert digits.x_train.shape[1:] == digits.x_test.shape[1:] == (1, 8, 8)
    total = digits.num_train + digits.num_test
    assert digits.num_test == pytest.approx(0.2 * total, abs=1)
    assert digits.x_train.min() >= 0.0 and digits.x_train.max() <= 1.0
    assert digits.x_train.max() == 1.0  # scaled by 16, not by the sample max
    # stratified: every class's test share is ~20 %
    for c in range(10):
        n_tr, n_te = np.sum(digits.y_train == c), np.sum(digits.y_test == c)
        assert abs(n_te - 0.2 * (n_tr + n_te)) <= 1
    assert digits.client_train is None


def test_digits_split_is_fixed(digits: Dataset) -> None:
    again = load_dataset(" digits ")
    np.testing.assert_array_equal(again.x_train, digits.x_train)
    np.testing.assert_array_equal(again.y_test, digits.y_test)


def test_mnist1d_shapes_and_standardization(mnist: Dataset) -> None:
    assert mnist.x_train.shape == (4000, 1, 40) and mnist.x_test.shape == (1000, 1, 40)
    assert mnist.input_shape == (1, 40)
    assert mnist.num_classes == 10
    assert mnist.x_train.dtype == np.float32 and mnist.y_test.dtype == np.int64
    assert set(np.unique(mnist.y_train)) == set(range(10))
    np.testing.assert_allclose(mnist.x_train.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(mnist.x_train.std(axis=0), 1.0, atol=1e-3)
    # test set uses train statistics, so it is close to but not exactly standardized
    assert np.all(np.isfinite(mnist.x_test))
    assert not np.allclose(mnist.x_test.mean(axis=0), 0.0, atol=1e-6)


def test_mnist1d_cache_used_second_time_and_env_override(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(mnist1d.data, "make_dataset", _fake_make_dataset(calls))
    first = load_dataset("mnist1d", cache_dir=tmp_path)
    assert len(calls) == 1
    assert len(list(tmp_path.glob("mnist1d-*.npz"))) == 1

    # Second load via the env var (no cache_dir): must hit the cache, not regenerate.
    monkeypatch.setenv("FEDSQUEEZE_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    second = load_dataset("mnist1d")
    assert len(calls) == 1
    np.testing.assert_array_equal(first.x_train, second.x_train)
    np.testing.assert_array_equal(first.y_test, second.y_test)


def test_mnist1d_corrupt_cache_is_regenerated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(mnist1d.data, "make_dataset", _fake_make_dataset(calls))
    load_dataset("mnist1d", cache_dir=tmp_path)
    (cache_file,) = tmp_path.glob("mnist1d-*.npz")
    cache_file.write_bytes(b"garbage")
    ds = load_dataset("mnist1d", cache_dir=tmp_path)
    assert len(calls) == 2
    assert ds.x_train.shape == (40, 1, 40)
    assert np.load(cache_file)["x"].shape == (40, 40)  # rewritten


def test_mnist1d_unwritable_cache_warns_but_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(mnist1d.data, "make_dataset", _fake_make_dataset(calls))
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    with pytest.warns(UserWarning, match="could not cache mnist1d"):
        ds = load_dataset("mnist1d", cache_dir=blocker / "sub")
    assert ds.x_train.shape == (40, 1, 40) and len(calls) == 1


def test_mnist1d_generation_keeps_global_rng(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mnist1d.data, "make_dataset", _fake_make_dataset([]))
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    load_dataset("mnist1d", cache_dir=tmp_path)
    assert np.random.rand() == expected_np
    assert random.random() == expected_py


def test_npz_loads_with_client_train(tmp_path: Path) -> None:
    arrays = _valid_arrays()
    ds = load_dataset(_write_npz(tmp_path / "ok.npz", arrays))
    assert ds.input_shape == (2, 3)
    assert ds.num_classes == int(max(arrays["y_train"].max(), arrays["y_test"].max())) + 1
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    np.testing.assert_allclose(ds.x_train, arrays["x_train"].astype(np.float32))
    np.testing.assert_array_equal(ds.y_test, arrays["y_test"])
    assert ds.client_train is not None and ds.client_train.dtype == np.int64
    np.testing.assert_array_equal(ds.client_train, arrays["client_train"])
    assert str(tmp_path / "ok.npz") in ds.name


def test_npz_accepts_integral_float_labels_and_no_client_train(tmp_path: Path) -> None:
    arrays = _valid_arrays()
    del arrays["client_train"]
    arrays["y_train"] = arrays["y_train"].astype(np.float64)
    arrays["x_train"] = (arrays["x_train"] * 10).astype(np.int16)
    ds = load_dataset(_write_npz(tmp_path / "f.npz", arrays))
    assert ds.client_train is None
    np.testing.assert_array_equal(ds.y_train, arrays["y_train"].astype(np.int64))
    assert ds.x_train.dtype == np.float32


def _bad(**changes: object) -> dict[str, np.ndarray]:
    arrays = _valid_arrays()
    for key, value in changes.items():
        if value is None:
            del arrays[key]
        else:
            arrays[key] = np.asarray(value)
    return arrays


_nan_x = _valid_arrays()["x_train"].copy()
_nan_x[3, 1, 2] = np.nan
_inf_x = _valid_arrays()["x_test"].copy()
_inf_x[0, 0, 0] = np.inf

BAD_NPZ = {
    "missing key": (_bad(x_test=None), "x_test"),
    "train length mismatch": (_bad(y_train=np.zeros(11, dtype=int)), "11 labels"),
    "test length mismatch": (_bad(y_test=np.zeros(4, dtype=int)), "y_test"),
    "x_test sample shape": (_bad(x_test=np.zeros((5, 3, 2))), "x_test sample shape"),
    "x_train 1-D": (_bad(x_train=np.zeros(12)), "x_train"),
    "y 2-D": (_bad(y_train=np.zeros((12, 1), dtype=int)), "y_train must be 1-D"),
    "NaN features": (_bad(x_train=_nan_x), "non-finite"),
    "Inf features": (_bad(x_test=_inf_x), "non-finite"),
    "too large for float32": (_bad(x_test=np.full((5, 2, 3), 1e300)), "non-finite"),
    "fractional labels": (_bad(y_train=np.linspace(0, 3, 12)), "integers"),
    "string labels": (_bad(y_test=np.array(list("abcde"))), "integers"),
    "negative labels": (_bad(y_test=np.array([0, 1, -2, 3, 1])), "negative"),
    "string features": (_bad(x_train=np.full((12, 2, 3), "a")), "numeric"),
    "single class": (
        _bad(y_train=np.zeros(12, dtype=int), y_test=np.zeros(5, dtype=int)),
        "single class",
    ),
    "client_train length": (_bad(client_train=np.arange(5)), "client_train"),
    "client_train fractional": (_bad(client_train=np.full(12, 0.5)), "client_train"),
    "empty train": (
        _bad(x_train=np.zeros((0, 2, 3)), y_train=np.zeros(0, dtype=int), client_train=None),
        "empty",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_NPZ))
def test_npz_validation_errors(tmp_path: Path, case: str) -> None:
    arrays, needle = BAD_NPZ[case]
    path = tmp_path / "bad.npz"
    with pytest.raises(DatasetError) as exc:
        load_dataset(_write_npz(path, arrays))
    _assert_one_line_error(exc, str(path), needle)


def test_npz_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.npz"
    with pytest.raises(DatasetError) as exc:
        load_dataset(f"npz:{path}")
    _assert_one_line_error(exc, str(path), "not found")


@pytest.mark.parametrize("kind", ["text", "npy", "pickle", "truncated zip", "directory"])
def test_npz_not_a_valid_archive(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "x.npz"
    if kind == "text":
        path.write_text("hello, world\n")
    elif kind == "npy":
        with path.open("wb") as fh:
            np.save(fh, np.arange(3))
    elif kind == "pickle":
        with path.open("wb") as fh:
            np.save(fh, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif kind == "truncated zip":
        buf = io.BytesIO()
        np.savez(buf, **_valid_arrays())
        path.write_bytes(buf.getvalue()[:-40])
    else:
        path.mkdir()
    with pytest.raises(DatasetError) as exc:
        load_dataset(f"npz:{path}")
    _assert_one_line_error(exc, str(path))


def test_npz_object_array_member_rejected(tmp_path: Path) -> None:
    arrays = _valid_arrays()
    arrays["y_train"] = np.array([0, 1] * 6, dtype=object)
    path = tmp_path / "obj.npz"
    np.savez(path, **arrays)
    with pytest.raises(DatasetError) as exc:
        load_dataset(f"npz:{path}")
    _assert_one_line_error(exc, str(path))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    compressed=st.booleans(),
)
def test_npz_fuzz_corrupted_bytes_only_raise_dataset_error(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject, compressed: bool
) -> None:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **_valid_arrays())
    blob = bytearray(buf.getvalue())
    n_flips = data.draw(st.integers(1, 8))
    for _ in range(n_flips):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(len(blob) // 2, len(blob)))
    path = tmp_path_factory.mktemp("fuzz") / "f.npz"
    path.write_bytes(bytes(blob[:cut]))
    try:
        ds = load_dataset(f"npz:{path}")
    except DatasetError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
    else:  # the corruption hit only payload bytes: result must still be a valid dataset
        assert ds.x_train.dtype == np.float32 and np.all(np.isfinite(ds.x_train))
        assert len(ds.x_train) == len(ds.y_train) and ds.y_train.min() >= 0


@pytest.mark.parametrize("spec", ["cifar10", "npz", "DIGITS", ""])
def test_unknown_dataset_lists_valid_names(spec: str) -> None:
    with pytest.raises(DatasetError) as exc:
        load_dataset(spec)
    _assert_one_line_error(exc, *DATASET_NAMES)


def test_npz_spec_without_path() -> None:
    with pytest.raises(DatasetError, match="needs a file path"):
        load_dataset("npz:")


def test_dataset_is_frozen_and_checked() -> None:
    ds = _synthetic(n=20)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.num_classes = 3  # type: ignore[misc]
    with pytest.raises(DatasetError, match="float32"):
        dataclasses.replace(ds, x_train=ds.x_train.astype(np.float64))
    with pytest.raises(DatasetError, match="client_train"):
        dataclasses.replace(ds, client_train=np.zeros(3, dtype=np.int64))


# --------------------------------------------------------------------------- partitioning


def _assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    for p in parts:
        assert p.dtype == np.int64 and p.ndim == 1 and len(p) > 0
        assert np.all(np.diff(p) > 0)  # sorted, no duplicates
    allidx = np.concatenate(parts)
    assert len(allidx) == n  # disjoint (no index twice) ...
    np.testing.assert_array_equal(np.sort(allidx), np.arange(n))  # ... and covering


def _mean_label_tv(ds: Dataset, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between client and global label distributions."""
    glob = np.bincount(ds.y_train, minlength=ds.num_classes) / ds.num_train
    tvs = []
    for p in parts:
        local = np.bincount(ds.y_train[p], minlength=ds.num_classes) / len(p)
        tvs.append(0.5 * np.abs(local - glob).sum())
    return float(np.mean(tvs))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_partition_deterministic_disjoint_cover(scheme: str) -> None:
    ds = _synthetic(n=600)
    a = partition_indices(ds, scheme, num_clients=7, seed=3)
    b = partition_indices(ds, scheme, num_clients=7, seed=3)
    c = partition_indices(ds, scheme, num_clients=7, seed=4)
    assert len(a) == 7
    _assert_disjoint_cover(a, ds.num_train)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_iid_partition_is_balanced_and_not_file_order() -> None:
    ds = _synthetic(n=600)
    parts = partition_indices(ds, "iid", num_clients=6, seed=0)
    assert {len(p) for p in parts} == {100}
    # A seeded shuffle precedes the split: client 0 is not simply rows 0..99.
    assert not np.array_equal(parts[0], np.arange(100))


@pytest.mark.parametrize("num_clients", [20, 100])
def test_dirichlet_on_mnist1d_many_clients(mnist: Dataset, num_clients: int) -> None:
    parts = partition_indices(mnist, "dirichlet", num_clients=num_clients, seed=0, alpha=0.5)
    _assert_disjoint_cover(parts, mnist.num_train)
    sizes = [len(p) for p in parts]
    assert min(sizes) >= 1 and max(sizes) > min(sizes)


def test_dirichlet_small_alpha_more_skewed_than_iid(mnist: Dataset) -> None:
    iid = partition_indices(mnist, "iid", num_clients=10, seed=0)
    skewed = partition_indices(mnist, "dirichlet", num_clients=10, seed=0, alpha=0.1)
    mild = partition_indices(mnist, "dirichlet", num_clients=10, seed=0, alpha=100.0)
    tv_iid, tv_skew, tv_mild = (_mean_label_tv(mnist, p) for p in (iid, skewed, mild))
    assert tv_iid < 0.1
    assert tv_skew > 0.4
    assert tv_skew > tv_mild


def test_shards_limit_labels_per_client(mnist: Dataset) -> None:
    spc = 2
    parts = partition_indices(mnist, "shards", num_clients=20, seed=1, shards_per_client=spc)
    _assert_disjoint_cover(parts, mnist.num_train)
    # shards (100 samples) are much smaller than classes (~400), so a shard spans <= 2 labels
    for p in parts:
        assert len(np.unique(mnist.y_train[p])) <= 2 * spc
    iid = partition_indices(mnist, "iid", num_clients=20, seed=1)
    assert all(len(np.unique(mnist.y_train[p])) == 10 for p in iid)


def test_shards_uneven_sizes_still_cover() -> None:
    ds = _synthetic(n=437)
    parts = partition_indices(ds, "shards", num_clients=9, seed=0, shards_per_client=3)
    _assert_disjoint_cover(parts, ds.num_train)


def test_natural_partition_matches_client_train() -> None:
    ids = np.array([7, 3, 3, 9, 7, 7, 3, 9, 12, 12] * 6, dtype=np.int64)
    ds = _synthetic(n=60, client_ids=ids)
    parts = partition_indices(ds, "natural", num_clients=4, seed=0)
    for part, cid in zip(parts, np.unique(ids), strict=True):
        np.testing.assert_array_equal(part, np.flatnonzero(ids == cid))


def test_natural_partition_errors() -> None:
    with pytest.raises(DatasetError, match="client_train") as exc:
        partition_indices(_synthetic(n=30), "natural", num_clients=3, seed=0)
    _assert_one_line_error(exc, "natural")
    ids = np.repeat(np.arange(5), 6).astype(np.int64)
    with pytest.raises(DatasetError) as exc:
        partition_indices(_synthetic(n=30, client_ids=ids), "natural", num_clients=3, seed=0)
    _assert_one_line_error(exc, "5 distinct client ids")


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"scheme": "pathological"}, "iid, dirichlet, shards, natural"),
        ({"num_clients": 0}, "num_clients"),
        ({"num_clients": 2.5}, "num_clients"),
        ({"num_clients": 61}, "more than the 60"),
        ({"seed": -1}, "seed"),
        ({"scheme": "dirichlet", "alpha": 0.0}, "alpha"),
        ({"scheme": "dirichlet", "alpha": float("nan")}, "alpha"),
        ({"scheme": "shards", "shards_per_client": 0}, "shards_per_client"),
    ],
)
def test_partition_argument_errors(kwargs: dict[str, object], needle: str) -> None:
    args: dict[str, object] = {"scheme": "iid", "num_clients": 3, "seed": 0, **kwargs}
    with pytest.raises(DatasetError) as exc:
        partition_indices(_synthetic(n=60), **args)  # type: ignore[arg-type]
    _assert_one_line_error(exc, needle)
    assert set(PARTITION_SCHEMES) == {"iid", "dirichlet", "shards", "natural"}


def test_dirichlet_impossible_split_suggests_fix() -> None:
    ds = _synthetic(n=200)
    with pytest.raises(DatasetError) as exc:
        partition_indices(ds, "dirichlet", num_clients=150, seed=0, alpha=0.01)
    _assert_one_line_error(exc, "alpha=0.01", "increase dirichlet-alpha")


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(20, 300),
    num_clients=st.integers(1, 20),
    seed=st.integers(0, 2**31),
    scheme=st.sampled_from(["iid", "dirichlet", "shards"]),
    alpha=st.floats(0.3, 50.0),
    spc=st.integers(1, 4),
)
def test_partition_properties(
    n: int, num_clients: int, seed: int, scheme: str, alpha: float, spc: int
) -> None:
    ds = _synthetic(n=n, seed=seed % 1000)
    try:
        parts = partition_indices(ds, scheme, num_clients, seed, alpha=alpha, shards_per_client=spc)
    except DatasetError as exc:  # only an impossible Dirichlet draw may refuse
        assert scheme == "dirichlet" and "dirichlet-alpha" in str(exc)
        return
    assert len(parts) == num_clients
    _assert_disjoint_cover(parts, n)


def test_partition_stats_counts(digits: Dataset) -> None:
    parts = partition_indices(digits, "dirichlet", num_clients=5, seed=0, alpha=0.5)
    stats = partition_stats(digits, parts)
    assert [s["client"] for s in stats] == list(range(5))
    for s, p in zip(stats, parts, strict=True):
        assert s["num_samples"] == len(p)
        assert len(s["label_counts"]) == digits.num_classes
        for c, count in enumerate(s["label_counts"]):
            assert count == int(np.sum(digits.y_train[p] == c))
            assert type(count) is int
    assert sum(s["num_samples"] for s in stats) == digits.num_train


def test_partition_stats_rejects_bad_indices(digits: Dataset) -> None:
    with pytest.raises(DatasetError, match="client 1"):
        partition_stats(digits, [np.arange(3), np.array([digits.num_train])])
    with pytest.raises(DatasetError, match="client 0"):
        partition_stats(digits, [np.array([-1])])


def test_zip_without_required_members_names_found_keys(tmp_path: Path) -> None:
    path = tmp_path / "other.npz"
    with zipfile.ZipFile(path, "w") as zf:
        buf = io.BytesIO()
        np.save(buf, np.arange(3))
        zf.writestr("weights.npy", buf.getvalue())
    with pytest.raises(DatasetError) as exc:
        load_dataset(f"npz:{path}")
    _assert_one_line_error(exc, str(path), "x_train", "found: weights")


@pytest.mark.parametrize("label", [10**9, 3 * 10**6, 10_000])
def test_npz_label_range_is_bounded_before_a_model_is_built(tmp_path: Path, label: int) -> None:
    """One stray label of 1e9 asked for a 1e9-output model (32 GB for logreg); 3e6 for a
    24M-parameter one that ran. Labels must be 0..K-1 with K <= 10,000."""
    arrays = _valid_arrays()
    arrays["y_test"] = arrays["y_test"].copy()
    arrays["y_test"][0] = label
    path = tmp_path / "labels.npz"
    np.savez(path, **arrays)
    with pytest.raises(DatasetError, match="K <= 10000"):
        load_dataset(f"npz:{path}")
    arrays["y_test"][0] = 9_999
    np.savez(path, **arrays)
    assert load_dataset(f"npz:{path}").num_classes == 10_000
