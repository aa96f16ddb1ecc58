"""Glance and focus (GFNet) and the cluttered data set: determinism, real exits equal to the
offline replay, ONNX parity of the steps, PPO learning, patch crops, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splitexit import InputError, MaxProb
from splitexit.data.cluttered import make_cluttered
from splitexit.glance import (
    GFNet,
    GFNetConfig,
    PatchGrid,
    PPOConfig,
    crop_patches,
    gae,
    ppo_update,
    train_classifier_stages,
    train_policy,
)

TINY = GFNetConfig(image=32, glance=8, patch=16, stride=8, steps=3, channels=(4, 8),
                   strides=(2, 2), hidden=16, num_classes=4)


def _items(n=40, side=12, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, side, side), dtype=np.uint8), rng.integers(0, 4, n)


def _net(seed=0) -> GFNet:
    torch.manual_seed(seed)
    net = GFNet(TINY).eval()
    with torch.no_grad():  # spread the classifier so thresholds split the samples
        net.classifier.weight.mul_(20)
    return net


def _images(n=23, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.round(torch.rand(n, 1, 32, 32, generator=g) * 255) / 255


def _between(logits) -> float:
    """A threshold halfway between two middle max-probabilities (far from every sample's
    value, so batch-size rounding differences cannot flip a decision)."""
    stats = torch.cat([torch.softmax(lg, 1).amax(1) for lg in logits[:-1]]).sort().values
    gaps = stats[1:] - stats[:-1]
    mid = len(stats) // 2
    k = mid - 3 + int(gaps[mid - 3: mid + 3].argmax())
    return float((stats[k] + stats[k + 1]) / 2)


# -- data ---------------------------------------------------------------------------------------

def test_cluttered_is_deterministic_and_places_the_item():
    images, labels = _items()
    a = make_cluttered(images, labels, 30, 40, fragments=3, fragment_size=5, seed=7)
    b = make_cluttered(images, labels, 30, 40, fragments=3, fragment_size=5, seed=7)
    c = make_cluttered(images, labels, 30, 40, fragments=3, fragment_size=5, seed=8)
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    assert not np.array_equal(a.x, c.x)
    assert a.x.shape == (30, 1, 40, 40) and a.x.dtype == np.uint8
    for i in range(30):  # the whole item lies on the canvas (max-composited over clutter)
        r, col = a.top_left[i]
        window = a.x[i, 0, r: r + 12, col: col + 12]
        assert np.all(window >= images[a.source_index[i]])
        assert a.y[i] == labels[a.source_index[i]]


def test_cluttered_rejects_bad_sizes():
    images, labels = _items()
    with pytest.raises(InputError, match="cannot hold"):
        make_cluttered(images, labels, 5, 10)
    with pytest.raises(InputError, match="fragment_size"):
        make_cluttered(images, labels, 5, 40, fragment_size=13)
    with pytest.raises(InputError, match="labels"):
        make_cluttered(images, labels[:3], 5, 40)


@pytest.mark.slow
def test_registered_cluttered_set_has_fixed_splits():
    from splitexit.data import list_datasets, load_dataset

    assert {"cluttered-fashion", "cluttered-mnist"} <= set(list_datasets())
    a = load_dataset("cluttered-mnist", seed=0)
    b = load_dataset("cluttered-mnist", seed=1)
    assert a.input_shape == (1, 160, 160)
    assert torch.equal(a.test.x, b.test.x)  # the test split never depends on the seed
    assert not torch.equal(a.calib.y, b.calib.y) or not torch.equal(a.calib.x, b.calib.x)
    assert float(a.train.x.max()) <= 1.0


# -- the grid and the crop ----------------------------------------------------------------------

def test_crop_is_the_patch_at_the_location():
    grid = PatchGrid(32, 16, 8, 8)
    x = torch.rand(5, 2, 32, 32)
    loc = torch.tensor([0, 3, 4, 8, 5])
    patches = crop_patches(x, grid.pixel_index(), loc, 16)
    for i, g in enumerate(loc.tolist()):
        r, c = grid.corners()[g].tolist()
        assert torch.equal(patches[i], x[i, :, r: r + 16, c: c + 16])


@pytest.mark.parametrize("kwargs, match", [
    ({"image": 12, "patch": 16, "stride": 4, "glance": 4}, "smaller than a patch"),
    ({"image": 30, "patch": 16, "stride": 4, "glance": 8}, "not divisible by the glance"),
    ({"image": 32, "patch": 16, "stride": 5, "glance": 8}, "do not tile"),
])
def test_grid_rejects_bad_geometry(kwargs, match):
    with pytest.raises(InputError, match=match):
        PatchGrid(**kwargs)


def test_patch_budget_of_zero_is_refused():
    with pytest.raises(InputError, match="budget"):
        GFNetConfig(image=32, glance=8, patch=16, stride=8, steps=0)
    net = _net()
    with pytest.raises(InputError, match="budget"):
        net.multiexit("learned", steps=0)
    with pytest.raises(InputError, match="unknown patch policy"):
        net.multiexit("everywhere")


def test_wrong_image_size_is_refused():
    model = _net().multiexit("centre")
    with pytest.raises(InputError, match="shape"):
        model(torch.rand(2, 1, 28, 28))


# -- exits --------------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["learned", "localiser", "random", "centre"])
def test_real_exits_equal_offline_replay(policy):
    net = _net()
    model = net.multiexit(policy)
    x = _images()
    with torch.no_grad():
        logits = model(x)
    assert len(logits) == TINY.steps + 1
    threshold = _between(logits)
    offline = model.simulate(logits, MaxProb(threshold))
    assert len(set(offline.exit_index.tolist())) > 1  # samples leave at different steps
    for batch in (1, 5, len(x)):
        got = [model.infer(x[i: i + batch], MaxProb(threshold)) for i in range(0, len(x), batch)]
        assert torch.equal(torch.cat([r.exit_index for r in got]), offline.exit_index)
        assert torch.equal(torch.cat([r.predictions for r in got]), offline.predictions)


@pytest.mark.parametrize("policy", ["learned", "random", "centre"])
def test_patches_are_distinct_and_rollout_matches_the_stages(policy):
    net = _net()
    x = _images(9)
    logits, chosen = net.rollout(x, policy)
    assert chosen.shape == (9, TINY.steps)
    assert all(len(set(row)) == TINY.steps for row in chosen.tolist())
    staged = net.multiexit(policy)(x)
    for a, b in zip(logits, staged):
        torch.testing.assert_close(a, b)


def test_random_policy_depends_on_the_sample_not_the_batch():
    net = _net()
    x = _images(12)
    _, alone = net.rollout(x[3:4], "random")
    _, together = net.rollout(x, "random")
    assert torch.equal(alone[0], together[3])
    assert len({tuple(r) for r in together.tolist()}) > 1  # not one sequence for all


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["learned", "localiser", "centre"])
def test_bundle_on_onnx_runtime_exits_as_pytorch(tmp_path, policy):
    """The steps export to ONNX (the crop is a gather with computed indices) and bundle like
    any model; ONNX Runtime makes the same per-sample exits at batch > 1 and batch 1. Every
    payload layout (with and without the glance image and the glance map) exports with every
    tensor read."""
    from splitexit import bundle, load_bundle

    net = _net()
    model = net.multiexit(policy)
    x = _images(11)
    with torch.no_grad():
        logits = model(x)
    policy = MaxProb(_between(logits))
    program = load_bundle(bundle(model, tmp_path / "b", policy=policy, example=x,
                                 measure=False)).program()
    ref = model.infer(x, policy)
    ort = program.infer(x.numpy(), policy)
    assert np.array_equal(np.asarray(ort.exit_index), ref.exit_index.numpy())
    assert np.array_equal(np.asarray(ort.predictions), ref.predictions.numpy())
    one = np.concatenate([np.asarray(program.infer(x[i: i + 1].numpy(), policy).exit_index)
                          for i in range(3)])
    assert np.array_equal(one, ref.exit_index[:3].numpy())


def test_save_and_load_round_trip(tmp_path):
    net = _net()
    net.save(tmp_path)
    again = GFNet.load(tmp_path)
    x = _images(4)
    for a, b in zip(net.multiexit()(x), again.multiexit()(x)):
        assert torch.equal(a, b)


# -- PPO ----------------------------------------------------------------------------------------

def test_learned_policy_scores_are_a_distribution_over_unused_locations():
    net = _net()
    x = _images(6)
    h, glance_map = net.glance(x)
    used = torch.zeros(6, net.grid.locations)
    used[:, :3] = 1
    logits, values = net.policy.actor_critic(net.policy.downsample(x), h, glance_map, used)
    probs = torch.softmax(logits, 1)
    torch.testing.assert_close(probs.sum(1), torch.ones(6))
    assert float(probs[:, :3].detach().max()) == 0.0 and values.shape == (6,)


def test_gae_of_one_step_episodes_is_reward_minus_value():
    r = torch.tensor([[1.0], [0.0]])
    v = torch.tensor([[0.25], [0.5]])
    adv, ret = gae(r, v, 0.9, 0.95)
    torch.testing.assert_close(adv, r - v)
    torch.testing.assert_close(ret, r)


def test_ppo_learns_a_contextual_bandit():
    torch.manual_seed(0)
    arms = 6
    net = torch.nn.Sequential(torch.nn.Linear(arms, 32), torch.nn.ReLU(),
                              torch.nn.Linear(32, arms + 1))

    def actor_critic(state):
        out = net(state)
        return out[:, :arms], out[:, arms]

    config = PPOConfig(lr=2e-2, epochs=3, minibatch=128, entropy_coef=0.0)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(0)
    rewards = []
    for _ in range(12):
        target = torch.randint(0, arms, (256,), generator=gen)
        state = torch.nn.functional.one_hot(target, arms).float()
        with torch.no_grad():
            logits, value = actor_critic(state)
            action = torch.multinomial(torch.softmax(logits, 1), 1, generator=gen).squeeze(1)
            log_prob = torch.log_softmax(logits, 1).gather(1, action[:, None]).squeeze(1)
        reward = (action == target).float()
        rewards.append(float(reward.mean()))
        adv, ret = gae(reward[:, None], value[:, None], 0.9, 0.95)
        ppo_update(actor_critic, optimizer, [state], action, log_prob, adv[:, 0], ret[:, 0],
                   config, gen)
    assert rewards[0] < 0.4 and np.mean(rewards[-3:]) > 0.9


def test_training_stages_train_what_they_should():
    """Stage 1 trains the classifier stages but not the policy; stage 2 (PPO) only the policy;
    stage 3 the focus CNN, the fusion cell and the classifier."""
    torch.manual_seed(0)
    from splitexit.data.splits import Split

    images, labels = _items(30, 12, 3)
    data = make_cluttered(images, labels, 48, 32, fragments=2, fragment_size=4, seed=0)
    split = Split(torch.from_numpy(data.x).float() / 255, torch.from_numpy(data.y))
    net = GFNet(TINY)

    def snapshot():
        return {k: v.clone() for k, v in net.state_dict().items()}

    def changed(before):
        after = net.state_dict()
        return {k.split(".")[0] + "." + k.split(".")[1] for k in before
                if not torch.equal(before[k], after[k])}

    before = snapshot()
    train_classifier_stages(net, split, 1, batch_size=16)
    assert {"glance.encoder", "focus.encoder", "classifier.weight"} <= changed(before)
    assert not any(k.startswith("policy") for k in changed(before))
    before = snapshot()
    log = train_policy(net, split, 3, batch=16, config=PPOConfig(minibatch=16, epochs=1))
    assert len(log) == 3 and all(np.isfinite(e["mean_return"]) for e in log)
    assert changed(before) and all(k.startswith("policy") for k in changed(before))
    before = snapshot()
    train_classifier_stages(net, split, 1, policy="learned", batch_size=16)
    assert changed(before) <= {"focus.encoder", "focus.cell", "glance.cell",
                               "classifier.weight", "classifier.bias"}
    assert "focus.encoder" in changed(before)


# -- the lookahead warm start and the inked stage 1 ---------------------------------------------

def test_one_step_lookahead_is_the_true_class_log_probability_after_each_location():
    from splitexit.glance import one_step_lookahead

    net = _net()
    x, y = _images(3), torch.tensor([0, 2, 3])
    scores = one_step_lookahead(net, x, y, batch_size=2)
    assert scores.shape == (3, net.grid.locations)
    with torch.no_grad():
        h, _ = net.glance(x)
        for g in range(net.grid.locations):
            loc = torch.full((3,), g)
            want = torch.log_softmax(net.classifier(net.focus(x, h, loc)), 1)[torch.arange(3), y]
            torch.testing.assert_close(scores[:, g], want, rtol=1e-5, atol=1e-5)


def test_warm_start_fits_only_the_localiser_to_the_lookahead():
    from splitexit.data.splits import Split
    from splitexit.glance import warm_start_policy

    torch.manual_seed(0)
    net = _net()
    x = _images(32, seed=4)
    split = Split(x, torch.randint(0, 4, (32,), generator=torch.Generator().manual_seed(0)))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    log = warm_start_policy(net, split, 20, lr=5e-2)
    after = net.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("policy.localiser") for k in moved)
    assert log[-1]["loss"] < log[0]["loss"]
    # the localiser's best location agrees with the lookahead's more often than at first
    # and than chance (1 in 9 locations)
    assert log[-1]["argmax_agreement"] > max(log[0]["argmax_agreement"],
                                             2 / net.grid.locations)


def test_inked_patches_go_where_the_ink_is():
    from splitexit.glance.train import _inked_locations, ink_scores

    net = _net()
    x = torch.zeros(50, 1, 32, 32)
    x[:, :, 18:30, 17:29] = 1.0  # a bright item under the bottom-right patches
    ink = ink_scores(net, x)
    best = int(ink[0].argmax())
    used = torch.zeros(50, net.grid.locations)
    gen = torch.Generator().manual_seed(0)
    inked = _inked_locations(ink, used, gen, share=1.0)
    assert (inked == best).float().mean() > 0.5
    uniform = _inked_locations(ink, used, gen, share=0.0)
    assert (uniform == best).float().mean() < 0.5
    used[:, best] = 1
    assert not (_inked_locations(ink, used, gen, share=1.0) == best).any()


def test_bad_schedule_values_are_refused():
    from splitexit.data.splits import Split
    from splitexit.glance import GFNetSchedule, fit_gfnet, warm_start_policy

    net = _net()
    split = Split(_images(8), torch.zeros(8, dtype=torch.int64))
    with pytest.raises(InputError, match="inked"):
        train_classifier_stages(net, split, 1, inked=1.5)
    with pytest.raises(InputError, match="temperature"):
        warm_start_policy(net, split, 1, temperature=0.0)
    with pytest.raises(InputError, match="rounds"):
        fit_gfnet(net, split, GFNetSchedule(rounds=0))


# -- the cheaper localiser, its distillation, and the step graphs on ONNX Runtime ---------------

def _strided(seed=0) -> GFNet:
    from dataclasses import replace

    torch.manual_seed(seed)
    return GFNet(replace(TINY, localiser_stride=2)).eval()


def test_localiser_at_stride_two_scores_each_location_over_its_footprint():
    net = _strided()
    policy = net.policy
    assert policy.whole_map and policy.map_footprint == 2  # 16-pixel patches, 8-pixel cells
    x = _images(5)
    with torch.no_grad():
        scores = policy.prior(x)
        cells = policy.localiser(policy.downsample(x))  # (5, 1, 4, 4): stride 2 on 8x8
        assert cells.shape == (5, 1, 4, 4) and scores.shape == (5, net.grid.locations)
        for g, (r, c) in enumerate((net.grid.corners() // 8).tolist()):
            torch.testing.assert_close(scores[:, g], cells[:, 0, r: r + 2, c: c + 2].mean((1, 2)))
    assert GFNetConfig.from_json(net.config.to_json()) == net.config
    assert "localiser_stride" not in TINY.to_json()  # older configurations hash alike
    for bad in (0, 5, 1.5):
        with pytest.raises(InputError, match="localiser stride"):
            GFNetConfig(image=32, glance=8, patch=16, stride=8, localiser_stride=bad)


def test_distilled_localiser_takes_over_the_teachers_location_scores():
    from dataclasses import replace

    from splitexit.data.splits import Split
    from splitexit.glance import distil_localiser

    teacher, student = _net(), _strided(seed=3)
    split = Split(_images(48, seed=5), torch.zeros(48, dtype=torch.int64))
    log = distil_localiser(student, teacher, split, 12, lr=2e-2)
    assert log[-1]["loss"] < log[0]["loss"]
    assert log[-1]["argmax_agreement"] > max(log[0]["argmax_agreement"], 0.5)
    mine, theirs = student.state_dict(), teacher.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs
               if not k.startswith("policy.localiser."))
    with pytest.raises(InputError, match="but for the localiser stride"):
        distil_localiser(GFNet(replace(TINY, hidden=8, localiser_stride=2)), teacher, split, 1)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["learned", "localiser", "centre"])
def test_step_graphs_exit_as_pytorch(tmp_path, policy):
    """One ONNX graph per step with the exit test inside: the same exits and predictions as
    the PyTorch model, sample by sample; the flat every-step graph the same logits."""
    from splitexit import FixedExit
    from splitexit.glance import GFNetSteps

    net = _strided()
    with torch.no_grad():
        net.classifier.weight.mul_(20)
    model = net.multiexit(policy)
    x = _images(17)
    with torch.no_grad():
        logits = model(x)
    exit_policy = MaxProb(_between(logits))
    steps = GFNetSteps(net, policy, exit_policy, tmp_path)
    ref = model.infer(x, exit_policy)
    got = [steps.infer(x[i: i + 1].numpy()) for i in range(len(x))]
    assert [e for _, e in got] == ref.exit_index.tolist()
    assert len(set(ref.exit_index.tolist())) > 1
    assert [int(lg.argmax(1)[0]) for lg, _ in got] == ref.predictions.tolist()
    every = model.infer(x, FixedExit(TINY.steps)).logits
    flat = np.concatenate([steps.infer_all(x[i: i + 1].numpy()) for i in range(len(x))])
    np.testing.assert_allclose(flat, every.numpy(), rtol=1e-4, atol=1e-4)
    assert len(steps.step_calls(x[:1].numpy())) == TINY.steps + 1
    with pytest.raises(InputError, match="float32"):
        steps.infer(x[:1].double().numpy())
    with pytest.raises(InputError, match="one sample at a time"):
        steps.infer(x[:2].numpy())
    with pytest.raises(InputError, match="max-prob, entropy or margin"):
        GFNetSteps(net, policy, FixedExit(1), tmp_path / "fixed")
    with pytest.raises(InputError, match="without an exit policy"):
        GFNetSteps(net, policy, None, tmp_path / "none").infer(x[:1].numpy())


# -- cheaper glance and focus CNNs distilled from a trained GFNet ------------------------------

SMALL = dict(encoder_channels=(2, 8), encoder_strides=(2, 2))  # the same 8 x 2 x 2 glance map


def test_encoder_design_is_its_own_and_hashes_as_before():
    from dataclasses import replace

    from splitexit.glance import full_resolution_backbone

    config = replace(TINY, **SMALL)
    net = GFNet(config)
    assert net.glance.encoder[0].out_channels == 2 and net.focus.encoder[0].out_channels == 2
    assert net.map_shape == GFNet(TINY).map_shape
    assert GFNetConfig.from_json(config.to_json()) == config
    assert "encoder_channels" not in TINY.to_json()  # older configurations hash alike
    backbone = full_resolution_backbone(config)  # the backbone keeps its own design
    assert backbone[0][0].out_channels == TINY.channels[0]
    with pytest.raises(InputError, match="same non-zero length"):
        replace(TINY, encoder_channels=(2, 8), encoder_strides=(2,))


def test_distilled_encoders_start_from_their_seed():
    from dataclasses import replace

    from splitexit.data.splits import Split
    from splitexit.glance import distil_encoders

    teacher, split = _net(), Split(_images(4), torch.zeros(4, dtype=torch.int64))
    students = []
    for draws in (0, 5):
        torch.manual_seed(draws)  # whatever ran before
        student = GFNet(replace(TINY, **SMALL))
        distil_encoders(student, teacher, split, 0, seed=3)
        students.append(student.state_dict())
    assert all(torch.equal(students[0][k], students[1][k]) for k in students[0])


@pytest.mark.slow
def test_distilled_encoders_keep_the_other_weights_and_learn_the_teachers_features():
    from dataclasses import replace

    from splitexit.data.splits import Split
    from splitexit.glance import distil_encoders, finetune_student

    teacher = _net()
    torch.manual_seed(4)
    student = GFNet(replace(TINY, **SMALL))
    x = _images(64, seed=6)
    log = distil_encoders(student, teacher, Split(x, torch.zeros(64, dtype=torch.int64)), 10,
                          lr=2e-2)
    for part in ("glance", "focus"):
        errors = [e["relative_mse"] for e in log if e["stage"] == f"distil-{part}-cnn"]
        assert len(errors) == 10 and errors[-1] < 0.7 * errors[0]
    mine, theirs = student.state_dict(), teacher.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs
               if not k.startswith(("glance.encoder.", "focus.encoder.")))

    def gap():
        with torch.no_grad():
            a, b = student.rollout(x, "learned")[0][-1], teacher.rollout(x, "learned")[0][-1]
            return float((torch.softmax(a, 1) - torch.softmax(b, 1)).abs().sum(1).mean())

    before = gap()
    # alpha 1: no label is read (these would fail any cross-entropy)
    finetune_student(student, teacher, Split(x, torch.full((64,), 99)), 8, lr=3e-3, alpha=1.0,
                     batch_size=8)
    assert gap() < before
    with pytest.raises(InputError, match="but for the glance and focus CNNs"):
        distil_encoders(GFNet(replace(TINY, hidden=8, **SMALL)), teacher, Split(x, torch.zeros(64, dtype=torch.int64)),
                        1)
    with pytest.raises(InputError, match="feature map"):
        distil_encoders(GFNet(replace(TINY, encoder_channels=(2, 8), encoder_strides=(2, 1))),
                        teacher, Split(x, torch.zeros(64, dtype=torch.int64)), 1)
