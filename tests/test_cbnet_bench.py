"""`splitexit bench cbnet` end to end on a slice of mnist5k (tiny training, few timings)."""

import json

import pytest

from benchmarks.cbnet import CBNetBenchSettings, run_cbnet_bench


@pytest.mark.slow
def test_bench_cbnet_small(tmp_path):
    s = CBNetBenchSettings(datasets=("mnist5k",), lenet_epochs=1, branchy_epochs=1,
                           converter_epochs=2, converter_min_steps=5, finetune_epochs=1,
                           joint_epochs=0, candidates=("fc_h32_linear",), train_limit=300,
                           select_samples=20, latency_samples=20, latency_chunks=2,
                           throughput_batch=128, progress=False)
    report = run_cbnet_bench(tmp_path / "out", s, "test")
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(report["rows"]))
    methods = [r["method"] for r in report["rows"]]
    assert "CBNet published (reproduction)" in methods
    assert "CBNet fc 784-32-784, fine-tuned classifier, folded" in methods
    assert any(m.startswith("CBNet with fallback exit") for m in methods)
    # controls: lean LeNet, the light classifier's lean floor, BranchyNet trained as long
    # (2 converter + 1 fine-tuning epochs vs 1 LeNet + 1 B-LeNet: one more epoch)
    assert {"LeNet, lean chain (control)",
            "BranchyNet trained as long as the CBNets (equal-training control)"} <= set(methods)
    assert report["sections"]["per data set"][0]["control_epochs"] == 3
    assert all("onnx_speedup_vs_lenet_lean_control" in e for e in report["sections"]["targets"])
    for r in report["rows"]:
        # ONNX Runtime gives the PyTorch predictions (folded or not, exits or not)
        assert r["onnx_agreement"] >= 0.998, r["method"]
        assert r["latency_ms"] > 0 and r["onnx_latency_ms"] > 0
    search = report["sections"]["converter search"]
    assert {r["candidate"] for r in search} == {
        "CBNet fc 784-32-784, fine-tuned classifier",
        "CBNet fc 784-32-784, fine-tuned classifier, folded"}
    assert (tmp_path / "out" / "pareto.png").stat().st_size > 0
    # a second run loads every model from the cache instead of training
    again = run_cbnet_bench(tmp_path / "out", s, "test")
    facts = again["sections"]["per data set"][0]
    assert facts["lenet_train_s"] is None and facts["branchynet_train_s"] is None
