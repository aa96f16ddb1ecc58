"""Edge runtime: local exits on the device, offload of undecided samples, fallback on failure.

:class:`EdgeRuntime` runs a device runtime on each batch (a bundle's ONNX Runtime
:class:`~splitexit.runtime.device.OrtDevice`, or the PyTorch
:class:`~splitexit.serve.device.DevicePart`), answers the samples a local exit decides, sends
the rest to the server half over HTTP (codec payload) and judges the server's logits with the
same exit policy, in numpy. Every call has a deadline that bounds the whole exchange
(connecting, sending and reading the full answer; requests run on an asyncio event loop of
the runtime's own and are cancelled at the deadline); failed requests are retried with
exponential backoff while time remains; a :class:`CircuitBreaker` stops offloading after
repeated failures and probes again later. When the server or the link fails, undecided samples
get the deepest local exit's answer. Every input gets exactly one :class:`Answer`, labelled
with its source; an input that breaks the device half, the wire codec or the server half
(finite but extreme values that overflow) gets its own ``failed`` or ``fallback`` answer and
costs the others nothing.

Requests fit the server: the runtime reads the server's limits (``max_request_samples``,
``max_request_bytes``) from ``GET /health`` with its token, once, and splits the undecided
samples into requests within them (and within its own ``EdgeSettings`` caps); a 413 that
carries new limits re-splits the refused request. Answers larger than
``EdgeSettings.max_response_bytes`` are not read past that size.

Modules: :mod:`~.runtime` (:class:`EdgeRuntime`: the device pass and the one answer per
input), :mod:`~.offload` (requests, retries, limits, the HTTP exchange), :mod:`~.breaker`,
:mod:`~.answers` (:class:`Answer`, :class:`EdgeStats`) and :mod:`~.settings`.

This package needs numpy, onnxruntime (for bundles), httpx and zstandard only: no PyTorch, no
FastAPI, so a device installs ``splitexit`` without them.

Example:
    >>> b = load_bundle("bundle/")
    >>> with EdgeRuntime(b.device(), b.policy, "http://127.0.0.1:8000", b.codec) as edge:
    ...     answers = edge.classify(x)          # numpy (or torch) batch
    >>> edge.stats.snapshot()["answers_by_source"]
"""

from .answers import EXIT, FAILED, FALLBACK, SERVER, Answer, EdgeStats
from .breaker import CircuitBreaker
from .runtime import EdgeRuntime
from .settings import EdgeSettings

__all__ = ["EdgeSettings", "CircuitBreaker", "Answer", "EdgeStats", "EdgeRuntime", "EXIT", "SERVER",
           "FALLBACK", "FAILED"]
