"""The few array operations the exit loop and the policies need, for numpy and for torch.

The exit loop (:mod:`splitexit.runtime.loop`) and the exit policies (:mod:`splitexit.policies`)
are written once against these operations; :func:`ops_of` picks the backend from the arrays
themselves. Nothing here imports torch: the torch operations are tensor methods, and the
torch module is looked up only when a torch tensor is already in hand. So an edge device runs
the same loop and the same policy code on numpy with ONNX Runtime, and no PyTorch installed.

A threshold statistic (max-prob, entropy, margin, and the dense mean confidence and pixel
share) is written once in :mod:`splitexit.policies` over the primitives ``softmax``,
``log_softmax``, ``amax``, ``sum``, ``exp``, ``mul``, ``neg``, ``top2``, ``sub``,
``reciprocal``, ``at_least``, ``float32``, ``grid`` and ``pixel_mean``;
:class:`~splitexit.export.exit_graph.OnnxOps` gives the same primitives as ONNX nodes, so the
graph form of a statistic comes from the same definition.

Logits are ``(N, C)`` per exit, or ``(N, C, H, W)`` for dense (per-pixel) outputs such as a
segmentation map: ``empty_like_rows`` and ``predictions_like`` (one class per sample, or per
pixel) follow the trailing dimensions, so the loop needs no second form for dense exits.
"""

from __future__ import annotations

import sys

import numpy as np

from ..errors import InputError

__all__ = ["NumpyOps", "TorchOps", "ops_of", "NUMPY", "TORCH", "is_torch", "to_numpy",
           "one_float32_sample", "check_grid"]


def is_torch(a: object) -> bool:
    """Whether ``a`` is a torch tensor (without importing torch)."""
    return type(a).__module__.startswith("torch") and hasattr(a, "detach")


def to_numpy(a) -> np.ndarray:
    """A numpy view (or copy) of a torch tensor or array-like."""
    if is_torch(a):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def one_float32_sample(x, input_shape: tuple[int, ...], who: str) -> np.ndarray:
    """``x`` if it is one float32 numpy sample ``(1, *input_shape)``, as a batch-1 runner
    (``who``) takes it.

    Raises:
        InputError: anything else; the message says what came and how to convert it.
    """
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or \
            x.shape != (1, *input_shape):
        got = f"{type(x).__name__} {getattr(x, 'dtype', '')} {tuple(getattr(x, 'shape', ()))}"
        raise InputError(f"{who} takes one float32 numpy sample of shape "
                         f"(1, {', '.join(map(str, input_shape))}), got {got}; convert with "
                         "x.astype(np.float32) and run batches one sample at a time")
    return x


def check_grid(shape, stride: int) -> None:
    """Raise :class:`InputError` unless a ``(N, C, H, W)`` map of ``shape`` holds at least one
    pixel of the ``stride`` grid (see :meth:`_Arithmetic.grid`)."""
    first = stride // 2
    if len(shape) == 4 and stride > 1 and (shape[2] <= first or shape[3] <= first):
        raise InputError(f"a dense policy with stride={stride} reads pixels from row and "
                         f"column {first} on, but the logit map is {tuple(shape[2:])}; "
                         "use a smaller stride")


class _Arithmetic:
    """The operations both array kinds spell alike."""

    @staticmethod
    def mul(a, b):
        return a * b

    @staticmethod
    def reciprocal(a):
        return 1.0 / a

    @staticmethod
    def at_least(a, value: float):
        """``a >= value`` (a boolean array; a float32 ``a`` is compared in float32)."""
        return a >= value

    @staticmethod
    def grid(z, stride: int):
        """The pixels a dense statistic with ``stride`` reads: rows and columns
        ``stride // 2``, ``stride // 2 + stride``, ... of a ``(N, C, H, W)`` map (a view);
        the map itself for ``stride=1`` or ``(N, C)`` logits.

        Raises:
            InputError: a map too small to hold one pixel of the grid.
        """
        if stride == 1 or z.ndim != 4:
            return z
        check_grid(z.shape, stride)
        first = stride // 2
        return z[:, :, first::stride, first::stride]

    @staticmethod
    def pixel_mean(a):
        """The mean over every axis but the first (samples)."""
        return a.reshape(a.shape[0], -1).mean(1)

    @staticmethod
    def neg(a):
        return -a

    @staticmethod
    def sub(a, b):
        return a - b

    @staticmethod
    def all(mask) -> bool:
        return bool(mask.all())


