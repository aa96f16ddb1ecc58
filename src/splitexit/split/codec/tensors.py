"""Payload tensors and arrays on the wire: validation, dtype lookup, the bitwise and float16
bodies, and the conversion of decoded arrays to numpy or torch payloads.

PyTorch is never imported here at module level: a tensor can only exist once torch has been
imported, so torch is taken from ``sys.modules`` where a tensor is handled, and imported only
to return tensors (:func:`to_torch`).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias

import numpy as np

from splitexit.errors import InputError, PayloadError

from .format import (
    BF16,
    BY_ARRAY,
    DTYPES,
    F32_MAX,
    MAX_NDIM,
    MAX_TENSORS,
    U32_MAX,
    Descriptor,
    DType,
)

if TYPE_CHECKING:
    import torch

Payload: TypeAlias = "torch.Tensor | tuple[torch.Tensor, ...]"
"""What crosses a cut: one tensor, or a tuple of tensors."""
ArrayPayload: TypeAlias = "np.ndarray | tuple[np.ndarray, ...]"
"""A payload as numpy arrays (what :func:`decode_arrays` returns; :meth:`Codec.encode` takes it)."""
Source: TypeAlias = "np.ndarray | torch.Tensor"
Decoded: TypeAlias = "tuple[list[np.ndarray], list[DType], bool]"
"""What the decoder returns: the arrays, their wire dtypes, and whether it was a tuple."""

_BY_TORCH: dict[Any, DType] = {}  # torch.dtype -> DType, filled on first use of a tensor
_SERIAL_CHUNK = 32768  # torch's intra-op grain size: chunks this size run on one thread


# ---------------------------------------------------------------------- torch, when present
def require_torch(what: str) -> Any:
    """The torch module; ``ModuleNotFoundError`` naming ``what`` when it is not installed."""
    try:
        import torch
    except ImportError:
        torch = None
    if torch is None:
        raise ModuleNotFoundError(
            f"{what} returns torch tensors and needs PyTorch, which is not installed; use "
            "splitexit.split.codec.decode_arrays for numpy arrays, or install torch"
        )
    return torch


def _torch_dtypes(torch: Any) -> dict[Any, DType]:
    """torch.dtype -> wire dtype (built once, on the first tensor seen)."""
    if not _BY_TORCH:
        _BY_TORCH.update({getattr(torch, d.name): d for d in DTYPES})
    return _BY_TORCH


# ---------------------------------------------------------------------- payload validation
def as_items(payload: object) -> tuple[list[tuple[Source, DType]], bool]:
    """Validate a payload: each tensor or array with its wire dtype.

    Arrays come back C-contiguous in native byte order; tensors detached, on the CPU and
    contiguous. Tensors stay tensors (their casts run in torch, and :func:`np_of` views them
    only where numpy needs them); arrays are never converted to tensors.
    """
    torch = sys.modules.get("torch")  # a tensor exists only once torch has been imported
    tensor_type = torch.Tensor if torch is not None else ()  # () matches nothing
    if isinstance(payload, tuple):
        xs, is_tuple = payload, True
        if not 1 <= len(xs) <= MAX_TENSORS:
            raise InputError(f"a payload tuple must hold 1..{MAX_TENSORS} tensors, got {len(xs)}")
    elif isinstance(payload, (np.ndarray, tensor_type)):
        xs, is_tuple = (payload,), False
    else:
        raise InputError(
            "a payload is a torch.Tensor or numpy array, or a tuple of them, got "
            + type(payload).__name__
            + ("; pass tuple(...)" if isinstance(payload, list) else "")
        )
    items: list[tuple[Source, DType]] = []
    for i, x in enumerate(xs):
        if isinstance(x, tensor_type):
            items.append(_tensor_item(torch, x, i))
        elif isinstance(x, np.ndarray):
            items.append(_array_item(x, i))
        else:
            raise InputError(
                f"payload item {i} is a {type(x).__name__}, not a numpy array or torch.Tensor"
            )
    return items, is_tuple


def _dims_error(shape: tuple[int, ...], index: int) -> NoReturn:
    """Raise for a shape with more than MAX_NDIM dims or a dim beyond u32."""
    if len(shape) > MAX_NDIM:
        raise InputError(
            f"payload tensor {index} has {len(shape)} dims; the wire format allows at most "
            f"{MAX_NDIM}; reshape it"
        )
    raise InputError(f"payload tensor {index} has a dim larger than 2**32 - 1")


def _tensor_item(torch: Any, t: torch.Tensor, index: int) -> tuple[torch.Tensor, DType]:
    if t.layout != torch.strided:
        raise InputError(
            f"payload tensor {index} has layout {t.layout}; convert it with .to_dense()"
        )
    dt = (_BY_TORCH or _torch_dtypes(torch)).get(t.dtype)
    if dt is None:
        raise InputError(
            f"payload tensor {index} has unsupported dtype {t.dtype}; supported: "
            + ", ".join(d.name for d in DTYPES)
        )
    shape = t.shape
    if len(shape) > MAX_NDIM or (shape and max(shape) > U32_MAX):
        _dims_error(shape, index)
    return t.detach().cpu().contiguous(), dt


def _array_item(a: np.ndarray, index: int) -> tuple[np.ndarray, DType]:
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    dt = BY_ARRAY.get(a.dtype)
    if dt is None:
        raise InputError(
            f"payload array {index} has unsupported dtype {a.dtype}; supported: "
            + ", ".join(str(d.array) for d in DTYPES if d.array is not None)
            + " (bfloat16 only as a torch.Tensor)"
        )
    shape = a.shape
    if len(shape) > MAX_NDIM or (shape and max(shape) > U32_MAX):
        _dims_error(shape, index)
    if type(a) is not np.ndarray:  # a subclass (np.matrix, ...): its plain data
        a = np.asarray(a)
    if not a.flags.c_contiguous:
        a = a.copy(order="C")
    return a, dt


def numel(x: Source) -> int:
    """Number of elements of a tensor or array."""
    return x.size if isinstance(x, np.ndarray) else x.numel()


def np_of(x: Source, dt: DType) -> np.ndarray:
    """The elements as a numpy array (a view): bfloat16 as int16 bits, bool as uint8."""
    if dt.view is None:
        return x if isinstance(x, np.ndarray) else x.numpy()
    if isinstance(x, np.ndarray):
        return x.view(dt.view)
    return x.view(getattr(sys.modules["torch"], dt.view)).numpy()


def nan_error(index: int) -> InputError:
    """The error for a payload holding NaN or inf."""
    return InputError(
        f"payload contains NaN/inf (tensor {index}); the wire format carries finite values "
        "only: fix the model or input producing them (e.g. torch.nan_to_num / np.nan_to_num)"
    )


def _cast(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """``t.to(torch.<dtype>)`` (flattened), one thread-sized chunk at a time.

    Elementwise casts are exact IEEE roundings either way; running them in chunks keeps them
    off torch's thread pool, whose synchronisation costs milliseconds on a busy small CPU.
    """
    torch = sys.modules["torch"]  # only called with tensors
    flat = t.reshape(-1)
    out = torch.empty(flat.numel(), dtype=getattr(torch, dtype))
    for i in range(0, flat.numel(), _SERIAL_CHUNK):
        out[i : i + _SERIAL_CHUNK].copy_(flat[i : i + _SERIAL_CHUNK])
    return out


def bits_finite(bits: np.ndarray, exp_mask: int) -> bool:
    """True if no 16-bit float pattern (float16 / bfloat16 as uint16) is inf or NaN."""
    return not bool(np.any((bits & exp_mask) == exp_mask))


def np_finite(arr: np.ndarray, dt: DType) -> bool:
    """All elements finite; ``arr`` as :func:`np_of` gives it (bfloat16 as bits)."""
    if dt.name == "float16":
        return bits_finite(arr.view(np.uint16), 0x7C00)
    if dt is BF16:
        return bits_finite(arr.view(np.uint16), 0x7F80)
    return bool(np.isfinite(arr).all())


def as_f32(x: Source, dt: DType, index: int) -> np.ndarray:
    """A non-empty floating tensor or array as a float32 array (no copy for float32)."""
    if dt.name == "float32":
        return np_of(x, dt)
    if dt.name == "float64":
        a64 = np_of(x, dt)
        if not bool(np.isfinite(a64).all()):
            raise nan_error(index)
        with np.errstate(over="ignore"):
            a = a64.astype(np.float32)
        if not bool(np.isfinite(a).all()):
            raise InputError(
                f"payload tensor {index} (float64) has values beyond the float32 range "
                f"(|x| > {F32_MAX:.4g}), which int8/int4 quantization cannot represent; "
                "rescale it or use the 'fp32' codec"
            )
        return a
    if isinstance(x, np.ndarray):  # float16 (exact)
        return x.astype(np.float32)
    return _cast(x, "float32").numpy().reshape(x.shape)  # float16 / bfloat16 tensor


# ---------------------------------------------------------------------- bodies
def _le_bytes(arr: np.ndarray, wire: np.dtype) -> bytes | memoryview:
    if sys.byteorder != "little" and arr.dtype.itemsize > 1:
        arr = arr.astype(wire)
    return memoryview(np.ascontiguousarray(arr)).cast("B")


def raw_body(x: Source, dt: DType, index: int) -> bytes | memoryview:
    """The bitwise body: the elements in C order, little-endian."""
    arr = np_of(x, dt)
    if arr.size == 0:
        return b""
    if dt.floating and not np_finite(arr, dt):
        raise nan_error(index)
    return _le_bytes(arr, dt.wire)


def half_body(x: Source, dt: DType, index: int) -> bytes | memoryview:
    """float32/float64 values as float16 bit patterns (int16)."""
    if isinstance(x, np.ndarray):
        if x.size == 0:
            return b""
        with np.errstate(over="ignore", invalid="ignore"):
            # torch casts float64 to float16 through float32 (two roundings): do the same
            a = x.astype(np.float32) if dt.name == "float64" else x
            h = a.astype(np.float16).view(np.int16)
    else:
        if x.numel() == 0:
            return b""
        h = _cast(x, "float16").numpy().view(np.int16)
    if not bits_finite(h.view(np.uint16), 0x7C00):
        if not bool(np.isfinite(np_of(x, dt)).all()):
            raise nan_error(index)
        raise InputError(
            f"payload tensor {index} has values beyond the float16 range (|x| > 65504); "
            "use the 'fp32' or 'int8' codec, or rescale the tensor"
        )
    return _le_bytes(h, np.dtype("<i2"))


def raw_array(bodies: memoryview, off: int, d: Descriptor, index: int) -> np.ndarray:
    """A bitwise body as an array: native byte order, bool as ``np.bool_``, bfloat16 as int16
    bits; floating values are checked to be finite."""
    dt = d.dt
    arr = np.frombuffer(bodies, dtype=dt.wire, count=d.numel, offset=off)
    arr = arr.astype(dt.wire.newbyteorder("="), copy=True)
    if dt.floating and not np_finite(arr, dt):
        raise PayloadError(f"tensor {index}: body contains NaN/inf")
    if dt.name == "bool":
        if arr.max() > 1:
            raise PayloadError(f"tensor {index}: bool body holds bytes other than 0/1")
        return arr.view(np.bool_).reshape(d.dims)
    return arr.reshape(d.dims)


def half_array(bodies: memoryview, off: int, d: Descriptor, index: int) -> np.ndarray:
    """A float16 body as an array of the original dtype (exact), checked to be finite."""
    bits = np.frombuffer(bodies, dtype="<u2", count=d.numel, offset=off)
    if not bits_finite(bits, 0x7C00):
        raise PayloadError(f"tensor {index}: float16 body contains NaN/inf")
    return bits.view("<f2").astype(d.dt.array).reshape(d.dims)


# ---------------------------------------------------------------------- decoded payloads
def to_arrays(decoded: Decoded) -> ArrayPayload:
    """The decoded arrays as a payload; bfloat16, which numpy lacks, is refused."""
    arrays, dts, is_tuple = decoded
    for i, dt in enumerate(dts):
        if dt is BF16:
            raise PayloadError(
                f"tensor {i} of the payload is bfloat16, which numpy has no dtype for: decode "
                "it with splitexit.split.codec.decode (needs PyTorch), or have the sender "
                "send float32/float16"
            )
    return tuple(arrays) if is_tuple else arrays[0]


def to_torch(decoded: Decoded) -> Payload:
    """The decoded arrays as torch tensors (no copy; bfloat16 from its bits)."""
    torch = require_torch("splitexit.split.codec.decode")
    arrays, dts, is_tuple = decoded
    out = []
    for a, dt in zip(arrays, dts, strict=True):
        t = torch.from_numpy(a)
        out.append(t.view(torch.bfloat16) if dt is BF16 else t)
    return tuple(out) if is_tuple else out[0]
