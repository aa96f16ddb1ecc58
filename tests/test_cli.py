"""The command line wraps the public functions: demo, train, calibrate, evaluate."""

import json

import pytest

from splitexit.cli import main


@pytest.mark.slow
def test_demo_writes_reports(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "3", "--models", "mlp",
                 "--latency-samples", "40", "--control"]) == 0
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
    overhead = [r for r in measured if r["method"].startswith("no exit fires")]
    assert [r["method"] for r in overhead].count("no exit fires (overhead)") == 2
    assert all(r["overhead_batch1"] > 0 for r in overhead)
    # the policy runs at every exit there, but nothing leaves before the final exit
    assert all(r["exit_fractions"][-1] == 1.0 for r in overhead)
    # the control (baseline trained as long as the multi-exit model) is the reference when
    # it is the stronger one, and every measured row reports its drop against it
    control = next(r for r in report["rows"] if r["method"].startswith("control"))
    assert (out / "models" / "mlp-control" / "model.json").is_file()
    points = [r for r in measured if "calib_reference_accuracy" in r]
    assert points and all(r["calib_reference_accuracy"] >= control["calib_accuracy"]
                          for r in points)
    for r in measured:
        assert r["drop_vs_control_pt"] == pytest.approx(100 * (control["accuracy"]
                                                               - r["accuracy"]))
    assert "| baseline |" in capsys.readouterr().out


def test_bench_parts_and_missing_models_are_clear_errors(tmp_path, capsys):
    assert main(["bench", "compress", "--parts", "bogus", "--out", str(tmp_path)]) == 2
    assert "parts must be among" in capsys.readouterr().err
    assert main(["bench", "compress", "--parts", "exits", "--exit-model",
                 str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert "bench early-exit" in capsys.readouterr().err


def test_train_calibrate_evaluate(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert main(["train", "--model", "mlp", "--epochs", "2", "--out", str(ckpt)]) == 0
    assert main(["calibrate", str(ckpt), "--max-drop", "0.02"]) == 0
    cal = json.loads((ckpt / "calibration.json").read_text())
    assert cal["calib_accuracy"] >= cal["calib_final_exit_accuracy"] - 0.02
    assert main(["evaluate", str(ckpt), "--latency-samples", "20"]) == 0
    report = json.loads((ckpt / "evaluation" / "report.json").read_text())
    assert report["rows"][0]["accuracy"] > 0.5


def test_cli_errors_are_messages_not_tracebacks(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "missing")]) == 2
    assert "not a splitexit checkpoint" in capsys.readouterr().err
    assert main(["train", "--model", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown model" in capsys.readouterr().err
