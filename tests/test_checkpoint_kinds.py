"""Every model kind describes itself (``config()``) so that a checkpoint rebuilds it: kept
exits, gated models and T-RECX models, from the zoo and from your own code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from splitexit import checkpoint
from splitexit.methods import ExitGate, GatedMultiExitModel, early_view_model
from splitexit.policies import MaxProb
from splitexit.usermodel import build_multiexit
from splitexit.zoo import create_multiexit

USER_NET = f"{Path(__file__).parent / 'user_net.py'}:net"


def _same(a, b, x):
    with torch.no_grad():
        for la, lb in zip(a(x), b(x), strict=True):
            assert torch.equal(la, lb)
        assert torch.equal(a.infer(x, MaxProb(0.3)).exit_index, b.infer(x, MaxProb(0.3)).exit_index)


@pytest.fixture
def zoo_model():
    torch.manual_seed(0)
    return create_multiexit("resnet8", 10, (1, 8, 8), widths=(4, 8, 8)).eval()


def test_kept_exits_reload(zoo_model, tmp_path):
    kept = zoo_model.keep_exits([0, 2]).keep_exits([1])  # twice: indices compose
    assert kept.head_cuts == ["block2"] and kept.config()["keep_exits"] == [2]
    back = checkpoint.load(checkpoint.save(kept, tmp_path / "k"))
    assert back.head_cuts == ["block2"]
    _same(kept, back, torch.rand(6, 1, 8, 8))


def test_gated_model_reloads_with_its_gate(zoo_model, tmp_path):
    gated = GatedMultiExitModel.from_multiexit(zoo_model.keep_exits([1]),
                                               ExitGate((1, 8, 8), hidden=5, grid=2), 0.3)
    assert gated.config()["gate"] == {"hidden": 5, "grid": 2, "threshold": 0.3}
    back = checkpoint.load(checkpoint.save(gated, tmp_path / "g"))
    assert isinstance(back, GatedMultiExitModel) and back.gate_threshold == 0.3
    x = torch.rand(6, 1, 8, 8)
    assert torch.equal(back.hard_probability(x), gated.hard_probability(x))
    _same(gated, back, x)


def test_trecx_model_reloads_from_the_zoo_and_from_your_code(zoo_model, tmp_path):
    trecx = early_view_model(zoo_model.backbone, "block1", 10, (1, 8, 8), head="depthwise").eval()
    torch.nn.init.normal_(trecx.backbone.stages[-1].module.assist.weight)  # not the zero start
    back = checkpoint.load(checkpoint.save(trecx, tmp_path / "t"))
    _same(trecx, back, torch.rand(6, 1, 8, 8))

    torch.manual_seed(1)
    mine = build_multiexit(USER_NET, "stem,block1", 10, (1, 8, 8))
    trecx = early_view_model(mine.backbone, "stem", 10, (1, 8, 8), head="linear").eval()
    path = checkpoint.save(trecx, tmp_path / "u")
    with pytest.raises(Exception, match="never imports code by itself"):
        checkpoint.load(path)
    _same(trecx, checkpoint.load(path, model=USER_NET), torch.rand(6, 1, 8, 8))
