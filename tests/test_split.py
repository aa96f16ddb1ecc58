"""Split computing: halves equal the model, the wire codec between them, bottlenecks, costs, errors."""

import json
from dataclasses import replace

import pytest
import torch

from splitexit.devices import get_device, load_devices, load_links
from splitexit.errors import CutError, InputError, PayloadError
from splitexit.split.bottleneck import BottleneckedModel, BottleneckSpec, inject_bottleneck
from splitexit.split.codec import Codec
from splitexit.split.halves import SplitModel, cut_costs, input_message_bytes, split_model
from splitexit.split.planner import LOCAL, OFFLOAD, CutCost, plan
from splitexit.stages import StagedModel
from splitexit.zoo import ResNet, create_model


@pytest.fixture(scope="module")
def resnet(digits):
    """ResNet-8 (digits shapes) with non-trivial BN statistics, eval mode."""
    torch.manual_seed(0)
    model = create_model("resnet8", digits.num_classes, digits.input_shape)
    model.train()
    with torch.no_grad():
        model(digits.train.x[:256])
    return model.eval()


@pytest.fixture(scope="module")
def x(digits):
    return digits.test.x[:32]


@pytest.mark.parametrize("cut", ["stem", "block1", "block2"])
def test_server_of_device_equals_model_exactly(resnet, x, cut):
    split = split_model(resnet, cut, example=x)
    with torch.no_grad():
        assert torch.equal(split(x), resnet(x))
        assert torch.equal(split.server_half(split.device_half(x)), resnet(x))


def test_cut_inside_residual_block_carries_tuple_and_round_trips(digits, x):
    torch.manual_seed(0)
    net = ResNet(digits.num_classes, 1).eval()
    staged = StagedModel.from_module(net, ["block2_conv1"])
    for codec in (None, "fp32"):
        split = split_model(staged, "block2_conv1", codec=codec, example=x)
        assert len(split.payload_spec) == 2  # main path and skip
        with torch.no_grad():
            payload = split.device_half(x)
            assert isinstance(payload, tuple)
            assert torch.equal(split(x), net(x))
    data = split.encode(x)
    assert isinstance(split.decode(data), tuple)


def test_tuple_payload_halves_export_to_onnx(digits, x, tmp_path):
    from splitexit.export.onnx import OrtPiece

    torch.manual_seed(0)
    net = ResNet(digits.num_classes, 1).eval()
    split = split_model(StagedModel.from_module(net, ["block2_conv1"]), "block2_conv1",
                        example=x)
    paths = split.export(tmp_path, x[:4])
    device, server = OrtPiece(paths["device"]), OrtPiece(paths["server"])
    payload = device(x)
    assert isinstance(payload, tuple) and len(payload) == 2
    with torch.no_grad():
        assert torch.allclose(server(payload), net(x), atol=1e-4)


@pytest.mark.parametrize("cut", ["stem", "block2"])
def test_fp32_codec_is_bitwise(resnet, x, cut):
    split = split_model(resnet, cut, codec="fp32", example=x)
    with torch.no_grad():
        assert torch.equal(split.serve(split.encode(x)), resnet(x))
        payload = split.device_half(x)
    assert torch.equal(split.decode(split.encode(x)), payload)


def test_int8_codec_within_quantiser_bound(resnet, x):
    split = split_model(resnet, "block1", codec="int8", example=x)
    codec = Codec("int8")
    with torch.no_grad():
        payload = split.device_half(x)
        back = split.decode(split.encode(x))
        bound = codec.error_bound(payload)
        assert 0 < float((back - payload).abs().max()) <= bound
        agree = (split(x).argmax(1) == resnet(x).argmax(1)).float().mean()
    assert agree >= 0.9
    assert len(split.encode(x)) < len(Codec("fp32").encode(payload)) / 3


