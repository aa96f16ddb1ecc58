"""The one payload spec: what crosses a cut, per sample (one :class:`TensorSpec` per tensor,
and whether it is a tuple). The split halves, the ONNX pieces of an exit program, bundles and
the server all check payloads against it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import InputError
from .runtime.loop import payload_tensors

__all__ = ["TensorSpec", "PayloadSpec", "PAYLOAD_DTYPES"]

Payload = torch.Tensor | tuple[torch.Tensor, ...]


#: dtypes a payload tensor may have on the wire, in a bundle and at a server, by name
PAYLOAD_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.float64: "float64",
                  torch.int64: "int64", torch.int32: "int32", torch.int8: "int8",
                  torch.uint8: "uint8", torch.bool: "bool"}
_BY_NAME = {v: k for k, v in PAYLOAD_DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a payload, per sample: its shape without the batch and its dtype."""

    shape: tuple[int, ...]
    dtype: str = "float32"

    def __post_init__(self):
        if self.dtype not in _BY_NAME:
            raise InputError(f"a payload tensor of dtype {self.dtype!r} cannot be deployed; use "
                             f"one of {', '.join(_BY_NAME)}")
        if not all(isinstance(d, int) and 0 < d < 2 ** 31 for d in self.shape):
            raise InputError(f"a payload tensor's per-sample shape must be positive ints, got "
                             f"{self.shape!r}")

    @classmethod
    def of(cls, t: torch.Tensor) -> TensorSpec:
        """The spec of one tensor of an example batch."""
        if t.dtype not in PAYLOAD_DTYPES:
            raise InputError(f"a payload tensor of dtype {t.dtype} cannot be deployed; use one "
                             f"of {', '.join(_BY_NAME)}")
        return cls(tuple(int(d) for d in t.shape[1:]), PAYLOAD_DTYPES[t.dtype])

    @property
    def torch_dtype(self) -> torch.dtype:
        return _BY_NAME[self.dtype]

    @property
    def sample_bytes(self) -> int:
        return self.torch_dtype.itemsize * math.prod(self.shape)

    def describe(self) -> str:
        """Short text such as ``float32[16, 28, 28]``."""
        return f"{self.dtype}{list(self.shape)}"

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, doc: dict) -> TensorSpec:
        try:
            shape = tuple(int(d) for d in doc["shape"])
            dtype = str(doc.get("dtype", "float32"))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"a payload tensor is {{'shape': [...], 'dtype': ...}}, got "
                             f"{doc!r}") from exc
        return cls(shape, dtype)


@dataclass(frozen=True)
class PayloadSpec:
    """What a payload must look like, per sample: one :class:`TensorSpec` per tensor, and
    whether it is a tuple (a cut inside a block) or one tensor. The one spec the split halves,
    the ONNX pieces of an exit program, bundles and the server check payloads against."""

    tensors: tuple[TensorSpec, ...]
    is_tuple: bool = False

    def __post_init__(self):
        if not self.tensors:
            raise InputError("a payload has at least one tensor")
        if not self.is_tuple and len(self.tensors) != 1:
            raise InputError(f"a payload of {len(self.tensors)} tensors is a tuple")

    @classmethod
    def of(cls, payload: Payload) -> PayloadSpec:
        """The spec of an example payload (batch dim dropped)."""
        return cls(tuple(TensorSpec.of(t) for t in payload_tensors(payload)),
                   isinstance(payload, tuple))

    def __len__(self) -> int:
        return len(self.tensors)

    def __getitem__(self, i: int) -> TensorSpec:
        return self.tensors[i]

    def __iter__(self):
        return iter(self.tensors)

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(t.shape for t in self.tensors)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of every tensor (a server payload has one dtype)."""
        dtypes = {t.dtype for t in self.tensors}
        if len(dtypes) != 1:
            raise InputError(f"the payload mixes dtypes {sorted(dtypes)}; a server takes one "
                             "dtype for every tensor of its payload")
        return _BY_NAME[dtypes.pop()]

    @property
    def sample_bytes(self) -> int:
        """Decoded bytes of one sample."""
        return sum(t.sample_bytes for t in self.tensors)

    def describe(self) -> str:
        return ", ".join(t.describe() for t in self.tensors)

    def check(self, payload: Payload, where: str = "this server") -> int:
        """Validate a (decoded) payload; return its batch size.

        Raises:
            PayloadError: the number of tensors, their dtype, shapes or batch sizes differ,
                or the batch is empty.
        """
        from .errors import PayloadError

        tensors = payload_tensors(payload)
        if isinstance(payload, tuple) != self.is_tuple or len(tensors) != len(self.tensors):
            raise PayloadError(
                f"the payload carries {len(tensors)} tensor(s) "
                f"({'tuple' if isinstance(payload, tuple) else 'single'}); {where} expects "
                f"{len(self.tensors)} tensor(s) ({'tuple' if self.is_tuple else 'single'}: "
                f"{self.describe()})")
        n = None
        for i, (t, spec) in enumerate(zip(tensors, self.tensors)):
            if t.dtype != spec.torch_dtype or t.dim() != len(spec.shape) + 1 \
                    or tuple(t.shape[1:]) != spec.shape:
                raise PayloadError(
                    f"payload tensor {i} is {str(t.dtype).removeprefix('torch.')}"
                    f"{list(t.shape)}; {where} expects (N, *{list(spec.shape)}) of "
                    f"{spec.describe()} (all tensors: {self.describe()}); was it made by "
                    "another model or cut? (encode the payload with any codec: it restores "
                    "the dtype)")
            if n is None:
                n = t.shape[0]
            elif t.shape[0] != n:
                raise PayloadError("the payload's tensors have different batch sizes; every "
                                   "tensor must carry the same samples")
        if not n:
            raise PayloadError("empty batch: send at least one sample")
        return int(n)

    def to_json(self) -> dict:
        """JSON form (a model directory's serve.json, a server's /health):
        ``{"shapes": [[...], ...], "dtype": "float32", "is_tuple": false}``."""
        return {"shapes": [list(t.shape) for t in self.tensors],
                "dtype": str(self.dtype).removeprefix("torch."), "is_tuple": self.is_tuple}

    @classmethod
    def from_json(cls, doc) -> PayloadSpec:
        """Inverse of :meth:`to_json`; also reads a bundle manifest's payload (a list of
        ``{"shape", "dtype"}`` tensors: several make a tuple).

        Raises:
            InputError: a malformed spec or a dtype that cannot be deployed.
        """
        if isinstance(doc, list):
            return cls(tuple(TensorSpec.from_json(t) for t in doc), len(doc) > 1)
        if not isinstance(doc, dict):
            raise InputError(f"a payload spec is an object or a list of tensors, got {doc!r}")
        try:
            shapes = [tuple(int(d) for d in s) for s in doc["shapes"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"malformed payload spec {doc!r}") from exc
        dtype = str(doc.get("dtype", "float32"))
        return cls(tuple(TensorSpec(s, dtype) for s in shapes), bool(doc.get("is_tuple", False)))
