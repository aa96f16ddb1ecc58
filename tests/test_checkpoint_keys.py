"""Checkpoint keys do not depend on where a model is cut: the weights saved from one staging load
into the same architecture staged at other cuts, bit for bit; old stage-indexed checkpoints
still load; a missing or corrupt checkpoint says so."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from splitexit import CorruptFileError, InputError, checkpoint
from splitexit.heads import create_head
from splitexit.multiexit import MultiExitModel
from splitexit.stages import StagedModel
from splitexit.zoo import ResNet, create_model, create_multiexit
from user_net import Block

REPORTS = Path(__file__).resolve().parents[1] / "reports"


class Residual(nn.Module):
    """A small residual network; ``mix`` is used before and after ``layer1`` (shared weights)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.mix = nn.Conv2d(4, 4, 1)
        self.layer1 = nn.Sequential(Block(4), Block(4))
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        x = self.mix(self.stem(x))
        x = self.mix(self.layer1(x)) * self.scale
        return self.fc(x.flatten(1))


def _exercised(model: nn.Module) -> nn.Module:
    """Random weights and BatchNorm statistics, so that a wrong mapping shows in the outputs."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.train()
    with torch.no_grad():
        model(torch.rand(16, 1, 8, 8))
    return model.eval()


def _heads(backbone: StagedModel, cuts, kind: str = "linear") -> dict:
    shapes = backbone.payload_shapes(torch.zeros(2, 1, 8, 8))
    return {c: create_head(kind, shapes[c][0], 10) for c in cuts}


def _equal_outputs(a: nn.Module, b: nn.Module) -> None:
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        out_a, out_b = a(x), b(x)
    out_a = out_a if isinstance(out_a, list) else [out_a]
    out_b = out_b if isinstance(out_b, list) else [out_b]
    assert len(out_a) == len(out_b)
    for p, q in zip(out_a, out_b):
        assert torch.equal(p, q)


def _stored_keys(directory: Path) -> list[str]:
    with safe_open(str(directory / "weights.safetensors"), "pt") as f:
        assert f.metadata()["splitexit.keys"] == "canonical"
        return list(f.keys())


def test_user_module_loads_into_other_cuts(tmp_path):
    torch.manual_seed(0)
    # staging A cuts inside a block (a two-tensor payload) and between the two uses of `mix`
    backbone_a = StagedModel.from_module(Residual(), ["stem", "layer1.0.conv1", "layer1.0"])
    model_a = _exercised(MultiExitModel(backbone_a, _heads(backbone_a, ["stem", "layer1.0"])))
    assert len(backbone_a.payload_shapes(torch.zeros(1, 1, 8, 8))["layer1.0.conv1"]) == 2
    checkpoint.save(model_a, tmp_path / "a")
    keys = _stored_keys(tmp_path / "a")
    assert "backbone.layer1.0.conv1.weight" in keys and "backbone.scale" in keys
    assert any(k.startswith("heads.stem.") for k in keys)
    assert any(k.startswith("heads.layer1.0.") for k in keys)
    assert not any("stages" in k for k in keys)
    # shared by two stages: two module keys, one stored tensor
    assert sum(k.endswith(".mix.weight") for k in model_a.state_dict()) == 2
    assert "backbone.mix.weight" in keys

    torch.manual_seed(1)  # other weights, other cuts (mix's two uses now in one stage), same heads
    backbone_b = StagedModel.from_module(Residual(), ["stem", "layer1.0", "layer1.1.bn1"])
    model_b = MultiExitModel(backbone_b, _heads(backbone_b, ["stem", "layer1.0"])).eval()
    checkpoint.load_weights(model_b, tmp_path / "a")
    _equal_outputs(model_a, model_b)
    # the weight both stages of A share is still one tensor there after a load back
    checkpoint.save(model_b, tmp_path / "b")
    torch.manual_seed(2)
    backbone_c = StagedModel.from_module(Residual(), ["stem", "layer1.0.conv1", "layer1.0"])
    model_c = MultiExitModel(backbone_c, _heads(backbone_c, ["stem", "layer1.0"]))
    checkpoint.load_weights(model_c, tmp_path / "b")
    mixes = [s.module.mix for s in backbone_c.stages if hasattr(s.module, "mix")]
    assert len(mixes) == 2 and mixes[0].weight is mixes[1].weight
    _equal_outputs(model_a, model_c)
    # and into the uncut module itself: the backbone's keys are its own names
    plain = Residual().eval()
    state = {k.removeprefix("backbone."): v for k, v in
             checkpoint.canonical_state_dict(model_a).items() if k.startswith("backbone.")}
    plain.load_state_dict(state)
    _equal_outputs(plain, backbone_a)


def test_zoo_model_loads_into_other_cuts(tmp_path):
    torch.manual_seed(0)
    model = _exercised(create_multiexit("resnet8", 10, (1, 8, 8)))
    checkpoint.save(model, tmp_path / "zoo")
    keys = _stored_keys(tmp_path / "zoo")
    assert "backbone.block1.conv1.weight" in keys
    assert any(k.startswith("heads.block2.") for k in keys)
    # the same ResNet staged elsewhere (inside block2 too), heads at the same cuts
    torch.manual_seed(1)
    backbone = StagedModel.from_module(ResNet(10, 1), ["stem", "block1", "block2.conv1",
                                                       "block2", "block3.bn1"])
    fresh = create_multiexit("resnet8", 10, (1, 8, 8))
    other = MultiExitModel(backbone, dict(zip(fresh.head_cuts, fresh.heads)),
                           input_shape=(1, 8, 8))
    checkpoint.load_weights(other, tmp_path / "zoo")
    _equal_outputs(model, other)
    again = checkpoint.load(tmp_path / "zoo")
    _equal_outputs(model, again)
    # a zoo checkpoint loads into a module given for it, too
    assert checkpoint.load(tmp_path / "zoo", model=other) is other
    with pytest.raises(InputError, match="drop the model argument"):
        checkpoint.load(tmp_path / "zoo", model="x.py:make")
    # the zoo baseline, and its weights in the uncut ResNet
    base = _exercised(create_model("resnet8", 10, (1, 8, 8)))
    checkpoint.save(base, tmp_path / "base")
    plain = StagedModel.from_module(ResNet(10, 1), [])
    checkpoint.load_weights(plain, tmp_path / "base")
    _equal_outputs(base, plain)


def test_sequential_stages_keep_child_names(tmp_path):
    def net():
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16),
                             nn.ReLU(), nn.Linear(16, 10))

    torch.manual_seed(0)
    a = StagedModel.from_sequential(net(), ["1", "2"])
    checkpoint.save(a, tmp_path / "seq")
    assert sorted(_stored_keys(tmp_path / "seq")) == sorted(net().state_dict())
    b = checkpoint.load_weights(StagedModel.from_sequential(net(), ["4"]), tmp_path / "seq")
    _equal_outputs(a, b)


def test_zoo_parts_are_keyed_by_stage_name(tmp_path):
    torch.manual_seed(0)
    model = _exercised(create_multiexit("mobilenet", 10, (1, 8, 8)))
    checkpoint.save(model, tmp_path / "m")
    keys = _stored_keys(tmp_path / "m")
    assert any(k.startswith("backbone.stages.block1.") for k in keys)
    _equal_outputs(model, checkpoint.load(tmp_path / "m"))
    # a server half keeps the full model's names
    half = model.backbone.split("block1")[1]
    checkpoint.save(half, tmp_path / "half")
    assert set(_stored_keys(tmp_path / "half")) <= {k.removeprefix("backbone.") for k in keys}


def _save_old_layout(model: nn.Module, directory: Path) -> None:
    """What checkpoint.save wrote before canonical keys: stage-indexed keys, no marker."""
    directory.mkdir(parents=True)
    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()},
              str(directory / "weights.safetensors"))
    (directory / "model.json").write_text(json.dumps(
        {"format": "splitexit-checkpoint", "version": 1, "class": type(model).__name__,
         "spec": getattr(model, "spec", None), "dataset": "digits"}))


@pytest.mark.parametrize("name", ["resnet8", "b-lenet", "mlp"])
def test_old_stage_indexed_checkpoints_still_load(tmp_path, name):
    torch.manual_seed(0)
    model = _exercised(create_multiexit(name, 10, (1, 8, 8)))
    _save_old_layout(model, tmp_path / "old")
    assert any(".stages.0.module." in k for k in model.state_dict())
    _equal_outputs(model, checkpoint.load(tmp_path / "old"))


CACHED = sorted(p.parent for p in REPORTS.glob("*/models/*/model.json"))


@pytest.mark.skipif(not CACHED, reason="no cached report models (reports/*/models) here")
def test_cached_report_models_load():
    zoo = [d for d in CACHED if "user_model" not in (checkpoint.read_meta(d).get("spec") or {})]
    for directory in zoo[:4]:  # a user's model needs its code passed; the zoo's rebuild alone
        model = checkpoint.load(directory)
        assert not model.training


def test_missing_and_corrupt_checkpoints_say_so(tmp_path):
    torch.manual_seed(0)
    model = _exercised(create_multiexit("resnet8", 10, (1, 8, 8)))
    with pytest.raises(CorruptFileError, match="no checkpoint at"):
        checkpoint.load_weights(model, tmp_path / "absent")
    with pytest.raises(CorruptFileError, match="no checkpoint at"):
        checkpoint.load(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorruptFileError, match="no checkpoint weights at"):
        checkpoint.load_weights(model, tmp_path / "empty")

    path = checkpoint.save(model, tmp_path / "m")
    weights = path / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit pattern in the tensor data: still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="corrupt") as info:
        checkpoint.load_weights(model, path)
    assert "does not match" not in str(info.value)

    # an old checkpoint (no checksum) with a damaged header is corrupt, not a mismatch
    _save_old_layout(model, tmp_path / "old")
    weights = tmp_path / "old" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[10:20] = b"\xff" * 10
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="truncated or corrupt") as info:
        checkpoint.load(tmp_path / "old")
    assert "does not match" not in str(info.value)

    # another architecture is a mismatch, saying what differs
    checkpoint.save(model, path)
    other = create_multiexit("resnet8", 10, (1, 8, 8), widths=(8, 16, 32))
    with pytest.raises(CorruptFileError, match="does not match this model.*shape mismatch"):
        checkpoint.load_weights(other, path)
    fewer = copy.deepcopy(model).keep_exits([0])
    with pytest.raises(CorruptFileError, match="unexpected.*heads.block1"):
        checkpoint.load_weights(fewer, path)
