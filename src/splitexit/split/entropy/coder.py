"""The entropy codec: integer latents <-> range-coded messages with frozen tables (no torch).

Encoding: ``q = round_half_even(y)`` in float32; a value outside the tables' range
``[lo, lo + S - 1]`` is **clamped** to it (never wrapped) and counted in
:attr:`EntropyCodec.clamped` (and :attr:`EntropyCodec.last_clamped` for the last message).
The integers are range-coded by the maintained ``constriction`` library with one categorical
distribution per element, read from the integer tables; the framing is
:mod:`splitexit.split.entropy.message`. Decoding checks the framing, then the decoded size
``n * C * H * W * 4`` against ``max_bytes`` **before** allocating anything sized by the
message.
"""

from __future__ import annotations

import math
import sys
import threading
from typing import Any

import numpy as np

from ...errors import InputError, PayloadError
from ..codec import DEFAULT_MAX_BYTES, Codec, _require_torch
from .message import TAG_ONE, check_byte, check_key, frame, read_frame
from .tables import EntropyTables

__all__ = ["EntropyCodec"]

_LITTLE = sys.byteorder == "little"
_SMALL = 1024
"""Latents with at most this many values are range-checked in Python (a one-sample latent)."""
_NOT_FINITE = "the latent holds NaN/inf; the entropy codec sends finite values"
_WORDS = np.dtype("<u4")
_F32 = np.dtype(np.float32)
_MAGIC = 1.5 * 2**23
"""Added in float32, it rounds any ``|y| < 2**22`` half to even (the sum's unit is 1)."""
_MAGIC_BITS = 0x4B400000
"""The float32 bits of ``_MAGIC``."""
_BYTE = tuple(bytes((i,)) for i in range(256))
"""``_BYTE[i] == bytes((i,))``, built once (the check byte of every message)."""


def _constriction() -> Any:
    try:
        import constriction
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ModuleNotFoundError(
            "the entropy codec needs the 'constriction' package: pip install "
            "'constriction>=0.4' (it is in requirements/edge.txt)") from e
    return constriction


