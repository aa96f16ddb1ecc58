"""Tests of the Neurosurgeon-style split planner on hand-made cost data."""

from __future__ import annotations

import json

import pytest

from splitexit.devices import DeviceProfile, LinkProfile
from splitexit.errors import InputError
from splitexit.split.planner import CutCost, Planner, plan

IMAGE_BYTES = 224 * 224 * 3  # uint8 input sent by "offload"
MODEL_MACS = 1.8e9  # ResNet-18-sized


def resnet_like_cuts():
    """local / an early cut with a big tensor / a bottleneck cut with a small payload / offload."""
    return [
        CutCost("local", device_macs=MODEL_MACS, server_macs=0, payload_bytes=0),
        CutCost("layer1", device_macs=0.6e9, server_macs=1.2e9, payload_bytes=64 * 56 * 56 * 4),
        CutCost("bottleneck", device_macs=0.1e9, server_macs=1.7e9, payload_bytes=2000),
        CutCost("offload", device_macs=0, server_macs=MODEL_MACS, payload_bytes=IMAGE_BYTES),
    ]


def test_offload_on_fast_link_with_slow_device():
    cuts = [c for c in resnet_like_cuts() if c.name in ("local", "offload")]
    p = plan(cuts, "rpi4", "gpu_server_t4", "wifi")
    assert p.choice == "offload"
    assert p.row("offload").latency_s < p.row("local").latency_s
    assert all(r.estimate for r in p.rows) and p.estimate


def test_local_on_lpwan_for_small_model():
    cuts = [
        CutCost("local", device_macs=12.5e6, server_macs=0, payload_bytes=0),
        CutCost("offload", device_macs=0, server_macs=12.5e6, payload_bytes=32 * 32 * 3),
    ]
    p = plan(cuts, "rpi4", "gpu_server_t4", "lpwan")
    assert p.choice == "local"
    local = p.row("local")
    assert local.tx_s == 0 and local.server_s == 0
    assert local.device_s == pytest.approx(12.5e6 / 4e9)


def test_intermediate_cut_when_payload_shrinks():
    p = plan(resnet_like_cuts(), "rpi4", "gpu_server_t4", "lte")
    assert p.choice == "bottleneck"
    # the early cut with a bigger tensor than the input is worse than offloading
    assert p.row("layer1").latency_s > p.row("offload").latency_s


def test_row_arithmetic_hand_computed():
    dev = DeviceProfile("d", compute_gmacs_per_s=1.0, active_power_w=2.0, idle_power_w=0.5)
    srv = DeviceProfile("s", compute_gmacs_per_s=10.0, active_power_w=70.0, idle_power_w=10.0)
    link = LinkProfile("l", uplink_mbps=8.0, downlink_mbps=8.0, rtt_ms=10.0,
                       tx_nj_per_bit=100.0, rx_nj_per_bit=50.0)
    cuts = [
        CutCost("mid", device_macs=1e8, server_macs=1e9, payload_bytes=1000, exit_fraction=0.5),
        CutCost("local", device_macs=1.1e9, server_macs=0, payload_bytes=0),
    ]
    p = plan(cuts, dev, srv, link, response_bytes=40)
    mid = p.row("mid")
    up = 0.005 + 8000 / 8e6
    down = 0.005 + 320 / 8e6
    assert mid.device_s == pytest.approx(0.1)
    assert mid.tx_s == pytest.approx(0.5 * (up + down))
    assert mid.server_s == pytest.approx(0.5 * 0.1)
    assert mid.latency_s == pytest.approx(0.1 + 0.5 * (up + down) + 0.05)
    energy_j = 2.0 * 0.1 + 0.5 * (0.5 * (up + down) + 0.05) + 0.5 * 8000 * 100e-9 \
        + 0.5 * 320 * 50e-9
    assert mid.energy_mj == pytest.approx(energy_j * 1e3)
    assert p.row("local").energy_mj == pytest.approx(2.0 * 1.1 * 1e3)
    assert p.choice == "mid"
    assert p.best is mid


def test_exits_reduce_expected_cost():
    base = dict(device_macs=0.1e9, server_macs=1.7e9, payload_bytes=2000)
    cuts = [CutCost("a", **base), CutCost("b", **base, exit_fraction=0.8)]
    p = plan(cuts, "rpi4", "gpu_server_t4", "lte")
    a, b = p.row("a"), p.row("b")
    assert b.device_s == a.device_s
    assert b.tx_s == pytest.approx(0.2 * a.tx_s)
    assert b.server_s == pytest.approx(0.2 * a.server_s)
    assert b.energy_mj < a.energy_mj
    assert p.choice == "b"


def test_objectives_can_disagree():
    dev = DeviceProfile("fast_hot", compute_gmacs_per_s=100.0, active_power_w=10.0,
                        idle_power_w=9.0)
    srv = DeviceProfile("srv", compute_gmacs_per_s=1e6, active_power_w=70.0, idle_power_w=10.0)
    link = LinkProfile("costly", 1000.0, 1000.0, 0.0, tx_nj_per_bit=1000.0)
    cuts = [
        CutCost("local", device_macs=1e9, server_macs=0, payload_bytes=0),
        CutCost("offload", device_macs=0, server_macs=1e9, payload_bytes=1e5),
    ]
    assert plan(cuts, dev, srv, link, "latency").choice == "offload"
    assert plan(cuts, dev, srv, link, "energy").choice == "local"
    assert plan(cuts, dev, srv, link, "latency+energy", latency_weight=1.0).choice == "offload"
    assert plan(cuts, dev, srv, link, "latency+energy", latency_weight=0.0).choice == "local"


