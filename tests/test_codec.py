"""Tests of the split-computing wire codec: round trips, error bounds, sizes, and hostile input."""

from __future__ import annotations

import re
import struct
import time
import tracemalloc

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitexit.errors import InputError, PayloadError
from splitexit.split.codec import (
    DEFAULT_MAX_BYTES,
    MAGIC,
    Codec,
    codec_of,
    decode,
)

# numpy must not leak overflow / invalid-cast warnings to users, whatever the input
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

ALL_SPECS = [
    f"{kind}{ch}{z}"
    for kind in ("fp32", "fp16", "int8", "int4")
    for ch in (("", "-ch") if kind.startswith("int") else ("",))
    for z in ("", "+zstd")
]
ALL_SPECS += [f"{s}:v2" for s in ALL_SPECS]  # the compact wire format (version 2)
LOSSY_SPECS = [s for s in ALL_SPECS if not s.startswith("fp32")]
HYP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
OTHER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)
SHAPES = [(), (0,), (1,), (7,), (3, 0, 2), (2, 3), (2, 3, 4, 5), (1, 1, 1, 1, 1, 1, 1, 2)]


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        x = torch.randn(shape, generator=g) * 10
        if x.numel() >= 3:  # sign of zero and subnormals must survive bitwise codecs
            x.view(-1)[0] = -0.0
            x.view(-1)[1] = 1e-40 if dtype in (torch.float32, torch.float64) else 0.0
        return x.to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -(2**40)), min(info.max, 2**40), shape, generator=g).to(
        dtype
    )


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point:
        view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.view(view), b.view(view))
    return torch.equal(a, b)


def _relu_like(shape=(8, 16, 7, 7), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(shape, generator=g))


def _decode_must_fail(data: bytes, **kw) -> PayloadError:
    with pytest.raises(PayloadError) as ei:
        decode(data, **kw)
    # The explicit checks caught it, not the last-resort wrapper around unexpected errors.
    assert not str(ei.value).startswith("malformed payload ("), str(ei.value)
    return ei.value


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + OTHER_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("spec", ["fp32", "fp32+zstd"])
def test_fp32_round_trip_is_bitwise(dtype, shape, spec):
    x = _tensor(dtype, shape)
    y = Codec.parse(spec).decode(Codec.parse(spec).encode(x))
    assert isinstance(y, torch.Tensor)
    assert _bits_equal(x, y)


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_tuples_keep_structure_and_non_float_tensors_exactly(spec):
    codec = Codec.parse(spec)
    parts = tuple(_tensor(d, s, i) for i, (d, s) in enumerate(zip(OTHER_DTYPES, SHAPES)))
    out = decode(codec.encode(parts))
    assert isinstance(out, tuple) and len(out) == len(parts)
    for a, b in zip(parts, out):
        assert _bits_equal(a, b)
    one = decode(codec.encode((torch.ones(3),)))
    assert isinstance(one, tuple) and len(one) == 1


@pytest.mark.parametrize("spec", ALL_SPECS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_every_codec_keeps_dtype_and_shape_within_bound(spec, dtype):
    codec = Codec.parse(spec)
    for shape in SHAPES:
        x = _tensor(dtype, shape)
        y = codec.decode(codec.encode(x))
        assert y.dtype == x.dtype and y.shape == x.shape
        if x.numel():
            err = (x.double() - y.double()).abs().max().item()
            assert err <= codec.error_bound(x)


def test_grad_and_non_contiguous_inputs_encode_like_plain_ones():
    x = torch.randn(4, 6, requires_grad=True)
    for spec in ALL_SPECS:
        codec = Codec.parse(spec)
        plain = x.detach().t().contiguous()
        assert codec.encode(x.t()) == codec.encode(plain)


@st.composite
def _float_tensors(draw, max_abs: float = float(np.finfo(np.float32).max)):
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=4)))
    n = int(np.prod(shape)) if shape else 1
    elems = st.floats(-max_abs, max_abs, allow_nan=False, allow_infinity=False, width=32)
    values = draw(st.lists(elems, min_size=n, max_size=n))
    return torch.tensor(values, dtype=torch.float32).reshape(shape)


