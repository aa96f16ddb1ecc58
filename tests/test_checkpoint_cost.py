"""Checkpoints reload to identical outputs; bad checkpoints get clear errors; the cost table."""

import json

import pytest
import torch

from splitexit import CorruptFileError, InputError, cost_table, create_multiexit, load, save
from splitexit.checkpoint import load_weights
from splitexit.cost import count_macs


def test_checkpoint_round_trip_identical(trained_resnet8, digits, tmp_path):
    save(trained_resnet8, tmp_path / "m", dataset="digits")
    again = load(tmp_path / "m")
    x = digits.test.x[:32]
    outs, outs_again = trained_resnet8(x), again(x)
    assert len(outs) == trained_resnet8.num_exits == 4
    for a, b in zip(outs, outs_again, strict=True):
        assert torch.equal(a, b)
    assert (tmp_path / "m" / "weights.safetensors").is_file()
    assert json.loads((tmp_path / "m" / "model.json").read_text())["dataset"] == "digits"


def test_corrupt_and_mismatched_checkpoints(trained_resnet8, tmp_path):
    path = save(trained_resnet8, tmp_path / "m")
    data = (path / "weights.safetensors").read_bytes()
    (path / "weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="truncated or corrupt"):
        load(path)
    save(trained_resnet8, path)
    other = create_multiexit("resnet8", 7, (1, 8, 8))
    with pytest.raises(CorruptFileError, match="shape mismatch"):
        load_weights(other, path)
    (path / "model.json").write_text("{not json")
    with pytest.raises(CorruptFileError, match="not valid JSON"):
        load(path)
    with pytest.raises(CorruptFileError, match="not a splitexit checkpoint"):
        load(tmp_path / "empty")


def test_non_zoo_model_needs_load_weights(tmp_path):
    model = torch.nn.Linear(2, 2)
    save(model, tmp_path / "lin")
    with pytest.raises(InputError, match="load_weights"):
        load(tmp_path / "lin")
    fresh = torch.nn.Linear(2, 2)
    load_weights(fresh, tmp_path / "lin")
    assert torch.equal(fresh.weight, model.weight)


def test_cost_table_counts_macs_per_part(trained_resnet8, digits):
    table = cost_table(trained_resnet8, digits.calib.x[:8], measure=True, batch_size=16,
                       repeats=3)
    conv = trained_resnet8.backbone.stages[0]
    # the stem conv: 8x8 output, 16 filters of 1x3x3
    assert table.stages[0].macs == pytest.approx(8 * 8 * 16 * 9)
    assert table.stages[0].macs == count_macs(lambda: conv(digits.calib.x[:1]))
    assert table.backbone_macs == sum(s.macs for s in table.stages)
    assert table.exit_macs == sorted(table.exit_macs)
    assert table.exit_macs[-1] == pytest.approx(table.backbone_macs
                                                + sum(h.macs for h in table.heads))
    assert table.cut_payload_bytes[0] == 16 * 8 * 8 * 4
    assert all(s.latency_b1_s > 0 for s in table.stages + table.heads)
    assert table.total_params == sum(p.numel() for p in trained_resnet8.parameters())


def test_fused_model_matches_and_keeps_parity(trained_resnet8, digits):
    from splitexit import MaxProb
    from splitexit.optimize import fuse_for_inference

    fused = fuse_for_inference(trained_resnet8)
    x = digits.test.x[:64]
    for a, b in zip(trained_resnet8(x), fused(x)):
        assert torch.allclose(a, b, atol=1e-4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    r = fused.infer(x, MaxProb(0.8))
    s = fused.simulate(fused(x), MaxProb(0.8))
    assert torch.equal(r.exit_index, s.exit_index) and torch.equal(r.predictions, s.predictions)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in trained_resnet8.modules())