class EntropyCodec(Codec):
    """Range-codes integer latents with frozen :class:`EntropyTables` (a :class:`Codec`).

    It is a :class:`~splitexit.split.codec.Codec`, so :func:`~splitexit.split.halves.split_model`,
    ``serve`` and ``edge`` take it unchanged; :func:`~splitexit.split.entropy.register` makes
    the module-level :func:`splitexit.split.codec.decode` (what the server calls) and
    ``Codec.parse("entropy:<id>")`` find it, and ``Codec.parse("entropy:<tables.json>")``
    loads and registers a tables file.

    Attributes:
        tables: The frozen prior.
        clamped: Latent values clamped into the tables' range since creation (counted, never
            wrapped).
        last_clamped: Values clamped in the last :meth:`encode`.
    """

    def __init__(self, tables: EntropyTables, source: str | None = None):
        if not isinstance(tables, EntropyTables):
            raise InputError(f"EntropyCodec needs EntropyTables, got {type(tables).__name__}")
        super().__init__("fp32")  # the base fields are unused; the tables decide everything
        c = _constriction()
        fields = {"tables": tables, "source": source, "clamped": 0, "last_clamped": 0,
                  "_probs": tables.probabilities(), "_key": check_key(tables.sha256),
                  "_lock": threading.Lock(), "_model": c.stream.model.Categorical(perfect=False),
                  "_encoder": c.stream.queue.RangeEncoder,
                  "_decoder": c.stream.queue.RangeDecoder, "_id": tables.codec_id,
                  "_lo": tables.lo, "_hi": tables.hi, "_numel": tables.numel,
                  "_shape": tables.shape, "_one": (1, *tables.shape), "_lo_int": np.int32(tables.lo),
                  # the one-sample path rounds by adding 1.5 * 2**23 in float32 and reads the
                  # symbol off the sum's bits (see _encode_one)
                  "_magic": np.full((1, *tables.shape), _MAGIC, np.float32),
                  "_bits_lo": np.full(tables.numel, (_MAGIC_BITS + tables.lo) & 0xFFFFFFFF,
                                      np.uint32),
                  "_values": np.arange(tables.lo, tables.hi + 1, dtype=np.float32),
                  # the 3-byte headers of one-sample messages, by bitstream length (< 128)
                  "_heads": tuple(bytes((TAG_ONE, tables.codec_id, n)) for n in range(128)),
                  "_one_bytes": 4 * tables.numel}
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EntropyCodec) and other.tables.sha256 == self.tables.sha256

    def __hash__(self) -> int:
        return hash(("entropy", self.tables.sha256))

    def __repr__(self) -> str:
        return (f"EntropyCodec({self.spec()}, shape={self.tables.shape}, "
                f"symbols={self.tables.symbols})")

    def spec(self) -> str:
        """``"entropy:<tables file>@<16 hex digits of the tables' SHA-256>"`` for a codec read
        from a file (``Codec.parse`` loads it in any process and checks the digest), else
        ``"entropy:<first 8 hex digits of the SHA-256>"`` (found once registered)."""
        if self.source is not None:
            return f"entropy:{self.source}@{self.tables.sha256[:16]}"
        return f"entropy:{self.tables.sha256[:8]}"

    # ------------------------------------------------------------------ encode
    def quantize(self, payload: Any) -> tuple[np.ndarray, int]:
        """Integer symbols ``(N, C*H*W)`` of a float latent, and how many values were clamped."""
        y = _as_array(payload)
        if y.ndim != 4 or y.shape[1:] != self._shape or y.shape[0] < 1:
            raise InputError(
                f"the entropy codec takes latents of shape (N, "
                f"{', '.join(map(str, self._shape))}) with N >= 1, got {tuple(y.shape)}; "
                "split at the entropy bottleneck's cut")
        q = y.reshape(y.shape[0], -1)
        q = np.rint(q) if q.dtype == np.float32 else np.rint(q, dtype=np.float32)  # half to even
        if q.size <= _SMALL:  # one pass in Python beats two numpy reductions on a few values
            values = q.ravel().tolist()
            if not math.isfinite(sum(values)):  # any NaN or inf makes the float64 sum so
                raise InputError(_NOT_FINITE)
            low, high = min(values), max(values)
        else:
            low, high = float(q.min()), float(q.max())
            if not -math.inf < low <= high < math.inf:  # False for NaN too
                raise InputError(_NOT_FINITE)
        clamped = 0
        if low < self._lo or high > self._hi:
            clamped = int(np.count_nonzero((q < self._lo) | (q > self._hi)))
            np.clip(q, self._lo, self._hi, out=q)
        # exact: the values are integers within [lo, hi]
        sym = q.astype(np.int32)
        sym -= self._lo_int
        return sym, clamped

    def encode(self, payload: Any) -> bytes:
        """One message for a latent batch ``(N, C, H, W)`` (tensor or array, float).

        Values are rounded half to even; values outside the tables' range are clamped and
        counted (:attr:`clamped`).
        """
        if (type(payload) is np.ndarray and payload.shape == self._one
                and payload.dtype is _F32):  # one native float32 sample, as the edge sends it
            message = self._encode_one(payload)
            if message is not None:
                if self.last_clamped:
                    object.__setattr__(self, "last_clamped", 0)
                return message
        sym, clamped = self.quantize(payload)
        if clamped or self.last_clamped:
            with self._lock:
                object.__setattr__(self, "clamped", self.clamped + clamped)
                object.__setattr__(self, "last_clamped", clamped)
        enc = self._encoder()
        for row in sym:
            enc.encode(row, self._model, self._probs)
        words = enc.get_compressed()
        stream = (words if _LITTLE else words.astype("<u4")).tobytes()
        return frame(self._id, len(sym), stream, self._key)

    def _encode_one(self, y: np.ndarray) -> bytes | None:
        """The message of one float32 sample whose values all round into the tables' range,
        else None (:meth:`encode`'s checked path then clamps and counts, or refuses NaN/inf).
        Same bytes as the checked path (tested, NaN, inf, ties and huge values included).

        Rounding and the offset take two numpy calls on a few values: ``t = y + 1.5 * 2**23``
        in float32 rounds ``y`` half to even exactly as ``np.rint`` when ``|y| < 2**22``, and
        then ``t``'s bits are ``bits(1.5 * 2**23) + rint(y)``; so ``bits(t) - bits(1.5 *
        2**23) - lo``, in uint32, is the symbol. Every other input lands outside ``[0, S)``
        with ``S <= 4096`` and ``|lo| <= 2**20`` (:class:`EntropyTables` enforces both):
        ``y >= 2**22`` or +inf gives a sum ``>= 2**24``, whose bits are at least ``2**22``
        above; ``y <= -2**22`` gives a sum below ``2**23`` (bits at least ``2**22`` below,
        wrapping to over ``2**31``) or a negative float (sign bit set); a NaN keeps NaN bits,
        far from ``bits(1.5 * 2**23)``. No cast of a non-finite float, so nothing depends on
        the platform. constriction refuses a symbol outside the tables, which sends the
        sample to the checked path."""
        sym = np.add(y, self._magic).view(np.uint32).reshape(-1)
        sym -= self._bits_lo
        enc = self._encoder()
        try:
            enc.encode(sym.view(np.int32), self._model, self._probs)
        except Exception:  # noqa: BLE001 - constriction refuses a symbol outside the tables
            return None  # (KeyError today); the checked path clamps, or raises what is wrong
        words = enc.get_compressed()
        stream = (words if _LITTLE else words.astype("<u4")).tobytes()
        if len(stream) >= 0x80:
            return frame(self._id, 1, stream, self._key)
        body = self._heads[len(stream)] + stream
        return body + _BYTE[check_byte(body, self._key)]

    def _check(self, body: bytes | memoryview) -> int:
        """The check byte of a message body for these tables."""
        return check_byte(body, self._key)

    # ------------------------------------------------------------------ decode
    def _symbols(self, stream: memoryview, n: int) -> np.ndarray:
        if len(stream) % 4:
            raise PayloadError(f"corrupt entropy message: a {len(stream)}-byte bitstream is "
                               "not whole 32-bit words")
        words = np.frombuffer(stream, dtype="<u4")
        try:
            dec = self._decoder(words if _LITTLE else words.astype(np.uint32))
            if n == 1:
                return dec.decode(self._model, self._probs)
            out = np.empty((n, self._numel), np.int32)
            for i in range(n):
                out[i] = dec.decode(self._model, self._probs)
        except Exception as e:  # noqa: BLE001 - constriction raises its own errors
            raise PayloadError(f"corrupt entropy bitstream ({type(e).__name__}: {e})") from e
        return out

    def decode_arrays(self, data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
        """The float32 latent ``(N, C, H, W)`` (integers) of a message for these tables.

        Raises:
            PayloadError: malformed, truncated, forged or corrupt message, a message for other
                tables, or one that decodes to more than ``max_bytes``.
        """
        if type(data) is bytes and type(max_bytes) is int:
            out = self._decode_one(data, max_bytes)
            if out is not None:
                return out
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise InputError(f"max_bytes must be a positive int, got {max_bytes!r}")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise PayloadError(f"an entropy message is bytes, got {type(data).__name__}")
        buf = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
        if len(buf) > max_bytes:
            raise PayloadError(f"entropy message is {len(buf)} bytes, over max_bytes={max_bytes}")
        n, stream = read_frame(buf, self._id, self._key)
        out_bytes = n * self._numel * 4
        if out_bytes > max_bytes:
            raise PayloadError(f"entropy message declares {n} samples, {out_bytes} bytes "
                               f"decoded, over max_bytes={max_bytes}")
        sym = self._symbols(stream, n)
        # symbol -> value through a float32 table (exact: |lo| <= 2**20, S <= 4096)
        return self._values.take(sym).reshape(n, *self._shape)

    def _decode_one(self, data: bytes, max_bytes: int) -> np.ndarray | None:
        """The latent of a well-formed one-sample message whose bitstream is under 128 bytes
        (what the edge sends), else None: anything else, or anything wrong, takes
        :meth:`decode_arrays`' checked path, which says what is wrong. Same checks in the
        same order for this one case: size limits, tag, id, length, check byte."""
        size = len(data)
        if (not 4 <= size <= max_bytes or self._one_bytes > max_bytes or data[0] != TAG_ONE
                or data[1] != self._id or data[2] >= 0x80 or data[2] + 4 != size or data[2] & 3
                or check_byte(data[:-1], self._key) != data[-1]):
            return None
        try:
            sym = self._decoder(np.frombuffer(data, _WORDS, data[2] >> 2, 3)).decode(
                self._model, self._probs)
        except Exception:  # noqa: BLE001 - the checked path raises the PayloadError
            return None
        return self._values.take(sym).reshape(self._one)

    def decode(self, data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
        """:meth:`decode_arrays` as a torch tensor (needs PyTorch)."""
        torch = sys.modules.get("torch") or _require_torch("EntropyCodec.decode")
        if type(data) is bytes and type(max_bytes) is int:  # one sample: no detour
            out = self._decode_one(data, max_bytes)
            if out is not None:
                return torch.from_numpy(out)
        return torch.from_numpy(self.decode_arrays(data, max_bytes=max_bytes))

    def bytes_per_sample(self, payload: Any) -> float:
        """Size of one message holding the whole batch, divided by the batch size."""
        return len(self.encode(payload)) / _as_array(payload).shape[0]

    def error_bound(self, payload: Any) -> float:
        """Largest |decoded - sent| for ``payload``: rounding (0.5) plus any clamping."""
        y = _as_array(payload).astype(np.float64)
        t = self.tables
        return float(max(0.5, np.max(np.maximum(t.lo - y, y - t.hi), initial=0.0)))


def _as_array(payload: Any) -> np.ndarray:
    if isinstance(payload, tuple):
        if len(payload) != 1:
            raise InputError("the entropy codec sends one latent tensor, got a tuple of "
                             f"{len(payload)}")
        payload = payload[0]
    if hasattr(payload, "detach"):  # a torch tensor (torch is not imported here)
        payload = payload.detach().cpu().float().numpy()
    if not isinstance(payload, np.ndarray):
        raise InputError(f"the entropy codec takes a tensor or numpy array, got "
                         f"{type(payload).__name__}")
    return payload