@HYP
@given(
    x=_float_tensors(),
    kind=st.sampled_from(["int8", "int4"]),
    per_channel=st.booleans(),
    zstd=st.booleans(),
)
def test_quantized_error_within_bound_over_the_whole_float32_range(x, kind, per_channel, zstd):
    codec = Codec(kind, per_channel, "zstd" if zstd else None)
    y = decode(codec.encode(x))
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.isfinite(y).all()
    err = (x.double() - y.double()).abs().max().item()
    assert err <= codec.error_bound(x)


@HYP
@given(
    x=_float_tensors(max_abs=100.0),
    kind=st.sampled_from(["int8", "int4"]),
    dtype=st.sampled_from([torch.float64, torch.float16, torch.bfloat16]),
    per_channel=st.booleans(),
)
def test_quantized_error_within_bound_for_other_float_dtypes(x, kind, dtype, per_channel):
    x = x.to(dtype)
    codec = Codec(kind, per_channel)
    y = decode(codec.encode(x))
    assert y.dtype == dtype and y.shape == x.shape
    err = (x.double() - y.double()).abs().max().item()
    assert err <= codec.error_bound(x)


@HYP
@given(x=_float_tensors(max_abs=65504.0), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_fp16_error_is_relative(x, dtype):
    x = x.to(dtype)
    codec = Codec("fp16")
    y = decode(codec.encode(x))
    assert y.dtype == dtype and y.shape == x.shape
    err = (x.double() - y.double()).abs()
    assert (err <= x.double().abs() * 2.0**-11 * (1 + 2.0**-10) + 2.0**-25).all()
    if x.numel():
        assert err.max().item() <= codec.error_bound(x)


def test_error_bound_values():
    x = torch.linspace(-1.0, 3.0, 101)
    assert Codec("fp32").error_bound(x) == 0.0
    assert Codec("fp16").error_bound(x) == pytest.approx(3.0 * 2.0**-11, rel=1e-2)
    assert Codec("int8").error_bound(x) == pytest.approx(4.0 / 255 / 2, rel=1e-3)
    assert Codec("int4").error_bound(x) == pytest.approx(4.0 / 15 / 2, rel=1e-3)
    assert Codec("int8").error_bound(torch.arange(5)) == 0.0  # integers are sent exactly


def test_per_channel_beats_per_tensor_on_channel_varying_ranges():
    g = torch.Generator().manual_seed(1)
    ranges = torch.logspace(-3, 2, 16).reshape(1, 16, 1, 1)
    x = torch.randn(4, 16, 5, 5, generator=g) * ranges
    for kind in ("int8", "int4"):
        tensor_c, chan_c = Codec(kind), Codec(kind, per_channel=True)
        err_t = (decode(tensor_c.encode(x)) - x).abs().amax(dim=(0, 2, 3))
        err_c = (decode(chan_c.encode(x)) - x).abs().amax(dim=(0, 2, 3))
        assert (err_c <= err_t).all()
        assert err_c[:8].max() < err_t[:8].max() / 10  # small channels gain a lot
        assert chan_c.error_bound(x) <= tensor_c.error_bound(x)
        assert err_c.max().item() <= chan_c.error_bound(x)


@pytest.mark.parametrize("spec", ["int8", "int8-ch", "int4", "int4-ch"])
def test_constant_tensors_and_channels_round_trip_exactly(spec):
    codec = Codec.parse(spec)
    x = torch.full((3, 4, 2), 2.5)
    x[:, 1] = -7.0
    assert torch.equal(decode(codec.encode(x)), x)
    assert torch.equal(decode(codec.encode(torch.zeros(5, 2))), torch.zeros(5, 2))
    assert torch.equal(decode(codec.encode(torch.tensor(3.25))), torch.tensor(3.25))


def test_relu_zeros_stay_exact_zero_after_quantization():
    x = _relu_like()
    for spec in ("int8", "int4-ch"):
        y = decode(Codec.parse(spec).encode(x))
        assert (y[x == 0] == 0).all()


def test_float_extremes_quantize_without_overflow():
    big = float(np.finfo(np.float32).max)
    x = torch.tensor([[-big, big, 0.0], [big, big, big]])
    for spec in ("int8", "int8-ch", "int4"):
        y = decode(Codec.parse(spec).encode(x))
        assert torch.isfinite(y).all()
        assert (x.double() - y.double()).abs().max().item() <= Codec.parse(spec).error_bound(x)
    # One channel spans more than float32 holds, another is narrow at a large magnitude.
    narrow = [1e30, 1e30 * (1 + 2**-20), 1e30 * (1 + 2**-21)]
    mixed = torch.tensor([[[-big, big, 0.0]], [narrow]])
    mixed = mixed.transpose(0, 1).contiguous()  # channels on dim 1
    for spec in ("int8-ch", "int4-ch"):
        codec = Codec.parse(spec)
        y = decode(codec.encode(mixed))
        err_narrow = (mixed[:, 1].double() - y[:, 1].double()).abs().max().item()
        # the narrow channel keeps its own fine scale: error within float32 resolution there
        assert err_narrow <= 2 * float(np.spacing(np.float32(1e30)))
        assert (mixed.double() - y.double()).abs().max().item() <= codec.error_bound(mixed)
    for x0 in (torch.tensor(-big), torch.tensor([[-big, big]])):
        assert torch.isfinite(decode(Codec("int8").encode(x0))).all()
    h = torch.tensor([-65504.0, 65504.0], dtype=torch.float16)
    assert torch.isfinite(decode(Codec("int4").encode(h))).all()


# --------------------------------------------------------------------------- sizes
def test_zstd_shrinks_sparse_relu_payloads_and_round_trips():
    x = _relu_like((16, 32, 7, 7))
    for kind in ("fp32", "fp16", "int8", "int4"):
        plain, packed = Codec(kind), Codec(kind, lossless="zstd")
        a, b = plain.encode(x), packed.encode(x)
        assert len(b) < 0.8 * len(a)
        assert torch.equal(decode(a), decode(b))
    very_sparse = torch.zeros(64, 64)
    very_sparse[3, 5] = 1.0
    assert len(Codec(lossless="zstd").encode(very_sparse)) < 200


def test_sizes_scale_with_bits():
    x = _relu_like((64, 32, 14, 14))
    n = Codec("fp32").payload_bytes(x)
    assert n == x.numel() * 4 + 54  # 8 fixed + (1+1+16+4+8) descriptor + 16 body sizes
    assert Codec("fp16").payload_bytes(x) / n == pytest.approx(1 / 2, rel=1e-3)
    assert Codec("int8").payload_bytes(x) / n == pytest.approx(1 / 4, rel=1e-3)
    assert Codec("int4").payload_bytes(x) / n == pytest.approx(1 / 8, rel=1e-3)
    assert Codec("int8", True).payload_bytes(x) == Codec("int8").payload_bytes(x) + 31 * 8
    assert Codec("int8").bytes_per_sample(x) == Codec("int8").payload_bytes(x) / 64
    with pytest.raises(InputError, match="batch"):
        Codec().bytes_per_sample(torch.tensor(1.0))


def test_int4_packs_two_values_per_byte():
    x = torch.tensor([*range(14), 15], dtype=torch.float32)  # codes = values; odd count
    data = Codec("int4").encode(x)
    assert data[-8:] == bytes([0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0x0F])
    assert torch.equal(decode(data), x)


def test_wire_layout_of_a_small_message():
    data = Codec("int8").encode(torch.tensor([[0.0, 2.0]]))
    head = MAGIC + bytes([1, 2, 0, 1]) + bytes([0, 2]) + struct.pack("<II", 1, 2)
    params = struct.pack("<I", 1) + struct.pack("<ff", 2.0 / 255, 0.0)
    sizes = struct.pack("<Q", 2) + struct.pack("<QQ", 2, 2)
    assert data == head + params + sizes + bytes([0, 255])


# --------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("spec", ALL_SPECS)
def test_encoding_is_deterministic(spec):
    codec = Codec.parse(spec)
    x = _relu_like()
    first = codec.encode(x)
    assert codec.encode(x.clone()) == first
    assert Codec.parse(spec).encode(_relu_like()) == first
    y1, y2 = decode(first), decode(first)
    assert _bits_equal(y1, y2)


# --------------------------------------------------------------------------- API
def test_parse_and_spec_are_inverse():
    for spec in ALL_SPECS + ["int8-ch+zstd19", "fp16+zstd1"]:
        assert Codec.parse(spec).spec() == spec
    assert Codec.parse(" INT8-CH+ZSTD ") == Codec("int8", True, "zstd")
    assert Codec.parse("int4+zstd19").zstd_level == 19
    assert str(Codec("int4", lossless="zstd")) == "int4+zstd"


@pytest.mark.parametrize(
    "bad",
    ["", "fp8", "int8ch", "fp16-ch", "int8+lz4", "int8+zstd0", "int8+zstd23", 3, "int8:v3",
     "int8:v0", "int8:2", "int8:v2+zstd"],
)
def test_bad_specs_list_the_valid_ones(bad):
    with pytest.raises(InputError, match="valid"):
        Codec.parse(bad)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "int2"},
        {"kind": "fp32", "per_channel": True},
        {"lossless": "gzip"},
        {"zstd_level": 0},
        {"zstd_level": True},
        {"version": 3},
        {"version": 0},
        {"version": True},
        {"version": "2"},
    ],
)
def test_bad_codec_fields_raise(kwargs):
    with pytest.raises(InputError):
        Codec(**kwargs)


