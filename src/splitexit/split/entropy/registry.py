"""Entropy codecs known to this process: ``Codec.parse("entropy:...")`` and the module-level
:func:`splitexit.split.codec.decode` find them here (registered with the wire codec on import).
"""

from __future__ import annotations

import threading

import numpy as np

from ...errors import CorruptFileError, InputError, PayloadError
from ..codec import register_external
from .coder import EntropyCodec
from .message import TAG_MANY, TAG_ONE
from .tables import EntropyTables

__all__ = ["register", "unregister", "registered"]

_REGISTRY: dict[int, EntropyCodec] = {}
_LOCK = threading.Lock()


def register(codec_or_tables: EntropyCodec | EntropyTables) -> EntropyCodec:
    """Make a codec known to ``Codec.parse(spec)`` and the module-level ``decode``.

    Two different tables with the same 8-bit id cannot be registered at once (the second is
    refused with :class:`InputError`).
    """
    c = codec_or_tables if isinstance(codec_or_tables, EntropyCodec) \
        else EntropyCodec(codec_or_tables)
    with _LOCK:
        have = _REGISTRY.get(c.tables.codec_id)
        if have is not None and have != c:
            raise InputError(f"another entropy codec with id {c.tables.codec_id:02x} is "
                             "registered in this process; unregister it first")
        _REGISTRY[c.tables.codec_id] = c  # the same tables: the newer object (e.g. its source)
        return c


def unregister(codec: EntropyCodec) -> None:
    """Forget a registered codec."""
    with _LOCK:
        if _REGISTRY.get(codec.tables.codec_id) == codec:
            del _REGISTRY[codec.tables.codec_id]


def registered() -> list[EntropyCodec]:
    """The registered entropy codecs."""
    with _LOCK:
        return list(_REGISTRY.values())


def _parse(spec: str) -> EntropyCodec:
    rest = spec.strip()[len("entropy:"):]
    if len(rest) == 8 and all(ch in "0123456789abcdef" for ch in rest.lower()):
        with _LOCK:
            c = _REGISTRY.get(int(rest[:2], 16))
        if c is None or c.tables.sha256[:8] != rest.lower():
            raise InputError(f"codec {spec!r}: no entropy tables with id {rest} are registered "
                             "in this process; load them with Codec.parse('entropy:<tables."
                             "json>') or splitexit.split.entropy.register")
        return c
    path, _, digest = rest.rpartition("@") if "@" in rest else (rest, "", "")
    tables = EntropyTables.load(path)
    if digest and not tables.sha256.startswith(digest.lower()):
        raise CorruptFileError(
            f"{path}: the entropy tables' sha256 {tables.sha256[:16]} does not match the "
            f"{digest} the codec spec (manifest) records: these tables belong to another "
            "model; export them again with the model")
    return register(EntropyCodec(tables, source=path))


def _decode_any(data: memoryview, max_bytes: int) -> np.ndarray:
    if len(data) < 2:
        raise PayloadError(f"truncated entropy message: {len(data)} bytes")
    cid = data[1]
    with _LOCK:
        c = _REGISTRY.get(cid)
    if c is None:
        raise PayloadError(f"entropy message for codec id {cid:02x}, which this process does "
                           "not know: load the model's entropy tables on the server")
    return c.decode_arrays(data, max_bytes=max_bytes)


register_external("entropy:", _parse, (TAG_ONE, TAG_MANY), _decode_any)
