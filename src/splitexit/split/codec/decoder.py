"""Reading a whole message: every header field is validated, in order, before anything sized
by the message is allocated; then the bodies are decompressed and decoded to numpy arrays.

The validation rules are those of ``docs/WIRE_FORMAT.md`` ("Validation"). Every failure is a
:class:`~splitexit.errors.PayloadError`, whatever goes wrong inside.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from splitexit.errors import InputError, PayloadError

from . import framing
from .format import (
    DTYPES,
    HALF,
    RAW,
    Descriptor,
    Header,
    Reader,
    read_descriptor,
    read_header,
    read_section_sizes,
)
from .quant import dequantize
from .registry import external_decoder
from .tensors import Decoded, half_array, raw_array

if TYPE_CHECKING:
    from .facade import Codec


def read_message_header(data: object) -> Header:
    """The fixed header of a message.

    Raises:
        PayloadError: the header is malformed.
    """
    try:
        return read_header(Reader(memoryview(data).cast("B")))
    except PayloadError:
        raise
    except Exception as e:  # noqa: BLE001 - the contract is PayloadError only
        raise PayloadError(f"malformed payload header ({type(e).__name__}: {e})") from e


def decode_message(data: object, max_bytes: int, expect: Codec | None) -> Decoded:
    """Decode a message to arrays; ``expect``: the codec it must have been encoded with.

    Raises:
        InputError: ``max_bytes`` is not a positive int.
        PayloadError: anything about the message is wrong.
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
        raise InputError(f"max_bytes must be a positive int, got {max_bytes!r}")
    try:
        return _decode_checked(data, max_bytes, expect)
    except PayloadError:
        raise
    except Exception as e:  # noqa: BLE001 - the contract is PayloadError only
        raise PayloadError(f"malformed payload ({type(e).__name__}: {e})") from e


def _decode_checked(data: object, max_bytes: int, expect: Codec | None) -> Decoded:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PayloadError(f"a payload message is bytes, got {type(data).__name__}")
    buf = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
    if len(buf) > max_bytes:
        raise PayloadError(
            f"payload message is {len(buf)} bytes, over the limit max_bytes={max_bytes}; "
            "pass a larger max_bytes if this size is expected"
        )
    external = external_decoder(buf[0]) if len(buf) else None
    if external is not None:
        if expect is not None:
            raise PayloadError(f"payload was encoded with another codec than {expect.spec()!r}"
                               "; use splitexit.split.codec.decode to accept any codec")
        return [external(buf, max_bytes)], [DTYPES[0]], False
    r = Reader(buf)
    h = read_header(r)
    if expect is not None and (
        h.kind != expect.kind
        or h.per_channel != expect.per_channel
        or h.zstd != (expect.lossless == "zstd")
    ):
        raise PayloadError(
            f"payload was encoded with codec {h.spec()!r} but this Codec is "
            f"{expect.spec()!r}; use splitexit.split.codec.decode to accept any codec"
        )

    descs: list[Descriptor] = []
    out_bytes = 0
    for i in range(h.n):
        d, out_bytes = read_descriptor(r, h, i, out_bytes, max_bytes)
        descs.append(d)

    total = sum(d.body_len for d in descs)
    raw_size, stored_size = read_section_sizes(r, h, total)
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
    if h.zstd:
        bodies = memoryview(framing.decompress(buf[r.pos :], raw_size))
    else:
        if stored_size != raw_size:
            raise PayloadError(
                f"uncompressed body section: stored size {stored_size} != raw size {raw_size}"
            )
        bodies = buf[r.pos :]

    out: list[np.ndarray] = []
    off = 0
    for i, d in enumerate(descs):
        out.append(_array(bodies, off, d, h.kind, i))
        off += d.body_len
    return out, [d.dt for d in descs], h.is_tuple


def _array(bodies: memoryview, off: int, d: Descriptor, kind: str, index: int) -> np.ndarray:
    """One decoded array: native byte order, bool as ``np.bool_``, bfloat16 as int16 bits."""
    if d.numel == 0:
        return np.empty(d.dims, dtype=d.dt.array if d.dt.array is not None else np.int16)
    if d.storage == RAW:
        return raw_array(bodies, off, d, index)
    if d.storage == HALF:
        return half_array(bodies, off, d, index)
    return dequantize(bodies, off, d, kind, index)