def test_bottleneck_shapes_and_split(resnet, x):
    spec = BottleneckSpec(channels=2, stride=2, hidden=4)
    model = inject_bottleneck(resnet, "block1", spec, x)
    assert isinstance(model, BottleneckedModel)
    assert model.cut_names == ["stem", "block1", "block1/bottleneck", "block1/decoded", "block2"]
    shapes = model.payload_shapes(x)
    assert shapes["block1/bottleneck"] == [(2, 4, 4)]
    assert shapes["block1/decoded"] == shapes["block1"] == [(16, 8, 8)]
    assert model.teacher_cut("block1/decoded") == "block1"
    split = split_model(model, codec="int8", example=x)
    assert split.cut == "block1/bottleneck"
    assert split.payload_spec[0].shape == (2, 4, 4)
    with torch.no_grad():
        assert split(x).shape == (len(x), 10)
    # the original model is untouched (the bottleneck lives in a copy)
    assert resnet.cut_names == ["stem", "block1", "block2"]
    # odd sizes: stride 4 on 8x8 -> 2x2, decoded back to exactly 8x8
    odd = inject_bottleneck(resnet, "block2", BottleneckSpec(1, stride=4), x)
    assert odd.payload_shapes(x)["block2/decoded"] == [(32, 4, 4)]


def test_split_model_injects_fresh_bottleneck(resnet, x):
    split = split_model(resnet, "stem", codec="int4+zstd", bottleneck=BottleneckSpec(1, 2), example=x)
    assert split.cut == "stem/bottleneck"
    assert split.payload_spec[0].shape == (1, 4, 4)
    assert split.device_params < split.server_params


def test_halves_export_to_onnx_and_match(resnet, x, tmp_path):
    from splitexit.export.onnx import OrtPiece

    model = inject_bottleneck(resnet, "block1", BottleneckSpec(2, 2), x)
    split = split_model(model, example=x)
    paths = split.export(tmp_path, x[:4])
    device, server = OrtPiece(paths["device"]), OrtPiece(paths["server"])
    with torch.no_grad():
        z = split.device_half(x)
        assert torch.allclose(device(x), z, atol=1e-5)
        assert torch.allclose(server(z), split.server_half(z), atol=1e-4)


def test_cut_costs_for_planner(resnet, x):
    costs = cut_costs(resnet, x, codec="int8")
    names = [c.name for c in costs]
    assert names == [LOCAL, "stem", "block1", "block2", OFFLOAD]
    total = costs[0].device_macs
    for c in costs[1:-1]:
        assert c.device_macs + c.server_macs == pytest.approx(total, rel=1e-6)
        assert c.device_macs > 0 and c.server_macs > 0 and c.payload_bytes > 0
    assert costs[1].device_macs < costs[2].device_macs < costs[3].device_macs
    for c in costs[1:-1]:  # the cost table's figures are the ones a real split measures
        real = split_model(resnet, c.name, codec="int8", example=x).cut_cost(x)
        assert (c.device_macs, c.server_macs) == pytest.approx(
            (real.device_macs, real.server_macs), rel=1e-9)
        assert c.payload_bytes == pytest.approx(real.payload_bytes)
    assert costs[-1].payload_bytes == input_message_bytes(x) > 64  # 8x8 uint8 plus a header
    # the planner on these costs: 0.76 MMAC run in 0.2 ms on a Pi beat a 600 ms LPWAN round
    # trip, so the model stays on the device; a device a million times slower offloads the
    # input, the smallest payload
    rpi4 = get_device("rpi4")
    local = plan(costs, rpi4, "gpu_server_t4", "lpwan")
    assert local.choice == LOCAL
    assert local.best.latency_s == pytest.approx(total / (rpi4.compute_gmacs_per_s * 1e9))
    assert all(r.latency_s > 0.6 for r in local.rows if r.name != LOCAL)
    crawling = replace(rpi4, name="crawling", compute_gmacs_per_s=rpi4.compute_gmacs_per_s / 1e6)
    offload = plan(costs, crawling, "gpu_server_t4", "lpwan")
    assert offload.choice == OFFLOAD
    assert offload.best.payload_bytes == min(c.payload_bytes for c in costs[1:])


def test_unknown_cut_lists_valid_ones(resnet, x):
    with pytest.raises(CutError, match="block1"):
        split_model(resnet, "block9", example=x)
    with pytest.raises(CutError, match="stem"):
        inject_bottleneck(resnet, "nope", BottleneckSpec(), x)


