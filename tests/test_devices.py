"""Tests of device/link profiles, their validation and the energy model."""

from __future__ import annotations

import json

import pytest

from splitexit.devices import (
    DeviceProfile,
    LinkProfile,
    energy_mj,
    get_device,
    get_link,
    load_devices,
    load_links,
    measure_host_profile,
)
from splitexit.errors import CorruptFileError, InputError


def _write(tmp_path, name, doc):
    path = tmp_path / name
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return path


GOOD_DEVICE = {
    "name": "board",
    "compute_gmacs_per_s": {"value": 2.0, "source": "my bench", "estimate": False},
    "active_power_w": {"value": 5.0, "source": "my meter", "estimate": False},
    "idle_power_w": {"value": 1.0, "source": "my meter", "estimate": False},
}


def test_builtin_devices_have_sources_and_expected_figures():
    devices = load_devices()
    assert {"rpi4", "jetson_nano_5w", "jetson_nano_10w", "cloud_vm_2vcpu", "gpu_server_t4"} <= set(
        devices
    )
    for dev in devices.values():
        assert set(dev.sources) == {"compute_gmacs_per_s", "active_power_w", "idle_power_w"}
        assert all(src.strip() for src in dev.sources.values())
        assert dev.estimate  # the compute rates are estimates
    rpi = devices["rpi4"]
    assert rpi.active_power_w == 6.4 and rpi.idle_power_w == 2.7
    assert "estimate" in rpi.sources["compute_gmacs_per_s"].lower()
    assert devices["jetson_nano_5w"].active_power_w == 5.0
    assert devices["jetson_nano_10w"].active_power_w == 10.0


def test_builtin_links_ordered_by_bandwidth_and_sourced():
    links = load_links()
    ups = [links[n].uplink_mbps for n in ("lpwan", "lte_weak", "lte", "wifi", "5g")]
    assert ups == [0.1, 1.0, 10.0, 50.0, 200.0]
    for link in links.values():
        assert link.estimate
        assert all(src.strip() for src in link.sources.values())
    assert "Huang" in links["lte"].sources["tx_nj_per_bit"]
    # Huang et al. MobiSys'12 LTE model: alpha_u + beta / t_u at 10 Mbit/s
    assert links["lte"].tx_nj_per_bit == pytest.approx(438.39 + 1288.04 / 10, abs=0.01)


def test_get_by_name_and_unknown_name():
    assert get_device("RPi4").name == "rpi4"
    assert get_link("LTE-weak").name == "lte_weak"
    dev = get_device("rpi4")
    assert get_device(dev) is dev
    with pytest.raises(InputError, match="unknown device 'pi5'.*rpi4"):
        get_device("pi5")
    with pytest.raises(InputError, match="unknown link 'carrier_pigeon'.*wifi"):
        get_link("carrier_pigeon")


def test_user_file_loads_and_bare_numbers_are_estimates(tmp_path):
    bare = {"name": "bare", "compute_gmacs_per_s": 3, "active_power_w": 4, "idle_power_w": 1}
    path = _write(tmp_path, "dev.json", {"devices": [GOOD_DEVICE, bare]})
    devices = load_devices(path)
    assert devices["board"].compute_gmacs_per_s == 2.0
    assert devices["board"].estimate is False
    assert devices["board"].sources["active_power_w"] == "my meter"
    assert devices["bare"].estimate is True
    assert "user-supplied" in devices["bare"].sources["active_power_w"]
    assert get_device("board", path).idle_power_w == 1.0


def test_missing_field_names_profile_and_field(tmp_path):
    entry = {k: v for k, v in GOOD_DEVICE.items() if k != "active_power_w"}
    path = _write(tmp_path, "dev.json", {"devices": [entry]})
    with pytest.raises(CorruptFileError, match=r"'board'.*missing field 'active_power_w'.*watts"):
        load_devices(path)


def test_negative_and_zero_figures_rejected(tmp_path):
    entry = dict(GOOD_DEVICE, compute_gmacs_per_s={"value": -1.0, "source": "x"})
    path = _write(tmp_path, "dev.json", {"devices": [entry]})
    with pytest.raises(CorruptFileError, match=r"'board'.*'compute_gmacs_per_s' is -1.0.*positive"):
        load_devices(path)
    link = {"name": "slow", "uplink_mbps": 0, "downlink_mbps": 1, "rtt_ms": 10,
            "tx_nj_per_bit": 100}
    path = _write(tmp_path, "links.json", {"links": [link]})
    with pytest.raises(CorruptFileError, match=r"'slow'.*'uplink_mbps' is 0.0.*positive"):
        load_links(path)
    link = dict(link, uplink_mbps=1, loss_rate=1.5)
    path = _write(tmp_path, "links.json", {"links": [link]})
    with pytest.raises(CorruptFileError, match=r"'loss_rate'.*\[0, 1\)"):
        load_links(path)


