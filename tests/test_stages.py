"""The equality invariant: running the stages one after another equals the original model."""

import pytest
import torch
from torch import nn

from splitexit import CutError, InputError, StagedModel, list_cuts
from splitexit.stages import payload_nbytes, payload_tensors
from splitexit.zoo import ResNet


def _eval_seeded(module):
    torch.manual_seed(0)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial running statistics
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return module.eval()


@pytest.fixture
def resnet():
    torch.manual_seed(0)
    return _eval_seeded(ResNet(10, 1))


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.rand(5, 1, 28, 28)


def test_sequential_cuts_equal_original(x):
    seq = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    seq.eval()
    for cuts in (["0"], ["1", "2"], None):
        staged = StagedModel.from_sequential(seq, cuts)
        assert torch.equal(staged(x), seq(x))
    assert list_cuts(seq) == ["0", "1", "2"]


def test_list_of_modules(x):
    mods = [nn.Conv2d(1, 3, 3), nn.Sequential(nn.ReLU(), nn.Flatten()), nn.Linear(3 * 26 * 26, 4)]
    staged = StagedModel.from_modules(mods, ["conv", "flat"])
    ref = mods[2](mods[1](mods[0](x)))
    assert torch.equal(staged(x), ref)
    assert staged.cut_names == ["conv", "flat"]


@pytest.mark.parametrize("cuts", [["stem"], ["block1"], ["stem", "block1", "block2"],
                                  ["block1.conv1"], ["block2.bn1", "block3"], ["block1.bn2"],
                                  ["add", "relu_3"], ["block1.bn2", "add_1", "block3"]])
def test_residual_network_cut_between_and_inside_blocks(resnet, x, cuts):
    """Module cuts, and fx node cuts at a residual add and at a functional relu."""
    staged = StagedModel.from_module(resnet, cuts)
    assert staged.cut_names == cuts
    assert len(staged.stages) == len(cuts) + 1
    assert torch.equal(staged(x), resnet(x))


def test_cut_inside_block_carries_several_tensors(resnet, x):
    staged = StagedModel.from_module(resnet, ["block2.conv1"])
    device, server = staged.split("block2.conv1")
    payload = device(x)
    assert isinstance(payload, tuple) and len(payload) == 2  # skip path + main path
    assert torch.equal(server(payload), resnet(x))
    shapes = staged.payload_shapes(x)["block2.conv1"]
    assert len(shapes) == 2
    assert payload_nbytes(payload) == sum(t[0].numel() * 4 for t in payload_tensors(payload))


def test_fx_node_names_are_cuts_too(resnet, x):
    cuts = list_cuts(resnet, nodes=True)
    assert "block1" in cuts and "stem" in cuts
    node_cut = next(c for c in cuts if "." not in c and c.startswith("block1_conv2"))
    staged = StagedModel.from_module(resnet, [node_cut])
    assert torch.equal(staged(x), resnet(x))


def test_unknown_cut_lists_valid_ones(resnet):
    with pytest.raises(CutError, match="Valid cuts.*block1"):
        StagedModel.from_module(resnet, ["block9"])
    seq = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    with pytest.raises(CutError, match="Valid cuts"):
        StagedModel.from_sequential(seq, ["7"])


def test_cuts_out_of_order_rejected(resnet):
    with pytest.raises(InputError, match="execution order"):
        StagedModel.from_module(resnet, ["block2", "block1"])


def test_split_halves_share_weights_and_compose(resnet, x):
    staged = StagedModel.from_module(resnet, ["stem", "block1", "block2"])
    for cut in staged.cut_names:
        device, server = staged.split(cut)
        assert torch.equal(server(device(x)), resnet(x))
        assert device.stages[0] is staged.stages[0]


def test_untraceable_module_gets_clear_error():
    class Branchy(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return x
            return -x

    with pytest.raises(InputError, match="cannot be traced"):
        StagedModel.from_module(Branchy(), ["neg"])


def test_backward_through_stages(resnet, x):
    staged = StagedModel.from_module(resnet, ["block1.conv1", "block2"]).train()
    staged(x).sum().backward()
    assert all(p.grad is not None for p in staged.parameters() if p.requires_grad)


def test_hooks_on_a_stage_graph_still_run(resnet, x):
    """Stages call their traced graph directly for speed; a hook on the graph module itself
    takes the full call again, and hooks inside the graph always run."""
    staged = StagedModel.from_module(resnet, ["block1"])
    graph = staged.stages[0].module
    with torch.no_grad():
        want = resnet(x)
    seen = []
    handle = graph.register_forward_hook(lambda m, i, o: seen.append("graph"))
    inner = resnet.stem[0].register_forward_hook(lambda m, i, o: seen.append("conv"))
    with torch.no_grad():
        assert torch.equal(staged(x), want)
    assert seen == ["conv", "graph"]
    handle.remove()
    with torch.no_grad():
        assert torch.equal(staged(x), want)
    assert seen == ["conv", "graph", "conv"]
    inner.remove()


def test_list_cuts_gives_module_names_by_default_and_nodes_on_request():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from user_net import net

    model = net()
    modules = list_cuts(model)
    assert modules == ["stem.0", "stem.1", "stem", "block1.conv1", "block1.bn1", "block1.conv2",
                       "block1.bn2", "block1", "block2.conv1", "block2.bn1", "block2.conv2",
                       "block2.bn2", "block2", "pool"]
    everything = list_cuts(model, nodes=True)
    assert set(modules) < set(everything) and {"stem_0", "relu", "add"} <= set(everything)
    x = torch.rand(2, 1, 8, 8)
    for cut in ("block1.bn1", "relu"):  # a module name and a node name both cut exactly
        assert torch.equal(StagedModel.from_module(model, [cut])(x), model(x))


def test_one_payload_spec_reads_every_form_and_checks_payloads():
    from splitexit.errors import PayloadError
    from splitexit.payload import PayloadSpec, TensorSpec

    payload = (torch.zeros(3, 16, 8, 8), torch.zeros(3, 16, 8, 8))
    spec = PayloadSpec.of(payload)
    assert spec.is_tuple and spec.shapes == ((16, 8, 8), (16, 8, 8))
    assert spec.sample_bytes == 2 * 16 * 8 * 8 * 4 and spec.describe().startswith("float32[16")
    served = {"shapes": [[16, 8, 8], [16, 8, 8]], "dtype": "float32", "is_tuple": True}
    assert spec.to_json() == served and PayloadSpec.from_json(served) == spec  # serve.json
    manifest = [{"shape": [16, 8, 8], "dtype": "float32"}] * 2
    assert PayloadSpec.from_json(manifest) == spec  # a bundle manifest's payload
    assert spec.check(payload) == 3
    with pytest.raises(PayloadError, match="expects 2 tensor"):
        spec.check(payload[0])
    with pytest.raises(PayloadError, match="float64"):
        spec.check((payload[0].double(), payload[1]))
    with pytest.raises(PayloadError, match="different batch sizes"):
        spec.check((payload[0], payload[1][:2]))
    with pytest.raises(PayloadError, match="empty batch"):
        spec.check((payload[0][:0], payload[1][:0]))
    with pytest.raises(InputError, match="cannot be deployed"):
        TensorSpec((4,), "complex64")
    with pytest.raises(InputError, match="positive ints"):
        PayloadSpec.from_json([{"shape": [4, -1], "dtype": "float32"}])
    with pytest.raises(InputError, match="mixes dtypes"):
        _ = PayloadSpec((TensorSpec((2,)), TensorSpec((2,), "int8")), True).dtype
