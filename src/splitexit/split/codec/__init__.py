"""Wire codec for split computing: payload tensors <-> bytes, never pickle.

A *payload* is what crosses a cut: one ``torch.Tensor`` or a tuple of tensors (a cut inside a
residual block carries several). :class:`Codec` turns a payload into a self-describing byte
string and back. The receiver needs no configuration: the module-level :func:`decode` reads the
codec from the header. The byte-level specification of the messages, precise enough to write a
decoder from, is ``docs/WIRE_FORMAT.md``.

The codec needs only numpy and zstandard; PyTorch is imported only to return tensors. An edge
device without PyTorch encodes numpy arrays (:meth:`Codec.encode` takes arrays and tensors alike
and writes the same bytes for the same values) and :func:`decode_arrays` decodes to numpy.
:func:`decode` is :func:`decode_arrays` plus the conversion to tensors (and bfloat16, which
numpy lacks).

Codecs (``Codec.parse`` / ``Codec.spec`` spelling)::

    fp32        every tensor sent bitwise, in its own dtype (lossless; the name is the common case)
    fp16        float32/float64 tensors sent as IEEE float16 (other dtypes sent bitwise)
    int8        floating tensors quantized to 8-bit codes, asymmetric: x ~ minimum + q * scale,
                q in 0..255, one (scale, minimum) per tensor
    int4        the same with 16 levels (q in 0..15), two codes per byte
    int8-ch     (and int4-ch) one (scale, minimum) per channel, i.e. per index along dim 1
                (tensors with fewer than 2 dims fall back to per tensor)
    ...+zstd    the bodies are additionally compressed with zstd (lossless), e.g. "int8-ch+zstd";
                "+zstdN" selects level N (1..22, default 3)
    ...:v2      write wire format version 2 (compact header), e.g. "int4:v2"; without the
                suffix messages are version 1. Decoders read both versions.

Non-floating tensors (integers, bool) are always sent bitwise. A decoded tensor has the dtype
and shape of the encoded one. Decoding validates the whole header before allocating anything
sized by the message and raises :class:`~splitexit.errors.PayloadError` for every fault;
encoding and decoding are deterministic across machines.

Modules: :mod:`~.format` (header, descriptors, varints), :mod:`~.tensors` (payload validation
and bitwise / float16 bodies), :mod:`~.quant` (int8 / int4), :mod:`~.framing` (zstd),
:mod:`~.decoder` (reading a message), :mod:`~.registry` (codecs of other modules, e.g.
:mod:`splitexit.split.entropy`) and :mod:`~.facade` (:class:`Codec`, :func:`decode`).
"""

from splitexit.errors import InputError, PayloadError  # noqa: F401 - the errors it raises

from .facade import Codec, codec_of, decode, decode_arrays
from .format import (
    COMPACT_VERSION,
    DEFAULT_MAX_BYTES,
    FORMAT_VERSION,
    MAGIC,
    MAX_NDIM,
    MAX_TENSORS,
    SUPPORTED_VERSIONS,
)
from .format import varint as _varint  # noqa: F401 - used by splitexit.split.entropy
from .registry import register_external
from .tensors import ArrayPayload, Payload
from .tensors import require_torch as _require_torch  # noqa: F401 - used by split.entropy

__all__ = [
    "COMPACT_VERSION",
    "DEFAULT_MAX_BYTES",
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_NDIM",
    "MAX_TENSORS",
    "SUPPORTED_VERSIONS",
    "ArrayPayload",
    "Codec",
    "Payload",
    "codec_of",
    "decode",
    "decode_arrays",
    "register_external",
]
