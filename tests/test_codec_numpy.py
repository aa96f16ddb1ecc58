"""The wire codec without PyTorch: numpy payloads encode to the very bytes tensors do, and
decode_arrays is decode's decoder returning numpy (so an edge device needs no torch)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import splitexit.errors
from splitexit.errors import InputError, PayloadError
from splitexit.split.codec import MAGIC, Codec, decode, decode_arrays

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

# every spelling Codec.parse accepts, up to the zstd level
SPECS = [
    f"{kind}{ch}{z}{v}"
    for kind in ("fp32", "fp16", "int8", "int4")
    for ch in (("", "-ch") if kind.startswith("int") else ("",))
    for z in ("", "+zstd", "+zstd1", "+zstd19")
    for v in ("", ":v1", ":v2")
]
HYP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NP_DTYPES = (
    np.float32,
    np.float16,
    np.float64,
    np.uint8,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.bool_,
)
SHAPES = [(), (0,), (1,), (7,), (3, 0, 2), (2, 3), (2, 3, 4, 5), (1, 16, 14, 14)]
SRC = Path(splitexit.errors.__file__).resolve().parent  # src/splitexit


def _array(dtype, shape, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(np.bool_)
    if dtype.kind == "f":
        x = np.asarray(rng.standard_normal(shape) * 10).astype(dtype)
        if x.size >= 3:  # sign of zero and subnormals must survive bitwise codecs
            x.reshape(-1)[0] = -0.0
            x.reshape(-1)[1] = 1e-40 if dtype != np.float16 else 3e-8
        return x
    info = np.iinfo(dtype)
    return np.asarray(rng.integers(max(info.min, -(2**40)), min(info.max, 2**40), shape)).astype(
        dtype
    )


def _same(a: np.ndarray, b) -> bool:
    """Bit-identical: dtype, shape and every byte (numpy array vs array or tensor)."""
    if isinstance(b, torch.Tensor):
        if b.dtype == torch.bfloat16:
            return False
        b = b.numpy()
    return (
        isinstance(a, np.ndarray)
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.tobytes() == b.tobytes()
    )


def _same_payload(arrays, tensors) -> bool:
    if isinstance(arrays, tuple) != isinstance(tensors, tuple):
        return False
    if isinstance(arrays, tuple):
        return len(arrays) == len(tensors) and all(map(_same, arrays, tensors))
    return _same(arrays, tensors)


def _random_f32(seed: int) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    rng = np.random.default_rng(seed)
    scale = np.float32(np.exp(rng.uniform(-20, 7)))  # within the float16 range, for fp16
    one = rng.standard_normal((1, 16, 14, 14)).astype(np.float32) * scale
    parts = (
        np.maximum(one, 0),  # relu-like
        rng.uniform(-5, 5, (2, 3)).astype(np.float32),
        np.full((), rng.standard_normal(), np.float32),
        rng.standard_normal((2, 4, 3, 3)).astype(np.float32) * np.float32(1e4),
    )
    return one, parts


# --------------------------------------------------------------------------- without torch
def test_codec_imports_encodes_and_decodes_without_torch(tmp_path):
    one, parts = _random_f32(7)
    payloads = {"one": one, "parts": parts}
    np.savez(tmp_path / "payloads.npz", one=one, **{f"p{i}": p for i, p in enumerate(parts)})
    code = textwrap.dedent(
        f"""
        import sys, types, json
        sys.modules["torch"] = None  # "import torch" now fails as if not installed
        pkg = types.ModuleType("splitexit")
        pkg.__path__ = [{str(SRC)!r}]
        sys.modules["splitexit"] = pkg  # skip the package __init__ (it may import torch)
        import numpy as np
        import splitexit.split.codec as codec

        z = np.load({str(tmp_path / "payloads.npz")!r}, allow_pickle=False)
        payloads = {{"one": z["one"], "parts": tuple(z[f"p{{i}}"] for i in range(4))}}
        out = {{}}
        for spec in {SPECS!r}:
            c = codec.Codec.parse(spec)
            for name, p in payloads.items():
                msg = c.encode(p)
                back = codec.decode_arrays(msg)
                assert type(back) is type(p), (spec, name)
                assert isinstance(c.decode_arrays(msg), type(p))
                assert c.payload_bytes(p) == len(msg)
                c.error_bound(p)
                out[spec + "/" + name] = msg.hex()
        try:
            codec.decode(bytes.fromhex(out["fp32/one"]))
        except ModuleNotFoundError as e:
            assert "decode_arrays" in str(e), str(e)
        else:
            raise AssertionError("decode returned tensors without torch")
        try:
            codec.Codec().encode(np.array([1.0, np.nan], np.float32))
        except codec.InputError as e:
            assert "NaN/inf" in str(e)
        loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        assert loaded == ["torch"] and sys.modules["torch"] is None, loaded
        print(json.dumps(out))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    messages = json.loads(proc.stdout)
    # what the torch-free process wrote is what this process writes for the same tensors
    for spec in SPECS:
        c = Codec.parse(spec)
        for name, p in payloads.items():
            t = tuple(map(torch.from_numpy, p)) if isinstance(p, tuple) else torch.from_numpy(p)
            assert bytes.fromhex(messages[f"{spec}/{name}"]) == c.encode(t), (spec, name)


