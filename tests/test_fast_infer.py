"""TorchScript early exits, the shared exit loop, and latency-aware exit selection."""

import pytest
import torch

from splitexit import InputError, MaxProb, NeverExit, Patience, create_multiexit
from splitexit.calibration import exit_costs, select_exits, sweep
from splitexit.heads import SDNHead
from splitexit.measure import measure_exit_latency
from splitexit.multiexit import ExitRun, advance_exits
from splitexit.optimize import TracedMultiExit, trace_for_inference
from splitexit.policies import Entropy, FixedExit, Margin, leave_at

POLICIES = [MaxProb(0.9), Entropy(0.3), Patience(2), NeverExit(), FixedExit(exit_index=1)]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
@pytest.mark.parametrize("batch_size", [1, 7, 256])
def test_torchscript_infer_matches_eager(trained_resnet8, digits, policy, batch_size, one_thread):
    traced = trace_for_inference(trained_resnet8, digits.calib.x[:4])
    assert isinstance(traced, TracedMultiExit)
    x = digits.test.x[:256] if batch_size != 1 else digits.test.x[:20]
    for i in range(0, len(x), batch_size):
        want = trained_resnet8.infer(x[i: i + batch_size], policy)
        got = traced.infer(x[i: i + batch_size], policy)
        assert torch.equal(got.predictions, want.predictions)
        assert torch.equal(got.exit_index, want.exit_index)
        assert torch.allclose(got.logits, want.logits, atol=1e-4)


def test_torchscript_forward_and_baseline(trained_resnet8, digits):
    x = digits.test.x[:33]
    traced = trace_for_inference(trained_resnet8)  # example from input_shape
    for a, b in zip(traced(x), trained_resnet8(x), strict=True):
        assert torch.allclose(a, b, atol=1e-4)
    base = trace_for_inference(trained_resnet8.backbone, x[:2])
    assert torch.allclose(base(x), trained_resnet8.backbone(x), atol=1e-4)
    with pytest.raises(InputError, match="input_shape"):
        trace_for_inference(trained_resnet8.backbone)
    with pytest.raises(InputError, match="NaN"):
        traced.infer(torch.full((1, *digits.input_shape), float("nan")), MaxProb(0.9))


def test_exit_loop_can_stop_at_a_cut_and_resume(trained_resnet8, digits):
    """The loop split in two (device, then server) gives the same answers as one run."""
    model, x, policy = trained_resnet8, digits.test.x[:64], MaxProb(0.9)
    first = advance_exits(ExitRun.start(x), model.step, model.exit_stages, policy, 2)
    assert not first.done and first.next_stage == 2
    assert first.fallback is not None and first.fallback.shape[0] == len(first.active)
    whole = model.infer(x, policy)
    rest = advance_exits(first, model.step, model.exit_stages, policy,
                         model.backbone.num_stages)
    assert rest.done
    assert torch.equal(rest.result.predictions, whole.predictions)
    assert torch.equal(rest.result.exit_index, whole.exit_index)


def test_keep_exits_shares_modules_and_matches_offline(trained_resnet8, digits):
    model, x = trained_resnet8, digits.test.x[:200]
    sub = model.keep_exits([0, 2])
    assert sub.exit_names == ["stem", "block2", "final"]
    assert sub.heads[1] is model.heads[2]
    logits = model.collect_logits(x)
    offline = sub.simulate([logits[0], logits[2], logits[3]], MaxProb(0.9))
    real = sub.infer(x, MaxProb(0.9))
    assert torch.equal(real.exit_index, offline.exit_index)
    with pytest.raises(InputError, match="0..2"):
        model.keep_exits([3])


def test_exit_costs_count_only_kept_heads():
    # stages cost 1, 2, 3, 4; heads 10, 20, 30 at stages 0, 1, 2
    assert exit_costs([1, 2, 3, 4], [10, 20, 30], [0, 1, 2, 3], [0, 1, 2]) == [11, 33, 66, 70]
    assert exit_costs([1, 2, 3, 4], [10, 20, 30], [0, 1, 2, 3], [1]) == [23, 30]
    assert exit_costs([1, 2, 3, 4], [10, 20, 30], [0, 1, 2, 3], []) == [10]