def test_host_measured_latency_is_scaled():
    host = DeviceProfile("host", compute_gmacs_per_s=20.0, active_power_w=15, idle_power_w=5)
    cuts = [CutCost("local", device_macs=1e9, server_macs=0, payload_bytes=0,
                    device_latency_s=0.01)]
    p = plan(cuts, "rpi4", "gpu_server_t4", "wifi", host=host)
    assert p.row("local").device_s == pytest.approx(0.01 * 20.0 / 4.0)


def test_to_dict_is_json_and_dict_cuts_accepted():
    cuts = [c.to_dict() for c in resnet_like_cuts()]
    p = plan(cuts, "rpi4", "gpu_server_t4", "lte")
    d = json.loads(json.dumps(p.to_dict()))
    assert d["choice"] == p.choice and d["estimate"] is True
    assert [r["name"] for r in d["rows"]] == ["local", "layer1", "bottleneck", "offload"]
    assert all(r["estimate"] for r in d["rows"])
    assert {"device_s", "tx_s", "server_s", "latency_s", "energy_mj"} <= set(d["rows"][0])


def test_bad_input_errors():
    cuts = resnet_like_cuts()
    with pytest.raises(InputError, match="empty"):
        plan([], "rpi4", "gpu_server_t4", "lte")
    with pytest.raises(InputError, match="device_macs must be >= 0"):
        CutCost("x", device_macs=-1, server_macs=0, payload_bytes=0)
    with pytest.raises(InputError, match="exit_fraction"):
        CutCost("x", device_macs=1, server_macs=0, payload_bytes=0, exit_fraction=1.5)
    with pytest.raises(InputError, match="payload_bytes"):
        CutCost("x", device_macs=1, server_macs=0, payload_bytes=float("nan"))
    with pytest.raises(InputError, match="'local' runs everything"):
        CutCost("local", device_macs=1, server_macs=5, payload_bytes=10)
    with pytest.raises(InputError, match="unknown device 'pi9'"):
        plan(cuts, "pi9", "gpu_server_t4", "lte")
    with pytest.raises(InputError, match="unknown link 'lora2'"):
        plan(cuts, "rpi4", "gpu_server_t4", "lora2")
    with pytest.raises(InputError, match="objective"):
        plan(cuts, "rpi4", "gpu_server_t4", "lte", objective="speed")
    with pytest.raises(InputError, match="unique"):
        plan(cuts + cuts[:1], "rpi4", "gpu_server_t4", "lte")
    with pytest.raises(InputError, match="unknown CutCost field"):
        plan([{"name": "a", "device_macs": 1, "server_macs": 1, "payload_bytes": 1, "x": 2}],
             "rpi4", "gpu_server_t4", "lte")
    with pytest.raises(InputError, match="response_bytes"):
        plan(cuts, "rpi4", "gpu_server_t4", "lte", response_bytes=-4)


def test_replan_changes_choice_when_bandwidth_drops():
    seen = []
    planner = Planner(resnet_like_cuts(), "rpi4", "gpu_server_t4", "5g",
                      on_change=lambda old, new: seen.append((old, new.choice)))
    assert planner.choice == "offload"
    assert planner.bandwidth_mbps == 200.0
    assert planner.replan(1.0).choice == "bottleneck"
    assert planner.replan(0.01).choice == "local"
    assert planner.replan(200.0).choice == "offload"
    assert seen == [("offload", "bottleneck"), ("bottleneck", "local"), ("local", "offload")]
    assert [s["to"] for s in planner.switches] == ["bottleneck", "local", "offload"]
    assert planner.plan.uplink_mbps == 200.0 and planner.plan.link == "5g"
    with pytest.raises(InputError, match="bandwidth_mbps"):
        planner.replan(0)


def test_ewma_observation():
    link = LinkProfile("l", uplink_mbps=10.0, downlink_mbps=10.0, rtt_ms=20.0)
    planner = Planner(resnet_like_cuts(), "rpi4", "gpu_server_t4", link, alpha=0.5)
    # 1 Mbit in 0.2 s of serialisation (+ 10 ms one-way latency) -> sample of 5 Mbit/s
    planner.observe(125_000, 0.010 + 0.2)
    assert planner.bandwidth_mbps == pytest.approx(0.5 * 5.0 + 0.5 * 10.0)
    assert planner.observations == 1
    # a transfer taking exactly the modelled time leaves the estimate unchanged
    modelled = link.with_bandwidth(planner.bandwidth_mbps).bytes_time_s(50_000)
    planner.observe(50_000, modelled)
    assert planner.bandwidth_mbps == pytest.approx(7.5)
    # sustained slow transfers drive the estimate down and the plan away from offloading
    start = planner.choice
    for _ in range(30):
        planner.observe(1000, 0.010 + 8000 / 0.02e6)  # 0.02 Mbit/s
    assert planner.bandwidth_mbps == pytest.approx(0.02, rel=1e-3)
    assert planner.choice == "local" != start
    assert planner.switches
    with pytest.raises(InputError, match="seconds"):
        planner.observe(100, 0)


def test_hysteresis_keeps_choice_on_small_gains():
    cuts = [
        CutCost("a", device_macs=1e8, server_macs=0, payload_bytes=1000),
        CutCost("b", device_macs=1.02e8, server_macs=0, payload_bytes=500),
    ]
    link = LinkProfile("l", uplink_mbps=1000.0, downlink_mbps=1000.0, rtt_ms=0.0)
    planner = Planner(cuts, "rpi4", "gpu_server_t4", link, hysteresis=0.2)
    assert planner.choice == "a"
    planner.replan(4.0)  # b now slightly better (~2 %), under the 20 % hysteresis
    assert planner.plan.row("b").latency_s < planner.plan.row("a").latency_s
    assert planner.choice == "a"
    assert not planner.switches
    planner.replan(0.08)  # b ~40 % better
    assert planner.choice == "b"