# --------------------------------------------------------------------------- same bytes
@pytest.mark.parametrize("spec", SPECS)
def test_numpy_and_torch_payloads_encode_to_the_same_bytes(spec):
    c = Codec.parse(spec)
    for seed in range(3):
        one, parts = _random_f32(seed)
        assert c.encode(one) == c.encode(torch.from_numpy(one))
        assert c.encode(parts) == c.encode(tuple(map(torch.from_numpy, parts)))
        t = torch.from_numpy(one)
        assert c.encode(t) == c.encode(t.numpy())  # tensor.numpy(), as an edge would hold it
        assert c.payload_bytes(one) == c.payload_bytes(t)
        assert c.bytes_per_sample(parts) == c.bytes_per_sample(tuple(map(torch.from_numpy, parts)))
        assert c.error_bound(parts) == c.error_bound(tuple(map(torch.from_numpy, parts)))


@pytest.mark.parametrize("spec", [s for s in SPECS if "zstd1" not in s])
@pytest.mark.parametrize("dtype", NP_DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_wire_dtype_encodes_alike_from_numpy_and_torch(spec, dtype):
    c = Codec.parse(spec)
    arrays = tuple(_array(dtype, s, i) for i, s in enumerate(SHAPES))
    tensors = tuple(map(torch.from_numpy, arrays))
    assert c.encode(arrays) == c.encode(tensors)
    for a, t in zip(arrays, tensors, strict=True):
        assert c.encode(a) == c.encode(t)
        assert c.error_bound(a) == c.error_bound(t)
        if a.ndim and a.shape[0]:
            assert c.bytes_per_sample(a) == c.bytes_per_sample(t)


@HYP
@given(
    x=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=0, max_dims=4, min_side=1, max_side=5),
        elements=st.floats(allow_nan=False, allow_infinity=False, width=32),
    ),
    y=hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4),
        elements=st.floats(-65504, 65504, allow_nan=False, allow_infinity=False),
    ),
    spec=st.sampled_from(SPECS),
)
def test_arbitrary_float_arrays_encode_like_tensors(x, y, spec):
    c = Codec.parse(spec)
    for p in (x, (x, y)):
        t = tuple(map(torch.from_numpy, p)) if isinstance(p, tuple) else torch.from_numpy(p)
        try:
            expected = c.encode(t)
        except InputError as e:  # e.g. beyond the float16 range: the same error from numpy
            with pytest.raises(InputError) as ei:
                c.encode(p)
            assert str(ei.value) == str(e)
            continue
        assert c.encode(p) == expected
        assert _same_payload(decode_arrays(expected), decode(expected))


def test_float64_to_fp16_rounds_like_torch():
    # torch casts float64 -> float16 through float32 (two roundings); numpy rounds once
    v = np.array([1 + 2**-11 + 2**-40, 2**-25 + 2**-60, 1.0, -3.5], np.float64)
    for spec in ("fp16", "fp16:v2"):
        assert Codec.parse(spec).encode(v) == Codec.parse(spec).encode(torch.from_numpy(v))


