"""The wire format's layout: constants, dtype codes, the fixed header, tensor descriptors
(version 1 and the compact version 2), unsigned LEB128 varints and a bounds-checked reader.

The byte-level specification is ``docs/WIRE_FORMAT.md``; this module is its one
implementation, for writing and for reading. Nothing here allocates anything sized by a
message before the fields that bound it are validated.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from splitexit.errors import PayloadError

MAGIC = b"SPX1"
FORMAT_VERSION = 1
"""Version written by default (``Codec(version=...)`` / the ``:v2`` suffix choose another)."""
COMPACT_VERSION = 2
"""The compact-header version: no redundant counts and lengths, varint dims."""
SUPPORTED_VERSIONS: tuple[int, ...] = (1, 2)
MAX_TENSORS = 16
MAX_NDIM = 8
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
"""Default limit, in bytes, on a decoded message and on the tensors it decodes to."""

KINDS = ("fp32", "fp16", "int8", "int4")
KIND_CODE = {k: i for i, k in enumerate(KINDS)}
LEVELS = {"int8": 255, "int4": 15}
"""Largest quantization code of each quantizing kind."""
DEFAULT_ZSTD_LEVEL = 3

FLAG_PER_CHANNEL = 1
FLAG_ZSTD = 2
FLAG_TUPLE = 4
FLAG_MASK = FLAG_PER_CHANNEL | FLAG_ZSTD | FLAG_TUPLE

FIXED = struct.Struct("<4sBBBB")
U8 = struct.Struct("<B")
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
U32_MAX = 2**32 - 1


@dataclass(frozen=True)
class DType:
    """One dtype the wire carries, with its code and its numpy forms."""

    code: int
    name: str  # the torch dtype's name, torch.<name> (resolved only when torch is in use)
    wire: np.dtype  # little-endian numpy dtype of the bitwise body
    floating: bool
    array: np.dtype | None  # numpy dtype of an array of this dtype (None: numpy has none)
    view: str | None = None  # dtype the elements are viewed as for numpy and the wire, if any


DTYPES = (
    DType(0, "float32", np.dtype("<f4"), True, np.dtype(np.float32)),
    DType(1, "float16", np.dtype("<f2"), True, np.dtype(np.float16)),
    DType(2, "bfloat16", np.dtype("<i2"), True, None, "int16"),  # numpy has no bfloat16
    DType(3, "float64", np.dtype("<f8"), True, np.dtype(np.float64)),
    DType(4, "uint8", np.dtype("u1"), False, np.dtype(np.uint8)),
    DType(5, "int8", np.dtype("i1"), False, np.dtype(np.int8)),
    DType(6, "int16", np.dtype("<i2"), False, np.dtype(np.int16)),
    DType(7, "int32", np.dtype("<i4"), False, np.dtype(np.int32)),
    DType(8, "int64", np.dtype("<i8"), False, np.dtype(np.int64)),
    DType(9, "bool", np.dtype("u1"), False, np.dtype(np.bool_), "uint8"),
)
BY_CODE = {d.code: d for d in DTYPES}
BY_ARRAY = {d.array: d for d in DTYPES if d.array is not None}
BF16 = DTYPES[2]

F32_MAX = float(np.finfo(np.float32).max)
# Largest finite value of the dtype the dequantized values are cast to (quantization
# parameters are float32, so float64 tensors are quantized in float32 range).
FMAX = {
    "float32": F32_MAX,
    "float64": F32_MAX,
    "float16": float(np.finfo(np.float16).max),
    "bfloat16": (2 - 2.0**-7) * 2.0**127,
}

# Storage of one tensor on the wire.
RAW, HALF, QUANT = "raw", "fp16", "quant"


def storage_of(kind: str, dt: DType) -> str:
    """How a tensor of dtype ``dt`` is stored by codec ``kind`` (the decoder derives it too)."""
    if kind == "fp16" and dt.name in ("float32", "float64"):
        return HALF
    if kind in LEVELS and dt.floating:
        return QUANT
    return RAW


def body_len(storage: str, kind: str, dt: DType, numel: int) -> int:
    """Exact length in bytes of one tensor's body."""
    if storage == RAW:
        return numel * dt.wire.itemsize
    if storage == HALF:
        return numel * 2
    return numel if kind == "int8" else (numel + 1) // 2


def n_params(storage: str, per_channel: bool, dims: Sequence[int], numel: int) -> int:
    """P, the number of (scale, minimum) pairs of one tensor."""
    if storage != QUANT or numel == 0:
        return 0
    return dims[1] if per_channel and len(dims) >= 2 else 1


def spell(kind: str, per_channel: bool, zstd: bool, zstd_level: int = DEFAULT_ZSTD_LEVEL,
          version: int = FORMAT_VERSION) -> str:
    """A codec's short spelling (``Codec.spec``), e.g. ``"int8-ch+zstd:v2"``."""
    s = kind + ("-ch" if per_channel else "")
    if zstd:
        s += "+zstd" + ("" if zstd_level == DEFAULT_ZSTD_LEVEL else str(zstd_level))
    if version != FORMAT_VERSION:
        s += f":v{version}"
    return s


