"""The SYNTHETIC signal generator behind the ``signals`` data set: 3-axis accelerometer windows
of six human-activity-like classes, generated offline and deterministically."""

from __future__ import annotations

import numpy as np

from splitexit.errors import InputError

__all__ = ["SIGNALS_CLASS_NAMES", "SIGNALS_LENGTH", "SIGNALS_RATE_HZ", "create_signals"]

#: Window length and nominal sampling rate of the synthetic signals.
SIGNALS_LENGTH = 128
SIGNALS_RATE_HZ = 50.0
SIGNALS_CLASS_NAMES = [
    "walking",
    "walking_upstairs",
    "walking_downstairs",
    "sitting",
    "standing",
    "laying",
]

# Per class, one row each (mean, sd pairs are drawn per sample): step frequency in Hz, dynamic
# amplitude in g, its weight per axis (vertical, forward, lateral), harmonic weights of the step
# waveform, impact sharpness, body tilt in degrees, noise sd in g. Static classes have tiny
# sway / breathing.
_SIGNAL_KEYS = ("freq", "amp", "axes", "harm", "sharp", "tilt", "noise")
_SIGNAL_ROWS = (
    # walking
    ((1.85, 0.18), (0.3, 0.06), (1.0, 0.55, 0.3), (1.0, 0.35, 0.1), 0.0, (5.0, 6.0), (0.06, 0.02)),
    # walking upstairs: slower, forward lean, asymmetric (strong 2nd harmonic)
    ((1.6, 0.18), (0.28, 0.06), (0.9, 0.7, 0.3), (1.0, 0.65, 0.25), 0.0, (10.0, 6.0), (0.06, 0.02)),
    # walking downstairs: faster, larger, impulsive heel strikes
    ((2.0, 0.2), (0.36, 0.08), (1.0, 0.45, 0.35), (1.0, 0.25, 0.1), 1.6, (2.0, 6.0), (0.08, 0.02)),
    # sitting: tilted trunk, almost no motion
    ((0.3, 0.08), (0.015, 0.006), (1.0, 1.0, 1.0), (1.0, 0.0, 0.0), 0.0, (24.0, 8.0), (0.02, 0.006)),
    # standing: upright, small postural sway
    ((0.35, 0.1), (0.02, 0.008), (1.0, 1.0, 1.0), (1.0, 0.0, 0.0), 0.0, (8.0, 8.0), (0.02, 0.006)),
    # laying: gravity along the body's forward axis, breathing
    ((0.25, 0.05), (0.015, 0.006), (1.0, 1.0, 1.0), (1.0, 0.0, 0.0), 0.0, (85.0, 8.0), (0.02, 0.006)),
)
_SIGNAL_CLASSES: tuple[dict, ...] = tuple(dict(zip(_SIGNAL_KEYS, row)) for row in _SIGNAL_ROWS)
_SIGNALS_RANGE_G = 2.0  # raw values in [-2 g, 2 g] map linearly to [0, 1] (clipped)
_SIGNALS_LEVELS = 4095  # 12-bit quantisation of [0, 1]


