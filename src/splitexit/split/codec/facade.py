"""The codec facade: :class:`Codec` (spelling, encode, decode, sizes, error bound) and the
module-level :func:`decode`, :func:`decode_arrays` and :func:`codec_of` that read the codec
from the message header."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from splitexit.errors import InputError

from . import framing, quant
from .decoder import decode_message, read_message_header
from .format import (
    DEFAULT_MAX_BYTES,
    DEFAULT_ZSTD_LEVEL,
    FORMAT_VERSION,
    HALF,
    KINDS,
    LEVELS,
    RAW,
    SUPPORTED_VERSIONS,
    Header,
    Quant,
    pack_descriptor,
    pack_section_sizes,
    spell,
    storage_of,
)
from .registry import external_parser
from .tensors import (
    ArrayPayload,
    Payload,
    as_f32,
    as_items,
    half_body,
    nan_error,
    np_finite,
    np_of,
    numel,
    raw_body,
    to_arrays,
    to_torch,
)

_VALID_SPECS = (
    "fp32, fp16, int8, int8-ch, int4, int4-ch, each optionally followed by +zstd "
    "(or +zstdN for zstd level N in 1..22) and by :v2 for the compact wire format, "
    "e.g. 'int8-ch+zstd' or 'int4:v2'"
)
_SPEC_RE = re.compile(r"^(fp32|fp16|int8|int4)(-ch)?(\+zstd(\d+)?)?(:v(\d+))?$")


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
    zstd_level: int = DEFAULT_ZSTD_LEVEL
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"unknown codec kind {self.kind!r}; valid kinds: {', '.join(KINDS)}")
        if not isinstance(self.per_channel, bool):
            raise InputError(f"per_channel must be True or False, got {self.per_channel!r}")
        if self.per_channel and self.kind not in LEVELS:
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
            parse = external_parser(spec.strip().lower().split(":", 1)[0] + ":")
            if parse is not None:
                return parse(spec)
        m = _SPEC_RE.match(spec.strip().lower()) if isinstance(spec, str) else None
        if m is None:
            raise InputError(f"invalid codec spec {spec!r}; valid: {_VALID_SPECS}")
        kind, ch, zstd, level, _, version = m.groups()
        if ch and kind not in LEVELS:
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
            zstd_level=int(level) if level is not None else DEFAULT_ZSTD_LEVEL,
            version=int(version) if version is not None else FORMAT_VERSION,
        )

    def spec(self) -> str:
        """The short spelling; ``Codec.parse(c.spec()) == c``."""
        return spell(self.kind, self.per_channel, self.lossless == "zstd", self.zstd_level,
                     self.version)

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
            The message (layout: ``docs/WIRE_FORMAT.md``); deterministic for a given payload
            and codec.

        Raises:
            InputError: the payload is not a tensor/array or tuple of them, has an unsupported
                dtype, too many tensors or dims, NaN/inf values, or values outside the
                float16 range for ``fp16``.
        """
        items, is_tuple = as_items(payload)
        zstd = self.lossless == "zstd"
        header = Header(self.version, self.kind, self.per_channel, zstd, len(items), is_tuple)
        parts: list[bytes | memoryview] = [header.pack()]
        bodies: list[bytes | memoryview] = []
        for i, (x, dt) in enumerate(items):
            storage = storage_of(self.kind, dt)
            params: Quant | None = None
            if storage == RAW:
                body = raw_body(x, dt, i)
            elif storage == HALF:
                body = half_body(x, dt, i)
            else:
                params, body = quant.quantize(x, dt, self.kind, self.per_channel, i)
            parts.append(pack_descriptor(dt, tuple(x.shape), params, len(body), self.version))
            bodies.append(body)
        raw_size = sum(len(b) for b in bodies)
        if zstd:
            stored = framing.compress(bodies, self.zstd_level)
            parts.append(pack_section_sizes(raw_size, len(stored), self.version))
            parts.append(stored)
        else:
            parts.append(pack_section_sizes(raw_size, raw_size, self.version))
            parts.extend(bodies)
        return b"".join(parts)

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
        return to_torch(decode_message(data, max_bytes, expect=self))

    def decode_arrays(self, data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> ArrayPayload:
        """:meth:`decode` to numpy arrays (no PyTorch needed); see :func:`decode_arrays`.

        Raises:
            PayloadError: as :meth:`decode`, and for bfloat16 tensors, which numpy lacks.
        """
        return to_arrays(decode_message(data, max_bytes, expect=self))

    # ------------------------------------------------------------------ sizes and bounds
    def payload_bytes(self, payload: Payload | ArrayPayload) -> int:
        """Size in bytes of the encoded payload, ``len(self.encode(payload))``."""
        return len(self.encode(payload))

    def bytes_per_sample(self, payload: Payload | ArrayPayload) -> float:
        """Encoded size divided by the batch size (dim 0 of the first tensor).

        Raises:
            InputError: the first tensor has no batch dimension or an empty batch.
        """
        items, _ = as_items(payload)
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
        items, _ = as_items(payload)
        bound = 0.0
        for i, (x, dt) in enumerate(items):
            storage = storage_of(self.kind, dt)
            if numel(x) == 0:
                continue
            if storage == RAW:
                if dt.floating and not np_finite(np_of(x, dt), dt):
                    raise nan_error(i)
                continue
            if storage == HALF:
                half_body(x, dt, i)  # same checks as encode
                maxabs = float(np.max(np.abs(as_f32(x, dt, i))))
                b = maxabs * 2.0**-11 * (1 + 2.0**-10) + 2.0**-25
            else:
                b = quant.error_bound(x, dt, self.kind, self.per_channel, i)
            bound = max(bound, b)
        return bound


def codec_of(data: bytes) -> Codec:
    """The codec a message was encoded with, read from its header (zstd level not stored).

    Raises:
        PayloadError: the header is malformed.
    """
    h = read_message_header(data)
    return Codec(h.kind, h.per_channel, "zstd" if h.zstd else None, version=h.version)


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
    return to_torch(decode_message(data, max_bytes, expect=None))


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
    return to_arrays(decode_message(data, max_bytes, expect=None))
