"""Neurosurgeon-style split planning on cost data: per-cut latency and device energy
estimates for a device, a server and a link, and the choice of the cut that minimises the
objective (the formulas are in :mod:`splitexit.split.planner`)."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from splitexit.devices import (
    DeviceProfile,
    LinkProfile,
    get_device,
    get_link,
    measure_host_profile,
)
from splitexit.errors import InputError

__all__ = ["LOCAL", "OBJECTIVES", "OFFLOAD", "CutCost", "Plan", "PlanRow", "plan"]

LOCAL = "local"
OFFLOAD = "offload"
OBJECTIVES = ("latency", "energy", "latency+energy")


def finite_nonneg(owner: str, what: str, value: Any) -> float:
    """``value`` as a float; InputError naming ``owner`` and ``what`` unless finite and >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{owner}: {what} must be a finite number >= 0, got {value!r}")
    if value < 0:
        raise InputError(f"{owner}: {what} must be >= 0, got {value}")
    return float(value)


def positive(what: str, value: Any) -> float:
    """``value`` as a float; InputError naming ``what`` unless finite and > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise InputError(f"{what} must be a finite number > 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class CutCost:
    """Cost of one candidate split point, per sample.

    Attributes:
        name: Cut name; ``"local"`` (all on the device, nothing sent) and ``"offload"`` (send
            the input) are special.
        device_macs: MACs run on the device up to the cut, including device-side early-exit
            heads and a bottleneck encoder.
        server_macs: MACs run on the server after the cut.
        payload_bytes: Bytes sent up after the codec (the input bytes for ``"offload"``, 0 for
            ``"local"``).
        exit_fraction: Fraction of samples that leave at a device-side exit before sending;
            only the other ``1 - exit_fraction`` send and run the server part.
        device_latency_s: Device-side latency measured on the host; if given it is scaled to
            the device instead of using ``device_macs``.
        server_latency_s: Server-side latency measured on the host; if given it is scaled to
            the server instead of using ``server_macs``.
    """

    name: str
    device_macs: float
    server_macs: float
    payload_bytes: float
    exit_fraction: float = 0.0
    device_latency_s: float | None = None
    server_latency_s: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InputError(f"CutCost.name must be a non-empty string, got {self.name!r}")
        owner = f"cut {self.name!r}"
        for fname in ("device_macs", "server_macs", "payload_bytes"):
            object.__setattr__(self, fname, finite_nonneg(owner, fname, getattr(self, fname)))
        for fname in ("device_latency_s", "server_latency_s"):
            value = getattr(self, fname)
            if value is not None:
                object.__setattr__(self, fname, finite_nonneg(owner, fname, value))
        frac = finite_nonneg(owner, "exit_fraction", self.exit_fraction)
        if frac > 1:
            raise InputError(f"{owner}: exit_fraction must be in [0, 1], got {frac}")
        object.__setattr__(self, "exit_fraction", frac)
        if self.name == LOCAL and (
            self.payload_bytes or self.server_macs or self.server_latency_s
        ):
            raise InputError(
                f"cut {LOCAL!r} runs everything on the device: payload_bytes, server_macs and "
                "server_latency_s must be 0 (put the whole model's MACs in device_macs)"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CutCost:
        """Build a CutCost from a mapping with the same field names.

        Args:
            data: Mapping with at least ``name``, ``device_macs``, ``server_macs`` and
                ``payload_bytes``.

        Returns:
            The CutCost.

        Raises:
            InputError: Missing or unknown keys, or bad values.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(
                f"unknown CutCost field(s) {unknown} in {dict(data)!r}; known fields: "
                f"{sorted(known)}"
            )
        missing = [k for k in ("name", "device_macs", "server_macs", "payload_bytes")
                   if k not in data]
        if missing:
            raise InputError(f"CutCost {dict(data)!r} misses field(s) {missing}")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly copy of the fields."""
        return asdict(self)


@dataclass(frozen=True)
class PlanRow:
    """Predicted per-sample cost of one cut (all figures are estimates).

    Attributes:
        name: Cut name.
        device_s: Device compute time.
        tx_s: Expected network time: (1 - exit_fraction) x (payload up + answer down).
        server_s: Expected server compute time: (1 - exit_fraction) x server time.
        latency_s: ``device_s + tx_s + server_s``.
        energy_mj: Expected device energy (compute, waiting, radio).
        payload_bytes: Bytes sent by a sample that does not exit on the device.
        exit_fraction: Fraction of samples exiting on the device.
        score: Value of the objective (lower is better).
        estimate: Always True: these are model predictions, not measurements.
    """

    name: str
    device_s: float
    tx_s: float
    server_s: float
    latency_s: float
    energy_mj: float
    payload_bytes: float
    exit_fraction: float
    score: float
    estimate: bool = True

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly copy of the fields."""
        return asdict(self)


