"""This machine's own profile, measured."""

from __future__ import annotations

import math
import statistics
import time

from ..errors import InputError
from .profiles import DeviceProfile

# ---------------------------------------------------------------------------------------------
# This machine


def measure_host_profile(
    gmacs_probe: float = 0.1,
    repeats: int = 5,
    threads: int | None = None,
    active_power_w: float = 15.0,
    idle_power_w: float = 5.0,
    name: str = "host",
) -> DeviceProfile:
    """Measure this machine's effective GMAC/s with torch on a small-CNN-like workload.

    The workload is a batch-1 3x3 convolution (32 -> 64 channels on 32x32) and a
    64x512 @ 512x512 matmul, run until ``gmacs_probe`` GMACs are done; the rate is the total
    MACs over the median of ``repeats`` timings, after one warm-up. Latencies measured on this
    machine can then be scaled to a target with :meth:`DeviceProfile.scale_latency`.

    This machine's power is not measured: ``active_power_w`` / ``idle_power_w`` are
    placeholders (recorded as such in ``sources``) unless you pass measured figures.

    Args:
        gmacs_probe: GMACs of work per timing (> 0); larger is steadier and slower.
        repeats: Number of timings (>= 1); the median is used.
        threads: torch intra-op threads during the probe; None keeps the current setting.
        active_power_w: Watts while computing (placeholder unless you know it).
        idle_power_w: Watts while idle (placeholder unless you know it).
        name: Name of the returned profile.

    Returns:
        A DeviceProfile with the measured ``compute_gmacs_per_s`` (flagged as an estimate, since
        the power figures are placeholders and the rate depends on the workload).
    """
    if isinstance(gmacs_probe, bool) or not isinstance(gmacs_probe, (int, float)) \
            or not math.isfinite(gmacs_probe) or gmacs_probe <= 0:
        raise InputError(f"gmacs_probe must be a positive number of GMACs, got {gmacs_probe!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise InputError(f"repeats must be an integer >= 1, got {repeats!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise InputError(f"threads must be None or an integer >= 1, got {threads!r}")

    import torch  # deferred: loading profiles must not need torch

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, 32, 32, 32, generator=gen)
        w = torch.randn(64, 32, 3, 3, generator=gen) * 0.05
        a = torch.randn(64, 512, generator=gen)
        b = torch.randn(512, 512, generator=gen) * 0.05
        macs_per_step = 64 * 32 * 9 * 32 * 32 + 64 * 512 * 512
        steps = max(1, math.ceil(gmacs_probe * 1e9 / macs_per_step))

        def run() -> None:
            for _ in range(steps):
                torch.nn.functional.conv2d(x, w, padding=1)
                torch.mm(a, b)

        with torch.inference_mode():
            run()  # warm-up
            timings = []
            for _ in range(repeats):
                start = time.perf_counter()
                run()
                timings.append(time.perf_counter() - start)
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(old_threads)
    median = max(statistics.median(timings), 1e-9)
    rate = steps * macs_per_step / median / 1e9
    placeholder = "placeholder, not measured; pass measured watts to measure_host_profile()"
    return DeviceProfile(
        name=name,
        compute_gmacs_per_s=rate,
        active_power_w=active_power_w,
        idle_power_w=idle_power_w,
        description=f"this machine (torch {torch.__version__}, {used_threads} threads)",
        sources={
            "compute_gmacs_per_s": (
                f"measured: batch-1 conv3x3 + matmul probe, {steps * macs_per_step / 1e9:.3f} "
                f"GMAC, median of {repeats}, torch {torch.__version__}, {used_threads} threads"
            ),
            "active_power_w": placeholder,
            "idle_power_w": placeholder,
        },
        estimate=True,
    )