def test_layouts_byte_orders_and_views_encode_like_contiguous_arrays():
    a = _array(np.float32, (4, 6), 1)
    c = Codec("int8", per_channel=True)
    ref = c.encode(np.ascontiguousarray(a.T))
    assert c.encode(a.T) == ref  # non-contiguous
    assert c.encode(np.asfortranarray(a.T)) == ref
    ro = a.T.copy()
    ro.flags.writeable = False
    assert c.encode(ro) == ref
    assert Codec().encode(a.astype(">f4")) == Codec().encode(a)  # big-endian input
    assert Codec().encode(a[::-1, ::2]) == Codec().encode(torch.from_numpy(a).flip(0)[:, ::2])
    mixed = (a, torch.from_numpy(a).to(torch.bfloat16))
    assert c.encode(mixed) == c.encode(tuple(torch.as_tensor(p) for p in mixed))
    assert np.array_equal(a, _array(np.float32, (4, 6), 1))  # the input is left alone


def test_numpy_payload_errors_match_the_torch_ones():
    for spec in SPECS:
        c = Codec.parse(spec)
        for bad in (np.nan, np.inf, -np.inf):
            x = np.ones((2, 3, 4), np.float32)
            x[1, 2, 3] = bad
            for p in (x, (np.ones(2, np.float32), x.astype(np.float64)), x.astype(np.float16)):
                with pytest.raises(InputError, match="NaN/inf"):
                    c.encode(p)
                with pytest.raises(InputError, match="NaN/inf"):
                    c.error_bound(p)
    with pytest.raises(InputError, match="float16 range"):
        Codec("fp16").encode(np.array([1e5], np.float32))
    with pytest.raises(InputError, match="float32 range"):
        Codec("int8").encode(np.array([1e300]))
    with pytest.raises(InputError, match="unsupported dtype complex64"):
        Codec().encode(np.ones(2, np.complex64))
    with pytest.raises(InputError, match="dtype"):
        Codec().encode(np.array(["a"]))
    with pytest.raises(InputError, match="dtype"):
        Codec().encode(np.array([1, None], dtype=object))
    with pytest.raises(InputError, match="dims"):
        Codec().encode(np.ones([1] * 9, np.float32))
    with pytest.raises(InputError, match="1..16"):
        Codec().encode(tuple(np.ones(1) for _ in range(17)))
    with pytest.raises(InputError, match="tuple"):
        Codec().encode([np.ones(1)])
    with pytest.raises(InputError, match="not a numpy array or torch.Tensor"):
        Codec().encode((np.ones(1), 3.0))
    with pytest.raises(InputError, match="batch"):
        Codec().bytes_per_sample(np.ones(()))


# --------------------------------------------------------------------------- one decoder
@pytest.mark.parametrize("spec", [s for s in SPECS if "zstd1" not in s])
def test_decode_arrays_is_decode_bit_for_bit(spec):
    c = Codec.parse(spec)
    for dtype in NP_DTYPES:
        arrays = tuple(_array(dtype, s, i) for i, s in enumerate(SHAPES))
        msg = c.encode(arrays)
        out, ref = decode_arrays(msg), decode(msg)
        assert _same_payload(out, ref)
        assert _same_payload(c.decode_arrays(msg), c.decode(msg))
        for a in out:
            assert a.flags.writeable and a.flags.c_contiguous and a.dtype.isnative
        one = decode_arrays(c.encode(arrays[-1]))
        assert isinstance(one, np.ndarray) and _same(one, decode(c.encode(arrays[-1])))
        if spec.startswith("fp32"):
            assert all(map(_same, arrays, out))  # lossless, dtype included (bool stays bool)


