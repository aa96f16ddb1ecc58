"""Quantization of the int8 / int4 codecs: parameters (scale and minimum per tensor or per
channel), codes and their packing, dequantization, and the round-trip error bound.

The arithmetic is specified in ``docs/WIRE_FORMAT.md`` ("Quantization"); it uses only exact
min/max and separately rounded IEEE-754 float32 operations, so it is deterministic.
"""

from __future__ import annotations

import numpy as np

from splitexit.errors import PayloadError

from .format import F32_MAX, FMAX, LEVELS, Descriptor, DType, Quant
from .tensors import Source, as_f32, nan_error

_MIN_NORMAL_F32 = 2.0**-126
_EPS32 = 2.0**-23
_WIDE = 2.0**127  # above this levels * scale, dequantization works at half scale
# Relative and absolute rounding of the final cast to the original dtype (generous).
_CAST_REL = {"float32": 0.0, "float64": 0.0, "float16": 2.0**-10, "bfloat16": 2.0**-7}
_CAST_ABS = {"float32": 1e-35, "float64": 1e-35, "float16": 2.0**-24, "bfloat16": 1e-35}


def bshape(ndim: int, n_params: int) -> tuple[int, ...]:
    """Broadcast shape of the per-tensor / per-channel parameters."""
    if n_params == 1:
        return ()
    return (1, n_params) + (1,) * (ndim - 2)


def quant_params(
    a: np.ndarray, per_channel: bool, levels: int, fmax: float, index: int
) -> tuple[Quant, np.ndarray, np.ndarray]:
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
        raise nan_error(index)
    scale = ((hi64 - lo64) / levels).astype(np.float32)
    scale[scale < _MIN_NORMAL_F32] = 0  # constant (or all-but-constant) channel
    while True:  # keep minimum + levels * scale within the dtype's range
        over = lo64 + levels * scale.astype(np.float64) > fmax
        if not over.any():
            break
        scale[over] = np.nextafter(scale[over], np.float32(0))
    return Quant(scale=scale, minimum=lo.astype(np.float32)), lo64, hi64


def quantize(x: Source, dt: DType, kind: str, per_channel: bool, index: int
             ) -> tuple[Quant, bytes]:
    """The parameters and the body (codes, int4 packed two per byte) of a floating tensor."""
    levels = LEVELS[kind]
    a = as_f32(x, dt, index)
    if a.size == 0:
        return Quant(np.zeros(0, np.float32), np.zeros(0, np.float32)), b""
    q, lo64, hi64 = quant_params(a, per_channel, levels, FMAX[dt.name], index)
    span = float(np.max(hi64 - lo64))
    shape = bshape(a.ndim, len(q.scale))
    minimum = q.minimum.reshape(shape)
    scale = np.where(q.scale > 0, q.scale, np.float32(1.0)).astype(np.float32)
    scale = scale.reshape(shape)
    if span <= F32_MAX:  # x - minimum cannot overflow float32
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
    if kind == "int4":
        if codes.size % 2:
            codes = np.concatenate([codes, np.zeros(1, np.uint8)])
        pairs = codes.reshape(-1, 2)
        body = (pairs[:, 0] | (pairs[:, 1] << 4)).astype(np.uint8).tobytes()
    else:
        body = codes.tobytes()
    return q, body


def error_bound(x: Source, dt: DType, kind: str, per_channel: bool, index: int) -> float:
    """Largest round-trip error of quantizing a non-empty floating tensor: half the largest
    step plus float32 rounding and the final cast to the original dtype."""
    levels = LEVELS[kind]
    a = as_f32(x, dt, index)
    q, lo64, hi64 = quant_params(a, per_channel, levels, FMAX[dt.name], index)
    maxabs = float(max(np.max(np.abs(lo64)), np.max(np.abs(hi64))))
    return (float(np.max(q.scale)) / 2 + (8 * _EPS32 + _CAST_REL[dt.name]) * maxabs
            + _CAST_ABS[dt.name])


def dequantize(bodies: memoryview, off: int, d: Descriptor, kind: str, index: int
               ) -> np.ndarray:
    """A quantized body as an array of the original dtype (bfloat16 as int16 bits).

    Raises:
        PayloadError: an int4 body of odd length whose padding nibble is not 0.
    """
    dt = d.dt
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
    shape = bshape(len(d.dims), len(d.quant.scale))
    scale = d.quant.scale.reshape(shape)
    minimum = d.quant.minimum.reshape(shape)
    levels = LEVELS[kind]
    fmax = FMAX[dt.name]
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
            np.minimum(x, np.float32(min(fmax, F32_MAX)), out=x)
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