@dataclass(frozen=True)
class Quant:
    """A tensor's quantization parameters as they travel: P scales and P minimums."""

    scale: np.ndarray  # float32, shape (P,)
    minimum: np.ndarray  # float32, shape (P,)


def check_quant(q: Quant, levels: int, fmax: float, index: int) -> None:
    """Validate received parameters: finite, scales >= 0, the range within the dtype's."""
    if not (np.isfinite(q.scale).all() and np.isfinite(q.minimum).all()):
        raise PayloadError(f"tensor {index}: non-finite quantization scale or minimum")
    s = q.scale.astype(np.float64)  # finite now: the cast cannot meet a signalling NaN
    m = q.minimum.astype(np.float64)
    if (s < 0).any():
        raise PayloadError(f"tensor {index}: negative quantization scale")
    if (m < -fmax).any() or (m + levels * s > fmax).any():
        raise PayloadError(
            f"tensor {index}: quantization range exceeds the tensor dtype's finite range"
        )


# ---------------------------------------------------------------------- writing
def varint(value: int) -> bytes:
    """Unsigned LEB128 (7 bits per byte, low group first), minimal length."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


@dataclass(frozen=True)
class Header:
    """The fixed header: format version, codec kind, flags and the number of tensors."""

    version: int
    kind: str
    per_channel: bool
    zstd: bool
    n: int
    is_tuple: bool

    @property
    def compact(self) -> bool:
        """Version 2: varint dims, no parameter counts, lengths or section sizes."""
        return self.version == COMPACT_VERSION

    def spec(self) -> str:
        """The spelling of the codec that wrote the message (zstd level not stored)."""
        return spell(self.kind, self.per_channel, self.zstd, version=self.version)

    def pack(self) -> bytes:
        """The 8 header bytes."""
        flags = ((FLAG_PER_CHANNEL if self.per_channel else 0) | (FLAG_ZSTD if self.zstd else 0)
                 | (FLAG_TUPLE if self.is_tuple else 0))
        return FIXED.pack(MAGIC, self.version, KIND_CODE[self.kind], flags, self.n)


def pack_descriptor(dt: DType, dims: tuple[int, ...], quant: Quant | None, length: int,
                    version: int) -> bytes:
    """One tensor descriptor: dtype, dims, parameters and (version 1) counts and length."""
    parts = [U8.pack(dt.code), U8.pack(len(dims))]
    compact = version == COMPACT_VERSION
    if compact:
        parts.extend(varint(d) for d in dims)
    else:
        parts.append(struct.pack(f"<{len(dims)}I", *dims))
        parts.append(U32.pack(0 if quant is None else len(quant.scale)))
    if quant is not None:
        parts.append(quant.scale.astype("<f4").tobytes())
        parts.append(quant.minimum.astype("<f4").tobytes())
    if not compact:
        parts.append(U64.pack(length))
    return b"".join(parts)


def pack_section_sizes(raw_size: int, stored_size: int, version: int) -> bytes:
    """The body section's sizes (version 1 only; version 2 derives them)."""
    return b"" if version == COMPACT_VERSION else U64.pack(raw_size) + U64.pack(stored_size)


# ---------------------------------------------------------------------- reading
class Reader:
    """Bounds-checked little-endian reader; every overrun is a PayloadError."""

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, n: int, what: str) -> int:
        """Advance by ``n`` bytes; the offset where they start."""
        if n > len(self.buf) - self.pos:
            raise PayloadError(
                f"truncated payload: {what} needs {n} bytes at offset {self.pos}, "
                f"but the message has {len(self.buf)} bytes"
            )
        start = self.pos
        self.pos += n
        return start

    def unpack(self, st: struct.Struct, what: str) -> tuple:
        """The fields of ``st`` at the current position."""
        return st.unpack_from(self.buf, self.take(st.size, what))

    def varint_u32(self, what: str) -> int:
        """A minimal unsigned LEB128 of at most 5 bytes and at most 2**32 - 1."""
        value = 0
        for i in range(5):
            byte = self.buf[self.take(1, what)]
            value |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                if i and byte == 0:
                    raise PayloadError(f"{what}: non-minimal varint encoding")
                if value > U32_MAX:
                    raise PayloadError(f"{what}: varint value {value} exceeds 2**32 - 1")
                return value
        raise PayloadError(f"{what}: varint longer than 5 bytes")


