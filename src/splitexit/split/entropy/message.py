"""The compact entropy message: framing, header parsing and every size check.

Wire format (all the decoder needs is fixed by the deployed tables)::

    offset size  field
    0      1     tag: 0xE1 one sample (version 1), 0xE9 several samples (version 1, bit 3)
    1      1     codec id: the first byte of the tables' SHA-256
    2      1..5  (0xE9 only) n, the number of samples, unsigned LEB128, 1..2**32-1, minimal
    .      1..5  L, the length of the bitstream in bytes (a multiple of 4), unsigned LEB128,
                 minimal
    .      L     bitstream: the constriction range coder's 32-bit words, little-endian
    .      1     check byte: the low byte of CRC-32 over everything before it, started from
                 the CRC-32 of the tables' SHA-256 digest (a check keyed by the tables)

A one-sample message has a 4-byte overhead (``L < 128``). :func:`read_frame` validates the
tag, the codec id (a message for other tables is refused; with the keyed check byte, so is
one whose 8-bit id collides, with probability 255/256), ``n``, minimal varints, ``L`` against
the bytes that follow (truncated or trailing data) and the check byte; every failure raises
:class:`~splitexit.errors.PayloadError`.
"""

from __future__ import annotations

import zlib

from ...errors import PayloadError
from ..codec import _varint

__all__ = ["TAG_ONE", "TAG_MANY", "message_overhead", "frame", "read_frame", "check_key",
           "check_byte"]

TAG_ONE = 0xE1
"""First byte of a one-sample message (version 1)."""
TAG_MANY = 0xE9
"""First byte of a message holding several samples (version 1, count field present)."""
MIN_MESSAGE = 4
_U32_MAX = 2**32 - 1


def check_key(sha256_hex: str) -> int:
    """The CRC-32 state the check byte starts from: the CRC-32 of the tables' digest."""
    return zlib.crc32(bytes.fromhex(sha256_hex))


def check_byte(body: bytes | memoryview, key: int) -> int:
    """The check byte of a message body: the low byte of CRC-32 started from ``key``."""
    return zlib.crc32(body, key) & 0xFF


def message_overhead(n_samples: int, bitstream_bytes: int) -> int:
    """Header plus check-byte size of a message with ``n_samples`` and that bitstream length."""
    n = len(_varint(n_samples)) if n_samples != 1 else 0
    return 2 + n + len(_varint(bitstream_bytes)) + 1


def frame(codec_id: int, n: int, stream: bytes, key: int) -> bytes:
    """The message for ``n`` samples coded as ``stream`` (see the module's wire format)."""
    if n == 1 and len(stream) < 0x80:  # the common case: a 3-byte header
        body = bytes((TAG_ONE, codec_id, len(stream))) + stream
    elif n == 1:
        body = bytes((TAG_ONE, codec_id)) + _varint(len(stream)) + stream
    else:
        body = bytes((TAG_MANY, codec_id)) + _varint(n) + _varint(len(stream)) + stream
    return body + bytes((check_byte(body, key),))


def _read_varint(buf: memoryview, pos: int, what: str) -> tuple[int, int]:
    value = 0
    for i in range(5):
        if pos + i >= len(buf):
            raise PayloadError(f"truncated entropy message: {what} is cut off")
        byte = buf[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if i and byte == 0:
                raise PayloadError(f"malformed entropy message: {what} is not minimally encoded")
            if value > _U32_MAX:
                raise PayloadError(f"malformed entropy message: {what} exceeds 2**32 - 1")
            return value, pos + i + 1
    raise PayloadError(f"malformed entropy message: {what} is longer than 5 bytes")


def read_frame(buf: memoryview, codec_id: int, key: int) -> tuple[int, memoryview]:
    """Validate a message's framing for the tables ``codec_id`` / ``key``.

    Returns:
        ``(n, bitstream)``: the declared sample count and the bitstream bytes.

    Raises:
        PayloadError: not an entropy message, a message for other tables, a malformed or
            truncated header, a length that disagrees with what follows, a bad check byte.
    """
    if len(buf) < MIN_MESSAGE:
        raise PayloadError(f"truncated entropy message: {len(buf)} bytes, a message has at "
                           f"least {MIN_MESSAGE}")
    tag = buf[0]
    if tag != TAG_ONE and tag != TAG_MANY:
        raise PayloadError(f"not an entropy message (first byte 0x{tag:02x}; expected "
                           f"0x{TAG_ONE:02x} or 0x{TAG_MANY:02x})")
    cid = buf[1]
    if cid != codec_id:
        raise PayloadError(
            f"entropy message for codec id {cid:02x}, but these tables are {codec_id:02x}: "
            "the device's CDF tables do not match the server's; deploy the same export on "
            "both sides")
    if tag == TAG_ONE and buf[2] < 0x80:  # the common case: one sample, L < 128
        n, length, pos = 1, buf[2], 3
    else:
        n, pos = 1, 2
        if tag == TAG_MANY:
            n, pos = _read_varint(buf, pos, "sample count")
            if n < 1:
                raise PayloadError("entropy message declares 0 samples")
        length, pos = _read_varint(buf, pos, "bitstream length")
    follow = len(buf) - pos - 1
    if length != follow:
        what = "truncated entropy message" if follow < length else "trailing bytes"
        raise PayloadError(f"{what}: the header declares a {length}-byte bitstream, "
                           f"{max(follow, 0)} bytes follow it")
    if check_byte(buf[:-1], key) != buf[-1]:
        raise PayloadError("corrupt entropy message, or one encoded with other tables: the "
                           "check byte does not match")
    return n, buf[pos: pos + length]