def test_codec_of_and_strict_codec_decode():
    data = Codec("int4", True, "zstd").encode(torch.ones(2, 3))
    assert codec_of(data) == Codec("int4", True, "zstd")
    assert Codec.parse("int4-ch+zstd19").decode(data).shape == (2, 3)  # level not on the wire
    with pytest.raises(PayloadError, match="encoded with codec 'int4-ch\\+zstd'"):
        Codec("int8").decode(data)
    with pytest.raises(PayloadError):
        codec_of(b"SPX")


@pytest.mark.parametrize("spec", ALL_SPECS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_are_rejected_on_encode(spec, bad):
    codec = Codec.parse(spec)
    x = torch.ones(2, 3, 4)
    x[1, 2, 3] = bad
    with pytest.raises(InputError, match="NaN/inf"):
        codec.encode(x)
    with pytest.raises(InputError, match="NaN/inf"):
        codec.encode((torch.ones(2), x.double()))
    with pytest.raises(InputError, match="NaN/inf"):
        codec.error_bound(x)


def test_unrepresentable_values_and_payloads_are_rejected_on_encode():
    with pytest.raises(InputError, match="float16 range"):
        Codec("fp16").encode(torch.tensor([1e5]))
    with pytest.raises(InputError, match="float32 range"):
        Codec("int8").encode(torch.tensor([1e300], dtype=torch.float64))
    with pytest.raises(InputError, match="tuple"):
        Codec().encode([torch.ones(1)])
    with pytest.raises(InputError, match="1..16"):
        Codec().encode(tuple(torch.ones(1) for _ in range(17)))
    with pytest.raises(InputError, match="1..16"):
        Codec().encode(())
    with pytest.raises(InputError, match="dtype"):
        Codec().encode(torch.ones(2, dtype=torch.complex64))
    with pytest.raises(InputError, match="dims"):
        Codec().encode(torch.ones([1] * 9))
    with pytest.raises(InputError, match="not a numpy array or torch.Tensor"):
        Codec().encode((torch.ones(1), [1.0]))
    with pytest.raises(InputError, match="numpy array"):
        Codec().encode(1.0)


# --------------------------------------------------------------------------- hostile input
def _samples() -> list[bytes]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 5, generator=g)
    return [
        Codec("fp32").encode((x, torch.arange(4), torch.tensor(True))),
        Codec("fp16").encode(x),
        Codec("int8", True).encode(x),
        Codec("int4", True, "zstd").encode((x, x[:, :, :3].to(torch.bfloat16))),
        Codec("fp32", lossless="zstd").encode(x),
        Codec("fp32", version=2).encode((x, torch.arange(4), torch.tensor(True))),
        Codec("int8", True, version=2).encode(x),
        Codec("int4", True, "zstd", version=2).encode((x, x[:, :, :3].to(torch.bfloat16))),
        Codec("int4", version=2).encode(torch.randn(1, 2, 7, 7, generator=g)),
    ]


