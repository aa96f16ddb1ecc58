"""docs/WIRE_FORMAT.md against the codec: messages built byte by byte from the spec's rules
decode to the values the spec's dequantization gives, and the codec writes the spec's
example bytes. Nothing here uses the codec's own layout code to build a message."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pytest
import zstandard

from splitexit.errors import PayloadError
from splitexit.split.codec import Codec, decode_arrays

SPEC = Path(__file__).resolve().parents[1] / "docs" / "WIRE_FORMAT.md"
EXAMPLE = np.array([0.0, 0.5, 1.0, 64.0, 100.25, 127.5], np.float32).reshape(1, 2, 3)


def _spec_hex_blocks() -> list[bytes]:
    """The ```hex blocks of the spec, in order."""
    blocks = re.findall(r"```hex\n(.*?)```", SPEC.read_text(encoding="utf-8"), flags=re.S)
    return [bytes.fromhex(b.replace("\n", " ")) for b in blocks]


def _leb128(value: int) -> bytes:
    """Section 1.1: 7 bits per byte, low group first, high bit = more follows."""
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value >> 7 else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _f32(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def test_the_codec_writes_the_spec_examples():
    v2, v1 = _spec_hex_blocks()
    assert len(v2) == 27 and len(v1) == 64  # the sizes the spec states
    assert Codec.parse("int8:v2").encode(EXAMPLE) == v2
    assert Codec.parse("int8").encode(EXAMPLE) == v1
    want = np.array([0.0, 0.5, 1.0, 64.0, 100.0, 127.5], np.float32).reshape(1, 2, 3)
    for message in (v2, v1):
        out = decode_arrays(message)
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, want)


def _v2_tuple(zstd: bool, dim_bytes: bytes | None = None) -> tuple[bytes, list[np.ndarray]]:
    """A version 2 ``int4-ch`` tuple message of three tensors, and the arrays it holds."""
    rng = np.random.default_rng(5)
    # tensor 0: float32 (1, 2, 130), quantized per channel (P = dims[1] = 2); 130 is a
    # two-byte varint (82 01)
    codes0 = rng.integers(0, 16, size=(1, 2, 130)).astype(np.uint8)
    scale0, minimum0 = np.float32([0.25, 2.0]), np.float32([-1.0, 10.0])
    flat = codes0.reshape(-1)
    body0 = bytes((flat[0::2] | (flat[1::2] << 4)).tolist())  # even N: no padding
    want0 = codes0.astype(np.float32) * scale0.reshape(1, 2, 1) + minimum0.reshape(1, 2, 1)
    dims0 = dim_bytes if dim_bytes is not None else _leb128(1) + _leb128(2) + _leb128(130)
    desc0 = bytes([0, 3]) + dims0 + _f32(0.25, 2.0) + _f32(-1.0, 10.0)
    # tensor 1: int64 (3,): not floating, so bitwise whatever the kind; P = 0
    want1 = np.array([-1, 2**40, 7], np.int64)
    desc1 = bytes([8, 1]) + _leb128(3)
    body1 = struct.pack("<3q", *want1.tolist())
    # tensor 2: float16 (3,), one dim: per tensor despite the per-channel flag (P = 1);
    # codes 0, 3, 15 -> bytes 0x30 and 0x0F (odd N: the last high nibble is 0)
    desc2 = bytes([1, 1]) + _leb128(3) + _f32(0.5) + _f32(1.0)
    body2 = bytes([0x30, 0x0F])
    want2 = np.array([1.0, 2.5, 8.5], np.float16)
    flags = 0x01 | 0x04 | (0x02 if zstd else 0)
    header = b"SPX1" + bytes([2, 3, flags, 3])
    raw = body0 + body1 + body2
    section = zstandard.ZstdCompressor(write_content_size=True, write_checksum=True
                                       ).compress(raw) if zstd else raw
    return header + desc0 + desc1 + desc2 + section, [want0, want1, want2]


@pytest.mark.parametrize("zstd", [False, True], ids=["plain", "zstd"])
def test_a_hand_built_v2_message_decodes_as_the_spec_says(zstd):
    message, want = _v2_tuple(zstd)
    out = decode_arrays(message)
    assert isinstance(out, tuple) and len(out) == 3
    for got, exp in zip(out, want, strict=True):
        assert got.dtype == exp.dtype and got.shape == exp.shape
        np.testing.assert_array_equal(got, exp)
    # and the codec writes these very bytes for these arrays (zstd at its default level 3,
    # the level the frame above was compressed with)
    codec = Codec.parse("int4-ch+zstd:v2" if zstd else "int4-ch:v2")
    assert codec.encode(tuple(want)) == message


def test_the_spec_rejections_of_a_v2_message():
    message, _ = _v2_tuple(False)
    for bad in (message + b"\0",                       # trailing byte
                message[:-1],                          # truncated body
                _v2_tuple(False, _leb128(1) + b"\x82\x00" + _leb128(130))[0],  # non-minimal
                message[:6] + bytes([message[6] | 0x08]) + message[7:]):  # reserved flag
        with pytest.raises(PayloadError):
            decode_arrays(bad)


def test_a_hand_built_v1_zstd_message_decodes_as_the_spec_says():
    # tuple of: float64 (2, 2) int8 per tensor (P = 1) and bool (3,) bitwise
    codes = bytes([0, 1, 2, 255])
    bools = bytes([1, 0, 1])
    raw = codes + bools
    frame = zstandard.ZstdCompressor(write_content_size=True, write_checksum=True).compress(raw)
    message = (b"SPX1" + bytes([1, 2, 0x02 | 0x04, 2])
               + bytes([3, 2]) + struct.pack("<2I", 2, 2) + struct.pack("<I", 1)
               + _f32(1.5) + _f32(-3.0) + struct.pack("<Q", 4)
               + bytes([9, 1]) + struct.pack("<I", 3) + struct.pack("<I", 0)
               + struct.pack("<Q", 3)
               + struct.pack("<QQ", len(raw), len(frame)) + frame)
    a, b = decode_arrays(message)
    q = np.frombuffer(codes, np.uint8).astype(np.float32).reshape(2, 2)
    want = (q * np.float32(1.5) + np.float32(-3.0)).astype(np.float64)
    assert a.dtype == np.float64 and b.dtype == np.bool_
    np.testing.assert_array_equal(a, want)
    np.testing.assert_array_equal(b, np.array([True, False, True]))
    # the declared raw size R must match the bodies (section 9, rule 6)
    forged = message.replace(struct.pack("<QQ", len(raw), len(frame)),
                             struct.pack("<QQ", len(raw) + 1, len(frame)))
    with pytest.raises(PayloadError, match="add up to"):
        decode_arrays(forged)
