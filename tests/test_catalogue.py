"""The early-exit-methods harness end to end on a tiny setting (digits, one epoch each)."""

from __future__ import annotations

import json

import pytest

from benchmarks.__main__ import main as bench_main
from benchmarks.catalogue import MAIN, CatalogueSettings, run_catalogue
from splitexit.errors import InputError


@pytest.mark.slow
def test_catalogue_runs_every_method_on_the_real_path(tmp_path, one_thread):
    settings = CatalogueSettings(configs=["digits:resnet8"], baseline_epochs=3, head_epochs=1,
                                 finetune_epochs=1, latency_samples=10, progress=False)
    report = run_catalogue(tmp_path, settings)
    methods = {r["method"] for r in report["rows"]}
    assert set(MAIN) | {"pabee", "baseline"} <= methods
    measured = [r for r in report["rows"] if "infer_matches_simulate" in r]
    assert len(measured) >= len(MAIN) - 2  # a method may miss the 50% budget: noted
    assert all(r["infer_matches_simulate"] for r in measured)
    assert all("note" in r or "accuracy" in r for r in report["rows"])
    sections = report["sections"]
    budgets = {(r["method"], r["budget"]) for r in
               sections["budgeted (thresholds chosen on calibration, measured on test)"]}
    assert {(m, b) for m in MAIN for b in settings.budgets} <= budgets
    info = {r["method"]: r for r in sections["methods (how each was fitted)"]}
    assert info["e2cm"]["gradient_steps"] == 0 and info["e2cm"]["passes"] == 1
    assert sections["exit gate"][-1]["infer_matches_simulate"]
    assert len(sections["online caching"]) == 1
    assert (tmp_path / "report.md").is_file() and (tmp_path / "pareto_digits_resnet8.png").is_file()
    # a second run reuses the cached part instead of training again
    part = tmp_path / "parts" / "digits_resnet8.json"
    stamp = json.loads(part.read_text())["seconds"]
    again = run_catalogue(tmp_path, settings)
    assert again["seconds"]["digits:resnet8"] == stamp


def test_catalogue_bad_input(tmp_path):
    with pytest.raises(InputError, match="dataset:model"):
        run_catalogue(tmp_path, CatalogueSettings(configs=["digits"]))
    with pytest.raises(InputError, match="unknown methods"):
        run_catalogue(tmp_path, CatalogueSettings(configs=["digits:resnet8"], methods=["nope"],
                                                  baseline_epochs=0))
    assert bench_main(["early-exit-methods", "--configs", "digits", "--out",
                 str(tmp_path)]) == 2