def test_every_truncation_and_any_trailing_byte_is_rejected():
    for data in _samples():
        for n in range(len(data)):
            _decode_must_fail(data[:n])
        _decode_must_fail(data + b"\x00")
        _decode_must_fail(bytes(data) + data)


def test_single_byte_flips_never_raise_anything_but_payload_error():
    for data in _samples():
        reference = decode(data)
        n_out = len(reference) if isinstance(reference, tuple) else -1
        for i in range(len(data)):
            for delta in (0x01, 0x80, 0xFF):
                forged = bytearray(data)
                forged[i] ^= delta
                try:
                    out = decode(bytes(forged))
                except PayloadError as e:
                    assert not str(e).startswith("malformed payload ("), str(e)
                    continue
                assert (len(out) if isinstance(out, tuple) else -1) == n_out


@HYP
@given(st.binary(max_size=300))
def test_random_bytes_are_rejected_cleanly(data):
    for blob in (data, MAGIC + data, MAGIC + b"\x01" + data):
        try:
            decode(blob)
        except PayloadError as e:
            assert not str(e).startswith("malformed payload ("), str(e)


@HYP
@given(st.integers(0, 400), st.binary(min_size=1, max_size=8))
def test_random_overwrites_of_a_valid_message_are_rejected_cleanly(pos, junk):
    for data in _samples():
        forged = bytearray(data)
        pos2 = pos % len(data)
        forged[pos2 : pos2 + len(junk)] = junk
        try:
            decode(bytes(forged))
        except PayloadError as e:
            assert not str(e).startswith("malformed payload ("), str(e)


