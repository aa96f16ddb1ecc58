"""Wire codec for split computing: payload tensors <-> bytes, never pickle.

A *payload* is what crosses a cut: one ``torch.Tensor`` or a tuple of tensors (a cut inside a
residual block carries several). :class:`Codec` turns a payload into a self-describing byte
string and back. The receiver needs no configuration: the module-level :func:`decode` reads the
codec from the header.

The codec needs only numpy and zstandard; PyTorch is imported only to return tensors. An edge
device without PyTorch encodes numpy arrays (:meth:`Codec.encode` takes arrays and tensors alike
and writes the same bytes for the same values) and :func:`decode_arrays` decodes to numpy.
:func:`decode` is :func:`decode_arrays` plus the conversion to tensors (and bfloat16, which
numpy lacks).

Codecs (``Codec.parse`` / ``Codec.spec`` spelling)::

    fp32        every tensor sent bitwise, in its own dtype (lossless; the name is the common case)
    fp16        float32/float64 tensors sent as IEEE float16 (other dtypes sent bitwise)
    int8        floating tensors quantized to 8-bit codes, asymmetric: x ~ minimum + q * scale,
                q in 0..255, one (scale, minimum) per tensor
    int4        the same with 16 levels (q in 0..15), two codes per byte
    int8-ch     (and int4-ch) one (scale, minimum) per channel, i.e. per index along dim 1
                (tensors with fewer than 2 dims fall back to per tensor)
    ...+zstd    the bodies are additionally compressed with zstd (lossless), e.g. "int8-ch+zstd";
                "+zstdN" selects level N (1..22, default 3)
    ...:v2      write wire format version 2 (compact header, see below), e.g. "int4:v2";
                without the suffix messages are version 1. Decoders read both versions.

Non-floating tensors (integers, bool) are always sent bitwise. A decoded tensor has the dtype
and shape of the encoded one.

Wire format, version 1 (the default). All integers little-endian; ``f32`` is IEEE-754 binary32 little-endian.

Fixed header, 8 bytes::

    offset size field
    0      4    magic b"SPX1"
    4      1    u8 format version (1 or 2)
    5      1    u8 codec kind: 0 fp32, 1 fp16, 2 int8, 3 int4
    6      1    u8 flags: bit 0 per-channel, bit 1 zstd, bit 2 tuple payload; bits 3..7 zero.
                Per-channel is only valid with int8 / int4.
    7      1    u8 number of tensors n, 1..16 (exactly 1 when the tuple bit is clear)

Then n tensor descriptors, back to back::

    u8        dtype code of the original tensor: 0 float32, 1 float16, 2 bfloat16, 3 float64,
              4 uint8, 5 int8, 6 int16, 7 int32, 8 int64, 9 bool
    u8        ndim, 0..8
    u32*ndim  dims
    u32       P, number of quantization parameter pairs. P = 0 unless the tensor is
              quantized (int8/int4 kind and a floating dtype); then P = 0 for an empty
              tensor, dims[1] with per-channel and ndim >= 2, else 1
    f32*P     scales (finite, >= 0)
    f32*P     minimums, the value code 0 decodes to (finite; minimum + levels * scale must
              not exceed the original dtype's largest finite value, levels = 255 or 15)
    u64       body length in bytes; must equal exactly, with N = prod(dims):
                  bitwise:           N * itemsize(dtype)
                  fp16:              N * 2
                  int8:              N
                  int4:              ceil(N / 2)

Then the body section::

    u64       raw size R: sum of the body lengths
    u64       stored size S: R without zstd; the zstd frame's length with zstd
    S bytes   without zstd: the bodies back to back in tensor order; with zstd: one zstd frame
              (content size R written in the frame, xxhash checksum on) of those bodies

and nothing after it.

Wire format, version 2 ("compact", for small payloads such as one sample's bottleneck; a
1x2x7x7 int4 tensor takes 22 header bytes instead of 62). The same fixed header (version byte
2) and the same bodies; every field the decoder can derive is left out, so each remaining one
is still validated before anything is allocated:

    per tensor:
    u8        dtype code (as above)
    u8        ndim, 0..8
    varint*ndim  dims as unsigned LEB128, at most 5 bytes each, value <= 2**32 - 1, minimal
              encoding (no trailing 0x80 / 0x00 continuation groups)
    f32*P     scales, f32*P minimums; P is not sent: it is derived exactly as in version 1
              (0 unless quantized; dims[1] per channel with ndim >= 2, else 1)
    (no body length: it is derived from dtype, codec and dims)

    body section: without zstd, the bodies back to back, and the message must end exactly
    after their derived total R; with zstd, one zstd frame filling the rest of the message
    (content size R written in the frame, checksum on), validated as in version 1.

Bodies: bitwise tensors are their elements in C order, little-endian
(bfloat16 as its 16-bit pattern, bool as bytes 0/1). fp16 bodies are binary16 values. int8
bodies are one code per element; int4 bodies pack element 2i in the low nibble and 2i+1 in the
high nibble of byte i (the unused high nibble of an odd-length body is 0). Dequantization is
``q.float32() * scale + minimum`` evaluated in float32 (multiply, then add, separately
rounded), broadcast over dim 1 per channel, then cast to the original dtype. When
``levels * scale`` exceeds 2**127 for any parameter of the tensor (a range near the float32
limit), it is evaluated as ``2 * (q * (scale / 2) + minimum / 2)`` so ``q * scale`` cannot
overflow. If ``minimum + levels * scale`` exceeds half the dtype's largest finite value, the
result is clamped to that largest finite value.

Quantization (encoder), on the tensor converted to float32: ``minimum = min(x)``, ``scale = f32((max(x) - min(x)) / levels)`` (set
to 0 when below 2**-126, e.g. for a constant tensor, and nudged down if ``minimum + levels *
scale`` would overflow), ``q = clamp(round_half_even((x - minimum) / scale), 0, levels)``
(in float32; in float64 if ``max(x) - min(x)`` of some channel exceeds the float32 range).
The round-trip error is at most ``scale / 2`` plus float rounding; see :meth:`Codec.error_bound`.

Safety: :func:`decode` (and :func:`decode_arrays`: one decoder) reads the whole header with
bounds checks and validates magic, version, kind, flags, counts, dtype codes, ndim, parameters, body lengths (exact, against the
dims), sizes against ``max_bytes`` and the absence of trailing bytes *before* allocating
anything sized by the message. ``max_bytes`` bounds the message length, its length with the
bodies decompressed, and the total size of the decoded tensors (elements times the original
element size), so peak memory while decoding is a small multiple of ``max_bytes``. A zstd body
section must be exactly one regular zstd frame that declares exactly the raw size R (so
decompression allocates at most R, never what a forged frame claims), ends exactly at the end
of the message and passes its checksum. Decoded floating tensors are checked to be finite.
Every failure raises :class:`~splitexit.errors.PayloadError`.

Determinism: encoding uses only exact min/max, IEEE-754 float32 elementwise operations
(numpy, and for tensors torch casts in single-thread chunks, independent of the thread count;
a numpy array and a tensor holding the same values give the same bytes),
round-half-even and single-threaded zstd at a fixed level, and writes no timestamps, so the same payload gives the
same bytes on any machine with the same zstd library version (zstd output may change between zstd
releases; decoding does not depend on it). Decoding gives the same tensors on every machine
(assuming denormals are not flushed, ``torch.set_flush_denormal(False)``, the default).
"""

