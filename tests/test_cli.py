"""The command line wraps the public functions: train, calibrate, evaluate, bench; and the
benchmark suites' command line (python -m benchmarks), with the demo."""

import json

import pytest

from benchmarks.__main__ import main as bench_main
from splitexit.cli import main


@pytest.mark.slow
def test_demo_writes_reports(tmp_path, capsys):
    out = tmp_path / "demo"
    assert bench_main(["demo", "--out", str(out), "--epochs", "3", "--models", "mlp",
                 "--latency-samples", "40"]) == 0
    report = json.loads((out / "report.json").read_text())
    methods = [r["method"] for r in report["rows"]]
    assert methods[0] == "baseline" and "oracle (bound)" in methods
    assert (out / "report.md").is_file() and (out / "pareto.png").stat().st_size > 1000
    measured = [r for r in report["rows"] if "infer_matches_simulate" in r]
    assert measured and all(r["infer_matches_simulate"] for r in measured)
    # each runtime is timed against its own baseline, with latency-chosen exits and overhead
    assert {r["runtime"] for r in measured} == {"eager", "torchscript"}
    assert [r["runtime"] for r in report["rows"] if r["method"] == "baseline"] == [
        "eager", "torchscript"]
    assert any("exits chosen for latency" in r["method"] for r in measured)
    # a bounded choice either keeps its predicted no-exit cost within 1.1x or says why not
    bounded = [r for r in report["rows"] if "no-exit cost <= 1.1x" in r["method"]]
    assert bounded and all(r.get("note") or r["predicted_no_exit_ratio"] <= 1.1
                           for r in bounded)
    # every subset the selection tried is in the report, the chosen ones marked
    subsets = report["sections"]["exit subsets (latency selection, calibration split)"]
    assert len(subsets) == 2 * 2 * 2 ** 3  # runtimes x drops x subsets of 3 heads
    assert sum(r["chosen"] for r in subsets) == 4
    overhead = [r for r in measured if r["method"].startswith("no exit fires")]
    assert [r["method"] for r in overhead].count("no exit fires (overhead)") == 2
    assert all(r["overhead_batch1"] > 0 for r in overhead)
    # the policy runs at every exit there, but nothing leaves before the final exit
    assert all(r["exit_fractions"][-1] == 1.0 for r in overhead)
    assert "| baseline |" in capsys.readouterr().out


def test_bench_parts_and_missing_models_are_clear_errors(tmp_path, capsys):
    assert bench_main(["compress", "--parts", "bogus", "--out", str(tmp_path)]) == 2
    assert "parts must be among" in capsys.readouterr().err
    assert bench_main(["compress", "--parts", "exits", "--exit-model",
                       str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert "no multi-exit checkpoint" in capsys.readouterr().err


def test_train_calibrate_evaluate(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert main(["train", "--model", "mlp", "--epochs", "2", "--out", str(ckpt)]) == 0
    assert main(["calibrate", str(ckpt), "--max-drop", "0.02"]) == 0
    cal = json.loads((ckpt / "calibration.json").read_text())
    assert cal["calib_accuracy"] >= cal["calib_final_exit_accuracy"] - 0.02
    assert main(["evaluate", str(ckpt), "--latency-samples", "20"]) == 0
    report = json.loads((ckpt / "evaluation" / "report.json").read_text())
    assert report["rows"][0]["accuracy"] > 0.5
    # your checkpoint against its own backbone without exits, side by side in one run
    assert main(["bench", str(ckpt), "--latency-samples", "20", "--drops", "2",
                 "--no-select-exits"]) == 0
    report = json.loads((ckpt / "bench" / "report.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert rows["baseline"]["latency_ratio"] == 1.0 and rows["baseline"]["macs_ratio"] == 1.0
    point = next(r for r in report["rows"] if r.get("target_drop_pt") == 2.0)
    assert point["infer_matches_simulate"] and point["macs_ratio"] < 1.0
    assert point["latency_ms"] > 0 and "oracle (bound)" in rows
    assert (ckpt / "bench" / "pareto.png").is_file()
    assert "the same network without its exit heads" in " ".join(report["notes"])
    # a checkpoint without exits is not something bench can compare
    base = tmp_path / "base"
    assert main(["train", "--model", "mlp", "--strategy", "baseline", "--epochs", "1",
                 "--out", str(base)]) == 0
    assert main(["bench", str(base)]) == 2
    assert "without exits" in capsys.readouterr().err
    assert main(["bench", str(ckpt), "--baseline", str(ckpt)]) == 2
    assert "has exits" in capsys.readouterr().err
    assert main(["bench", str(ckpt), "--drops", "half"]) == 2
    assert "--drops takes" in capsys.readouterr().err


def test_cli_errors_are_messages_not_tracebacks(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "missing")]) == 2
    assert "not a splitexit checkpoint" in capsys.readouterr().err
    assert main(["train", "--model", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_early_exit_bench_control_is_the_stricter_reference(trained_resnet8, digits):
    """With a control (the baseline trained as long as the multi-exit model), operating points
    are chosen against the better of the two references and rows report the drop vs it."""
    import copy

    import torch

    from splitexit.compare import CompareSettings, compare_exits
    from splitexit.zoo import create_model

    torch.manual_seed(0)
    weak = create_model("resnet8", digits.num_classes, digits.input_shape).eval()  # untrained
    strong = copy.deepcopy(trained_resnet8.backbone).eval()
    s = CompareSettings(runtimes=("eager",), latency_samples=20, select_exits=False,
                        drops=(0.02,), timing_chunks=2)
    rows, _ = compare_exits(digits, "resnet8", weak, trained_resnet8, s, control=strong)
    control = next(r for r in rows if r["method"].startswith("control"))
    with torch.no_grad():
        calib = float((strong(digits.calib.x).argmax(1) == digits.calib.y).double().mean())
    assert control["calib_accuracy"] == calib
    point = next(r for r in rows if r["method"] == "joint (sweep, target <= 2 pt drop)")
    assert point["calib_reference_accuracy"] == calib  # not the untrained baseline's
    assert point["calib_accuracy"] >= calib - 0.02 - 1e-9
    for r in rows:
        if "drop_vs_control_pt" in r:
            assert r["drop_vs_control_pt"] == pytest.approx(100 * (control["accuracy"]
                                                                   - r["accuracy"]))


def test_benchmarks_time_in_a_steady_allocator_state():
    """glibc keeps freed blocks in the process (no mmap per batch), and servers a benchmark
    starts inherit it through the environment."""
    import subprocess
    import sys

    code = ("import os; from splitexit.measure import steady_allocator; "
            "print(steady_allocator(), os.environ['MALLOC_MMAP_MAX_'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["True", "0"]