class NumpyOps(_Arithmetic):
    """Array operations on numpy arrays (rows are samples, columns classes)."""

    name = "numpy"
    long = np.int64

    # statistic primitives (axis 1 = classes)
    @staticmethod
    def softmax(z):
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    @staticmethod
    def log_softmax(z):
        shifted = z - z.max(axis=1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))

    @staticmethod
    def amax(z, keepdims: bool = False):
        return z.max(axis=1, keepdims=keepdims)

    @staticmethod
    def sum(z):
        return z.sum(axis=1)

    @staticmethod
    def exp(z):
        return np.exp(z)

    @staticmethod
    def sigmoid(z):
        return 1.0 / (1.0 + np.exp(-z))

    @staticmethod
    def top2(z):
        part = np.partition(z, z.shape[1] - 2, axis=1)
        return part[:, -1], part[:, -2]

    # everything else the loop and the policies use
    @staticmethod
    def float32(z):
        return z if z.dtype == np.float32 else z.astype(np.float32)

    @staticmethod
    def empty_long(n: int):
        return np.empty(n, dtype=np.int64)

    @staticmethod
    def full_long(n: int, value: int):
        return np.full(n, value, dtype=np.int64)

    @staticmethod
    def full_bool(n: int, value: bool):
        return np.full(n, bool(value), dtype=np.bool_)

    @staticmethod
    def zeros(shape, like=None):
        return np.zeros(shape, dtype=np.float32 if like is None else like.dtype)

    @staticmethod
    def zeros_long(n: int):
        return np.zeros(n, dtype=np.int64)

    @staticmethod
    def arange(n: int):
        return np.arange(n)

    @staticmethod
    def empty_like_rows(n: int, row):
        return np.empty((n, *row.shape[1:]), dtype=row.dtype)

    @staticmethod
    def predictions_like(n: int, logits):
        return np.empty((n, *logits.shape[2:]), dtype=np.int64)

    @staticmethod
    def classes(logits):
        """The predicted class of every row (or every pixel of dense logits). On a dense map
        the first maximum is found class by class: numpy's ``argmax(1)`` reduces along the
        strided class axis one pixel at a time (about 1 ms for 11 x 64 x 64)."""
        if logits.ndim == 2:
            return logits.argmax(1)
        top = logits.max(axis=1)
        out = np.zeros(top.shape, dtype=np.int64)
        for k in range(logits.shape[1] - 1, -1, -1):  # the lowest class of a tie is kept
            np.copyto(out, k, where=logits[:, k] == top)
        return out

    @staticmethod
    def where(cond, a, b):
        return np.where(cond, a, b)

    @staticmethod
    def zeros_like(a):
        return np.zeros_like(a)

    @staticmethod
    def constant(values, like):
        return np.asarray(values, dtype=like.dtype)

    @staticmethod
    def stack(arrays, axis: int):
        return np.stack(arrays, axis=axis)

    @staticmethod
    def cast_like(a, like):
        return a if a.dtype == like.dtype else a.astype(like.dtype)

    @staticmethod
    def count(mask) -> int:
        return int(np.count_nonzero(mask))

    @staticmethod
    def fill(a, value) -> None:
        a.fill(value)

    @staticmethod
    def bincount(a, minlength: int):
        return np.bincount(a, minlength=minlength).astype(np.float64)

    @staticmethod
    def is_finite(a) -> bool:
        return bool(np.isfinite(a).all())


