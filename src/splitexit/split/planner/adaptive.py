"""Adaptive split planning: :class:`Planner` tracks the uplink bandwidth from observed
transfers (EWMA) and re-plans, with hysteresis, recording when the chosen cut changes."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any

from splitexit.devices import DeviceProfile, LinkProfile, get_device, get_link
from splitexit.errors import InputError

from .estimate import CutCost, Plan, check_objective, finite_nonneg, normalize_cuts, plan, positive

__all__ = ["Planner"]


class Planner:
    """Holds cuts and profiles; tracks the uplink bandwidth and re-plans when it changes.

    The bandwidth estimate starts at the link profile's uplink rate and is updated by an
    exponentially weighted moving average of observed transfers (:meth:`observe`), or set
    directly (:meth:`replan`). Every change of choice is appended to :attr:`switches` and
    reported to ``on_change``.

    Args:
        cuts: Candidate cuts, as for :func:`plan`.
        device: Device profile or name.
        server: Server profile or name.
        link: Link profile or name (its RTT, loss and energy figures are kept; only the uplink
            bandwidth is tracked).
        objective: As for :func:`plan`.
        response_bytes: As for :func:`plan`.
        host: As for :func:`plan`.
        latency_weight: As for :func:`plan`.
        alpha: EWMA weight of a new observation, in (0, 1].
        hysteresis: Switch cut only if the new best scores at least this fraction lower than
            the current choice (0 switches on any improvement); avoids flapping.
        on_change: Called as ``on_change(old_choice, new_plan)`` when the choice changes.

    Attributes:
        switches: One dict per change of choice: ``bandwidth_mbps``, ``from``, ``to``.
        observations: Number of transfers observed.
    """

    def __init__(
        self,
        cuts: Iterable[CutCost | Mapping[str, Any]],
        device: str | DeviceProfile,
        server: str | DeviceProfile,
        link: str | LinkProfile,
        objective: str = "latency",
        response_bytes: float = 40,
        *,
        host: DeviceProfile | None = None,
        latency_weight: float = 0.5,
        alpha: float = 0.3,
        hysteresis: float = 0.0,
        on_change: Callable[[str, Plan], None] | None = None,
    ) -> None:
        self.cuts = normalize_cuts(cuts)
        self.device = get_device(device)
        self.server = get_device(server)
        self.link = get_link(link)
        self.objective = objective
        self.latency_weight = check_objective(objective, latency_weight)
        self.response_bytes = finite_nonneg("Planner", "response_bytes", response_bytes)
        self.host = host
        self.alpha = positive("alpha", alpha)
        if self.alpha > 1:
            raise InputError(f"alpha must be in (0, 1], got {alpha}")
        self.hysteresis = finite_nonneg("Planner", "hysteresis", hysteresis)
        if self.hysteresis >= 1:
            raise InputError(f"hysteresis must be in [0, 1), got {hysteresis}")
        self.on_change = on_change
        self.switches: list[dict[str, Any]] = []
        self.observations = 0
        self._bandwidth = self.link.uplink_mbps
        self._plan = self._compute(previous=None)

    @property
    def bandwidth_mbps(self) -> float:
        """Current uplink bandwidth estimate, Mbit/s."""
        return self._bandwidth

    @property
    def plan(self) -> Plan:
        """The current plan."""
        return self._plan

    @property
    def choice(self) -> str:
        """Name of the currently chosen cut."""
        return self._plan.choice

    def replan(self, bandwidth_mbps: float | None = None) -> Plan:
        """Re-plan, optionally with a new uplink bandwidth.

        Args:
            bandwidth_mbps: New uplink bandwidth estimate (> 0), replacing the EWMA state; None
                re-plans with the current estimate.

        Returns:
            The new current plan.
        """
        if bandwidth_mbps is not None:
            self._bandwidth = positive("bandwidth_mbps", bandwidth_mbps)
        return self._update()

    def observe(self, nbytes: float, seconds: float) -> Plan:
        """Fold one observed uplink transfer into the bandwidth estimate and re-plan.

        ``seconds`` is the wall time of the transfer as :meth:`LinkProfile.bytes_time_s`
        models it (one-way latency + serialisation). The link's one-way latency (RTT / 2) is
        subtracted when the transfer took longer than that, and the loss rate is undone, so a
        transfer that took exactly the modelled time reproduces the modelled bandwidth.

        Args:
            nbytes: Bytes sent (> 0).
            seconds: Seconds the transfer took (> 0).

        Returns:
            The new current plan.
        """
        nbytes = positive("nbytes", nbytes)
        seconds = positive("seconds", seconds)
        one_way = self.link.rtt_ms / 2e3
        serial = seconds - one_way if seconds > one_way else seconds
        sample = nbytes * 8.0 / serial / 1e6 / (1.0 - self.link.loss_rate)
        self._bandwidth = self.alpha * sample + (1.0 - self.alpha) * self._bandwidth
        self.observations += 1
        return self._update()

    def _compute(self, previous: str | None) -> Plan:
        new = plan(
            self.cuts,
            self.device,
            self.server,
            self.link.with_bandwidth(self._bandwidth),
            self.objective,
            self.response_bytes,
            host=self.host,
            latency_weight=self.latency_weight,
        )
        if previous is not None and new.choice != previous and self.hysteresis > 0:
            kept = new.row(previous).score
            if new.best.score > kept * (1.0 - self.hysteresis):
                new = replace(new, choice=previous)
        return new

    def _update(self) -> Plan:
        old = self._plan.choice
        self._plan = self._compute(previous=old)
        if self._plan.choice != old:
            self.switches.append(
                {"bandwidth_mbps": self._bandwidth, "from": old, "to": self._plan.choice}
            )
            if self.on_change is not None:
                self.on_change(old, self._plan)
        return self._plan