def _forge(
    *,
    version=1,
    kind=0,
    flags=0,
    tensors=((0, (2,), (), (), 8),),
    n=None,
    raw=None,
    stored=None,
    body=b"\x00" * 8,
) -> bytes:
    """A message built field by field: tensors are (dtype code, dims, scales, minimums, len)."""
    out = [MAGIC, bytes([version, kind, flags, len(tensors) if n is None else n])]
    for code, dims, scales, mins, blen in tensors:
        out.append(bytes([code, len(dims)]) + struct.pack(f"<{len(dims)}I", *dims))
        out.append(struct.pack("<I", len(scales)))
        out.append(struct.pack(f"<{len(scales)}f", *scales))
        out.append(struct.pack(f"<{len(mins)}f", *mins))
        out.append(struct.pack("<Q", blen))
    raw = sum(t[4] for t in tensors) if raw is None else raw
    stored = len(body) if stored is None else stored
    out.append(struct.pack("<QQ", raw, stored) + body)
    return b"".join(out)


def test_forge_helper_builds_valid_messages():
    assert torch.equal(decode(_forge()), torch.zeros(2))


def test_forged_huge_dims_fail_fast_without_allocating():
    forged = [
        _forge(tensors=((0, (2**31,) * 4, (), (), 2**63),)),
        _forge(tensors=((3, (2**32 - 1,) * 8, (), (), 2**64 - 1),)),
        _forge(tensors=((0, (2**31,), (), (), 2**33),), raw=2**33, stored=8),
        _forge(kind=2, tensors=((0, (2**20, 2**20), (1.0,), (0.0,), 2**40),)),
        _forge(tensors=tuple((0, (2**22,), (), (), 2**24) for _ in range(16)), flags=4),
    ]
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        for data in forged:
            e = _decode_must_fail(data)
            assert "max_bytes" in str(e)
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 0.5
    assert peak < 256 * 1024