def read_header(r: Reader) -> Header:
    """Read and validate the fixed header.

    Raises:
        PayloadError: bad magic, unknown version, kind or flag bits, per-channel without
            quantization, a tensor count outside 1..16 or above 1 without the tuple flag.
    """
    magic, version, kind_code, flags, n = r.unpack(FIXED, "the fixed header")
    if magic != MAGIC:
        raise PayloadError(f"not a splitexit payload: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version not in SUPPORTED_VERSIONS:
        raise PayloadError(
            f"unsupported payload format version {version}; this splitexit reads version(s) "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}: upgrade the receiver or encode with "
            "a matching splitexit"
        )
    if kind_code >= len(KINDS):
        raise PayloadError(
            f"unknown codec kind code {kind_code}; this splitexit knows "
            + ", ".join(f"{i} ({k})" for i, k in enumerate(KINDS))
        )
    if flags & ~FLAG_MASK:
        raise PayloadError(f"unknown flag bits 0x{flags & ~FLAG_MASK:02x} in payload header")
    kind = KINDS[kind_code]
    per_channel = bool(flags & FLAG_PER_CHANNEL)
    if per_channel and kind not in LEVELS:
        raise PayloadError(f"payload header sets per-channel with codec {kind!r}")
    is_tuple = bool(flags & FLAG_TUPLE)
    if not 1 <= n <= MAX_TENSORS:
        raise PayloadError(f"payload declares {n} tensors; allowed 1..{MAX_TENSORS}")
    if not is_tuple and n != 1:
        raise PayloadError(f"payload declares {n} tensors but is not a tuple")
    return Header(version, kind, per_channel, bool(flags & FLAG_ZSTD), n, is_tuple)


@dataclass(frozen=True)
class Descriptor:
    """One tensor's descriptor as read (and validated) from a message."""

    dt: DType
    dims: tuple[int, ...]
    numel: int
    storage: str
    quant: Quant | None
    body_len: int


def _sent_or_derived(r: Reader, h: Header, derived: int, st: struct.Struct, what: str) -> int:
    """A count or length version 1 sends (the caller checks it against ``derived``) and
    version 2 leaves out."""
    return derived if h.compact else r.unpack(st, what)[0]


def read_descriptor(r: Reader, h: Header, index: int, decoded_bytes: int, max_bytes: int
                    ) -> tuple[Descriptor, int]:
    """Read tensor ``index``'s descriptor; it and the running total of decoded bytes.

    ``decoded_bytes`` is the size of the tensors before this one; the shape is checked against
    ``max_bytes`` before the parameters are read.

    Raises:
        PayloadError: unknown dtype code, too many dims, a bad varint, a size over the limit,
            a parameter count or body length that does not match the dims, truncation.
    """
    (code,) = r.unpack(U8, f"dtype of tensor {index}")
    dt = BY_CODE.get(code)
    if dt is None:
        raise PayloadError(
            f"tensor {index}: unknown dtype code {code}; known codes 0..{len(DTYPES) - 1}"
        )
    (ndim,) = r.unpack(U8, f"ndim of tensor {index}")
    if ndim > MAX_NDIM:
        raise PayloadError(f"tensor {index}: ndim {ndim} exceeds the maximum {MAX_NDIM}")
    if h.compact:
        dims = tuple(r.varint_u32(f"dim {j} of tensor {index}") for j in range(ndim))
    else:
        dims = struct.unpack_from(f"<{ndim}I", r.buf, r.take(4 * ndim, f"dims of tensor {index}"))
    numel = math.prod(dims)
    decoded_bytes += numel * dt.wire.itemsize
    if decoded_bytes > max_bytes:
        raise PayloadError(
            f"tensor {index}: shape {dims} ({dt.name}) brings the decoded tensors to "
            f"{decoded_bytes} bytes, over the limit max_bytes={max_bytes}; pass a larger "
            "max_bytes if this size is expected"
        )
    storage = storage_of(h.kind, dt)
    want_params = n_params(storage, h.per_channel, dims, numel)
    count = _sent_or_derived(r, h, want_params, U32, f"parameter count of tensor {index}")
    if count != want_params:
        raise PayloadError(
            f"tensor {index}: {count} quantization parameters, expected {want_params} for "
            f"codec {h.spec()!r}, dtype {dt.name} and shape {dims}"
        )
    quant = None
    if storage == QUANT:
        off = r.take(8 * count, f"quantization parameters of tensor {index}")
        vals = np.frombuffer(r.buf, dtype="<f4", count=2 * count, offset=off)
        quant = Quant(scale=vals[:count].astype(np.float32),
                      minimum=vals[count:].astype(np.float32))
        check_quant(quant, LEVELS[h.kind], FMAX[dt.name], index)
    want_len = body_len(storage, h.kind, dt, numel)
    length = _sent_or_derived(r, h, want_len, U64, f"body length of tensor {index}")
    if length != want_len:
        raise PayloadError(
            f"tensor {index}: body length {length} does not match shape {dims} "
            f"({dt.name}, codec {h.spec()!r}), which needs exactly {want_len}"
        )
    return Descriptor(dt, dims, numel, storage, quant, length), decoded_bytes


def read_section_sizes(r: Reader, h: Header, total: int) -> tuple[int, int]:
    """The body section's raw size R and stored size S (read in version 1, derived in 2).

    Raises:
        PayloadError: an uncompressed version 2 section that is not exactly ``total`` bytes.
    """
    if not h.compact:
        return r.unpack(struct.Struct("<QQ"), "body section sizes")
    stored_size = len(r.buf) - r.pos
    if not h.zstd and stored_size != total:
        what = "trailing garbage" if stored_size > total else "truncated payload"
        raise PayloadError(
            f"{what}: the tensor bodies need {total} bytes, {stored_size} bytes follow "
            "the header"
        )
    return (total if h.zstd else stored_size), stored_size
