"""Device and link profiles, and the energy model used for estimates.

Profiles are data: ``profiles/devices.json`` and ``profiles/links.json`` ship with the package
and every figure in them carries its ``source`` (datasheet, paper or benchmark) and whether it
is an ``estimate``. A user's own JSON file in the same format can be loaded with
:func:`load_devices` / :func:`load_links`; it is validated and a bad file raises
:class:`~splitexit.errors.CorruptFileError` naming the profile, the field and what is expected.

Everything computed here for a device other than this machine is an estimate:

* compute time = MACs / effective MAC rate (:meth:`DeviceProfile.compute_time_s`), or a latency
  measured on this machine scaled by the ratio of MAC rates
  (:meth:`DeviceProfile.scale_latency`, with the host rate from :func:`measure_host_profile`);
* transfer time = RTT / 2 + bits / (bandwidth x (1 - loss)) (:meth:`LinkProfile.bytes_time_s`);
* device energy = active power x compute time + idle power x waiting time + radio energy per bit
  x bits sent and received (:meth:`DeviceProfile.energy_mj`).

A figure file entry is either a bare number or ``{"value": 6.4, "source": "...",
"estimate": true}``; a bare number is recorded as user-supplied and flagged as an estimate.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from splitexit.errors import CorruptFileError, InputError

__all__ = [
    "DeviceProfile",
    "LinkProfile",
    "energy_mj",
    "get_device",
    "get_link",
    "load_devices",
    "load_links",
    "measure_host_profile",
]

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


# ---------------------------------------------------------------------------------------------
# Loading profile files


def _read_json(path: Path | None, builtin: str) -> tuple[Any, str]:
    """Return the parsed JSON document and a label of where it came from."""
    if path is None:
        text = resources.files("splitexit").joinpath("profiles").joinpath(builtin).read_text("utf-8")
        return json.loads(text), f"built-in profiles/{builtin}"
    path = Path(path)
    if not path.is_file():
        raise InputError(f"profile file {str(path)!r} does not exist; give the path to a JSON file")
    try:
        return json.loads(path.read_text("utf-8")), str(path)
    except UnicodeDecodeError as exc:
        raise CorruptFileError(f"profile file {str(path)!r} is not UTF-8 text: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise CorruptFileError(
            f"profile file {str(path)!r} is not valid JSON (line {exc.lineno}, column "
            f"{exc.colno}: {exc.msg}); fix the file or restore it from profiles/"
        ) from exc


def _entries(doc: Any, key: str, origin: str) -> list[dict[str, Any]]:
    """The list of profile entries: ``{key: [...]}``, ``{key: {name: {...}}}`` or a bare list."""
    body = doc.get(key) if isinstance(doc, dict) else doc
    if isinstance(body, dict):
        body = [{"name": name, **entry} if isinstance(entry, dict) else entry
                for name, entry in body.items()]
    if not isinstance(body, list):
        raise CorruptFileError(
            f"{origin}: expected a JSON object with a {key!r} list of profiles "
            f'(e.g. {{"{key}": [{{"name": ...}}]}}), got {type(body).__name__}'
        )
    return body


def _parse(
    entry: Any, index: int, kind: str, figures: dict[str, tuple[str, str]],
    optional: dict[str, float], origin: str,
) -> dict[str, Any]:
    """Turn one JSON entry into constructor keyword arguments, validating presence and types."""
    if not isinstance(entry, dict):
        raise CorruptFileError(f"{origin}: {kind} entry #{index} is not a JSON object")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise CorruptFileError(
            f"{origin}: {kind} entry #{index} has no 'name'; expected a non-empty string"
        )
    kwargs: dict[str, Any] = {"name": name, "description": str(entry.get("description", ""))}
    sources: dict[str, str] = {}
    any_estimate = False
    for fname, (_rule, expected) in figures.items():
        if fname not in entry:
            if fname in optional:
                kwargs[fname] = optional[fname]
                sources[fname] = "not given; default"
                continue
            raise CorruptFileError(
                f"{origin}: {kind} profile {name!r} is missing field {fname!r}; expected "
                f'{expected}, e.g. "{fname}": {{"value": ..., "source": "..."}}'
            )
        raw = entry[fname]
        if isinstance(raw, dict):
            if "value" not in raw:
                raise CorruptFileError(
                    f"{origin}: {kind} profile {name!r}: field {fname!r} has no 'value'; "
                    f"expected {expected}"
                )
            kwargs[fname] = raw["value"]
            sources[fname] = str(raw.get("source", f"user-supplied ({origin})"))
            any_estimate |= bool(raw.get("estimate", True))
        else:
            kwargs[fname] = raw
            sources[fname] = f"user-supplied ({origin})"
            any_estimate = True
    kwargs["sources"] = sources
    kwargs["estimate"] = any_estimate
    return kwargs


def _load(
    path: Path | str | None, key: str, kind: str, cls: type,
    figures: dict[str, tuple[str, str]], optional: dict[str, float],
) -> dict[str, Any]:
    doc, origin = _read_json(None if path is None else Path(path), f"{key}.json")
    out: dict[str, Any] = {}
    for index, entry in enumerate(_entries(doc, key, origin)):
        kwargs = _parse(entry, index, kind, figures, optional, origin)
        try:
            profile = cls(**kwargs)
        except InputError as exc:
            raise CorruptFileError(f"{origin}: {exc}") from exc
        if profile.name in out:
            raise CorruptFileError(
                f"{origin}: {kind} profile {profile.name!r} appears twice; names must be unique"
            )
        out[profile.name] = profile
    if not out:
        raise CorruptFileError(f"{origin}: no {kind} profiles in the file")
    return out


@functools.lru_cache(maxsize=1)
def _builtin_devices() -> dict[str, DeviceProfile]:
    return _load(None, "devices", "device", DeviceProfile, _DEVICE_FIGURES, {})


@functools.lru_cache(maxsize=1)
def _builtin_links() -> dict[str, LinkProfile]:
    return _load(None, "links", "link", LinkProfile, _LINK_FIGURES, _LINK_OPTIONAL)


def load_devices(path: str | Path | None = None) -> dict[str, DeviceProfile]:
    """Load device profiles.

    Args:
        path: A JSON file in the format of ``profiles/devices.json``; None for the built-in
            profiles (Raspberry Pi 4, Jetson Nano 5 W / 10 W, 2-vCPU cloud VM, T4 GPU server).

    Returns:
        Profile name -> DeviceProfile.

    Raises:
        InputError: The file does not exist.
        CorruptFileError: The file is not valid JSON, or a profile misses a field or has a
            figure out of range (the message names the profile and the field).
    """
    if path is None:
        return dict(_builtin_devices())
    return _load(path, "devices", "device", DeviceProfile, _DEVICE_FIGURES, {})


def load_links(path: str | Path | None = None) -> dict[str, LinkProfile]:
    """Load link profiles.

    Args:
        path: A JSON file in the format of ``profiles/links.json``; None for the built-in
            profiles (lpwan, lte_weak, lte, wifi, 5g). ``jitter_ms``, ``loss_rate`` and
            ``rx_nj_per_bit`` may be left out (default 0); the other fields are required.

    Returns:
        Profile name -> LinkProfile.

    Raises:
        InputError: The file does not exist.
        CorruptFileError: The file is not valid JSON, or a profile misses a field or has a
            figure out of range (the message names the profile and the field).
    """
    if path is None:
        return dict(_builtin_links())
    return _load(path, "links", "link", LinkProfile, _LINK_FIGURES, _LINK_OPTIONAL)


def _lookup(name: Any, table: dict[str, Any], kind: str, origin: str) -> Any:
    if not isinstance(name, str):
        raise InputError(f"{kind} must be a profile name or a {kind.title()}Profile, got {name!r}")
    key = name.strip().lower().replace("-", "_")
    if key in table:
        return table[key]
    for candidate, profile in table.items():
        if candidate.lower().replace("-", "_") == key:
            return profile
    raise InputError(
        f"unknown {kind} {name!r} in {origin}; known {kind}s: {', '.join(sorted(table))}"
    )


def get_device(name: str | DeviceProfile, path: str | Path | None = None) -> DeviceProfile:
    """Look up a device profile by name (a DeviceProfile is returned unchanged).

    Args:
        name: Profile name such as ``"rpi4"`` (case-insensitive, ``-`` and ``_`` alike).
        path: Profile file to look in; None for the built-in profiles.

    Returns:
        The profile.

    Raises:
        InputError: Unknown name; the message lists the known ones.
    """
    if isinstance(name, DeviceProfile):
        return name
    origin = "built-in device profiles" if path is None else str(path)
    return _lookup(name, load_devices(path), "device", origin)


def get_link(name: str | LinkProfile, path: str | Path | None = None) -> LinkProfile:
    """Look up a link profile by name (a LinkProfile is returned unchanged).

    Args:
        name: Profile name such as ``"lte"`` (case-insensitive, ``-`` and ``_`` alike).
        path: Profile file to look in; None for the built-in profiles.

    Returns:
        The profile.

    Raises:
        InputError: Unknown name; the message lists the known ones.
    """
    if isinstance(name, LinkProfile):
        return name
    origin = "built-in link profiles" if path is None else str(path)
    return _lookup(name, load_links(path), "link", origin)


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
