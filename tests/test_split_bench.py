"""The split benchmark's command line: every grid and training option reaches the settings."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from benchmarks import split as split_bench
from benchmarks.__main__ import main as bench_main
from benchmarks.split import DEFAULT_CODECS, SplitBenchSettings


@pytest.fixture
def captured(monkeypatch):
    seen = {}

    def fake_run(out, settings, command=None, progress=True):
        seen["out"], seen["settings"], seen["command"] = out, settings, command
        return {"targets": {}}

    monkeypatch.setattr(split_bench, "run_split_bench", fake_run)
    return seen


def test_defaults_reach_the_settings(captured, tmp_path):
    assert bench_main(["split", "--out", str(tmp_path)]) == 0
    s = captured["settings"]
    d = SplitBenchSettings()
    assert s.cuts == d.cuts and s.widths == d.widths and s.codecs == DEFAULT_CODECS
    assert s.stage2_codec == "int8" and s.stage1_noise is None and s.decoder_hidden is None
    assert s.train_samples == d.train_samples and s.test_samples is None
    assert "int4:v2" in s.codecs and "int8:v2" in s.codecs


def test_restricted_grid_and_training_options(captured, tmp_path, monkeypatch):
    argv = ["split", "--out", str(tmp_path), "--cuts", "", "--widths", "2,3",
            "--bottleneck-cut", "stem", "--stride", "2", "--encoder-hidden", "6",
            "--decoder-hidden", "32", "--stage1-epochs", "6", "--stage2-epochs", "5",
            "--stage2-codec", "int4:v2", "--stage1-noise", "15", "--lr", "0.001",
            "--autoencoder-widths", "", "--autoencoder-epochs", "3", "--train-samples", "0",
            "--codecs", "int8:v2,int4:v2"]
    monkeypatch.setattr(sys, "argv", ["benchmarks", *argv])  # what the report records
    assert bench_main(argv) == 0
    s = captured["settings"]
    assert s.cuts == () and s.widths == (2, 3) and s.bottleneck_cut == "stem" and s.stride == 2
    assert s.encoder_hidden == 6 and s.decoder_hidden == 32
    assert (s.stage1_epochs, s.stage2_epochs, s.stage2_codec) == (6, 5, "int4:v2")
    assert s.stage1_noise == 15 and s.lr == 0.001
    assert s.autoencoder_widths == () and s.autoencoder_epochs == 3
    assert s.train_samples is None and s.codecs == ("int8:v2", "int4:v2")
    assert "--stage1-noise 15" in captured["command"]
    assert bench_main(["split", "--out", str(tmp_path), "--stage2-codec", "none"]) == 0
    assert captured["settings"].stage2_codec is None


@pytest.mark.parametrize("flag", ["--codecs", "--stage2-codec"])
def test_bad_codec_spellings_fail_before_any_training(captured, tmp_path, capsys, flag):
    assert bench_main(["split", "--out", str(tmp_path), flag, "int3"]) == 2
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


def test_entropy_curve_options_reach_the_settings(captured, tmp_path):
    d = SplitBenchSettings()
    assert len(d.entropy_betas) >= 5 and d.control and d.cache == "reports/split/models"
    assert bench_main(["split", "--out", str(tmp_path)]) == 0
    s = captured["settings"]
    assert s.entropy_betas == d.entropy_betas and s.image_qualities == d.image_qualities
    assert s.teacher is None and s.control
    argv = ["split", "--out", str(tmp_path), "--entropy-betas", "0.5,0.05",
            "--entropy-width", "4", "--image-qualities", "", "--no-control",
            "--teacher", "some/checkpoint"]
    assert bench_main(argv) == 0
    s = captured["settings"]
    assert s.entropy_betas == (0.5, 0.05) and s.entropy_width == 4
    assert s.image_qualities == () and not s.control and s.teacher == "some/checkpoint"


def test_image_codecs_shrink_with_quality():
    rng = np.random.default_rng(0)
    image = (rng.random((28, 28)) * 255).astype(np.uint8)
    for fmt in ("JPEG", "WEBP"):
        low, high = (len(split_bench.image_codec_bytes(image, fmt, q)) for q in (5, 90))
        assert 0 < low < high


def test_entropy_targets_compare_with_control_and_bottlefit():
    rows = [
        {"method": "bottlefit C=2 int4:v2", "codec": "int4:v2", "bytes_per_sample": 71.0,
         "accuracy": 0.910},
        {"method": "entropy C=2 beta=0.1", "codec": "entropy:x", "bytes_per_sample": 20.0,
         "batched_bytes_per_sample": 16.0, "accuracy": 0.916, "accuracy_drop_pt": 0.1,
         "encode_ms_median": 0.02, "decode_ms_median": 0.02, "device_half_ms_median": 0.5,
         "codec_share_of_device_half_median": 0.08},
        {"method": "entropy C=2 beta=0.01", "codec": "entropy:y", "bytes_per_sample": 40.0,
         "batched_bytes_per_sample": 35.0, "accuracy": 0.918, "accuracy_drop_pt": 0.0},
    ]
    t, notes = split_bench._entropy_targets(rows, 0.918, 0.920, {})
    assert t["entropy_smallest_within_0.5pt"]["method"] == "entropy C=2 beta=0.1"
    assert t["entropy_24B_within_0.5pt_met"] and t["entropy_codec_share_met"]
    assert t["entropy_best_at_bottlefit_bytes"] == "entropy C=2 beta=0.01"
    assert t["entropy_gain_at_bottlefit_bytes_pt"] == pytest.approx(0.8)
    assert t["entropy_gain_0.3pt_met"] and any("met" in n for n in notes)
    t, _ = split_bench._entropy_targets(rows, 0.918, 0.930, {})  # a stronger control
    assert not t["entropy_24B_within_0.5pt_met"]