def create_signals(
    n_per_class: int, seed: int, length: int = SIGNALS_LENGTH
) -> tuple[np.ndarray, np.ndarray]:
    """Generate the SYNTHETIC accelerometer data set behind the ``signals`` name.

    This is not recorded sensor data. Each sample is a window of a 3-axis accelerometer
    (``length`` samples at a nominal 50 Hz, like the UCI HAR windows), built as gravity along a
    randomly tilted and rotated body axis plus a periodic "step" component plus noise. The six
    classes (``walking``, ``walking_upstairs``, ``walking_downstairs``, ``sitting``,
    ``standing``, ``laying``) differ in step frequency, amplitude, waveform (harmonic content
    and impact sharpness), body tilt and noise level; each sample draws its own phase,
    frequency drift, amplitude modulation, tilt, heading and timing jitter, and the class
    distributions overlap on purpose (walking vs. stairs, sitting vs. standing), so the task is
    not trivially separable.

    Values are in units of g mapped linearly from ``[-2, 2]`` to ``[0, 1]`` (clipped) and
    quantised to 12 bits (4096 levels, about 1 mg, like a 12-bit accelerometer ADC). The labels
    and every random draw are identical on every machine; the quantisation also absorbs the
    last-bit differences that ``sin`` / ``exp`` may show between CPUs, except in the rare case
    where a value lies on a quantisation boundary.

    Args:
        n_per_class: Samples per class.
        seed: Seed of the generator (``numpy.random.Generator(PCG64(seed))``).
        length: Samples per window.

    Returns:
        ``(x, y)``: ``float32`` array of shape ``(6 * n_per_class, 3, length)`` in ``[0, 1]``
        and ``int64`` labels, interleaved in a seeded random order.
    """
    if isinstance(n_per_class, bool) or not isinstance(n_per_class, (int, np.integer)):
        raise InputError(f"n_per_class must be an integer, got {n_per_class!r}.")
    if n_per_class < 1 or length < 8:
        raise InputError(
            f"create_signals needs n_per_class >= 1 and length >= 8, got {n_per_class}, {length}."
        )
    rng = np.random.Generator(np.random.PCG64(int(seed)))
    n_classes = len(_SIGNAL_CLASSES)
    n = n_per_class * n_classes
    y = rng.permutation(np.repeat(np.arange(n_classes, dtype=np.int64), n_per_class))
    t = np.arange(length, dtype=np.float64) / SIGNALS_RATE_HZ  # (L,)

    def per_class(key: str, j: int | None = None) -> np.ndarray:
        values = [c[key] if j is None else c[key][j] for c in _SIGNAL_CLASSES]
        return np.array(values, dtype=np.float64)[y]

    def gauss(key: str, low: float = 0.0) -> np.ndarray:
        return np.maximum(rng.normal(per_class(key, 0), per_class(key, 1)), low)

    freq = gauss("freq", 0.1)[:, None]
    amp = gauss("amp", 0.0)[:, None]
    axes_w = np.stack([per_class("axes", j) for j in range(3)], axis=1)  # (n, 3)
    axes_w = axes_w * rng.uniform(0.75, 1.25, size=(n, 3))
    harm = np.stack([per_class("harm", j) for j in range(3)], axis=1)
    harm = harm * rng.uniform(0.6, 1.4, size=(n, 3))
    sharp = per_class("sharp")[:, None] * rng.uniform(0.5, 1.5, size=(n, 1))

    # Phase with random start, slow frequency drift and small timing jitter.
    drift = rng.normal(0.0, 0.06, size=(n, 1)) * freq
    jitter = np.cumsum(rng.normal(0.0, 0.015, size=(n, length)), axis=1)
    phase = (
        2 * np.pi * (freq * t + 0.5 * drift * t**2 / t[-1])
        + rng.uniform(0, 2 * np.pi, size=(n, 1))
        + jitter
    )
    # Harmonic step waveform; the forward axis sees it with a phase lag.
    offsets = rng.uniform(0, 2 * np.pi, size=(n, 2))
    lag = rng.normal(np.pi / 2, 0.4, size=(n, 1))

    def step_wave(ph: np.ndarray) -> np.ndarray:
        w = harm[:, 0:1] * np.sin(ph)
        w = w + harm[:, 1:2] * np.sin(2 * ph + offsets[:, 0:1])
        w = w + harm[:, 2:3] * np.sin(3 * ph + offsets[:, 1:2])
        # Heel-strike impulses: exp(k * cos) peaks once per step, zero mean.
        impact = np.exp(sharp * (np.cos(ph) - 1.0))
        w = w + sharp * (impact - impact.mean(axis=1, keepdims=True))
        return w / np.maximum(np.abs(w).max(axis=1, keepdims=True), 1e-6)

    envelope = 1.0 + 0.15 * np.sin(
        2 * np.pi * rng.uniform(0.1, 0.5, size=(n, 1)) * t + rng.uniform(0, 2 * np.pi, (n, 1))
    )
    scale = amp * envelope  # (n, L)
    # Lateral sway follows half the step frequency with its own phase.
    lateral = np.sin(0.5 * phase + rng.uniform(0, 2 * np.pi, size=(n, 1)))
    body = np.stack(
        [
            axes_w[:, 0:1] * scale * step_wave(phase),  # x: vertical
            axes_w[:, 2:3] * scale * lateral,  # y: lateral
            axes_w[:, 1:2] * scale * step_wave(phase + lag),  # z: forward
        ],
        axis=1,
    )  # (n, 3, L)

    # Gravity: tilt from the vertical (x) axis toward forward (z) with a random heading.
    tilt = np.deg2rad(gauss("tilt", -30.0))
    heading = rng.normal(0.0, np.deg2rad(25.0), size=n)
    gravity = np.stack(
        [np.cos(tilt), np.sin(tilt) * np.sin(heading), np.sin(tilt) * np.cos(heading)], axis=1
    )
    noise_sd = gauss("noise", 0.005)
    x = (
        gravity[:, :, None]
        + body
        + rng.normal(0.0, 1.0, size=(n, 3, length)) * noise_sd[:, None, None]
    )
    x = np.clip((x + _SIGNALS_RANGE_G) / (2 * _SIGNALS_RANGE_G), 0.0, 1.0)
    x = (np.round(x * _SIGNALS_LEVELS) / _SIGNALS_LEVELS).astype(np.float32)
    return x, y