@pytest.mark.parametrize("spec", ["fp32", "int8", "int4-ch+zstd", "int8-ch:v2"])
def test_quantized_float16_and_extreme_ranges_decode_alike(spec):
    c = Codec.parse(spec)
    rng = np.random.default_rng(5)
    for lim, dtype in ((65504.0, np.float16), (3.4e38, np.float32), (3.4e38, np.float64)):
        x = rng.uniform(-lim, lim, (2, 3, 5)).astype(dtype)
        msg = c.encode(x)
        assert msg == c.encode(torch.from_numpy(x))
        assert _same(decode_arrays(msg), decode(msg))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_quantized_16_bit_floats_round_to_nearest_even_like_torch(dtype):
    # 1 + q * 2**-8 (and 1 + q * 2**-11) is halfway between two bfloat16 (float16) values for
    # every odd q, with either parity of the lower neighbour: ties must go to even
    code = {torch.bfloat16: 2, torch.float16: 1}[dtype]
    for scale, minimum in (
        (2.0**-8, 1.0),
        (2.0**-11, 1.0),
        (2.0**-8 * (1 + 2.0**-8), 0.0),
        (0.0123, 1.5),
    ):
        msg = (
            MAGIC
            + bytes([2, 2, 0, 1, code, 1, 0x80, 0x02])  # v2, int8, one tensor (256,)
            + np.array([scale, minimum], "<f4").tobytes()
            + bytes(range(256))
        )
        q = torch.arange(256, dtype=torch.float32)
        want = (q * torch.tensor(scale, dtype=torch.float32) + minimum).to(dtype)
        got = decode(msg)
        assert got.dtype == dtype and torch.equal(got.view(torch.int16), want.view(torch.int16))
        if dtype == torch.float16:
            assert _same(decode_arrays(msg), got)


def _golden_payload() -> tuple[np.ndarray, ...]:
    """Values computed exactly (integer arithmetic, one float32 division) on any machine."""

    def vals(n: int, k: int) -> np.ndarray:
        i = np.arange(n, dtype=np.int64)
        return ((i * 2654435761 + k) % 65521).astype(np.float32) / np.float32(997) - np.float32(30)

    return (
        vals(120, 1).reshape(2, 3, 4, 5),
        (vals(7, 2) * np.float32(1e-3)).reshape(1, 7),
        vals(24, 3).reshape(2, 3, 4).astype(np.float16),
        (vals(15, 4).astype(np.float64) * 1000.3).reshape(3, 5),
    )


# sha256 prefixes of (message, decoded tensors), recorded with the torch-only codec this one
# replaced: the wire bytes and the decoded values must not change (zstd bytes may change with
# the zstd release, so only the decoded values are pinned there).
GOLDEN = {
    "fp32": ("518b7b670eb2dacb", "5c34c2959c61df6c"),
    "fp16": ("02c0c6f8a1bccfc4", "9021c05eb69555ff"),
    "int8": ("12b2df95e1e4252a", "792e88a356d49928"),
    "int8-ch": ("cd217b40fa2cdc42", "9e84cf74688bcd42"),
    "int4": ("704bea8e3ae44928", "e5ecdd57c22b63ae"),
    "int4-ch": ("0a46a40e57ec7cfd", "2eb869d1056760d2"),
    "int8-ch+zstd": (None, "9e84cf74688bcd42"),
    "int4:v2": ("9d42f4c90f9801ff", "e5ecdd57c22b63ae"),
    "int8-ch:v2": ("6731a8aaf8bbcce4", "9e84cf74688bcd42"),
}


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("spec", list(GOLDEN))
def test_wire_bytes_and_decoded_values_are_those_of_the_torch_only_codec(spec):
    arrays = _golden_payload()
    bf16 = torch.from_numpy(arrays[0][0]).to(torch.bfloat16)
    c = Codec.parse(spec)
    msg = c.encode((*map(torch.from_numpy, arrays), bf16))
    assert c.encode((*arrays, bf16)) == msg  # numpy arrays with one tensor in the tuple
    want_msg, want_values = GOLDEN[spec]
    if want_msg is not None:
        assert hashlib.sha256(msg).hexdigest()[:16] == want_msg
    assert _digest(decode(msg)) == want_values
    with pytest.raises(PayloadError, match="bfloat16"):
        decode_arrays(msg)
    plain = c.encode(arrays)
    assert _same_payload(decode_arrays(plain), decode(plain))