def test_forged_zstd_sizes_and_bombs_are_refused_before_decompressing():
    cctx = zstandard.ZstdCompressor(level=3)
    bomb = cctx.compress(b"\x00" * (32 * 2**20))  # 32 MiB of zeros, a few KiB compressed
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(b"\x00" * (32 * 2**20))
    small = cctx.compress(b"\x00" * 8)
    cases = {
        "header declares a huge raw size": _forge(
            flags=2, tensors=((0, (2**20, 2**20), (), (), 2**42),), body=bomb
        ),
        "frame larger than the header says": _forge(flags=2, body=bomb),
        "frame without a content size": _forge(flags=2, body=no_size),
        "frame smaller than the header says": _forge(
            flags=2, tensors=((0, (4,), (), (), 16),), body=small
        ),
        "not a zstd frame": _forge(flags=2, body=b"\x00" * 8),
        "two frames": _forge(flags=2, body=small + small),
    }
    tracemalloc.start()
    try:
        for name, data in cases.items():
            e = _decode_must_fail(data)
            assert str(e), name
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 2**20  # the forged messages themselves are small; nothing was inflated
    assert torch.equal(decode(_forge(flags=2, body=small)), torch.zeros(2))


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"XXXX" + _forge()[4:], "magic"),
        (_forge(version=3), "version 3.*reads version.*1, 2"),
        (_forge(version=0), "version 0"),
        (_forge(kind=4), "unknown codec kind code 4.*int4"),
        (_forge(flags=8), "flag"),
        (_forge(flags=1), "per-channel"),
        (_forge(n=0, tensors=()), "0 tensors"),
        (_forge(n=17, tensors=()), "17 tensors"),
        (_forge(n=2), "not a tuple"),
        (_forge(tensors=((10, (2,), (), (), 8),)), "dtype code 10"),
        (_forge(tensors=((0, (1,) * 9, (), (), 4),), body=b"\x00" * 4), "ndim 9"),
        (_forge(tensors=((0, (3,), (), (), 8),)), "body length 8"),
        (_forge(tensors=((0, (2,), (), (), 8),), raw=9), "add up"),
        (_forge(tensors=((0, (2,), (), (), 8),), stored=9), "truncated"),
        (_forge(tensors=((0, (2,), (), (), 8),), stored=7), "trailing garbage"),
        (_forge(kind=2, tensors=((0, (8,), (), (), 8),)), "0 quantization parameters"),
        (_forge(kind=2, tensors=((0, (8,), (1.0, 1.0), (0.0, 0.0), 8),)), "expected 1"),
        (_forge(kind=2, tensors=((0, (8,), (float("nan"),), (0.0,), 8),)), "non-finite"),
        (_forge(kind=2, tensors=((0, (8,), (1.0,), (float("inf"),), 8),)), "non-finite"),
        (  # a signalling NaN scale
            _forge(kind=2, tensors=((0, (8,), (1.0,), (0.0,), 8),)).replace(
                struct.pack("<f", 1.0), struct.pack("<I", 0x7F800001)
            ),
            "non-finite",
        ),
        (_forge(kind=2, tensors=((0, (8,), (-1.0,), (0.0,), 8),)), "negative"),
        (_forge(kind=2, tensors=((0, (8,), (3e38,), (0.0,), 8),)), "range"),
        (_forge(kind=2, tensors=((1, (8,), (300.0,), (0.0,), 8),)), "range"),
        (_forge(kind=3, tensors=((0, (3,), (1.0,), (0.0,), 2),), body=b"\x00\xf0"), "nibble"),
        (_forge(body=b"\x00\x00\xc0\x7f" + b"\x00" * 4), "NaN/inf"),
        (_forge(kind=1, tensors=((0, (2,), (), (), 4),), body=b"\x00\x7c\x00\x00"), "NaN/inf"),
        (_forge(tensors=((9, (2,), (), (), 2),), body=b"\x01\x02"), "bool"),
    ],
)
def test_forged_headers_get_clear_errors(data, match):
    e = _decode_must_fail(data)
    assert re.search(match, str(e)), str(e)


