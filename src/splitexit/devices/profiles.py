"""Device and link profiles (validated figures with their sources) and the energy model."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import InputError

# Field name -> (rule, what is expected). Rules: "pos" > 0, "nonneg" >= 0, "prob" in [0, 1).
_DEVICE_FIGURES: dict[str, tuple[str, str]] = {
    "compute_gmacs_per_s": ("pos", "a positive number: effective GMAC/s for small-CNN inference"),
    "active_power_w": ("pos", "a positive number: watts drawn while computing"),
    "idle_power_w": ("nonneg", "a number >= 0: watts drawn while waiting (radio not included)"),
}
_LINK_FIGURES: dict[str, tuple[str, str]] = {
    "uplink_mbps": ("pos", "a positive number: device -> server Mbit/s"),
    "downlink_mbps": ("pos", "a positive number: server -> device Mbit/s"),
    "rtt_ms": ("nonneg", "a number >= 0: round-trip time in ms"),
    "jitter_ms": ("nonneg", "a number >= 0: jitter in ms"),
    "loss_rate": ("prob", "a number in [0, 1): packet loss rate"),
    "tx_nj_per_bit": ("nonneg", "a number >= 0: device radio energy per bit sent, nJ"),
    "rx_nj_per_bit": ("nonneg", "a number >= 0: device radio energy per bit received, nJ"),
}
_LINK_OPTIONAL = {"jitter_ms": 0.0, "loss_rate": 0.0, "rx_nj_per_bit": 0.0}


def _check_figure(kind: str, name: str, fname: str, value: Any, rule: str, expected: str) -> float:
    """Validate one figure and return it as a float; raise InputError naming profile and field."""
    where = f"{kind} profile {name!r}: field {fname!r}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{where} is {value!r}; expected {expected}")
    value = float(value)
    if not math.isfinite(value):
        raise InputError(f"{where} is {value}; expected {expected}")
    bad = (
        (rule == "pos" and value <= 0)
        or (rule == "nonneg" and value < 0)
        or (rule == "prob" and not 0 <= value < 1)
    )
    if bad:
        raise InputError(f"{where} is {value}; expected {expected}")
    return value


def _check_nonneg(what: str, value: float) -> float:
    """Return ``value`` as float if it is a finite number >= 0, else raise InputError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{what} must be a finite number >= 0, got {value!r}")
    if value < 0:
        raise InputError(f"{what} must be >= 0, got {value}")
    return float(value)