def _two_heads_same_samples():
    """Two heads, both confident and right on the same half of the samples; a final exit
    right on all."""
    torch.manual_seed(0)
    n, c = 400, 5
    labels = torch.randint(0, c, (n,))
    good = torch.nn.functional.one_hot(labels, c).float() * 6
    easy = torch.arange(n) < n // 2
    early = torch.where(easy[:, None], good, torch.zeros(n, c))
    return [early, early.clone(), good], labels


def test_select_exits_drops_heads_that_do_not_pay():
    """Exit 1 is as confident as exit 0 on the same samples but costs a lot: it goes."""
    logits, labels = _two_heads_same_samples()

    def costs(keep):
        return exit_costs([1.0, 1.0, 1.0], [0.1, 5.0], [0, 1, 2], keep)

    sel = select_exits(logits, labels, costs, MaxProb(0.5), reference_accuracy=1.0,
                       max_drop=0.0)
    assert sel.exits == [0]
    assert sel.point.accuracy == 1.0
    assert len(sel.candidates) == 4
    # the full set is never cheaper than the chosen subset
    full = sweep(logits, labels, costs([0, 1]), MaxProb(0.5))
    assert min(p.mean_macs for p in full if p.accuracy == 1.0) > sel.point.mean_macs
    with pytest.raises(InputError, match="per-exit"):
        select_exits(logits, labels, costs, MaxProb((0.5, 0.6)), reference_accuracy=1.0,
                     max_drop=0.0)
    with pytest.raises(InputError, match="no subset"):
        select_exits(logits, labels, costs, MaxProb(0.5), reference_accuracy=1.0, max_drop=0.0,
                     max_final_cost=0.5)
    with pytest.raises(InputError, match="fraction"):  # an accuracy above 1 is a mistake
        select_exits(logits, labels, costs, MaxProb(0.5), reference_accuracy=1.5, max_drop=0.0)


def test_measured_exit_latency_grows_with_depth(trained_resnet8, digits, one_thread):
    lat = measure_exit_latency(trained_resnet8.infer, digits.test.x, 4, samples=30)
    assert len(lat) == 4 and all(t > 0 for t in lat)
    assert lat[0] < lat[3]  # leaving after the stem is cheaper than running every stage


def test_exit_latency_relative_to_a_reference(trained_resnet8, digits, one_thread):
    """With a reference timed alongside, the figures are ratios to it: the no-exit case of a
    model is about the model itself (loose bounds: this is a timing, not a benchmark)."""
    model = trained_resnet8
    never = leave_at(MaxProb(0.9), 3, 4)
    ratios = measure_exit_latency(model.infer, digits.test.x, 4, samples=40, policy=MaxProb(0.9),
                                  reference=lambda s: model.infer(s, never))
    assert len(ratios) == 4 and 0.5 < ratios[-1] < 2.0
    assert ratios[0] < ratios[-1]


def test_sdn_head_fixed_and_adaptive_pooling_agree():
    head = SDNHead((8, 28, 28), 10)
    x = torch.randn(3, 8, 28, 28)
    mx = torch.nn.functional.adaptive_max_pool2d(x, 4)
    av = torch.nn.functional.adaptive_avg_pool2d(x, 4)
    want = head.fc(torch.lerp(av, mx, head.alpha.clamp(0, 1)).flatten(1))
    assert torch.allclose(head(x), want, atol=1e-6)
    odd = SDNHead((8, 14, 14), 10)  # 14 is not a multiple of 4: the adaptive path
    assert odd(torch.randn(2, 8, 14, 14)).shape == (2, 10)


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_sdn_max_pooling_is_bitwise_max_pool2d(batch):
    """Above batch 1 the SDN head's max pooling runs as two reductions: the same values bit
    for bit as F.max_pool2d, ties included (ReLU maps are full of zeros), so exits do not
    depend on the batch size."""
    from splitexit.heads import _grid_pool

    torch.manual_seed(batch)
    x = torch.relu(torch.randn(batch, 8, 28, 28))
    assert torch.equal(_grid_pool(x, (4, 4), (7, 7), "max"), torch.nn.functional.max_pool2d(x, 7))
    head = SDNHead((8, 28, 28), 10).eval()
    one_by_one = torch.cat([head(x[i: i + 1]) for i in range(batch)])
    assert torch.equal(head(x).argmax(1), one_by_one.argmax(1))