def test_other_bad_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_devices(tmp_path / "nope.json")
    with pytest.raises(CorruptFileError, match="not valid JSON"):
        load_devices(_write(tmp_path, "broken.json", '{"devices": [ {'))
    with pytest.raises(CorruptFileError, match="appears twice"):
        load_devices(_write(tmp_path, "dup.json", {"devices": [GOOD_DEVICE, GOOD_DEVICE]}))
    swapped = dict(GOOD_DEVICE, idle_power_w=9.0)
    with pytest.raises(CorruptFileError, match="idle <= active"):
        load_devices(_write(tmp_path, "swap.json", {"devices": [swapped]}))
    with pytest.raises(CorruptFileError, match="'value'"):
        load_devices(_write(tmp_path, "noval.json",
                            {"devices": [dict(GOOD_DEVICE, idle_power_w={"source": "x"})]}))
    with pytest.raises(CorruptFileError, match="'devices' list"):
        load_devices(_write(tmp_path, "shape.json", {"devices": 3}))
    with pytest.raises(CorruptFileError, match="'text'"):
        load_devices(_write(tmp_path, "text.json",
                            {"devices": [dict(GOOD_DEVICE, idle_power_w="text")]}))


def test_link_optional_fields_default_to_zero(tmp_path):
    link = {"name": "min", "uplink_mbps": 1, "downlink_mbps": 2, "rtt_ms": 10,
            "tx_nj_per_bit": 100}
    got = load_links(_write(tmp_path, "links.json", {"links": [link]}))["min"]
    assert (got.jitter_ms, got.loss_rate, got.rx_nj_per_bit) == (0.0, 0.0, 0.0)


def test_direct_construction_validates():
    with pytest.raises(InputError, match="'active_power_w'"):
        DeviceProfile("d", 1.0, -2.0, 0.5)
    with pytest.raises(InputError, match="'rtt_ms'"):
        LinkProfile("l", 1.0, 1.0, float("nan"))


def test_compute_time_and_scaling():
    dev = DeviceProfile("d", compute_gmacs_per_s=2.0, active_power_w=5.0, idle_power_w=1.0)
    host = DeviceProfile("h", compute_gmacs_per_s=10.0, active_power_w=5.0, idle_power_w=1.0)
    assert dev.compute_time_s(1e9) == pytest.approx(0.5)
    assert dev.scale_latency(0.1, host) == pytest.approx(0.5)
    with pytest.raises(InputError, match="macs"):
        dev.compute_time_s(-1)


def test_link_time_and_energy_hand_computed():
    link = LinkProfile("l", uplink_mbps=8.0, downlink_mbps=16.0, rtt_ms=20.0,
                       tx_nj_per_bit=100.0, rx_nj_per_bit=50.0)
    assert link.bytes_time_s(1000) == pytest.approx(0.010 + 8000 / 8e6)
    assert link.bytes_time_s(1000, "down") == pytest.approx(0.010 + 8000 / 16e6)
    assert link.bytes_time_s(0) == 0.0
    assert link.tx_energy_j(1000) == pytest.approx(8000 * 100e-9)
    assert link.rx_energy_j(1000) == pytest.approx(8000 * 50e-9)
    lossy = LinkProfile("x", 8.0, 8.0, 20.0, loss_rate=0.5, tx_nj_per_bit=100.0)
    assert lossy.bytes_time_s(1000) == pytest.approx(0.010 + 2 * 8000 / 8e6)
    assert lossy.tx_energy_j(1000) == pytest.approx(2 * 8000 * 100e-9)
    with pytest.raises(InputError, match="direction"):
        link.bytes_time_s(10, "sideways")
    faster = link.with_bandwidth(80.0)
    assert faster.uplink_mbps == 80.0 and faster.downlink_mbps == 16.0
    assert faster.tx_nj_per_bit == 100.0


def test_energy_model_hand_computed():
    dev = DeviceProfile("d", compute_gmacs_per_s=2.0, active_power_w=5.0, idle_power_w=1.0)
    link = LinkProfile("l", 8.0, 8.0, 0.0, tx_nj_per_bit=100.0, rx_nj_per_bit=50.0)
    # 5 W x 0.1 s + 1 W x 0.2 s + 8000 bit x 100 nJ + 320 bit x 50 nJ
    expected = (0.5 + 0.2 + 8000 * 100e-9 + 320 * 50e-9) * 1e3
    assert dev.energy_mj(0.1, 0.2, 1000, link, rx_bytes=40) == pytest.approx(expected)
    assert energy_mj(dev, 0.1, 0.2, 1000, link, 40) == pytest.approx(expected)
    assert dev.energy_mj(0.1) == pytest.approx(500.0)
    with pytest.raises(InputError, match="no link"):
        dev.energy_mj(0.1, 0.0, 100)
    with pytest.raises(InputError, match="idle_s"):
        dev.energy_mj(0.1, -1.0)


def test_measure_host_profile_is_positive_and_labelled():
    host = measure_host_profile(gmacs_probe=0.01, repeats=1)
    assert host.compute_gmacs_per_s > 0
    assert host.estimate
    assert host.sources["compute_gmacs_per_s"].startswith("measured")
    assert "placeholder" in host.sources["active_power_w"]
    with pytest.raises(InputError, match="gmacs_probe"):
        measure_host_profile(gmacs_probe=0)


def test_to_dict_is_json_and_carries_every_field():
    """Every built-in profile survives to_dict -> JSON -> constructor with all its fields."""
    for cls, profiles in ((DeviceProfile, load_devices()), (LinkProfile, load_links())):
        for profile in profiles.values():
            back = cls(**json.loads(json.dumps(profile.to_dict())))
            assert back == profile
            assert back.sources == profile.sources and back.sources  # not compared by ==
            assert back.description == profile.description and back.estimate
