"""Settings of the edge runtime: the deadline, retries and backoff, the circuit breaker, the
token, and the size caps of requests and answers."""

from __future__ import annotations

import math
from dataclasses import dataclass

from splitexit.errors import InputError


@dataclass(frozen=True)
class EdgeSettings:
    """Deadline, retry, circuit-breaker and size settings of the edge runtime.

    Attributes:
        deadline_s: longest time one :meth:`EdgeRuntime.classify` call may take, device pass
            included; it bounds connecting, sending and reading the whole answer. The
            fallback answer is given when the server has not answered by then.
        retries: further attempts after a failed request (connection error, 5xx, 408, 429).
        backoff_s: wait before the first retry; doubles per retry up to ``backoff_max_s``.
        backoff_max_s: longest wait between retries.
        breaker_failures: consecutive failed requests that open the circuit breaker.
        breaker_reset_s: how long the breaker stays open before one probe request.
        token: bearer token the server expects, if any.
        workers: requests (connections) to the server at most at once.
        max_response_bytes: largest answer read from the server; a larger one is a failed
            request (not retried) and is not read further.
        max_request_samples: samples per request at most (``None``: the server's limit).
        max_request_bytes: encoded bytes per request at most (``None``: the server's limit).
    """

    deadline_s: float = 1.0
    retries: int = 2
    backoff_s: float = 0.01
    backoff_max_s: float = 0.2
    breaker_failures: int = 3
    breaker_reset_s: float = 1.0
    token: str | None = None
    workers: int = 8
    max_response_bytes: int = 16 * 1024 * 1024
    max_request_samples: int | None = None
    max_request_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("deadline_s", "backoff_s", "backoff_max_s", "breaker_reset_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise InputError(f"EdgeSettings.{name} must be a finite number >= 0, got "
                                 f"{value!r}")
        if self.deadline_s <= 0:
            raise InputError("EdgeSettings.deadline_s must be > 0 seconds")
        for name, low in (("retries", 0), ("breaker_failures", 1), ("workers", 1),
                          ("max_response_bytes", 1024)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"EdgeSettings.{name} must be an int >= {low}, got {value!r}")
        for name, low in (("max_request_samples", 1), ("max_request_bytes", 64)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < low):
                raise InputError(f"EdgeSettings.{name} must be None or an int >= {low}, got "
                                 f"{value!r}")
