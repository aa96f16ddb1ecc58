"""Honest operating points (issue 14): a row states its target, the test drop it reached and
that drop's 95% interval; a calibration set too small for the target switches to the guarded
mode or says so; no label claims a bound the test drop broke. Digits (144 calibration
samples) and the session's quickly trained ResNet-8."""

from __future__ import annotations

import copy
import json
import re
import warnings

import pytest
import torch

from splitexit import checkpoint
from splitexit.calibration import (
    CalibrationWarning,
    calibrate,
    min_calibration_samples,
    paired_drop_ci,
)
from splitexit.cli import main
from splitexit.cost import cost_table
from splitexit.errors import InputError
from splitexit.policies import MaxProb, Patience

BOUND_CLAIM = re.compile(r"\(<= [\d.]+ pt drop")  # the old label: a bound stated as a fact


@pytest.fixture(scope="module")
def calib(trained_resnet8, digits):
    logits = trained_resnet8.collect_logits(digits.calib.x)
    macs = cost_table(trained_resnet8, digits.calib.x[:8], measure=False).exit_macs
    return logits, digits.calib.y, macs


@pytest.fixture(scope="module")
def pooled(trained_resnet8, digits):
    """Calibration + test samples: 503, enough for the guarded mode at a 1 pt target."""
    x = torch.cat([digits.calib.x, digits.test.x])
    y = torch.cat([digits.calib.y, digits.test.y])
    macs = cost_table(trained_resnet8, x[:8], measure=False).exit_macs
    return trained_resnet8.collect_logits(x), y, macs


def test_paired_drop_ci_lives_in_the_library():
    ref = torch.tensor([True] * 90 + [False] * 10)
    other = ref.clone()
    other[:5] = False
    other[95:97] = True
    drop, lo, hi = paired_drop_ci(ref, other)
    assert drop == pytest.approx(3.0) and lo < 3.0 < hi
    assert paired_drop_ci(ref, ref.clone()) == (0.0, 0.0, 0.0)
    with pytest.raises(InputError, match="one length"):
        paired_drop_ci(ref, ref[:5])
    from benchmarks import split  # the bench imports it from the library
    assert split.paired_drop_ci is paired_drop_ci


def test_too_small_calibration_set_warns_with_its_interval(calib):
    logits, y, macs = calib
    need = min_calibration_samples(0.005, 0.05)
    assert len(y) < need == 598
    with pytest.warns(CalibrationWarning, match=f"at least {need} samples"):
        cal = calibrate(logits, y, macs, MaxProb(), max_drop=0.005)
    assert cal.mode == "sweep" and cal.min_guarded_samples == need
    lo, hi = cal.calib_drop_ci95_pt
    assert lo <= cal.calib_drop_pt <= hi and cal.calib_drop_pt <= 0.5 + 1e-9
    assert cal.warning and "144 calibration samples are too few" in cal.warning
    assert cal.to_dict()["calib_drop_ci95_pt"] == [lo, hi]
    # asked for explicitly, the guarded mode refuses and says how many samples it needs
    with pytest.raises(InputError, match=f"at least {need} are needed"):
        calibrate(logits, y, macs, MaxProb(), max_drop=0.005, mode="guarded")


def test_auto_uses_the_guarded_mode_when_the_sweep_margin_is_thin(pooled):
    logits, y, macs = pooled
    assert len(y) >= min_calibration_samples(0.01, 0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)  # no warning: it is guarded
        cal = calibrate(logits, y, macs, MaxProb(), max_drop=0.01)
    assert cal.mode == "guarded" and cal.certified is not None and cal.warning is None
    assert "too close" in cal.reason
    # the explicit choice is honoured, and warns that its interval reaches past the target
    with pytest.warns(CalibrationWarning, match="mode='guarded' certifies"):
        plain = calibrate(logits, y, macs, MaxProb(), max_drop=0.01, mode="sweep")
    assert plain.mode == "sweep" and plain.calib_drop_ci95_pt[1] > 1.0
    assert cal.mean_macs >= plain.mean_macs  # guarding costs compute, never the reverse
    # a policy with no threshold to guard stays a sweep; if its interval reaches past the
    # target, the warning says why it was not guarded
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CalibrationWarning)
        pat = calibrate(logits, y, macs, Patience(), max_drop=0.01)
    assert pat.mode == "sweep"
    assert (pat.warning is not None) == (pat.calib_drop_ci95_pt[1] > 1.0
                                         and pat.exit_fractions[-1] < 1.0)
    assert all("guarded mode does not apply" in str(w.message) for w in caught)


