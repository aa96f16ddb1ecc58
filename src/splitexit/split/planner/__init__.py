"""Neurosurgeon-style split planner working on cost data.

Given, for every candidate cut, the MACs (or host-measured latencies) on each side, the bytes
sent at the cut and the fraction of samples that leave at a device-side early exit, the planner
predicts per-sample latency and device energy for a device, a server and a link, and picks the
cut that minimises the objective (Kang et al., "Neurosurgeon", ASPLOS'17; with early exits as in
SPINN). It never touches a model: the cost table is produced elsewhere.

Per cut, with ``p = 1 - exit_fraction`` (samples that do not exit on the device):

* ``device_s`` = device MACs / device rate (or the host latency scaled to the device);
* ``tx_s`` = p x (uplink time of the payload + downlink time of the answer);
* ``server_s`` = p x (server MACs / server rate, or the host latency scaled to the server);
* ``latency_s`` = device_s + tx_s + server_s;
* ``energy_mj`` = device active power x device_s + idle power x (tx_s + server_s)
  + radio energy of p x payload bits sent and p x answer bits received.

Two cut names are special: ``"local"`` (everything on the device; nothing is sent) and
``"offload"`` (the input is sent). Every figure in a :class:`Plan` is an estimate and is
labelled ``estimate=True``.

:class:`Planner` keeps the cuts and profiles, tracks the uplink bandwidth with an EWMA of
observed transfers (:meth:`Planner.observe`) and re-plans, recording when the choice changes.

Modules: :mod:`~.estimate` (the cost types, the estimates and :func:`plan`) and
:mod:`~.adaptive` (:class:`Planner`).
"""

from .adaptive import Planner
from .estimate import LOCAL, OBJECTIVES, OFFLOAD, CutCost, Plan, PlanRow, plan

__all__ = ["LOCAL", "OBJECTIVES", "OFFLOAD", "CutCost", "Plan", "PlanRow", "Planner", "plan"]