def test_max_bytes_is_enforced_and_adjustable():
    x = torch.zeros(1000)
    data = Codec("int8").encode(x)  # ~1 KB on the wire, 4 KB decoded
    e = _decode_must_fail(data, max_bytes=2000)
    assert "max_bytes=2000" in str(e)
    assert torch.equal(decode(data, max_bytes=4000), x)
    _decode_must_fail(Codec().encode(x), max_bytes=3000)
    assert DEFAULT_MAX_BYTES == 64 * 2**20
    with pytest.raises(InputError):
        decode(data, max_bytes=0)


def test_non_bytes_input_is_a_payload_error():
    for bad in (None, "SPX1", 12, [1, 2]):
        with pytest.raises(PayloadError):
            decode(bad)  # type: ignore[arg-type]
    data = Codec("int4").encode(torch.ones(3))
    assert torch.equal(decode(bytearray(data)), decode(memoryview(data)))


# --------------------------------------------------------------------------- compact format (v2)
def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        out.append((v & 0x7F) | (0x80 if v > 0x7F else 0))
        v >>= 7
        if not v:
            return bytes(out)


def _forge2(*, kind=0, flags=0, tensors=((0, (2,), (), ()),), n=None, dims_bytes=None,
            body=b"\x00" * 8) -> bytes:
    """A version-2 message built field by field: tensors are (dtype code, dims, scales, mins)."""
    out = [MAGIC, bytes([2, kind, flags, len(tensors) if n is None else n])]
    for code, dims, scales, mins in tensors:
        out.append(bytes([code, len(dims)]))
        out.append(b"".join(_varint(d) for d in dims) if dims_bytes is None else dims_bytes)
        out.append(struct.pack(f"<{len(scales)}f", *scales))
        out.append(struct.pack(f"<{len(mins)}f", *mins))
    out.append(body)
    return b"".join(out)


def test_compact_wire_layout_of_a_small_message():
    data = Codec("int8", version=2).encode(torch.tensor([[0.0, 2.0]]))
    head = MAGIC + bytes([2, 2, 0, 1]) + bytes([0, 2, 1, 2])
    assert data == head + struct.pack("<ff", 2.0 / 255, 0.0) + bytes([0, 255])
    assert torch.equal(decode(_forge2()), torch.zeros(2))
    big = Codec("fp32", version=2).encode(torch.zeros(300, 1))
    assert big[8:12] == bytes([0, 2, 0xAC, 0x02]) + b"" and big[12] == 1  # 300 = 0xAC 0x02


def test_compact_header_of_one_bottleneck_sample():
    z = torch.randn(1, 2, 7, 7)
    v1, v2 = Codec("int4"), Codec("int4", version=2)
    assert len(v1.encode(z)) == 49 + 62
    assert len(v2.encode(z)) == 49 + 22  # 8 fixed + dtype, ndim, 4 one-byte dims + scale, min
    assert len(Codec("int8", version=2).encode(z[:, :1])) == 49 + 22
    assert torch.equal(decode(v1.encode(z)), decode(v2.encode(z)))  # same quantisation
    assert v2.bytes_per_sample(z.expand(64, 2, 7, 7)) == pytest.approx(49 + 22 / 64, abs=0.1)