def test_auto_keeps_a_sweep_whose_interval_lies_within_the_target(pooled):
    logits, y, macs = pooled
    same = [logits[-1]] * len(logits)  # early exits that agree with the final exit
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)
        cal = calibrate(same, y, macs, MaxProb(), max_drop=0.01)
    assert cal.mode == "sweep" and cal.calib_drop_ci95_pt == [0.0, 0.0]
    assert cal.exit_fractions[0] == 1.0  # all leave at the first exit, at no loss


def test_guarded_bounds_the_drop_vs_a_given_reference(pooled, digits):
    logits, y, macs = pooled
    # a reference that is right everywhere: every early-exit mistake counts as a loss
    cal = calibrate(logits, y, macs, MaxProb(), max_drop=0.02,
                    reference_correct=torch.ones_like(y, dtype=torch.bool), mode="guarded")
    final = calibrate(logits, y, macs, MaxProb(), max_drop=0.02, mode="guarded")
    assert cal.reference_accuracy == 1.0
    assert cal.mean_macs >= final.mean_macs
    with pytest.raises(InputError, match="per-sample correctness"):
        calibrate(logits, y, macs, MaxProb(), max_drop=0.02, reference_correct=y[:3])
    with pytest.raises(InputError, match="calibration mode"):
        calibrate(logits, y, macs, MaxProb(), max_drop=0.02, mode="lucky")


def test_demo_rows_state_target_test_drop_and_interval(trained_resnet8, digits):
    from splitexit.compare import CompareSettings, compare_exits

    baseline = copy.deepcopy(trained_resnet8.backbone).eval()
    s = CompareSettings(runtimes=("eager",), latency_samples=20, select_exits=False,
                        drops=(0.005, 0.02), timing_chunks=2, throughput_batch=128)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)  # in the report, not on stderr
        rows, _ = compare_exits(digits, "resnet8", baseline, trained_resnet8, s)
    targets = [r for r in rows if "target_drop_pt" in r]
    assert [r["target_drop_pt"] for r in targets] == [0.5, 2.0]
    base_acc = next(r["accuracy"] for r in rows if r["method"] == "baseline")
    for r in targets:
        assert re.fullmatch(r"joint \(sweep, target <= [\d.]+ pt drop\)", r["method"])
        drop = r["test_drop_vs_reference_pt"]
        assert drop == pytest.approx(100 * (base_acc - r["accuracy"]))
        lo, hi = r["test_drop_ci95_pt"]
        assert lo <= drop <= hi and hi > lo  # a real interval over the 359 test samples
        assert r["target_met_on_test"] == (drop <= r["target_drop_pt"] + 1e-9)
        assert r["calib_mode"] == "sweep" and len(r["calib_drop_ci95_pt"]) == 2
    # 144 calibration samples cannot back either target: a note says so for each
    notes = [r for r in rows if "note" in r and "too few" in r["note"]]
    assert {n["method"] for n in notes} == {r["method"] for r in targets}
    # no row states a drop bound as a fact
    assert not any(BOUND_CLAIM.search(r["method"]) for r in rows)
    assert all("accuracy_drop_ci95_pt" in r for r in rows
               if "latency_ms" in r and r["method"] != "baseline")


def test_calibrate_command_reports_mode_interval_and_warning(trained_resnet8, tmp_path,
                                                               capsys):
    ckpt = tmp_path / "ckpt"
    checkpoint.save(trained_resnet8, ckpt, dataset="digits")
    assert main(["calibrate", str(ckpt), "--max-drop", "0.005"]) == 0
    out = capsys.readouterr()
    assert "95% interval" in out.out and "too few" in out.err and "598" in out.err
    doc = json.loads((ckpt / "calibration.json").read_text())
    assert doc["mode"] == "sweep" and doc["target"] == {"max_drop": 0.005}
    assert doc["warning"] and len(doc["calib_drop_ci95_pt"]) == 2 and doc["pareto"]
    assert checkpoint.load_policy(ckpt).config() == doc["policy"]  # still loads
    # the user's explicit choice is honoured: guarded refuses with too few samples
    assert main(["calibrate", str(ckpt), "--max-drop", "0.005", "--calibration",
                 "guarded"]) == 2
    assert "at least 598 are needed" in capsys.readouterr().err