from __future__ import annotations

import math
import re
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias

import numpy as np
import zstandard

from splitexit.errors import InputError, PayloadError

if TYPE_CHECKING:
    import torch

__all__ = [
    "COMPACT_VERSION",
    "DEFAULT_MAX_BYTES",
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_NDIM",
    "MAX_TENSORS",
    "SUPPORTED_VERSIONS",
    "ArrayPayload",
    "Codec",
    "Payload",
    "codec_of",
    "decode",
    "decode_arrays",
]

Payload: TypeAlias = "torch.Tensor | tuple[torch.Tensor, ...]"
"""What crosses a cut: one tensor, or a tuple of tensors."""
ArrayPayload: TypeAlias = "np.ndarray | tuple[np.ndarray, ...]"
"""A payload as numpy arrays (what :func:`decode_arrays` returns; :meth:`Codec.encode` takes it)."""

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

_KINDS = ("fp32", "fp16", "int8", "int4")
_KIND_CODE = {k: i for i, k in enumerate(_KINDS)}
_LEVELS = {"int8": 255, "int4": 15}

_FLAG_PER_CHANNEL = 1
_FLAG_ZSTD = 2
_FLAG_TUPLE = 4
_FLAG_MASK = _FLAG_PER_CHANNEL | _FLAG_ZSTD | _FLAG_TUPLE

_FIXED = struct.Struct("<4sBBBB")
_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_U32_MAX = 2**32 - 1

_MIN_NORMAL_F32 = 2.0**-126
_F32_MAX = float(np.finfo(np.float32).max)
_EPS32 = 2.0**-23
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_WIDE = 2.0**127  # above this levels * scale, dequantization works at half scale


@dataclass(frozen=True)
class _DType:
    code: int
    name: str  # the torch dtype's name, torch.<name> (resolved only when torch is in use)
    wire: np.dtype  # little-endian numpy dtype of the bitwise body
    floating: bool
    array: np.dtype | None  # numpy dtype of an array of this dtype (None: numpy has none)
    view: str | None = None  # dtype the elements are viewed as for numpy and the wire, if any


_DTYPES = (
    _DType(0, "float32", np.dtype("<f4"), True, np.dtype(np.float32)),
    _DType(1, "float16", np.dtype("<f2"), True, np.dtype(np.float16)),
    _DType(2, "bfloat16", np.dtype("<i2"), True, None, "int16"),  # numpy has no bfloat16
    _DType(3, "float64", np.dtype("<f8"), True, np.dtype(np.float64)),
    _DType(4, "uint8", np.dtype("u1"), False, np.dtype(np.uint8)),
    _DType(5, "int8", np.dtype("i1"), False, np.dtype(np.int8)),
    _DType(6, "int16", np.dtype("<i2"), False, np.dtype(np.int16)),
    _DType(7, "int32", np.dtype("<i4"), False, np.dtype(np.int32)),
    _DType(8, "int64", np.dtype("<i8"), False, np.dtype(np.int64)),
    _DType(9, "bool", np.dtype("u1"), False, np.dtype(np.bool_), "uint8"),
)
_BY_CODE = {d.code: d for d in _DTYPES}
_BY_ARRAY = {d.array: d for d in _DTYPES if d.array is not None}
_BY_TORCH: dict[Any, _DType] = {}  # torch.dtype -> _DType, filled on first use of a tensor
_BF16 = _DTYPES[2]

# Largest finite value of the dtype the dequantized values are cast to (quantization
# parameters are float32, so float64 tensors are quantized in float32 range).
_FMAX = {
    "float32": _F32_MAX,
    "float64": _F32_MAX,
    "float16": float(np.finfo(np.float16).max),
    "bfloat16": (2 - 2.0**-7) * 2.0**127,
}
# Relative and absolute rounding of the final cast to the original dtype (generous).
_CAST_REL = {"float32": 0.0, "float64": 0.0, "float16": 2.0**-10, "bfloat16": 2.0**-7}
_CAST_ABS = {"float32": 1e-35, "float64": 1e-35, "float16": 2.0**-24, "bfloat16": 1e-35}


# Codecs defined elsewhere (splitexit.split.entropy): a spec prefix -> parser and the first
# message bytes -> decoder to numpy. Their modules register on import; known prefixes and first
# bytes import their module lazily.
_EXTERNAL_PARSERS: dict[str, Callable[[str], Any]] = {}
_EXTERNAL_DECODERS: dict[int, Callable[[memoryview, int], np.ndarray]] = {}
_EXTERNAL_MODULES = {"entropy:": "splitexit.split.entropy", 0xE1: "splitexit.split.entropy",
                     0xE9: "splitexit.split.entropy"}


def register_external(prefix: str, parse: Callable[[str], Any], first_bytes: Sequence[int],
                      decode: Callable[[memoryview, int], np.ndarray]) -> None:
    """Hook for another codec module: ``Codec.parse`` hands specs starting with ``prefix``
    to ``parse``; :func:`decode` hands messages starting with one of ``first_bytes`` to
    ``decode(message, max_bytes)``, which returns one float32 array or raises PayloadError."""
    _EXTERNAL_PARSERS[prefix] = parse
    for b in first_bytes:
        _EXTERNAL_DECODERS[b] = decode


def _external(key: Any, table: dict) -> Any:
    if key not in table and key in _EXTERNAL_MODULES:
        import importlib

        importlib.import_module(_EXTERNAL_MODULES[key])
    return table.get(key)