@dataclass(frozen=True)
class DeviceProfile:
    """A compute device: effective MAC rate and power draw.

    Attributes:
        name: Short identifier, e.g. ``"rpi4"``.
        compute_gmacs_per_s: Effective GMAC/s reached by small CNNs at batch 1 (an estimate
            unless measured, see :func:`measure_host_profile`).
        active_power_w: Watts drawn while computing.
        idle_power_w: Watts drawn while waiting (for the network or the server).
        description: Free text describing the device.
        sources: Field name -> citation of where the figure comes from.
        estimate: True if any figure is an estimate rather than a measurement.
    """

    name: str
    compute_gmacs_per_s: float
    active_power_w: float
    idle_power_w: float
    description: str = ""
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)
    estimate: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InputError(f"device profile name must be a non-empty string, got {self.name!r}")
        for fname, (rule, expected) in _DEVICE_FIGURES.items():
            value = _check_figure("device", self.name, fname, getattr(self, fname), rule, expected)
            object.__setattr__(self, fname, value)
        if self.idle_power_w > self.active_power_w:
            raise InputError(
                f"device profile {self.name!r}: field 'idle_power_w' ({self.idle_power_w} W) is "
                f"larger than 'active_power_w' ({self.active_power_w} W); expected idle <= active "
                "(are the two swapped?)"
            )
        object.__setattr__(self, "sources", dict(self.sources))

    def compute_time_s(self, macs: float) -> float:
        """Estimated seconds to run ``macs`` multiply-accumulates on this device.

        Args:
            macs: Number of MACs (>= 0).

        Returns:
            ``macs / (compute_gmacs_per_s * 1e9)``.
        """
        return _check_nonneg("macs", macs) / (self.compute_gmacs_per_s * 1e9)

    def scale_latency(self, host_latency_s: float, host: DeviceProfile) -> float:
        """Scale a latency measured on ``host`` to this device by the ratio of MAC rates.

        Args:
            host_latency_s: Latency measured on the host, in seconds (>= 0).
            host: Profile of the machine the latency was measured on (for this machine, see
                :func:`measure_host_profile`).

        Returns:
            Estimated latency on this device: ``host_latency_s * host_rate / device_rate``.
        """
        if not isinstance(host, DeviceProfile):
            raise InputError(f"host must be a DeviceProfile, got {type(host).__name__}")
        latency = _check_nonneg("host_latency_s", host_latency_s)
        return latency * host.compute_gmacs_per_s / self.compute_gmacs_per_s

    def energy_mj(
        self,
        compute_s: float,
        idle_s: float = 0.0,
        tx_bytes: float = 0.0,
        link: LinkProfile | None = None,
        rx_bytes: float = 0.0,
    ) -> float:
        """Estimated device energy in millijoules.

        ``active_power_w * compute_s + idle_power_w * idle_s + radio energy`` where the radio
        energy is ``link.tx_energy_j(tx_bytes) + link.rx_energy_j(rx_bytes)``.

        Args:
            compute_s: Seconds spent computing.
            idle_s: Seconds spent waiting (transfers, server time).
            tx_bytes: Bytes sent up over ``link``.
            link: The link; required when ``tx_bytes`` or ``rx_bytes`` is non-zero.
            rx_bytes: Bytes received over ``link``.

        Returns:
            Energy in mJ.
        """
        compute_s = _check_nonneg("compute_s", compute_s)
        idle_s = _check_nonneg("idle_s", idle_s)
        tx_bytes = _check_nonneg("tx_bytes", tx_bytes)
        rx_bytes = _check_nonneg("rx_bytes", rx_bytes)
        joules = self.active_power_w * compute_s + self.idle_power_w * idle_s
        if tx_bytes or rx_bytes:
            if not isinstance(link, LinkProfile):
                raise InputError(
                    "energy_mj: bytes are sent or received but no link was given; pass "
                    "link=get_link('wifi') (or another LinkProfile)"
                )
            joules += link.tx_energy_j(tx_bytes) + link.rx_energy_j(rx_bytes)
        return joules * 1e3

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description, including sources and the estimate flag."""
        return {
            "name": self.name,
            "description": self.description,
            "compute_gmacs_per_s": self.compute_gmacs_per_s,
            "active_power_w": self.active_power_w,
            "idle_power_w": self.idle_power_w,
            "estimate": self.estimate,
            "sources": dict(self.sources),
        }


@dataclass(frozen=True)
class LinkProfile:
    """A network link between device and server.

    Attributes:
        name: Short identifier, e.g. ``"lte"``.
        uplink_mbps: Device -> server application throughput, Mbit/s.
        downlink_mbps: Server -> device application throughput, Mbit/s.
        rtt_ms: Round-trip time, ms.
        jitter_ms: Jitter, ms (informational; the planner uses mean times).
        loss_rate: Packet loss rate in [0, 1); lost data is assumed retransmitted.
        tx_nj_per_bit: Device radio energy per bit sent, nJ.
        rx_nj_per_bit: Device radio energy per bit received, nJ.
        description: Free text.
        sources: Field name -> citation.
        estimate: True if any figure is an estimate.
    """

    name: str
    uplink_mbps: float
    downlink_mbps: float
    rtt_ms: float
    jitter_ms: float = 0.0
    loss_rate: float = 0.0
    tx_nj_per_bit: float = 0.0
    rx_nj_per_bit: float = 0.0
    description: str = ""
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)
    estimate: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InputError(f"link profile name must be a non-empty string, got {self.name!r}")
        for fname, (rule, expected) in _LINK_FIGURES.items():
            value = _check_figure("link", self.name, fname, getattr(self, fname), rule, expected)
            object.__setattr__(self, fname, value)
        object.__setattr__(self, "sources", dict(self.sources))

    def bytes_time_s(self, nbytes: float, direction: str = "up") -> float:
        """Estimated seconds to move ``nbytes`` one way: RTT/2 + bits / (rate x (1 - loss)).

        Lost packets are assumed retransmitted, so the goodput is ``rate * (1 - loss_rate)``.
        Zero bytes take zero time (nothing is sent).

        Args:
            nbytes: Bytes to move (>= 0).
            direction: ``"up"`` (device -> server) or ``"down"`` (server -> device).

        Returns:
            Seconds.
        """
        nbytes = _check_nonneg("nbytes", nbytes)
        if nbytes == 0:
            return 0.0
        rate = self._rate(direction)
        return self.rtt_ms / 2e3 + nbytes * 8.0 / (rate * 1e6 * (1.0 - self.loss_rate))

    def tx_energy_j(self, nbytes: float) -> float:
        """Estimated device radio energy (J) to send ``nbytes``, retransmissions included."""
        nbytes = _check_nonneg("nbytes", nbytes)
        return nbytes * 8.0 * self.tx_nj_per_bit * 1e-9 / (1.0 - self.loss_rate)

    def rx_energy_j(self, nbytes: float) -> float:
        """Estimated device radio energy (J) to receive ``nbytes``, retransmissions included."""
        nbytes = _check_nonneg("nbytes", nbytes)
        return nbytes * 8.0 * self.rx_nj_per_bit * 1e-9 / (1.0 - self.loss_rate)

    def with_bandwidth(self, uplink_mbps: float, downlink_mbps: float | None = None) -> LinkProfile:
        """A copy of this link with another bandwidth (e.g. a measured one).

        The per-bit radio energy is kept as is (in reality it depends on the rate).

        Args:
            uplink_mbps: New uplink rate, Mbit/s (> 0).
            downlink_mbps: New downlink rate; unchanged if None.

        Returns:
            A new LinkProfile flagged as an estimate.
        """
        sources = dict(self.sources)
        sources["uplink_mbps"] = "set at run time (measured or assumed bandwidth)"
        changes: dict[str, Any] = {"uplink_mbps": uplink_mbps, "sources": sources, "estimate": True}
        if downlink_mbps is not None:
            changes["downlink_mbps"] = downlink_mbps
            sources["downlink_mbps"] = "set at run time (measured or assumed bandwidth)"
        return replace(self, **changes)

    def _rate(self, direction: str) -> float:
        if direction == "up":
            return self.uplink_mbps
        if direction == "down":
            return self.downlink_mbps
        raise InputError(f"direction must be 'up' or 'down', got {direction!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description, including sources and the estimate flag."""
        out: dict[str, Any] = {"name": self.name, "description": self.description}
        out.update({f: getattr(self, f) for f in _LINK_FIGURES})
        out.update({"estimate": self.estimate, "sources": dict(self.sources)})
        return out


def energy_mj(
    device: DeviceProfile,
    compute_s: float,
    idle_s: float = 0.0,
    tx_bytes: float = 0.0,
    link: LinkProfile | None = None,
    rx_bytes: float = 0.0,
) -> float:
    """Estimated device energy in mJ; see :meth:`DeviceProfile.energy_mj`.

    Args:
        device: The device.
        compute_s: Seconds spent computing.
        idle_s: Seconds spent waiting.
        tx_bytes: Bytes sent over ``link``.
        link: The link (needed when bytes move).
        rx_bytes: Bytes received over ``link``.

    Returns:
        Energy in mJ.
    """
    return device.energy_mj(compute_s, idle_s, tx_bytes, link, rx_bytes)
