"""The IDX file format (MNIST, Fashion-MNIST): a validating parser for gzipped or raw files,
and a per-process cache of parsed files."""

from __future__ import annotations

import functools
import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from splitexit.errors import CorruptFileError, DatasetMissingError, InputError

__all__ = ["idx_cache_info", "read_idx", "read_idx_cached"]

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


@functools.lru_cache(maxsize=8)
def _parse_once(path: str, size: int, mtime_ns: int) -> np.ndarray:
    array = read_idx(path)
    array.setflags(write=False)
    return array


def read_idx_cached(path: str | os.PathLike) -> np.ndarray:
    """:func:`read_idx`, parsed once per process while the file stays the same.

    The cache is keyed by the resolved path, size and modification time, and holds up to 8
    files; :func:`idx_cache_info` reports its hits and misses.

    Returns:
        The parsed array, read-only (it is shared by every caller).
    """
    path = Path(path)
    st = path.stat()
    return _parse_once(str(path.resolve()), st.st_size, st.st_mtime_ns)


def idx_cache_info() -> tuple[int, int, int, int]:
    """``(hits, misses, maxsize, currsize)`` of :func:`read_idx_cached`'s cache, as the named
    tuple of :func:`functools.lru_cache`."""
    return _parse_once.cache_info()
