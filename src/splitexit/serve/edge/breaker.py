"""The circuit breaker that stops the edge offloading to a failing server and probes again
later."""

from __future__ import annotations

import threading
import time


class CircuitBreaker:
    """Closed -> open after ``failures`` consecutive failures -> half-open after ``reset_s``.

    While open, :meth:`allow` refuses requests (the edge answers locally at once). After
    ``reset_s`` one probe request is let through (half-open): success closes the breaker,
    failure opens it again. Thread-safe.
    """

    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"

    def __init__(self, failures: int = 3, reset_s: float = 1.0, clock=time.monotonic):
        self.failures = failures
        self.reset_s = reset_s
        self._clock = clock
        self._lock = threading.Lock()
        self._state = self.CLOSED
        self._count = 0
        self._opened_at = 0.0
        self._probing = False
        self.opens = 0

    @property
    def state(self) -> str:
        with self._lock:
            if self._state == self.OPEN and self._clock() - self._opened_at >= self.reset_s:
                return self.HALF_OPEN
            return self._state

    def allow(self) -> bool:
        """Whether a request may go out now (half-open: only one probe at a time)."""
        with self._lock:
            if self._state == self.CLOSED:
                return True
            if self._state == self.OPEN and self._clock() - self._opened_at >= self.reset_s:
                self._state = self.HALF_OPEN
                self._probing = False
            if self._state == self.HALF_OPEN and not self._probing:
                self._probing = True
                return True
            return False

    def success(self) -> None:
        with self._lock:
            self._state, self._count, self._probing = self.CLOSED, 0, False

    def failure(self) -> None:
        with self._lock:
            self._count += 1
            if self._state == self.HALF_OPEN or (self._state == self.CLOSED
                                                  and self._count >= self.failures):
                self._state = self.OPEN
                self._opened_at = self._clock()
                self._probing = False
                self.opens += 1
