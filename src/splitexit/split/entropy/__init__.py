"""Entropy-coded bottleneck codec: integer latents -> range-coded bits, deterministic, no torch.

A learned entropy bottleneck (:func:`splitexit.split.bottleneck.inject_entropy_bottleneck`,
trained by :mod:`splitexit.training.entropy`) sends its latent ``y`` (N, C, H, W) rounded to
integers. Its factorized prior (one distribution per latent element) is frozen at export into
**integer frequency tables** (:class:`EntropyTables`); :class:`EntropyCodec` range-codes the
integers with them through the maintained ``constriction`` library (numpy in, numpy out). The
tables are integers and ``constriction`` is deterministic, so the same latent gives the same
bytes on every machine, whether the device half ran in PyTorch or ONNX Runtime; this package
imports numpy and constriction only, never torch (tensors are accepted, converted lazily).

Modules: :mod:`~.tables` (the frozen prior and its JSON file), :mod:`~.message` (the compact
message: 4 bytes of framing around the bitstream, every size checked), :mod:`~.coder`
(:class:`EntropyCodec`: rounding, clamping, range coding) and :mod:`~.registry` (codecs known
to ``Codec.parse("entropy:...")`` and to the module-level ``decode``).
"""

from .coder import EntropyCodec
from .message import TAG_MANY, TAG_ONE, message_overhead
from .registry import register, registered, unregister
from .tables import (
           ENTROPY_FORMAT,
           MAX_ELEMENTS,
           MAX_PRECISION,
           MAX_SYMBOLS,
           EntropyTables,
           tables_from_pmf,
)

__all__ = ["ENTROPY_FORMAT", "TAG_ONE", "TAG_MANY", "MAX_SYMBOLS", "MAX_ELEMENTS",
           "MAX_PRECISION", "EntropyTables", "EntropyCodec", "register", "unregister",
           "registered", "message_overhead", "tables_from_pmf"]
