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

from .files import get_device, get_link, load_devices, load_links
from .host import measure_host_profile
from .profiles import DeviceProfile, LinkProfile, energy_mj

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