class TorchOps(_Arithmetic):
    """The same operations on torch tensors, as tensor methods (torch imported lazily)."""

    name = "torch"

    @staticmethod
    def _torch():
        return sys.modules.get("torch") or __import__("torch")

    @property
    def long(self):
        return self._torch().long

    @staticmethod
    def softmax(z):
        return z.softmax(1)

    @staticmethod
    def log_softmax(z):
        return z.log_softmax(1)

    @staticmethod
    def amax(z, keepdims: bool = False):
        return z.amax(1, keepdim=keepdims)

    @staticmethod
    def sum(z):
        return z.sum(dim=1)

    @staticmethod
    def exp(z):
        return z.exp()

    @staticmethod
    def sigmoid(z):
        return z.sigmoid()

    @staticmethod
    def top2(z):
        top = z.topk(2, dim=1).values
        return top[:, 0], top[:, 1]

    @staticmethod
    def float32(z):
        return z if z.dtype == TorchOps._torch().float32 else z.float()

    @staticmethod
    def empty_long(n: int):
        torch = TorchOps._torch()
        return torch.empty(n, dtype=torch.long)

    @staticmethod
    def full_long(n: int, value: int):
        torch = TorchOps._torch()
        return torch.full((n,), value, dtype=torch.long)

    @staticmethod
    def full_bool(n: int, value: bool):
        torch = TorchOps._torch()
        return torch.full((n,), bool(value), dtype=torch.bool)

    @staticmethod
    def zeros(shape, like=None):
        torch = TorchOps._torch()
        return torch.zeros(shape, dtype=torch.float32 if like is None else like.dtype)

    @staticmethod
    def zeros_long(n: int):
        torch = TorchOps._torch()
        return torch.zeros(n, dtype=torch.long)

    @staticmethod
    def arange(n: int):
        return TorchOps._torch().arange(n)

    @staticmethod
    def empty_like_rows(n: int, row):
        return TorchOps._torch().empty((n, *row.shape[1:]), dtype=row.dtype)

    @staticmethod
    def predictions_like(n: int, logits):
        torch = TorchOps._torch()
        return torch.empty((n, *logits.shape[2:]), dtype=torch.long)

    @staticmethod
    def classes(logits):
        """The predicted class of every row (or every pixel of dense logits). On a dense
        map ``max(1).indices`` (the same first-maximum indices) is several times faster on CPU
        than ``argmax(1)``, which reduces across the strided class axis slowly."""
        return logits.argmax(1) if logits.ndim == 2 else logits.max(1).indices

    @staticmethod
    def where(cond, a, b):
        return TorchOps._torch().where(cond, a, b)

    @staticmethod
    def zeros_like(a):
        return TorchOps._torch().zeros_like(a)

    @staticmethod
    def constant(values, like):
        return TorchOps._torch().tensor(values, dtype=like.dtype)

    @staticmethod
    def stack(arrays, axis: int):
        return TorchOps._torch().stack(list(arrays), dim=axis)

    @staticmethod
    def cast_like(a, like):
        return a if a.dtype == like.dtype else a.to(like.dtype)

    @staticmethod
    def count(mask) -> int:
        return int(mask.sum()) if mask.shape[0] > 1 else int(mask)

    @staticmethod
    def fill(a, value) -> None:
        a.fill_(value)

    @staticmethod
    def bincount(a, minlength: int):
        return TorchOps._torch().bincount(a, minlength=minlength).double()

    @staticmethod
    def is_finite(a) -> bool:
        return bool(TorchOps._torch().isfinite(a).all())


NUMPY = NumpyOps()
TORCH = TorchOps()


def ops_of(a) -> NumpyOps | TorchOps:
    """The operations for the kind of ``a`` (a payload tensor, logits or a tuple of them)."""
    if isinstance(a, tuple):
        a = a[0]
    return NUMPY if isinstance(a, np.ndarray) else TORCH
