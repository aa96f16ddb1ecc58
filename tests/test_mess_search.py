"""MESS's latency-aware head search: the one-shot joint candidate bank, the latency table of
the exit program's pieces (measured on ONNX Runtime in DenseSteps' form) and a search that
minimises its expected batch-1 latency within the MAC budgets."""

from __future__ import annotations

import pytest
import torch

from splitexit.cost import cost_table
from splitexit.data.canvas import DenseSplit, create_canvases
from splitexit.errors import InputError
from splitexit.segmentation import (
    CandidateBank,
    LatencyTable,
    MeanConfidence,
    PixelShare,
    create_segmenter,
    fit_candidates,
    head_label,
    head_macs,
    measure_latency_table,
    search_heads,
    summarize_candidates,
)
from splitexit.segmentation.sweep import policy_key

pytestmark = pytest.mark.usefixtures("one_thread_module")

SHAPE, CLASSES = (1, 16, 16), 4
KWARGS = {"widths": (4, 8, 8), "dilations": (1, 2, 1)}
CANDIDATES = [{"cut": "down", "kind": "pointwise"}, {"cut": "down", "kind": "conv"},
              {"cut": "block1", "kind": "pointwise"}]


@pytest.fixture(scope="module")
def split() -> DenseSplit:
    from test_segmentation import _items

    x, y = create_canvases(*_items(), 40, seed=1, size=16, max_items=2)
    return DenseSplit(torch.from_numpy(x).float() / 255, torch.from_numpy(y))


def _bank(split, joint: bool) -> tuple:
    torch.manual_seed(0)
    model = create_segmenter(CLASSES, SHAPE, [], model_kwargs=KWARGS)
    bank = CandidateBank(model, CANDIDATES, joint=joint)
    before = {k: v.clone() for k, v in bank.state_dict().items()}
    fit_candidates(bank, split, epochs=1, progress=False, batch_size=20)
    return model, bank, before


@pytest.fixture(scope="module")
def joint_bank(split):
    return _bank(split, joint=True)


def test_a_joint_bank_trains_its_backbone_and_a_two_stage_bank_does_not(split, joint_bank):
    for (model, bank, before), trains_backbone in ((joint_bank, True),
                                                   (_bank(split, joint=False), False)):
        after = bank.state_dict()
        moved = {k for k in before if not torch.equal(before[k], after[k])}
        assert any(k.startswith("heads.") for k in moved)
        assert any(k.startswith("backbone.") and "weight" in k for k in moved) is trains_backbone
        assert model.backbone is bank.backbone  # the model shares the trained backbone


def test_expected_latency_runs_the_pieces_up_to_each_exit():
    policy = MeanConfidence(0.5)
    down, block1 = CANDIDATES[0], CANDIDATES[2]
    table = LatencyTable({f"input > {head_label(down)}": 0.3,
                          f"down > {head_label(block1)}": 0.2, "block1 > final": 0.6},
                         {policy_key(policy): 0.05}, 1.0, policy.config(), 10)
    # pieces 0.35, 0.25 and 0.6 (the test is added to the pieces with an exit): a sample
    # leaving at exit i runs pieces 0..i
    assert table.expected([down, block1], policy, [0.5, 0.25, 0.25]) == pytest.approx(
        0.5 * 0.35 + 0.25 * 0.6 + 0.25 * 1.2)
    assert LatencyTable.from_dict(table.to_dict()) == table
    with pytest.raises(InputError, match="no time for"):
        table.expected([block1], policy, [0.5, 0.5])  # no piece from the input to block1
    with pytest.raises(InputError, match="no time for"):
        table.expected([down, block1], PixelShare(0.5), [0.5, 0.25, 0.25])


def test_the_search_minimises_expected_latency_within_the_mac_budgets(split, joint_bank):
    model, bank, _ = joint_bank
    policies = [MeanConfidence(0.5)]
    heads, final = summarize_candidates(bank, model, split.x, split.y, CLASSES, policies)
    stages = [s.macs for s in cost_table(model.backbone, split.x[:2], measure=False).stages]
    # a table in which the block1 exit answers fastest though it costs the most MACs
    pieces = {**{f"input > {head_label(c)}": 0.5 + 0.1 * i for i, c in enumerate(CANDIDATES)},
              f"input > {head_label(CANDIDATES[2])}": 0.2,
              **{f"down > {head_label(CANDIDATES[2])}": 0.1, "down > final": 0.9,
                 "block1 > final": 0.8}}
    table = LatencyTable(pieces, {policy_key(policies[0]): 0.0}, 1.0,
                         policies[0].config(), 10)
    by_macs = search_heads(bank, heads, final, stages, policies, 1.0, max_drop=1.0)
    fast = search_heads(bank, heads, final, stages, policies, 1.0, max_drop=1.0, latency=table)
    assert by_macs.heads[0]["cut"] == "down" and by_macs.calib_latency_ratio is None
    assert fast.heads == [CANDIDATES[2]] and fast.calib_latency_ratio == pytest.approx(0.2)
    assert fast.calib_latency_ratio == min(r["calib_latency_ratio"] for r in fast.tried)
    # a mean-MACs budget of the cheapest down exit rules the block1 exit out
    budget = sum(stages[:2]) + head_macs(bank.heads[0])  # stem, down and the head
    capped = search_heads(bank, heads, final, stages, policies, 1.0, max_drop=1.0,
                          latency=table, macs_budget=budget)
    assert capped.heads[0] == CANDIDATES[0] and capped.calib_mean_macs <= budget
    assert all(r["calib_mean_macs"] <= budget for r in capped.tried if r["meets_drop"])


@pytest.mark.slow
def test_measured_latency_table_covers_every_configuration(split, joint_bank, tmp_path):
    model, bank, _ = joint_bank
    policies = [MeanConfidence(0.5), PixelShare(0.5, pixel_threshold=0.6, stride=4)]
    table = measure_latency_table(bank, model, policies, split.x[:12], tmp_path, chunks=3)
    assert table.reference_ms > 0 and table.samples == 12
    assert table.tests[policy_key(policies[0])] == 0.0 and len(table.tests) == 2
    assert all(v > 0 for v in table.segments.values())
    assert table.mean_segments.keys() == table.segments.keys()
    heads, final = summarize_candidates(bank, model, split.x, split.y, CLASSES, policies)
    stages = [s.macs for s in cost_table(model.backbone, split.x[:2], measure=False).stages]
    found = search_heads(bank, heads, final, stages, policies, 1.0, max_drop=1.0,
                         latency=table)
    assert len(found.tried) == 5 * 2  # every configuration priced: no piece is missing
    point_fractions = [1.0] + [0.0] * len(found.heads)  # all at the first exit: its piece
    first = f"input > {head_label(found.heads[0])}"
    assert table.expected(found.heads, found.policy, point_fractions) == pytest.approx(
        table.segments[first] + table.tests[policy_key(found.policy)])