def _torch() -> Any:
    """The torch module, or None when PyTorch is not installed."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def _require_torch(what: str) -> Any:
    torch = _torch()
    if torch is None:
        raise ModuleNotFoundError(
            f"{what} returns torch tensors and needs PyTorch, which is not installed; use "
            "splitexit.split.codec.decode_arrays for numpy arrays, or install torch"
        )
    return torch


def _torch_dtypes(torch: Any) -> dict[Any, _DType]:
    """torch.dtype -> wire dtype (built once, on the first tensor seen)."""
    if not _BY_TORCH:
        _BY_TORCH.update({getattr(torch, d.name): d for d in _DTYPES})
    return _BY_TORCH


_VALID_SPECS = (
    "fp32, fp16, int8, int8-ch, int4, int4-ch, each optionally followed by +zstd "
    "(or +zstdN for zstd level N in 1..22) and by :v2 for the compact wire format, "
    "e.g. 'int8-ch+zstd' or 'int4:v2'"
)
_SPEC_RE = re.compile(r"^(fp32|fp16|int8|int4)(-ch)?(\+zstd(\d+)?)?(:v(\d+))?$")

# Storage of one tensor on the wire.
_RAW, _HALF, _QUANT = "raw", "fp16", "quant"


def _storage(kind: str, dt: _DType) -> str:
    """How a tensor of dtype ``dt`` is stored by codec ``kind`` (the decoder derives it too)."""
    if kind == "fp16" and dt.name in ("float32", "float64"):
        return _HALF
    if kind in _LEVELS and dt.floating:
        return _QUANT
    return _RAW


def _body_len(storage: str, kind: str, dt: _DType, numel: int) -> int:
    if storage == _RAW:
        return numel * dt.wire.itemsize
    if storage == _HALF:
        return numel * 2
    return numel if kind == "int8" else (numel + 1) // 2


def _n_params(storage: str, per_channel: bool, dims: Sequence[int], numel: int) -> int:
    if storage != _QUANT or numel == 0:
        return 0
    return dims[1] if per_channel and len(dims) >= 2 else 1


def _bshape(ndim: int, n_params: int) -> tuple[int, ...]:
    """Broadcast shape of the per-tensor / per-channel parameters."""
    if n_params == 1:
        return ()
    return (1, n_params) + (1,) * (ndim - 2)


@dataclass(frozen=True)
class _Quant:
    scale: np.ndarray  # float32, shape (P,)
    minimum: np.ndarray  # float32, shape (P,)


@dataclass(frozen=True)
class Codec:
    """How payloads are turned into bytes.

    Attributes:
        kind: ``"fp32"`` (bitwise), ``"fp16"``, ``"int8"`` or ``"int4"``.
        per_channel: int8/int4 only: one scale and minimum per index of dim 1 instead of one
            per tensor.
        lossless: ``None`` or ``"zstd"`` to compress the bodies losslessly as well.
        zstd_level: zstd compression level, 1..22 (not stored on the wire; decoding needs no
            level).
        version: Wire format version written by :meth:`encode`: 1 (default) or 2 (compact
            header, for small payloads). Decoding accepts every supported version.
    """

    kind: str = "fp32"
    per_channel: bool = False
    lossless: str | None = None
    zstd_level: int = 3
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise InputError(f"unknown codec kind {self.kind!r}; valid kinds: {', '.join(_KINDS)}")
        if not isinstance(self.per_channel, bool):
            raise InputError(f"per_channel must be True or False, got {self.per_channel!r}")
        if self.per_channel and self.kind not in _LEVELS:
            raise InputError(
                f"per_channel applies only to int8/int4 quantization, not {self.kind!r}; "
                "use per_channel=False"
            )
        if self.lossless not in (None, "zstd"):
            raise InputError(f"lossless must be None or 'zstd', got {self.lossless!r}")
        if (
            isinstance(self.zstd_level, bool)
            or not isinstance(self.zstd_level, int)
            or not 1 <= self.zstd_level <= 22
        ):
            raise InputError(f"zstd_level must be an int in 1..22, got {self.zstd_level!r}")
        if (
            isinstance(self.version, bool)
            or not isinstance(self.version, int)
            or self.version not in SUPPORTED_VERSIONS
        ):
            raise InputError(
                f"wire format version must be one of {SUPPORTED_VERSIONS}, got {self.version!r}"
            )

    # ------------------------------------------------------------------ spelling
    @classmethod
    def parse(cls, spec: str) -> Codec:
        """Build a codec from its short spelling.

        Args:
            spec: e.g. ``"fp32"``, ``"fp16"``, ``"int8"``, ``"int8-ch"``, ``"int4+zstd"``,
                ``"int8-ch+zstd19"``, ``"int4:v2"`` (compact wire format; case and
                surrounding spaces ignored).

        Returns:
            The codec.

        Raises:
            InputError: the spelling is not valid; the message lists the valid ones.
        """
        if isinstance(spec, str) and ":" in spec:
            parse = _external(spec.strip().lower().split(":", 1)[0] + ":", _EXTERNAL_PARSERS)
            if parse is not None:
                return parse(spec)
        m = _SPEC_RE.match(spec.strip().lower()) if isinstance(spec, str) else None
        if m is None:
            raise InputError(f"invalid codec spec {spec!r}; valid: {_VALID_SPECS}")
        kind, ch, zstd, level, _, version = m.groups()
        if ch and kind not in _LEVELS:
            raise InputError(
                f"invalid codec spec {spec!r}: '-ch' (per channel) only applies to int8/int4; "
                f"valid: {_VALID_SPECS}"
            )
        if level is not None and not 1 <= int(level) <= 22:
            raise InputError(
                f"invalid codec spec {spec!r}: zstd level must be 1..22; valid: {_VALID_SPECS}"
            )
        if version is not None and int(version) not in SUPPORTED_VERSIONS:
            raise InputError(
                f"invalid codec spec {spec!r}: wire format version must be one of "
                f"{', '.join(f'v{v}' for v in SUPPORTED_VERSIONS)}; valid: {_VALID_SPECS}"
            )
        return cls(
            kind=kind,
            per_channel=bool(ch),
            lossless="zstd" if zstd else None,
            zstd_level=int(level) if level is not None else 3,
            version=int(version) if version is not None else FORMAT_VERSION,
        )

    def spec(self) -> str:
        """The short spelling; ``Codec.parse(c.spec()) == c``."""
        s = self.kind + ("-ch" if self.per_channel else "")
        if self.lossless == "zstd":
            s += "+zstd" + ("" if self.zstd_level == 3 else str(self.zstd_level))
        if self.version != FORMAT_VERSION:
            s += f":v{self.version}"
        return s

    def __str__(self) -> str:
        return self.spec()

    # ------------------------------------------------------------------ encode
    def encode(self, payload: Payload | ArrayPayload) -> bytes:
        """Serialize a payload.

        Args:
            payload: a CPU (or any-device; copied to CPU) tensor or numpy array, or a tuple of
                1..16 of them, each with at most 8 dims, dtype float32/float16/bfloat16 (torch
                only)/float64/uint8/int8/int16/int32/int64/bool, and only finite values. An
                array and a tensor with the same values encode to the same bytes.

        Returns:
            The message; deterministic for a given payload and codec.

        Raises:
            InputError: the payload is not a tensor/array or tuple of them, has an unsupported
                dtype, too many tensors or dims, NaN/inf values, or values outside the
                float16 range for ``fp16``.
        """
        items, is_tuple = _as_items(payload)
        flags = (
            (_FLAG_PER_CHANNEL if self.per_channel else 0)
            | (_FLAG_ZSTD if self.lossless == "zstd" else 0)
            | (_FLAG_TUPLE if is_tuple else 0)
        )
        compact = self.version == COMPACT_VERSION
        parts: list[bytes | memoryview] = [
            _FIXED.pack(MAGIC, self.version, _KIND_CODE[self.kind], flags, len(items))
        ]
        bodies: list[bytes | memoryview] = []
        for i, (x, dt) in enumerate(items):
            storage = _storage(self.kind, dt)
            dims = tuple(x.shape)
            quant: _Quant | None = None
            if storage == _RAW:
                body = _raw_body(x, dt, i)
            elif storage == _HALF:
                body = _half_body(x, dt, i)
            else:
                quant, body = self._quantize(x, dt, i)
            parts.append(_U8.pack(dt.code) + _U8.pack(len(dims)))
            if compact:
                parts.append(b"".join(_varint(d) for d in dims))
            else:
                parts.append(struct.pack(f"<{len(dims)}I", *dims))
                n_params = 0 if quant is None else len(quant.scale)
                parts.append(_U32.pack(n_params))
            if quant is not None:
                parts.append(quant.scale.astype("<f4").tobytes())
                parts.append(quant.minimum.astype("<f4").tobytes())
            if not compact:
                parts.append(_U64.pack(len(body)))
            bodies.append(body)
        raw_size = sum(len(b) for b in bodies)
        if self.lossless == "zstd":
            cctx = zstandard.ZstdCompressor(
                level=self.zstd_level, write_content_size=True, write_checksum=True, threads=0
            )
            stored = cctx.compress(b"".join(bodies))
            if not compact:
                parts.append(_U64.pack(raw_size) + _U64.pack(len(stored)))
            parts.append(stored)
        else:
            if not compact:
                parts.append(_U64.pack(raw_size) + _U64.pack(raw_size))
            parts.extend(bodies)
        return b"".join(parts)

    def _quantize(self, x: _Source, dt: _DType, index: int) -> tuple[_Quant, bytes]:
        levels = _LEVELS[self.kind]
        a = _as_f32(x, dt, index)
        if a.size == 0:
            return _Quant(np.zeros(0, np.float32), np.zeros(0, np.float32)), b""
        q, lo64, hi64 = _quant_params(a, self.per_channel, levels, _FMAX[dt.name], index)
        span = float(np.max(hi64 - lo64))
        bshape = _bshape(a.ndim, len(q.scale))
        minimum = q.minimum.reshape(bshape)
        scale = np.where(q.scale > 0, q.scale, np.float32(1.0)).astype(np.float32)
        scale = scale.reshape(bshape)
        if span <= _F32_MAX:  # x - minimum cannot overflow float32
            y = np.empty(a.shape, np.float32)
            np.subtract(a, minimum, out=y)
            y /= scale
        else:  # a range wider than float32 holds (|x| near 3.4e38): rare, work in float64
            y = np.empty(a.shape, np.float64)
            np.subtract(a, minimum, out=y, dtype=np.float64)
            y /= scale.astype(np.float64)
        np.rint(y, out=y)  # round half to even
        np.clip(y, 0, levels, out=y)
        codes = y.astype(np.uint8).reshape(-1)
        if self.kind == "int4":
            if codes.size % 2:
                codes = np.concatenate([codes, np.zeros(1, np.uint8)])
            pairs = codes.reshape(-1, 2)
            body = (pairs[:, 0] | (pairs[:, 1] << 4)).astype(np.uint8).tobytes()
        else:
            body = codes.tobytes()
        return q, body

    # ------------------------------------------------------------------ decode
    def decode(self, data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Payload:
        """Decode a message produced by this codec.

        Args:
            data: the message (bytes, bytearray or memoryview).
            max_bytes: limit on the message's decoded size and on the total size of the
                tensors it decodes to.

        Returns:
            A tensor or a tuple of tensors, the same structure, dtypes and shapes as encoded.

        Raises:
            PayloadError: the message is malformed, forged, too large, or was encoded with a
                different codec (use the module-level :func:`decode` to accept any codec).
        """
        return _to_torch(_decode(data, max_bytes, expect=self))

    def decode_arrays(self, data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> ArrayPayload:
        """:meth:`decode` to numpy arrays (no PyTorch needed); see :func:`decode_arrays`.

        Raises:
            PayloadError: as :meth:`decode`, and for bfloat16 tensors, which numpy lacks.
        """
        return _to_arrays(_decode(data, max_bytes, expect=self))

    # ------------------------------------------------------------------ sizes and bounds
    def payload_bytes(self, payload: Payload | ArrayPayload) -> int:
        """Size in bytes of the encoded payload, ``len(self.encode(payload))``."""
        return len(self.encode(payload))

    def bytes_per_sample(self, payload: Payload | ArrayPayload) -> float:
        """Encoded size divided by the batch size (dim 0 of the first tensor).

        Raises:
            InputError: the first tensor has no batch dimension or an empty batch.
        """
        items, _ = _as_items(payload)
        first = items[0][0]
        if first.ndim == 0 or first.shape[0] == 0:
            raise InputError(
                "bytes_per_sample needs a batch dimension (dim 0, size >= 1) on the first "
                f"payload tensor, got shape {tuple(first.shape)}; use payload_bytes instead"
            )
        return self.payload_bytes(payload) / first.shape[0]

    def error_bound(self, payload: Payload | ArrayPayload) -> float:
        """Largest absolute round-trip error this codec guarantees for ``payload``.

        ``fp32`` and non-floating tensors: 0. ``fp16``: each element is within
        ``2**-11 * |x|`` (plus ``2**-25`` for tiny values) of the original, so the bound is
        relative; the value returned is that for the largest ``|x|``. ``int8``/``int4``: half
        the largest quantization step (``scale / 2``) plus float32 rounding (and the final
        rounding to float16/bfloat16 for those dtypes).

        Args:
            payload: a tensor/array or tuple of them, as for :meth:`encode`.

        Returns:
            The bound over all elements of all tensors.

        Raises:
            InputError: as :meth:`encode`.
        """
        items, _ = _as_items(payload)
        bound = 0.0
        for i, (x, dt) in enumerate(items):
            storage = _storage(self.kind, dt)
            if _numel(x) == 0:
                continue
            if storage == _RAW:
                if dt.floating and not _np_finite(_np_of(x, dt), dt):
                    raise _nan_error(i)
                continue
            if storage == _HALF:
                _half_body(x, dt, i)  # same checks as encode
                maxabs = float(np.max(np.abs(_as_f32(x, dt, i))))
                b = maxabs * 2.0**-11 * (1 + 2.0**-10) + 2.0**-25
            else:
                levels = _LEVELS[self.kind]
                a = _as_f32(x, dt, i)
                q, lo64, hi64 = _quant_params(a, self.per_channel, levels, _FMAX[dt.name], i)
                maxabs = float(max(np.max(np.abs(lo64)), np.max(np.abs(hi64))))
                b = (
                    float(np.max(q.scale)) / 2
                    + (8 * _EPS32 + _CAST_REL[dt.name]) * maxabs
                    + _CAST_ABS[dt.name]
                )
            bound = max(bound, b)
        return bound


# ---------------------------------------------------------------------- encode helpers
_Source: TypeAlias = "np.ndarray | torch.Tensor"


def _as_items(payload: object) -> tuple[list[tuple[_Source, _DType]], bool]:
    """Validate a payload: each tensor or array with its wire dtype.

    Arrays come back C-contiguous in native byte order; tensors detached, on the CPU and
    contiguous. Tensors stay tensors (their casts run in torch, and :func:`_np_of` views them
    only where numpy needs them); arrays are never converted to tensors.
    """
    torch = sys.modules.get("torch")  # a tensor exists only once torch has been imported
    tensor_type = torch.Tensor if torch is not None else ()  # () matches nothing
    if isinstance(payload, tuple):
        xs, is_tuple = payload, True
        if not 1 <= len(xs) <= MAX_TENSORS:
            raise InputError(f"a payload tuple must hold 1..{MAX_TENSORS} tensors, got {len(xs)}")
    elif isinstance(payload, (np.ndarray, tensor_type)):
        xs, is_tuple = (payload,), False
    else:
        raise InputError(
            "a payload is a torch.Tensor or numpy array, or a tuple of them, got "
            + type(payload).__name__
            + ("; pass tuple(...)" if isinstance(payload, list) else "")
        )
    items: list[tuple[_Source, _DType]] = []
    for i, x in enumerate(xs):
        if isinstance(x, tensor_type):
            items.append(_tensor_item(torch, x, i))
        elif isinstance(x, np.ndarray):
            items.append(_array_item(x, i))
        else:
            raise InputError(
                f"payload item {i} is a {type(x).__name__}, not a numpy array or torch.Tensor"
            )
    return items, is_tuple


def _dims_error(shape: tuple[int, ...], index: int) -> NoReturn:
    """Raise for a shape with more than MAX_NDIM dims or a dim beyond u32."""
    if len(shape) > MAX_NDIM:
        raise InputError(
            f"payload tensor {index} has {len(shape)} dims; the wire format allows at most "
            f"{MAX_NDIM}; reshape it"
        )
    raise InputError(f"payload tensor {index} has a dim larger than 2**32 - 1")


def _tensor_item(torch: Any, t: torch.Tensor, index: int) -> tuple[torch.Tensor, _DType]:
    if t.layout != torch.strided:
        raise InputError(
            f"payload tensor {index} has layout {t.layout}; convert it with .to_dense()"
        )
    dt = (_BY_TORCH or _torch_dtypes(torch)).get(t.dtype)
    if dt is None:
        raise InputError(
            f"payload tensor {index} has unsupported dtype {t.dtype}; supported: "
            + ", ".join(d.name for d in _DTYPES)
        )
    shape = t.shape
    if len(shape) > MAX_NDIM or (shape and max(shape) > _U32_MAX):
        _dims_error(shape, index)
    return t.detach().cpu().contiguous(), dt


def _array_item(a: np.ndarray, index: int) -> tuple[np.ndarray, _DType]:
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    dt = _BY_ARRAY.get(a.dtype)
    if dt is None:
        raise InputError(
            f"payload array {index} has unsupported dtype {a.dtype}; supported: "
            + ", ".join(str(d.array) for d in _DTYPES if d.array is not None)
            + " (bfloat16 only as a torch.Tensor)"
        )
    shape = a.shape
    if len(shape) > MAX_NDIM or (shape and max(shape) > _U32_MAX):
        _dims_error(shape, index)
    if type(a) is not np.ndarray:  # a subclass (np.matrix, ...): its plain data
        a = np.asarray(a)
    if not a.flags.c_contiguous:
        a = a.copy(order="C")
    return a, dt


def _numel(x: _Source) -> int:
    return x.size if isinstance(x, np.ndarray) else x.numel()


def _np_of(x: _Source, dt: _DType) -> np.ndarray:
    """The elements as a numpy array (a view): bfloat16 as int16 bits, bool as uint8."""
    if dt.view is None:
        return x if isinstance(x, np.ndarray) else x.numpy()
    if isinstance(x, np.ndarray):
        return x.view(dt.view)
    return x.view(getattr(sys.modules["torch"], dt.view)).numpy()


def _nan_error(index: int) -> InputError:
    return InputError(
        f"payload contains NaN/inf (tensor {index}); the wire format carries finite values "
        "only: fix the model or input producing them (e.g. torch.nan_to_num / np.nan_to_num)"
    )


_SERIAL_CHUNK = 32768  # torch's intra-op grain size: chunks this size run on one thread


def _cast(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """``t.to(torch.<dtype>)`` (flattened), one thread-sized chunk at a time.

    Elementwise casts are exact IEEE roundings either way; running them in chunks keeps them
    off torch's thread pool, whose synchronisation costs milliseconds on a busy small CPU.
    """
    torch = sys.modules["torch"]  # only called with tensors
    flat = t.reshape(-1)
    out = torch.empty(flat.numel(), dtype=getattr(torch, dtype))
    for i in range(0, flat.numel(), _SERIAL_CHUNK):
        out[i : i + _SERIAL_CHUNK].copy_(flat[i : i + _SERIAL_CHUNK])
    return out


def _bits_finite(bits: np.ndarray, exp_mask: int) -> bool:
    """True if no 16-bit float pattern (float16 / bfloat16 as uint16) is inf or NaN."""
    return not bool(np.any((bits & exp_mask) == exp_mask))


def _np_finite(arr: np.ndarray, dt: _DType) -> bool:
    """All elements finite; ``arr`` as :func:`_np_of` gives it (bfloat16 as bits)."""
    if dt.name == "float16":
        return _bits_finite(arr.view(np.uint16), 0x7C00)
    if dt is _BF16:
        return _bits_finite(arr.view(np.uint16), 0x7F80)
    return bool(np.isfinite(arr).all())


def _le_bytes(arr: np.ndarray, wire: np.dtype) -> bytes | memoryview:
    if sys.byteorder != "little" and arr.dtype.itemsize > 1:
        arr = arr.astype(wire)
    return memoryview(np.ascontiguousarray(arr)).cast("B")


def _raw_body(x: _Source, dt: _DType, index: int) -> bytes | memoryview:
    arr = _np_of(x, dt)
    if arr.size == 0:
        return b""
    if dt.floating and not _np_finite(arr, dt):
        raise _nan_error(index)
    return _le_bytes(arr, dt.wire)


def _half_body(x: _Source, dt: _DType, index: int) -> bytes | memoryview:
    """float32/float64 values as float16 bit patterns (int16)."""
    if isinstance(x, np.ndarray):
        if x.size == 0:
            return b""
        with np.errstate(over="ignore", invalid="ignore"):
            # torch casts float64 to float16 through float32 (two roundings): do the same
            a = x.astype(np.float32) if dt.name == "float64" else x
            h = a.astype(np.float16).view(np.int16)
    else:
        if x.numel() == 0:
            return b""
        h = _cast(x, "float16").numpy().view(np.int16)
    if not _bits_finite(h.view(np.uint16), 0x7C00):
        if not bool(np.isfinite(_np_of(x, dt)).all()):
            raise _nan_error(index)
        raise InputError(
            f"payload tensor {index} has values beyond the float16 range (|x| > 65504); "
            "use the 'fp32' or 'int8' codec, or rescale the tensor"
        )
    return _le_bytes(h, np.dtype("<i2"))


def _as_f32(x: _Source, dt: _DType, index: int) -> np.ndarray:
    """A non-empty floating tensor or array as a float32 array (no copy for float32)."""
    if dt.name == "float32":
        return _np_of(x, dt)
    if dt.name == "float64":
        a64 = _np_of(x, dt)
        if not bool(np.isfinite(a64).all()):
            raise _nan_error(index)
        with np.errstate(over="ignore"):
            a = a64.astype(np.float32)
        if not bool(np.isfinite(a).all()):
            raise InputError(
                f"payload tensor {index} (float64) has values beyond the float32 range "
                f"(|x| > {_F32_MAX:.4g}), which int8/int4 quantization cannot represent; "
                "rescale it or use the 'fp32' codec"
            )
        return a
    if isinstance(x, np.ndarray):  # float16 (exact)
        return x.astype(np.float32)
    return _cast(x, "float32").numpy().reshape(x.shape)  # float16 / bfloat16 tensor


def _quant_params(
    a: np.ndarray, per_channel: bool, levels: int, fmax: float, index: int
) -> tuple[_Quant, np.ndarray, np.ndarray]:
    """Scale and minimum per tensor or per channel of a non-empty float32 array.

    Returns:
        The parameters, and the minima and maxima per channel (or of the tensor) in float64.

    Raises:
        InputError: the array holds NaN or inf (min/max propagate them).
    """
    if per_channel and a.ndim >= 2:
        axes = tuple(d for d in range(a.ndim) if d != 1)
        lo, hi = a.min(axis=axes), a.max(axis=axes)
    else:
        lo, hi = a.min().reshape(1), a.max().reshape(1)
    lo64 = lo.astype(np.float64)
    hi64 = hi.astype(np.float64)
    if not (np.isfinite(lo64).all() and np.isfinite(hi64).all()):
        raise _nan_error(index)
    scale = ((hi64 - lo64) / levels).astype(np.float32)
    scale[scale < _MIN_NORMAL_F32] = 0  # constant (or all-but-constant) channel
    while True:  # keep minimum + levels * scale within the dtype's range
        over = lo64 + levels * scale.astype(np.float64) > fmax
        if not over.any():
            break
        scale[over] = np.nextafter(scale[over], np.float32(0))
    return _Quant(scale=scale, minimum=lo.astype(np.float32)), lo64, hi64


def _varint(value: int) -> bytes:
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


# ---------------------------------------------------------------------- decode
class _Reader:
    """Bounds-checked little-endian reader; every overrun is a PayloadError."""

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, n: int, what: str) -> int:
        if n > len(self.buf) - self.pos:
            raise PayloadError(
                f"truncated payload: {what} needs {n} bytes at offset {self.pos}, "
                f"but the message has {len(self.buf)} bytes"
            )
        start = self.pos
        self.pos += n
        return start

    def unpack(self, st: struct.Struct, what: str) -> tuple:
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
                if value > _U32_MAX:
                    raise PayloadError(f"{what}: varint value {value} exceeds 2**32 - 1")
                return value
        raise PayloadError(f"{what}: varint longer than 5 bytes")


@dataclass(frozen=True)
class _Desc:
    dt: _DType
    dims: tuple[int, ...]
    numel: int
    storage: str
    quant: _Quant | None
    body_len: int


def _codec_from_header(kind_code: int, flags: int, version: int = FORMAT_VERSION) -> Codec:
    if kind_code >= len(_KINDS):
        raise PayloadError(
            f"unknown codec kind code {kind_code}; this splitexit knows "
            + ", ".join(f"{i} ({k})" for i, k in enumerate(_KINDS))
        )
    if flags & ~_FLAG_MASK:
        raise PayloadError(f"unknown flag bits 0x{flags & ~_FLAG_MASK:02x} in payload header")
    kind = _KINDS[kind_code]
    per_channel = bool(flags & _FLAG_PER_CHANNEL)
    if per_channel and kind not in _LEVELS:
        raise PayloadError(f"payload header sets per-channel with codec {kind!r}")
    return Codec(kind, per_channel, "zstd" if flags & _FLAG_ZSTD else None, version=version)


def _read_fixed(r: _Reader) -> tuple[Codec, int, bool]:
    magic, version, kind_code, flags, n = r.unpack(_FIXED, "the fixed header")
    if magic != MAGIC:
        raise PayloadError(f"not a splitexit payload: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version not in SUPPORTED_VERSIONS:
        raise PayloadError(
            f"unsupported payload format version {version}; this splitexit reads version(s) "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}: upgrade the receiver or encode with "
            "a matching splitexit"
        )
    codec = _codec_from_header(kind_code, flags, version)
    is_tuple = bool(flags & _FLAG_TUPLE)
    if not 1 <= n <= MAX_TENSORS:
        raise PayloadError(f"payload declares {n} tensors; allowed 1..{MAX_TENSORS}")
    if not is_tuple and n != 1:
        raise PayloadError(f"payload declares {n} tensors but is not a tuple")
    return codec, n, is_tuple


def codec_of(data: bytes) -> Codec:
    """The codec a message was encoded with, read from its header (zstd level not stored).

    Raises:
        PayloadError: the header is malformed.
    """
    try:
        return _read_fixed(_Reader(memoryview(data).cast("B")))[0]
    except PayloadError:
        raise
    except Exception as e:  # noqa: BLE001 - the contract is PayloadError only
        raise PayloadError(f"malformed payload header ({type(e).__name__}: {e})") from e


def decode(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Payload:
    """Decode any message to torch tensors, reading the codec from its header.

    This is :func:`decode_arrays` followed by ``torch.from_numpy`` (no copy), which also
    returns bfloat16 tensors.

    Args:
        data: the message (bytes, bytearray or memoryview).
        max_bytes: limit on the message's decoded size and on the total size of the tensors
            it decodes to (default 64 MiB); larger messages are rejected before allocating.

    Returns:
        A tensor or a tuple of tensors, the same structure, dtypes and shapes as encoded.

    Raises:
        PayloadError: anything about the message is wrong; the message says what.
        ModuleNotFoundError: PyTorch is not installed (use :func:`decode_arrays`).
    """
    return _to_torch(_decode(data, max_bytes, expect=None))


def decode_arrays(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> ArrayPayload:
    """Decode any message to numpy arrays, reading the codec from its header; needs no PyTorch.

    The validation is that of :func:`decode` (the same decoder) and the values are bit for bit
    those of its tensors; dtypes are numpy's (torch.bool as ``np.bool_``).

    Args:
        data: the message (bytes, bytearray or memoryview).
        max_bytes: as for :func:`decode`.

    Returns:
        An array or a tuple of arrays, the same structure, dtypes and shapes as encoded.

    Raises:
        PayloadError: anything about the message is wrong, or it holds a bfloat16 tensor,
            which numpy has no dtype for (decode that with :func:`decode`, with PyTorch).
    """
    return _to_arrays(_decode(data, max_bytes, expect=None))


_Decoded: TypeAlias = "tuple[list[np.ndarray], list[_DType], bool]"


def _to_arrays(decoded: _Decoded) -> ArrayPayload:
    arrays, dts, is_tuple = decoded
    for i, dt in enumerate(dts):
        if dt is _BF16:
            raise PayloadError(
                f"tensor {i} of the payload is bfloat16, which numpy has no dtype for: decode "
                "it with splitexit.split.codec.decode (needs PyTorch), or have the sender "
                "send float32/float16"
            )
    return tuple(arrays) if is_tuple else arrays[0]


def _to_torch(decoded: _Decoded) -> Payload:
    torch = _require_torch("splitexit.split.codec.decode")
    arrays, dts, is_tuple = decoded
    out = []
    for a, dt in zip(arrays, dts, strict=True):
        t = torch.from_numpy(a)
        out.append(t.view(torch.bfloat16) if dt is _BF16 else t)
    return tuple(out) if is_tuple else out[0]


def _decode(data: object, max_bytes: int, expect: Codec | None) -> _Decoded:
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
        raise InputError(f"max_bytes must be a positive int, got {max_bytes!r}")
    try:
        return _decode_checked(data, max_bytes, expect)
    except PayloadError:
        raise
    except Exception as e:  # noqa: BLE001 - the contract is PayloadError only
        raise PayloadError(f"malformed payload ({type(e).__name__}: {e})") from e


def _decode_checked(data: object, max_bytes: int, expect: Codec | None) -> _Decoded:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PayloadError(f"a payload message is bytes, got {type(data).__name__}")
    buf = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
    if len(buf) > max_bytes:
        raise PayloadError(
            f"payload message is {len(buf)} bytes, over the limit max_bytes={max_bytes}; "
            "pass a larger max_bytes if this size is expected"
        )
    external = _external(buf[0], _EXTERNAL_DECODERS) if len(buf) else None
    if external is not None:
        if expect is not None:
            raise PayloadError(f"payload was encoded with another codec than {expect.spec()!r}"
                               "; use splitexit.split.codec.decode to accept any codec")
        return [external(buf, max_bytes)], [_DTYPES[0]], False
    r = _Reader(buf)
    codec, n, is_tuple = _read_fixed(r)
    if expect is not None and (
        codec.kind != expect.kind
        or codec.per_channel != expect.per_channel
        or codec.lossless != expect.lossless
    ):
        raise PayloadError(
            f"payload was encoded with codec {codec.spec()!r} but this Codec is "
            f"{expect.spec()!r}; use splitexit.split.codec.decode to accept any codec"
        )

    descs: list[_Desc] = []
    out_bytes = 0
    for i in range(n):
        (code,) = r.unpack(_U8, f"dtype of tensor {i}")
        dt = _BY_CODE.get(code)
        if dt is None:
            raise PayloadError(
                f"tensor {i}: unknown dtype code {code}; known codes 0..{len(_DTYPES) - 1}"
            )
        (ndim,) = r.unpack(_U8, f"ndim of tensor {i}")
        if ndim > MAX_NDIM:
            raise PayloadError(f"tensor {i}: ndim {ndim} exceeds the maximum {MAX_NDIM}")
        if codec.version == COMPACT_VERSION:
            dims = tuple(r.varint_u32(f"dim {j} of tensor {i}") for j in range(ndim))
        else:
            dims = struct.unpack_from(
                f"<{ndim}I", buf, r.take(4 * ndim, f"dims of tensor {i}")
            )
        numel = math.prod(dims)
        out_bytes += numel * dt.wire.itemsize
        if out_bytes > max_bytes:
            raise PayloadError(
                f"tensor {i}: shape {dims} ({dt.name}) brings the decoded tensors to "
                f"{out_bytes} bytes, over the limit max_bytes={max_bytes}; pass a larger "
                "max_bytes if this size is expected"
            )
        storage = _storage(codec.kind, dt)
        want_params = _n_params(storage, codec.per_channel, dims, numel)
        if codec.version == COMPACT_VERSION:
            n_params = want_params
        else:
            (n_params,) = r.unpack(_U32, f"parameter count of tensor {i}")
        if n_params != want_params:
            raise PayloadError(
                f"tensor {i}: {n_params} quantization parameters, expected {want_params} for "
                f"codec {codec.spec()!r}, dtype {dt.name} and shape {dims}"
            )
        quant = None
        if storage == _QUANT:
            off = r.take(8 * n_params, f"quantization parameters of tensor {i}")
            vals = np.frombuffer(buf, dtype="<f4", count=2 * n_params, offset=off)
            quant = _Quant(
                scale=vals[:n_params].astype(np.float32),
                minimum=vals[n_params:].astype(np.float32),
            )
            _check_quant(quant, _LEVELS[codec.kind], _FMAX[dt.name], i)
        want_len = _body_len(storage, codec.kind, dt, numel)
        if codec.version == COMPACT_VERSION:
            body_len = want_len
        else:
            (body_len,) = r.unpack(_U64, f"body length of tensor {i}")
        if body_len != want_len:
            raise PayloadError(
                f"tensor {i}: body length {body_len} does not match shape {dims} "
                f"({dt.name}, codec {codec.spec()!r}), which needs exactly {want_len}"
            )
        descs.append(_Desc(dt, dims, numel, storage, quant, body_len))

    total = sum(d.body_len for d in descs)
    if codec.version == COMPACT_VERSION:
        stored_size = len(buf) - r.pos
        raw_size = total if codec.lossless == "zstd" else stored_size
        if codec.lossless != "zstd" and stored_size != total:
            what = "trailing garbage" if stored_size > total else "truncated payload"
            raise PayloadError(
                f"{what}: the tensor bodies need {total} bytes, {stored_size} bytes follow "
                "the header"
            )
    else:
        raw_size, stored_size = r.unpack(struct.Struct("<QQ"), "body section sizes")
    if raw_size != total:
        raise PayloadError(
            f"body section declares {raw_size} bytes but the tensor bodies add up to {total}"
        )
    if r.pos + raw_size > max_bytes:
        raise PayloadError(
            f"decoded payload would be {r.pos + raw_size} bytes, over the limit "
            f"max_bytes={max_bytes}; pass a larger max_bytes if this size is expected"
        )
    remaining = len(buf) - r.pos
    if stored_size != remaining:
        what = "trailing garbage" if remaining > stored_size else "truncated payload"
        raise PayloadError(
            f"{what}: body section declares {stored_size} stored bytes, "
            f"{remaining} bytes follow the header"
        )
    if codec.lossless == "zstd":
        bodies = memoryview(_unzstd(buf[r.pos :], raw_size))
    else:
        if stored_size != raw_size:
            raise PayloadError(
                f"uncompressed body section: stored size {stored_size} != raw size {raw_size}"
            )
        bodies = buf[r.pos :]

    out: list[np.ndarray] = []
    off = 0
    for i, d in enumerate(descs):
        out.append(_build(bodies, off, d, codec.kind, i))
        off += d.body_len
    return out, [d.dt for d in descs], is_tuple


def _check_quant(q: _Quant, levels: int, fmax: float, index: int) -> None:
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


def _unzstd(frame: memoryview, raw_size: int) -> bytes:
    """Decompress one zstd frame that must hold exactly ``raw_size`` bytes (already bounded)."""
    if bytes(frame[:4]) != _ZSTD_MAGIC:
        raise PayloadError("the payload's body section is not a zstd frame (bad frame magic)")
    try:
        params = zstandard.get_frame_parameters(frame)
    except Exception as e:  # noqa: BLE001 - zstandard.ZstdError and friends
        raise PayloadError(f"invalid zstd frame header in payload: {e}") from e
    if params.content_size != raw_size:
        raise PayloadError(
            f"zstd frame declares {params.content_size} decompressed bytes, the payload "
            f"header {raw_size}; refusing to decompress"
        )
    try:
        dctx = zstandard.ZstdDecompressor(max_window_size=1 << 27)
        out = dctx.decompress(frame, max_output_size=raw_size, allow_extra_data=False)
    except Exception as e:  # noqa: BLE001
        raise PayloadError(f"corrupt zstd data in payload: {e}") from e
    if len(out) != raw_size:
        raise PayloadError(
            f"zstd data decompressed to {len(out)} bytes, the header declares {raw_size}"
        )
    return out


def _build(bodies: memoryview, off: int, d: _Desc, kind: str, index: int) -> np.ndarray:
    """One decoded array: native byte order, bool as ``np.bool_``, bfloat16 as int16 bits."""
    dt = d.dt
    if d.numel == 0:
        return np.empty(d.dims, dtype=dt.array if dt.array is not None else np.int16)
    if d.storage == _RAW:
        arr = np.frombuffer(bodies, dtype=dt.wire, count=d.numel, offset=off)
        arr = arr.astype(dt.wire.newbyteorder("="), copy=True)
        if dt.floating and not _np_finite(arr, dt):
            raise PayloadError(f"tensor {index}: body contains NaN/inf")
        if dt.name == "bool":
            if arr.max() > 1:
                raise PayloadError(f"tensor {index}: bool body holds bytes other than 0/1")
            return arr.view(np.bool_).reshape(d.dims)
        return arr.reshape(d.dims)
    if d.storage == _HALF:
        bits = np.frombuffer(bodies, dtype="<u2", count=d.numel, offset=off)
        if not _bits_finite(bits, 0x7C00):
            raise PayloadError(f"tensor {index}: float16 body contains NaN/inf")
        return bits.view("<f2").astype(dt.array).reshape(d.dims)  # exact
    # quantized
    assert d.quant is not None
    raw = np.frombuffer(bodies, dtype=np.uint8, count=d.body_len, offset=off)
    if kind == "int4":
        pairs = np.empty((d.body_len, 2), np.uint8)
        np.bitwise_and(raw, 0x0F, out=pairs[:, 0])
        np.right_shift(raw, 4, out=pairs[:, 1])
        codes = pairs.reshape(-1)
        if d.numel % 2 and codes[-1] != 0:
            raise PayloadError(f"tensor {index}: nonzero padding nibble in int4 body")
        codes = codes[: d.numel]
    else:
        codes = raw
    x = codes.astype(np.float32).reshape(d.dims)
    bshape = _bshape(len(d.dims), len(d.quant.scale))
    scale = d.quant.scale.reshape(bshape)
    minimum = d.quant.minimum.reshape(bshape)
    levels = _LEVELS[kind]
    fmax = _FMAX[dt.name]
    scale64 = d.quant.scale.astype(np.float64)
    with np.errstate(over="ignore"):  # overflow only rounds past the largest finite: clamped
        if float(np.max(levels * scale64)) <= _WIDE:
            x *= scale  # separately rounded multiply, then add: no FMA
            x += minimum
        else:  # q * scale could overflow float32: work at half scale
            x *= scale * np.float32(0.5)
            x += minimum * np.float32(0.5)
            x *= np.float32(2.0)
        top = d.quant.minimum.astype(np.float64) + levels * scale64
        if float(np.max(top)) > fmax / 2:  # float32 rounding could step past the largest finite
            np.minimum(x, np.float32(min(fmax, _F32_MAX)), out=x)
    if dt.name == "float32":
        return x
    if dt.name == "float64":
        return x.astype(np.float64)
    if dt.name == "float16":
        return x.astype(np.float16)  # |x| <= 65504 here: no overflow
    return _bf16_bits(x)


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """Finite float32 values rounded to bfloat16 (to nearest, ties to even) as int16 bits."""
    u = x.reshape(-1).view(np.uint32)  # 1-d: 0-d arithmetic would give numpy scalars
    r = u >> 16
    r &= 1
    r += 0x7FFF
    r += u  # no wrap-around: the largest finite magnitude 0x7F7FFFFF + 0x8000 < 2**31
    r >>= 16
    return r.astype(np.uint16).view(np.int16).reshape(x.shape)