@dataclass(frozen=True)
class Plan:
    """Result of :func:`plan`: the chosen cut and the prediction for every cut.

    Attributes:
        choice: Name of the chosen cut.
        objective: ``"latency"``, ``"energy"`` or ``"latency+energy"``.
        rows: One PlanRow per cut, in the order given.
        device: Device profile name.
        server: Server profile name.
        link: Link profile name.
        uplink_mbps: Uplink bandwidth assumed.
        response_bytes: Bytes of the answer sent back per sample.
        latency_weight: Weight of latency in ``"latency+energy"`` (energy gets 1 - weight).
        estimate: Always True.
    """

    choice: str
    objective: str
    rows: tuple[PlanRow, ...]
    device: str
    server: str
    link: str
    uplink_mbps: float
    response_bytes: float
    latency_weight: float
    estimate: bool = True

    @property
    def best(self) -> PlanRow:
        """The row of the chosen cut."""
        return self.row(self.choice)

    def row(self, name: str) -> PlanRow:
        """The row of cut ``name``.

        Raises:
            InputError: No such cut; the message lists the cuts.
        """
        for r in self.rows:
            if r.name == name:
                return r
        raise InputError(f"no cut {name!r} in this plan; cuts: {[r.name for r in self.rows]}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (rows as dicts)."""
        return {
            "choice": self.choice,
            "objective": self.objective,
            "device": self.device,
            "server": self.server,
            "link": self.link,
            "uplink_mbps": self.uplink_mbps,
            "response_bytes": self.response_bytes,
            "latency_weight": self.latency_weight,
            "estimate": self.estimate,
            "rows": [r.to_dict() for r in self.rows],
        }


@functools.lru_cache(maxsize=1)
def _this_host() -> DeviceProfile:
    """This machine's profile, measured once per process."""
    return measure_host_profile()


def normalize_cuts(cuts: Iterable[CutCost | Mapping[str, Any]]) -> tuple[CutCost, ...]:
    """The cuts as CutCost objects with unique names (dicts are converted)."""
    if isinstance(cuts, (CutCost, Mapping, str, bytes)):
        raise InputError("cuts must be a list of CutCost (or of dicts with CutCost fields)")
    try:
        items = list(cuts)
    except TypeError as exc:
        raise InputError(f"cuts must be a list of CutCost, got {type(cuts).__name__}") from exc
    if not items:
        raise InputError("cuts is empty; give at least one CutCost (e.g. 'local' and 'offload')")
    out: list[CutCost] = []
    for item in items:
        if isinstance(item, CutCost):
            out.append(item)
        elif isinstance(item, Mapping):
            out.append(CutCost.from_dict(item))
        else:
            raise InputError(f"each cut must be a CutCost or a dict, got {type(item).__name__}")
    names = [c.name for c in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"cut names must be unique; repeated: {dupes}")
    return tuple(out)


def check_objective(objective: str, latency_weight: float) -> float:
    """Validate the objective; the latency weight as a float in [0, 1]."""
    if objective not in OBJECTIVES:
        raise InputError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
    w = finite_nonneg("plan", "latency_weight", latency_weight)
    if w > 1:
        raise InputError(f"latency_weight must be in [0, 1], got {w}")
    return w


def _row_costs(
    cut: CutCost, device: DeviceProfile, server: DeviceProfile, link: LinkProfile,
    response_bytes: float, host: DeviceProfile | None,
) -> tuple[float, float, float, float]:
    """(device_s, tx_s, server_s, energy_mj) for one cut, expected per sample."""
    if cut.device_latency_s is not None:
        device_s = device.scale_latency(cut.device_latency_s, host or _this_host())
    else:
        device_s = device.compute_time_s(cut.device_macs)
    if cut.name == LOCAL:
        return device_s, 0.0, 0.0, device.energy_mj(device_s)
    if cut.server_latency_s is not None:
        server_full = server.scale_latency(cut.server_latency_s, host or _this_host())
    else:
        server_full = server.compute_time_s(cut.server_macs)
    p = 1.0 - cut.exit_fraction
    net_full = link.bytes_time_s(cut.payload_bytes, "up") + link.bytes_time_s(
        response_bytes, "down"
    )
    tx_s, server_s = p * net_full, p * server_full
    energy = device.energy_mj(
        compute_s=device_s,
        idle_s=tx_s + server_s,
        tx_bytes=p * cut.payload_bytes,
        link=link,
        rx_bytes=p * response_bytes,
    )
    return device_s, tx_s, server_s, energy


def plan(
    cuts: Iterable[CutCost | Mapping[str, Any]],
    device: str | DeviceProfile,
    server: str | DeviceProfile,
    link: str | LinkProfile,
    objective: str = "latency",
    response_bytes: float = 40,
    *,
    host: DeviceProfile | None = None,
    latency_weight: float = 0.5,
) -> Plan:
    """Predict latency and device energy of every cut and choose the best one.

    Args:
        cuts: Candidate cuts (CutCost or dicts with its fields), at least one.
        device: Device profile or its name (see :func:`splitexit.devices.load_devices`).
        server: Server profile or its name.
        link: Link profile or its name (see :func:`splitexit.devices.load_links`).
        objective: ``"latency"`` (seconds per sample), ``"energy"`` (device mJ per sample) or
            ``"latency+energy"``: ``w * latency / max latency + (1 - w) * energy / max energy``
            over the cuts, with ``w = latency_weight``.
        response_bytes: Bytes of the answer sent back to the device per offloaded sample.
        host: Profile of the machine where ``device_latency_s`` / ``server_latency_s`` were
            measured; if None and a cut has such a latency, this machine is measured once with
            :func:`splitexit.devices.measure_host_profile`.
        latency_weight: Weight of latency for ``"latency+energy"``, in [0, 1].

    Returns:
        A Plan; ties go to the cut listed first.

    Raises:
        InputError: Empty or malformed cuts, negative numbers, unknown profile names, unknown
            objective.
    """
    cut_list = normalize_cuts(cuts)
    weight = check_objective(objective, latency_weight)
    dev, srv, lnk = get_device(device), get_device(server), get_link(link)
    resp = finite_nonneg("plan", "response_bytes", response_bytes)
    if host is not None and not isinstance(host, DeviceProfile):
        raise InputError(f"host must be a DeviceProfile or None, got {type(host).__name__}")

    costs = [_row_costs(c, dev, srv, lnk, resp, host) for c in cut_list]
    latencies = [d + t + s for d, t, s, _ in costs]
    energies = [e for *_, e in costs]
    if objective == "latency":
        scores = latencies
    elif objective == "energy":
        scores = energies
    else:
        max_lat, max_en = max(latencies), max(energies)
        scores = [
            weight * (lat / max_lat if max_lat > 0 else 0.0)
            + (1.0 - weight) * (en / max_en if max_en > 0 else 0.0)
            for lat, en in zip(latencies, energies, strict=True)
        ]
    rows = tuple(
        PlanRow(
            name=c.name,
            device_s=d,
            tx_s=t,
            server_s=s,
            latency_s=lat,
            energy_mj=e,
            payload_bytes=c.payload_bytes,
            exit_fraction=c.exit_fraction,
            score=score,
        )
        for c, (d, t, s, e), lat, score in zip(cut_list, costs, latencies, scores, strict=True)
    )
    best = min(range(len(rows)), key=lambda i: (scores[i], i))
    return Plan(
        choice=rows[best].name,
        objective=objective,
        rows=rows,
        device=dev.name,
        server=srv.name,
        link=lnk.name,
        uplink_mbps=lnk.uplink_mbps,
        response_bytes=resp,
        latency_weight=weight,
    )