def test_codec_of_and_decode_accept_either_version():
    x = torch.randn(3, 4)
    data = Codec("int8", True, "zstd", version=2).encode(x)
    assert codec_of(data) == Codec("int8", True, "zstd", version=2)
    assert codec_of(data).spec() == "int8-ch+zstd:v2"
    # the receiver needs no configuration: a version-1 Codec reads version 2 and vice versa
    assert torch.equal(Codec("int8", True, "zstd").decode(data), decode(data))
    v1 = Codec("int8", True, "zstd").encode(x)
    assert torch.equal(Codec("int8", True, "zstd", version=2).decode(v1), decode(data))
    with pytest.raises(PayloadError, match="encoded with codec 'int8-ch\\+zstd:v2'"):
        Codec("int4", version=2).decode(data)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (_forge2(dims_bytes=b"\x82\x00"), "non-minimal"),
        (_forge2(dims_bytes=b"\x80\x80\x80\x80\x80\x01"), "longer than 5"),
        (_forge2(dims_bytes=b"\xff\xff\xff\xff\x7f"), "exceeds 2\\*\\*32"),
        (_forge2(dims_bytes=b"\x82", body=b""), "truncated"),
        (_forge2(body=b"\x00" * 7), "truncated"),
        (_forge2(body=b"\x00" * 9), "trailing garbage"),
        (_forge2(n=2), "not a tuple"),
        (_forge2(tensors=((10, (2,), (), ()),)), "dtype code 10"),
        (_forge2(tensors=((0, (1,) * 9, (), ()),), body=b"\x00" * 4), "ndim 9"),
        (_forge2(kind=2, tensors=((0, (8,), (float("nan"),), (0.0,)),)), "non-finite"),
        (_forge2(kind=2, tensors=((0, (8,), (-1.0,), (0.0,)),)), "negative"),
        (_forge2(kind=2, tensors=((0, (8,), (3e38,), (0.0,)),)), "range"),
        (_forge2(kind=2, tensors=((0, (8,), (), ()),)), "truncated"),  # params missing
        (_forge2(kind=3, tensors=((0, (3,), (1.0,), (0.0,)),), body=b"\x00\xf0"), "nibble"),
        (_forge2(body=b"\x00\x00\xc0\x7f" + b"\x00" * 4), "NaN/inf"),
        (_forge2(flags=2, body=b"\x00" * 8), "not a zstd frame"),
        (_forge2(flags=2, body=b""), "zstd frame"),
    ],
)
def test_forged_compact_headers_get_clear_errors(data, match):
    e = _decode_must_fail(data)
    assert re.search(match, str(e)), str(e)


def test_forged_compact_huge_dims_and_zstd_bombs_fail_fast_without_allocating():
    cctx = zstandard.ZstdCompressor(level=3)
    bomb = cctx.compress(b"\x00" * (32 * 2**20))
    forged = [
        _forge2(tensors=((0, (2**31,) * 4, (), ()),)),
        _forge2(tensors=((3, (2**32 - 1,) * 8, (), ()),)),
        _forge2(kind=2, tensors=((0, (2**20, 2**20), (1.0,), (0.0,)),)),
        _forge2(tensors=tuple((0, (2**22,), (), ()) for _ in range(16)), flags=4),
        _forge2(flags=2, tensors=((0, (2**23,), (), ()),), body=bomb),  # 32 MiB < 64 MiB limit
        _forge2(flags=2, body=bomb),  # frame says 32 MiB, header 8 bytes
    ]
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        for i, data in enumerate(forged):
            e = _decode_must_fail(data, max_bytes=16 * 2**20)
            if i < 5:
                assert "max_bytes" in str(e), str(e)
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 0.5
    assert peak < 2 * 2**20