def test_traced_cascading_heads_match_eager(digits):
    torch.manual_seed(0)
    model = create_multiexit("resnet8", digits.num_classes, digits.input_shape,
                             head="cascading").eval()
    traced = trace_for_inference(model)
    x = digits.test.x[:40]
    want, got = model.infer(x, MaxProb(0.2)), traced.infer(x, MaxProb(0.2))
    assert torch.equal(want.exit_index, got.exit_index)
    assert torch.allclose(want.logits, got.logits, atol=1e-4)
    with pytest.raises(InputError, match="cascading"):
        model.keep_exits([0])


@pytest.mark.parametrize("policy", [MaxProb(), Entropy(), MaxProb(temperature=1.7)],
                         ids=["maxprob", "entropy", "temperature"])
def test_threshold_sweep_fast_path_equals_replay(policy):
    """sweep() computes each exit's statistic once for plain threshold policies; the points
    must be exactly those of replaying the policy at every threshold."""
    from splitexit.multiexit import simulate_exits

    torch.manual_seed(0)
    logits = [torch.randn(300, 10) * k for k in (1, 2, 3, 4)]
    labels = torch.randint(0, 10, (300,))
    costs = [1.0, 2.0, 3.0, 4.0]
    for point in sweep(logits, labels, costs, policy):
        replay = simulate_exits(logits, point.policy)
        assert point.accuracy == replay.accuracy(labels)
        assert point.exit_fractions == replay.exit_fractions(4)
        assert point.mean_macs == pytest.approx(
            float(torch.tensor(costs, dtype=torch.float64)[replay.exit_index].mean()), abs=0)


def test_pool_head_is_an_avg_only_sdn_head(digits):
    from splitexit.heads import PoolHead, create_head

    head = create_head("pool", (8, 28, 28), 10)
    assert isinstance(head, PoolHead) and head.config()["pool_size"] == 4
    x = torch.randn(3, 8, 28, 28)
    want = head.fc(torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))
    assert torch.allclose(head(x), want, atol=1e-6)
    model = create_multiexit("resnet8", digits.num_classes, digits.input_shape, head="pool")
    assert [type(h).__name__ for h in model.heads] == ["PoolHead"] * 3
    assert model(digits.test.x[:2])[0].shape == (2, digits.num_classes)


def test_batch_one_runs_as_one_torchscript_program(trained_resnet8, digits, one_thread):
    """A single sample under max-prob/entropy/margin is one scripted call (stages, heads and
    threshold tests); its exits and logits equal the eager model's."""
    from splitexit.policies import Margin

    traced = trace_for_inference(trained_resnet8)
    assert traced.batch_one_program
    x = digits.test.x[:40]
    for policy in (MaxProb(0.9), MaxProb((0.95, 0.8, 0.6), temperature=(1.5, 1.2, 1.0, 1.0)),
                   Entropy(0.3), Margin(0.5)):
        for i in range(len(x)):
            want = trained_resnet8.infer(x[i: i + 1], policy)
            got = traced.infer(x[i: i + 1], policy)
            assert torch.equal(got.exit_index, want.exit_index), (policy, i)
            assert torch.equal(got.predictions, want.predictions)
            assert torch.allclose(got.logits, want.logits, atol=1e-4)


def test_batch_one_program_uses_the_policies_own_statistic(trained_resnet8, digits):
    """The scripted batch-1 program computes each statistic by tracing the policy's
    ``statistic`` (no copy): equal bit for bit to the eager statistic; and it runs the pieces
    of the exit program (stages between exits merged with the head ending them)."""
    from splitexit.optimize import _PLAIN, _Statistic, _trace
    from splitexit.program import lower

    logits = trained_resnet8(digits.test.x[:50])[0] * 0.7
    for cls in _PLAIN:
        traced = _trace(_Statistic(cls()), (logits[:1],))
        assert torch.equal(traced(logits), cls().statistic(logits)), cls.__name__
    sub = trained_resnet8.keep_exits([1])  # exit after block1: stem and block1 in one piece
    traced = trace_for_inference(sub)
    assert traced.batch_one_program
    assert len(traced.pieces) == len(lower(sub).pieces) == 2
    assert traced.exit_stages == [0, 1]
    x = digits.test.x[:30]
    for policy in (MaxProb(0.9), Entropy(0.3), Margin(0.5)):
        for i in range(len(x)):
            want, got = sub.infer(x[i: i + 1], policy), traced.infer(x[i: i + 1], policy)
            assert torch.equal(got.exit_index, want.exit_index), (policy, i)
            assert torch.equal(got.predictions, want.predictions)


