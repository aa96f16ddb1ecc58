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

_REGISTRY: dict[int, list[EntropyCodec]] = {}
"""Codecs by their 8-bit id; tables whose ids collide share a list (told apart by the check
byte, which is keyed by each table's full digest)."""
_LOCK = threading.Lock()


def register(codec_or_tables: EntropyCodec | EntropyTables) -> EntropyCodec:
    """Make a codec known to ``Codec.parse(spec)`` and the module-level ``decode``.

    Registering the same tables again replaces the older object (e.g. to record its source
    file). Different tables whose 8-bit ids collide are both kept: a message is decoded by the
    one whose keyed check byte it carries (see :func:`_decode_any`).
    """
    c = codec_or_tables if isinstance(codec_or_tables, EntropyCodec) \
        else EntropyCodec(codec_or_tables)
    with _LOCK:
        same_id = _REGISTRY.setdefault(c.tables.codec_id, [])
        same_id[:] = [have for have in same_id if have != c] + [c]
        return c


def unregister(codec: EntropyCodec) -> None:
    """Forget a registered codec."""
    with _LOCK:
        same_id = _REGISTRY.get(codec.tables.codec_id, [])
        same_id[:] = [have for have in same_id if have != codec]
        if not same_id:
            _REGISTRY.pop(codec.tables.codec_id, None)


def registered() -> list[EntropyCodec]:
    """The registered entropy codecs."""
    with _LOCK:
        return [c for same_id in _REGISTRY.values() for c in same_id]


def _by_digest(prefix: str) -> EntropyCodec | None:
    with _LOCK:
        return next((c for c in _REGISTRY.get(int(prefix[:2], 16), [])
                     if c.tables.sha256.startswith(prefix)), None)


def _parse(spec: str) -> EntropyCodec:
    rest = spec.strip()[len("entropy:"):]
    if len(rest) == 8 and all(ch in "0123456789abcdef" for ch in rest.lower()):
        c = _by_digest(rest.lower())
        if c is None:
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
        candidates = list(_REGISTRY.get(cid, ()))
    if not candidates:
        raise PayloadError(f"entropy message for codec id {cid:02x}, which this process does "
                           "not know: load the model's entropy tables on the server")
    if len(candidates) == 1:
        return candidates[0].decode_arrays(data, max_bytes=max_bytes)
    # colliding ids: the check byte is keyed by each table's full digest
    body = data[:-1]
    fits = [c for c in candidates if len(data) >= 4 and c._check(body) == data[-1]]
    if len(fits) == 1:
        return fits[0].decode_arrays(data, max_bytes=max_bytes)
    if not fits:  # report what the first candidate finds wrong (framing, then the check)
        return candidates[0].decode_arrays(data, max_bytes=max_bytes)
    names = ", ".join(c.spec() for c in fits)
    raise PayloadError(f"entropy message with codec id {cid:02x} fits {len(fits)} registered "
                       f"tables ({names}); their 8-bit ids and check bytes collide for this "
                       "message: serve each entropy model in its own process, or decode with "
                       "the model's own codec (EntropyCodec.decode)")


register_external("entropy:", _parse, (TAG_ONE, TAG_MANY), _decode_any)
