"""zstd framing of the body section: one regular frame with its content size and checksum,
decompressed only into exactly the size the header declares (see ``docs/WIRE_FORMAT.md``)."""

from __future__ import annotations

from collections.abc import Sequence

import zstandard

from splitexit.errors import PayloadError

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MAX_WINDOW = 1 << 27
"""Largest zstd window a received frame may ask for (128 MiB, zstd's own default limit)."""


def compress(bodies: Sequence[bytes | memoryview], level: int) -> bytes:
    """The bodies back to back as one zstd frame: single-threaded, content size and checksum
    written, no dictionary, so the same bodies give the same bytes at a given zstd version."""
    cctx = zstandard.ZstdCompressor(
        level=level, write_content_size=True, write_checksum=True, threads=0
    )
    return cctx.compress(b"".join(bodies))


def decompress(frame: memoryview, raw_size: int) -> bytes:
    """Decompress one zstd frame that must hold exactly ``raw_size`` bytes (already bounded).

    Raises:
        PayloadError: not a zstd frame, a frame that declares another content size (or none),
            corrupt data, a failed checksum, or bytes after the frame.
    """
    if bytes(frame[:4]) != ZSTD_MAGIC:
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
        dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
        out = dctx.decompress(frame, max_output_size=raw_size, allow_extra_data=False)
    except Exception as e:  # noqa: BLE001
        raise PayloadError(f"corrupt zstd data in payload: {e}") from e
    if len(out) != raw_size:
        raise PayloadError(
            f"zstd data decompressed to {len(out)} bytes, the header declares {raw_size}"
        )
    return out