def test_bfloat16_needs_torch_to_decode():
    x = torch.randn(2, 3).to(torch.bfloat16)
    for spec in ("fp32", "int8", "int4-ch+zstd:v2"):
        msg = Codec.parse(spec).encode((torch.ones(2), x))
        with pytest.raises(PayloadError, match="bfloat16") as ei:
            decode_arrays(msg)
        assert "splitexit.split.codec.decode" in str(ei.value)
        with pytest.raises(PayloadError, match="bfloat16"):
            Codec.parse(spec).decode_arrays(msg)
        assert decode(msg)[1].dtype == torch.bfloat16
    with pytest.raises(PayloadError, match="bfloat16"):  # empty too: the dtype is the problem
        decode_arrays(Codec().encode(torch.zeros(0, dtype=torch.bfloat16)))


def test_decode_arrays_validates_like_decode():
    x = np.arange(1000, dtype=np.float32)
    data = Codec("int8").encode(x)
    with pytest.raises(PayloadError, match="max_bytes=2000"):
        decode_arrays(data, max_bytes=2000)
    assert decode_arrays(data, max_bytes=4000).shape == (1000,)
    with pytest.raises(InputError):
        decode_arrays(data, max_bytes=0)
    with pytest.raises(PayloadError, match="encoded with codec 'int8'"):
        Codec("int4").decode_arrays(data)
    for bad in (None, "SPX1", 12, [1, 2]):
        with pytest.raises(PayloadError):
            decode_arrays(bad)  # type: ignore[arg-type]
    assert _same(decode_arrays(bytearray(data)), decode_arrays(memoryview(data)))


# --------------------------------------------------------------------------- hostile input
def _samples() -> list[bytes]:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 5)).astype(np.float32)
    return [
        Codec("fp32").encode((x, np.arange(4), np.array(True))),
        Codec("fp16").encode(x.astype(np.float64)),
        Codec("int8", True).encode(x),
        Codec("int4", True, "zstd").encode((x, x[:, :, :3].astype(np.float16))),
        Codec("fp32", version=2).encode((x, np.arange(4, dtype=np.int16), np.array(True))),
        Codec("int4", version=2).encode(rng.standard_normal((1, 2, 7, 7)).astype(np.float32)),
        Codec("int8", version=2).encode((x, torch.from_numpy(x).to(torch.bfloat16))),
    ]


def _same_outcome(data: bytes) -> None:
    """decode_arrays and decode accept and reject alike, with the same values or message."""
    try:
        ref = decode(data)
    except PayloadError as e:
        assert not str(e).startswith("malformed payload ("), str(e)
        with pytest.raises(PayloadError) as ei:
            decode_arrays(data)
        assert str(ei.value) == str(e)
        return
    refs = ref if isinstance(ref, tuple) else (ref,)
    if any(t.dtype == torch.bfloat16 for t in refs):
        with pytest.raises(PayloadError, match="bfloat16"):
            decode_arrays(data)
        return
    assert _same_payload(decode_arrays(data), ref)


def test_every_truncation_and_byte_flip_fails_or_decodes_alike():
    for data in _samples():
        _same_outcome(data)
        for n in range(len(data)):
            with pytest.raises(PayloadError):
                decode_arrays(data[:n])
        with pytest.raises(PayloadError):
            decode_arrays(data + b"\x00")
        for i in range(len(data)):
            for delta in (0x01, 0x80, 0xFF):
                forged = bytearray(data)
                forged[i] ^= delta
                _same_outcome(bytes(forged))


@HYP
@given(st.binary(max_size=300))
def test_decode_arrays_rejects_random_bytes_cleanly(data):
    for blob in (data, MAGIC + data, MAGIC + b"\x01" + data, MAGIC + b"\x02" + data):
        try:
            decode_arrays(blob)
        except PayloadError as e:
            assert not str(e).startswith("malformed payload ("), str(e)


@HYP
@given(st.integers(0, 400), st.binary(min_size=1, max_size=8))
def test_decode_arrays_rejects_random_overwrites_cleanly(pos, junk):
    for data in _samples():
        forged = bytearray(data)
        pos2 = pos % len(data)
        forged[pos2 : pos2 + len(junk)] = junk
        _same_outcome(bytes(forged))


@HYP
@given(st.integers(0, 400), st.integers(0, 400))
def test_decode_arrays_rejects_cut_and_spliced_messages_cleanly(cut, splice):
    samples = _samples()
    for a, b in zip(samples, samples[1:] + samples[:1], strict=True):
        _same_outcome(a[: cut % len(a)] + b[splice % len(b) :])