@pytest.mark.parametrize("policy", [MaxProb(0.9), Entropy(0.3), Margin(0.5), Patience(2)],
                         ids=lambda p: p.name)
def test_leave_at_forces_the_exit_on_every_runtime(trained_resnet8, digits, policy, one_thread):
    """The timing policy leaves exactly where asked, eager and TorchScript, at batch 1 and
    batched; the last exit is the no-exit case."""
    traced = trace_for_inference(trained_resnet8, digits.calib.x[:4])
    n = trained_resnet8.num_exits
    for e in range(n):
        forced = leave_at(policy, e, n)
        assert type(forced) is (type(policy) if policy.name != "patience" else FixedExit)
        for runner in (trained_resnet8, traced):
            assert runner.infer(digits.test.x[:1], forced).exit_index.tolist() == [e]
            assert set(runner.infer(digits.test.x[:64], forced).exit_index.tolist()) == {e}
    with pytest.raises(InputError, match="exit_index"):
        leave_at(policy, n, n)


def test_select_exits_respects_a_bound_on_the_no_exit_cost():
    """With the final-exit cost bounded, a subset whose heads make the no-exit case too
    expensive is not chosen, even when its expected cost is the lowest."""
    logits, labels = _two_heads_same_samples()

    def costs(keep):
        return exit_costs([1.0, 1.0, 1.0], [0.2, 0.1], [0, 1, 2], keep)

    free = select_exits(logits, labels, costs, MaxProb(0.5), reference_accuracy=1.0,
                        max_drop=0.0)
    assert free.exits == [0]  # leaving after one stage is the cheapest on average
    bounded = select_exits(logits, labels, costs, MaxProb(0.5), reference_accuracy=1.0,
                           max_drop=0.0, max_final_cost=3.15)
    assert bounded.exits == [1]  # head 0 costs 0.2 on every sample that runs to the end
    assert [c["exits"] for c in bounded.candidates if c.get("over_final_cost")] == [[0], [0, 1]]
    assert costs(bounded.exits)[-1] <= 3.15
    with pytest.raises(InputError, match="final-exit cost"):
        select_exits(logits, labels, costs, MaxProb(0.5), reference_accuracy=1.0,
                     max_drop=0.0, max_final_cost=2.9)


def test_sdn_heads_exit_alike_at_every_batch_size_and_runtime(digits, one_thread):
    """SDN heads pool differently at batch 1 and above (one call vs two reductions): the
    exits still equal the offline replay at batch 1, 7 and 64, eager and TorchScript."""
    torch.manual_seed(0)
    model = create_multiexit("resnet8", digits.num_classes, digits.input_shape,
                             head="sdn").eval()
    x = digits.test.x[:64]
    logits = model.collect_logits(x)
    traced = trace_for_inference(model, digits.calib.x[:4])
    # untrained heads are barely confident: thresholds at observed confidences (exact ties)
    confidence = torch.softmax(logits[0], 1).amax(1).sort().values
    for policy in (MaxProb(float(confidence[32])), MaxProb(float(confidence[50]))):
        offline = model.simulate(logits, policy)
        assert 0 < int((offline.exit_index < 3).sum()) < len(x)  # some leave early, some not
        for runner in (model, traced):
            for b in (1, 7, 64):
                got = torch.cat([runner.infer(x[i: i + b], policy).exit_index
                                 for i in range(0, len(x), b)])
                assert torch.equal(got, offline.exit_index)


def test_an_optimisation_that_cannot_apply_says_so():
    from torch import nn

    from splitexit.optimize import OptimizationWarning, fuse_for_inference

    class Branchy(nn.Module):  # data-dependent control flow: torch.fx cannot trace it
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return y if float(y.sum()) > 0 else -y

    model = Branchy().eval()
    x = torch.rand(2, 1, 6, 6)
    with pytest.warns(OptimizationWarning, match="BatchNorm not folded in Branchy"):
        fused = fuse_for_inference(model)
    assert torch.equal(fused(x), model(x))  # unfused, same outputs