def test_bottleneck_at_tuple_cut_is_refused(digits, x):
    staged = StagedModel.from_module(ResNet(10, 1).eval(), ["block2_conv1"])
    with pytest.raises(InputError, match="one 4-D tensor"):
        inject_bottleneck(staged, "block2_conv1", BottleneckSpec(), x)


@pytest.mark.parametrize("bad", [dict(channels=0), dict(stride=3), dict(hidden=-1)])
def test_bad_bottleneck_spec(bad):
    with pytest.raises(InputError):
        BottleneckSpec(**bad)


def test_server_rejects_mismatched_payloads(resnet, x):
    split = split_model(resnet, "block2", codec="int8", example=x)
    good = split.encode(x[:2])
    assert split.serve(good).shape == (2, 10)
    # a header broken in transit
    forged = bytearray(good)
    forged[0:4] = b"XXXX"
    with pytest.raises(PayloadError):
        split.serve(bytes(forged))
    with pytest.raises(PayloadError):
        split.serve(good[:-3])
    # right codec, wrong shape: a message made at another cut
    other = split_model(resnet, "block1", codec="int8", example=x)
    with pytest.raises(PayloadError, match="expects"):
        split.serve(other.encode(x[:2]))
    # right shape, wrong dtype
    with pytest.raises(PayloadError, match="float64"):
        split.serve(Codec("int8").encode(split.device_half(x[:2]).double()))
    # wrong number of tensors
    z = split.device_half(x[:2])
    with pytest.raises(PayloadError, match="1 tensor"):
        split.serve(Codec("int8").encode((z, z)))
    # another codec than the split's
    with pytest.raises(PayloadError):
        split.serve(Codec("fp16").encode(z))


def test_profile_with_negative_figures_is_an_error(tmp_path):
    doc = json.loads(json.dumps({"devices": [{
        "name": "bad", "compute_gmacs_per_s": {"value": -4.0, "source": "x"},
        "active_power_w": 5.0, "idle_power_w": 1.0}]}))
    path = tmp_path / "devices.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(InputError, match="compute_gmacs_per_s"):
        load_devices(path)
    link = {"links": [{"name": "l", "uplink_mbps": 1.0, "downlink_mbps": 1.0, "rtt_ms": -5,
                       "tx_nj_per_bit": 1.0}]}
    path.write_text(json.dumps(link))
    with pytest.raises(InputError, match="rtt_ms"):
        load_links(path)
    with pytest.raises(InputError, match="payload_bytes"):
        CutCost("block1", 1.0, 1.0, -3.0)


def test_split_model_errors(resnet, x):
    with pytest.raises(InputError, match="codec spec"):
        split_model(resnet, "stem", codec="int7", example=x)
    with pytest.raises(InputError, match="give a cut"):
        split_model(resnet, None, example=x)
    with pytest.raises(InputError, match="StagedModel"):
        split_model(torch.nn.Linear(2, 2), "0")
    assert isinstance(split_model(resnet, "stem"), SplitModel)  # shape from the zoo spec


def test_plan_command_prints_table_and_choice(capsys):
    from splitexit.cli import main

    assert main(["plan", "--link", "lpwan", "--samples", "4", "--codec", "int8"]) == 0
    out = capsys.readouterr().out
    for name in ("local", "stem", "block1", "block2", "offload"):
        assert f"| {name} |" in out
    assert "choice for latency on rpi4 -> gpu_server_t4 over lpwan" in out
    assert main(["plan", "--link", "nowhere"]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_splitting_leaves_every_module_mode_alone(resnet, x):
    wrapper = StagedModel(list(resnet.stages), resnet.cut_names)  # new wrapper: training mode
    assert wrapper.training
    split_model(wrapper, "block1", example=x)
    inject_bottleneck(wrapper, "block1", BottleneckSpec(1, 2), x)
    cut_costs(wrapper, x[:4], local=False, offload=False)
    assert wrapper.training
    assert not any(m.training for m in resnet.modules())
