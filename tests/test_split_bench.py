"""The split benchmark's command line: every grid and training option reaches the settings."""

from __future__ import annotations

import sys

import pytest
import torch

from splitexit.bench import split as split_bench
from splitexit.bench.split import DEFAULT_CODECS, SplitBenchSettings
from splitexit.cli import main


@pytest.fixture
def captured(monkeypatch):
    seen = {}

    def fake_run(out, settings, command=None, progress=True):
        seen["out"], seen["settings"], seen["command"] = out, settings, command
        return {"targets": {}}

    monkeypatch.setattr(split_bench, "run_split_bench", fake_run)
    return seen


def test_defaults_reach_the_settings(captured, tmp_path):
    assert main(["bench", "split", "--out", str(tmp_path)]) == 0
    s = captured["settings"]
    d = SplitBenchSettings()
    assert s.cuts == d.cuts and s.widths == d.widths and s.codecs == DEFAULT_CODECS
    assert s.stage2_codec == "int8" and s.stage1_noise is None and s.decoder_hidden is None
    assert s.train_samples == d.train_samples and s.test_samples is None
    assert "int4:v2" in s.codecs and "int8:v2" in s.codecs


def test_restricted_grid_and_training_options(captured, tmp_path, monkeypatch):
    argv = ["bench", "split", "--out", str(tmp_path), "--cuts", "", "--widths", "2,3",
            "--bottleneck-cut", "stem", "--stride", "2", "--encoder-hidden", "6",
            "--decoder-hidden", "32", "--stage1-epochs", "6", "--stage2-epochs", "5",
            "--stage2-codec", "int4:v2", "--stage1-noise", "15", "--lr", "0.001",
            "--autoencoder-widths", "", "--autoencoder-epochs", "3", "--train-samples", "0",
            "--codecs", "int8:v2,int4:v2"]
    monkeypatch.setattr(sys, "argv", ["splitexit", *argv])  # what the report records
    assert main(argv) == 0
    s = captured["settings"]
    assert s.cuts == () and s.widths == (2, 3) and s.bottleneck_cut == "stem" and s.stride == 2
    assert s.encoder_hidden == 6 and s.decoder_hidden == 32
    assert (s.stage1_epochs, s.stage2_epochs, s.stage2_codec) == (6, 5, "int4:v2")
    assert s.stage1_noise == 15 and s.lr == 0.001
    assert s.autoencoder_widths == () and s.autoencoder_epochs == 3
    assert s.train_samples is None and s.codecs == ("int8:v2", "int4:v2")
    assert "--stage1-noise 15" in captured["command"]
    assert main(["bench", "split", "--out", str(tmp_path), "--stage2-codec", "none"]) == 0
    assert captured["settings"].stage2_codec is None


@pytest.mark.parametrize("flag", ["--codecs", "--stage2-codec"])
def test_bad_codec_spellings_fail_before_any_training(captured, tmp_path, capsys, flag):
    assert main(["bench", "split", "--out", str(tmp_path), flag, "int3"]) == 2
    assert "valid" in capsys.readouterr().err
    assert "settings" not in captured


def test_paired_drop_ci():
    ref = torch.tensor([True] * 90 + [False] * 10)
    same = split_bench.paired_drop_ci(ref, ref.clone())
    assert same == (0.0, 0.0, 0.0)  # identical predictions: no uncertainty about the drop
    other = ref.clone()
    other[:5] = False  # 5 lost
    other[95:97] = True  # 2 gained
    drop, low, high = split_bench.paired_drop_ci(ref, other)
    assert drop == pytest.approx(3.0)
    # var = ((5 + 2) / 100 - 0.03**2) / 100
    half = 100 * 1.96 * (((7 / 100) - 0.03**2) / 100) ** 0.5
    assert (low, high) == pytest.approx((3.0 - half, 3.0 + half))
    with pytest.raises(ValueError):
        split_bench.paired_drop_ci(ref, ref[:5])
