"""Training glance and focus as the paper does, in three stages:

1. the classifier stages (glance CNN, focus CNN, fusion cell, classifier) with patches at
   random locations, the loss summed over every step;
2. the patch policy by PPO with everything else frozen: an episode is one image's focus steps,
   the reward of a step the gain in the true class's softmax probability. Optionally (when
   ``search_epochs > 0``) PPO starts from a warm start: a one-step lookahead over every
   location of every training image (the classifier's true-class log-probability after the
   glance and a focus step there; class labels only, never the item's place) whose
   softmax the policy's first-step distribution is fitted to (:func:`warm_start_policy`);
3. the focus CNN, fusion cell and classifier fine-tuned with the learned policy's patches (on images
   where the item now tends to be inside the patch: the "well-placed" patches).

Optionally stages 1 and 3 distil a teacher (e.g. the full-resolution backbone): every step's
loss is its cross-entropy plus ``kd_alpha`` times the softened KL divergence to the teacher's
logits (:func:`~splitexit.training.bottlefit.softened_kl`), computed once per training image.

Plus :func:`train_backbone`, the same optimiser and data for the full-resolution backbone
without exits (the equally trained control).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from ..data.splits import Split
from ..errors import InputError
from ..training.base import seed_everything
from ..training.bottlefit import softened_kl
from .fitting import _check_epochs, batched_logits, check_kd, minibatch_epochs, same_config_but
from .model import GFNet, global_pool, mark_used
from .patch_policies import masked_scores
from .ppo import PPOConfig, gae, ppo_update

__all__ = ["GFNetSchedule", "train_classifier_stages", "train_policy", "train_backbone",
           "fit_gfnet", "step_accuracies", "one_step_lookahead", "warm_start_policy",
           "ink_scores", "distil_localiser"]


@dataclass(frozen=True)
class GFNetSchedule:
    """How long each stage trains.

    Attributes:
        classifier_epochs: stage 1 epochs (random patches).
        policy_iterations: stage 2 PPO iterations (one batch of rollouts each).
        policy_batch: images per PPO rollout batch.
        finetune_epochs: stage 3 epochs (learned patches).
        finetune_lr_scale: stage 3's peak rate as a multiple of ``lr``.
        inked: stage 1's share of patches drawn where the glance has most ink (see
            :func:`train_classifier_stages`; 0: all at random, as the paper).
        search_epochs: epochs of the policy's warm start on the one-step lookahead (0: PPO
            from scratch).
        search_temperature: temperature of the lookahead's target distribution (in units of
            the lookahead's standard deviation over an image's locations).
        search_samples: training images the lookahead covers (a stratified subset; it costs
            one focus step per location per image).
        search_lr: Adam rate of the warm start.
        rounds: rounds of (warm start, PPO, fine-tuning), sharing ``policy_iterations`` and
            ``finetune_epochs``.
        lr, batch_size, seed: the classifier stages' Adam rate, batch and seed.
        ppo: PPO hyper-parameters.
    """

    classifier_epochs: int = 4
    policy_iterations: int = 120
    policy_batch: int = 256
    finetune_epochs: int = 2
    finetune_lr_scale: float = 0.25
    inked: float = 0.0
    search_epochs: int = 0
    search_temperature: float = 0.3
    search_samples: int = 2000
    search_lr: float = 5e-3
    rounds: int = 1
    lr: float = 2e-3
    batch_size: int = 128
    seed: int = 0
    ppo: PPOConfig = field(default_factory=PPOConfig)

    def to_json(self) -> dict:
        return asdict(self)


def _random_locations(used: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    scores = torch.rand(used.shape, generator=generator)
    return masked_scores(scores, used).argmax(1)


def ink_scores(net: GFNet, x: torch.Tensor) -> torch.Tensor:
    """``(N, locations)``: the mean intensity of the glance under each patch's footprint,
    standardised per image (where there is most to see; a training aid, label-free)."""
    with torch.no_grad():
        policy = net.policy
        small = policy.downsample(x).mean(1, keepdim=True)
        mass = F.avg_pool2d(small, policy.footprint, stride=1).flatten(1)[:, policy.sites]
        return (mass - mass.mean(1, keepdim=True)) / (mass.std(1, keepdim=True) + 1e-6)


def _inked_locations(ink: torch.Tensor, used: torch.Tensor, generator: torch.Generator,
                     share: float, temperature: float = 0.5) -> torch.Tensor:
    """Per sample, with probability ``share`` a location drawn from ``softmax(ink / T)``
    (Gumbel-max), else a uniformly random one; never a used one."""
    u = torch.rand(ink.shape, generator=generator).clamp_(1e-9, 1 - 1e-9)
    inked = ink / temperature - torch.log(-torch.log(u))
    pick = torch.rand((ink.shape[0], 1), generator=generator) < share
    scores = torch.where(pick, inked, torch.rand(ink.shape, generator=generator))
    return masked_scores(scores, used).argmax(1)


def _epochs(net_params, data, epochs: int, lr: float, batch_size: int, seed: int, loss_fn,
            log: list, what: str, modules: list[nn.Module]) -> None:
    optimizer = torch.optim.Adam(net_params, lr=lr)
    steps = epochs * -(-len(data) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=max(1, steps))
    for epoch in range(epochs):
        for m in modules:
            m.train()
        t0, total, n = time.perf_counter(), 0.0, 0
        for x, y in data.loader(batch_size, shuffle=True, seed=seed + epoch):
            loss = loss_fn(x, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(y)
            n += len(y)
        log.append({"stage": what, "epoch": epoch, "loss": total / n,
                    "seconds": time.perf_counter() - t0})
        print(f"[{what}] epoch {epoch + 1}/{epochs} loss {total / n:.4f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)


def train_classifier_stages(net: GFNet, data, epochs: int, *, policy: str = "random",
                            lr: float = 2e-3, batch_size: int = 128, seed: int = 0,
                            inked: float = 0.0, teacher_logits: torch.Tensor | None = None,
                            kd_alpha: float = 0.0, kd_temperature: float = 2.0,
                            log: list | None = None) -> list:
    """Stage 1 (``policy="random"``: every module but the patch policy, patches at random
    locations) or stage 3 (``policy="learned"``: the focus CNN, the fusion cell and the
    classifier, patches where the frozen learned policy looks). The loss is the mean over the
    steps of each step's cross-entropy, plus ``kd_alpha`` times its ``kd_temperature``-softened
    KL divergence to ``teacher_logits`` (one row per image of ``data``) when ``kd_alpha > 0``.

    ``inked`` (stage 1 only): the share of patches drawn where the glance has most ink
    (:func:`ink_scores`, sampled at temperature 0.5) instead of uniformly, so that the
    classifier sees the item early when it is small on a large canvas.
    """
    _check_epochs("epochs", epochs)
    kd = check_kd(kd_alpha, kd_temperature)
    if kd and (teacher_logits is None or tuple(teacher_logits.shape) != (
            len(data), net.config.num_classes)):
        raise InputError(f"kd_alpha > 0 needs the teacher's logits on the {len(data)} training "
                         f"images, shape ({len(data)}, {net.config.num_classes}) (fit_gfnet: "
                         f"a teacher), got "
                         f"{None if teacher_logits is None else tuple(teacher_logits.shape)}")
    if kd:  # the loader yields each image's index, which picks its label and teacher logits
        labels, data = data.y, Split(data.x, torch.arange(len(data)))
    if not 0.0 <= inked <= 1.0:
        raise InputError(f"inked is a share in [0, 1], got {inked!r}")
    if policy not in ("random", "learned"):
        raise InputError(f"the classifier stages train with 'random' (stage 1) or 'learned' "
                         f"(stage 3) patches, got {policy!r}")
    log = [] if log is None else log
    gen = torch.Generator().manual_seed(seed)
    steps = net.config.steps
    if policy == "random":
        trained = [net.glance, net.focus, net.classifier]
    else:
        trained = [net.focus, net.classifier]  # focus CNN, fusion cell (shared), classifier
    params = list({id(p): p for m in trained for p in m.parameters()}.values())
    for p in net.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    net.eval()

    def loss_fn(x, key):
        y, target = (labels[key], teacher_logits[key]) if kd else (key, None)

        def step_loss(logits):
            ce = F.cross_entropy(logits, y)
            return ce if target is None else ce + kd_alpha * softened_kl(logits, target,
                                                                         kd_temperature)

        h, glance_map = net.glance(x)
        used = h.new_zeros(x.shape[0], net.grid.locations)
        if policy == "learned":
            with torch.no_grad():
                prior = net.policy.prior(x)
        loss = step_loss(net.classifier(h))
        ink = ink_scores(net, x) if policy == "random" and inked > 0 else None
        for _ in range(steps):
            if ink is not None:
                location = _inked_locations(ink, used, gen, inked)
            elif policy == "random":
                location = _random_locations(used, gen)
            else:
                with torch.no_grad():
                    location = net.policy.choose(prior, h, glance_map, used)
            h = net.focus(x, h, location)
            used = mark_used(used, location)
            loss = loss + step_loss(net.classifier(h))
        return loss / (steps + 1)

    _epochs(params, data, epochs, lr, batch_size, seed, loss_fn, log,
            "stage1-classifier" if policy == "random" else "stage3-finetune", trained)
    for p in net.parameters():
        p.requires_grad_(True)
    net.eval()
    return log


@torch.no_grad()
def _rollouts(net: GFNet, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> dict:
    """One episode per image with sampled patches: states, actions, log-probs, values,
    rewards (gain of the true class's probability)."""
    h, glance_map = net.glance(x)
    small = net.policy.downsample(x)
    used = h.new_zeros(x.shape[0], net.grid.locations)
    p_prev = F.softmax(net.classifier(h), 1).gather(1, y[:, None]).squeeze(1)
    hs, maps, useds, actions, log_probs, values, rewards = [], [], [], [], [], [], []
    for _ in range(net.config.steps):
        logits, value = net.policy.actor_critic(small, h, glance_map, used)
        probs = F.softmax(logits, 1)
        action = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        hs.append(h)
        maps.append(glance_map)
        useds.append(used)
        actions.append(action)
        log_probs.append(torch.log(probs.gather(1, action[:, None]).squeeze(1)))
        values.append(value)
        h = net.focus(x, h, action)
        used = mark_used(used, action)
        p = F.softmax(net.classifier(h), 1).gather(1, y[:, None]).squeeze(1)
        rewards.append(p - p_prev)
        p_prev = p
    return {"small": small[:, None].expand(-1, len(hs), *small.shape[1:]),
            "h": torch.stack(hs, 1), "map": torch.stack(maps, 1), "used": torch.stack(useds, 1),
            "action": torch.stack(actions, 1), "log_prob": torch.stack(log_probs, 1),
            "value": torch.stack(values, 1), "reward": torch.stack(rewards, 1),
            "final_correct": (net.classifier(h).argmax(1) == y).float()}


def train_policy(net: GFNet, data, iterations: int, *, batch: int = 256,
                 config: PPOConfig | None = None, seed: int = 0, log: list | None = None
                 ) -> list:
    """Stage 2: the patch policy's actor-critic by PPO, everything else frozen (eval mode).

    Returns the log: per iteration the mean episode return (the true class's probability
    gained over the focus steps), the final step's accuracy and the PPO losses.
    """
    _check_epochs("iterations", iterations)
    config = config or PPOConfig()
    log = [] if log is None else log
    gen = torch.Generator().manual_seed(seed)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    params = list(net.policy.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=config.lr)
    n = len(data)
    t0 = time.perf_counter()
    for it in range(iterations):
        idx = torch.randint(0, n, (min(batch, n),), generator=gen)
        roll = _rollouts(net, data.x[idx], data.y[idx], gen)
        advantages, returns = gae(roll["reward"], roll["value"], config.gamma, config.lam)
        flat = [roll[k].flatten(0, 1) for k in ("small", "h", "map", "used")]
        stats = ppo_update(net.policy.actor_critic, optimizer, flat,
                           roll["action"].flatten(), roll["log_prob"].flatten(),
                           advantages.flatten(), returns.flatten(), config, gen)
        entry = {"stage": "stage2-ppo", "iteration": it,
                 "mean_return": float(roll["reward"].sum(1).mean()),
                 "final_accuracy": float(roll["final_correct"].mean()), **stats}
        log.append(entry)
        if it % 20 == 0 or it == iterations - 1:
            print(f"[stage2-ppo] iteration {it + 1}/{iterations} return "
                  f"{entry['mean_return']:.3f} accuracy {entry['final_accuracy']:.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    for p in net.parameters():
        p.requires_grad_(True)
    net.eval()
    return log


@torch.no_grad()
def one_step_lookahead(net: GFNet, x: torch.Tensor, y: torch.Tensor,
                       batch_size: int = 16) -> torch.Tensor:
    """``(N, locations)``: the log-probability of the true class after the glance and one
    focus step at each location (what the classifier would gain by looking there)."""
    net.eval()
    grid, out = net.grid, []
    index = net.focus.pixel_index
    for i in range(0, len(x), batch_size):
        xb, yb = x[i: i + batch_size], y[i: i + batch_size]
        n, c = xb.shape[:2]
        h, _ = net.glance(xb)
        patches = xb.reshape(n, c, -1)[:, :, index]  # (n, c, locations, P*P)
        patches = patches.permute(0, 2, 1, 3).reshape(n * grid.locations, c, grid.patch,
                                                      grid.patch)
        f = global_pool(net.focus.encoder(patches))
        h1 = net.focus.cell(f, h.repeat_interleave(grid.locations, 0))
        logp = F.log_softmax(net.classifier(h1), 1)
        out.append(logp.gather(1, yb.repeat_interleave(grid.locations)[:, None])
                   .reshape(n, grid.locations))
    return torch.cat(out)


def warm_start_policy(net: GFNet, data, epochs: int, *, temperature: float = 0.3,
                      samples: int | None = None, lr: float = 2e-3, batch_size: int = 128,
                      seed: int = 0, log: list | None = None) -> list:
    """Fit the policy's localiser (its image-only spatial scores, the first step's logits
    before PPO) to ``softmax(z / temperature)``, ``z`` the per-image standardised
    :func:`one_step_lookahead` on ``data`` (or a stratified subset of ``samples`` images),
    by cross-entropy; everything else frozen. A warm start for PPO, from class labels only."""
    _check_epochs("epochs", epochs)
    if samples is not None and samples < len(data):
        data = data.subset(_check_epochs("samples", samples) or 1, seed=seed)
    if not temperature > 0:
        raise InputError(f"the lookahead temperature must be > 0, got {temperature!r}")
    log = [] if log is None else log
    if epochs == 0:
        return log
    t0 = time.perf_counter()
    net.eval()
    scores = one_step_lookahead(net, data.x, data.y)
    with torch.no_grad():
        small = net.policy.downsample(data.x)
    # in units of each image's spread, so the target is as sharp early in training (when the
    # classifier's log-probabilities differ little between locations) as later
    z = (scores - scores.mean(1, keepdim=True)) / (scores.std(1, keepdim=True) + 1e-6)
    target = F.softmax(z / temperature, 1)
    print(f"[stage2-lookahead] {len(data)} images x {net.grid.locations} locations "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    _fit_localiser(net, small, target, scores.argmax(1), stage="stage2-lookahead",
                   epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, log=log, t0=t0)
    return log


def distil_localiser(student: GFNet, teacher: GFNet, data, epochs: int, *, lr: float = 5e-3,
                     batch_size: int = 128, seed: int = 0, log: list | None = None) -> list:
    """Give ``student`` every weight of a trained ``teacher`` and fit its localiser (e.g. a
    cheaper one, ``localiser_stride=2``) to the teacher's image-only location scores.

    The target is ``softmax`` of the teacher's :meth:`~LearnedPatchPolicy.prior` on ``data``
    (no labels); the loss its cross-entropy with the student's, which matches the scores up
    to a per-image constant, the freedom the policy's choice ``argmax(prior + actor)`` has.
    Adam with a one-cycle schedule; everything but the student's localiser frozen. The
    localiser starts from the teacher's weights (its convolutions have the same shapes
    whatever the stride).

    Raises:
        InputError: nets whose configurations differ in more than the localiser's stride.
    """
    _check_epochs("epochs", epochs)
    same_config_but(teacher, student, ("localiser_stride",), "the localiser stride")
    log = [] if log is None else log
    student.load_state_dict(teacher.state_dict())
    student.eval()
    teacher.eval()
    if epochs == 0:
        return log
    t0 = time.perf_counter()
    with torch.no_grad():
        small = teacher.policy.downsample(data.x)
        scores = torch.cat([teacher.policy.spatial(small[i: i + 500])
                            for i in range(0, len(small), 500)])
        target = F.softmax(scores, 1)
    _fit_localiser(student, small, target, scores.argmax(1), stage="distil-localiser",
                   epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, log=log, t0=t0,
                   one_cycle=True)
    return log


def _fit_localiser(net, small: torch.Tensor, target: torch.Tensor, best: torch.Tensor, *,
                   stage: str, epochs: int, lr: float, batch_size: int, seed: int,
                   log: list, t0: float, one_cycle: bool = False) -> None:
    """Fit only ``net``'s localiser to soft location targets on the glance images ``small``
    (cross-entropy, Adam, optionally a one-cycle schedule), logging the agreement of its best
    location with ``best``; everything else stays frozen, and ``net`` ends in eval mode."""
    for p in net.parameters():
        p.requires_grad_(False)
    params = list(net.policy.localiser.parameters())
    for p in params:
        p.requires_grad_(True)
    hits = [0.0]

    def loss_fn(idx):
        logits = net.policy.spatial(small[idx])
        hits[0] += float((logits.argmax(1) == best[idx]).sum())
        return -(target[idx] * F.log_softmax(logits, 1)).sum(1).mean()

    for epoch, loss in minibatch_epochs(params, len(small), loss_fn, epochs=epochs, lr=lr,
                                        batch_size=batch_size, seed=seed,
                                        one_cycle=one_cycle):
        log.append({"stage": stage, "epoch": epoch, "loss": loss,
                    "argmax_agreement": hits[0] / len(small),
                    "seconds": time.perf_counter() - t0})
        print(f"[{stage}] epoch {epoch + 1}/{epochs} loss {loss:.4f} "
              f"best-location agreement {hits[0] / len(small):.3f}", flush=True)
        hits[0] = 0.0
    for p in net.parameters():
        p.requires_grad_(True)
    net.eval()


def train_backbone(backbone: nn.Module, data, epochs: int, *, lr: float = 2e-3,
                   batch_size: int = 128, seed: int = 0, log: list | None = None) -> list:
    """The full-resolution backbone, with the classifier stages' optimiser, schedule and data."""
    _check_epochs("epochs", epochs)
    log = [] if log is None else log
    _epochs(list(backbone.parameters()), data, epochs, lr, batch_size, seed,
            lambda x, y: F.cross_entropy(backbone(x), y), log, "backbone", [backbone])
    backbone.eval()
    return log


def fit_gfnet(net: GFNet, data, schedule: GFNetSchedule | None = None, *,
              teacher: nn.Module | None = None, kd_alpha: float = 0.0,
              kd_temperature: float = 2.0) -> list:
    """All three stages on ``data`` (a train :class:`~splitexit.data.Split`); returns the log.

    With ``kd_alpha > 0``, stages 1 and 3 also distil ``teacher`` (a classifier of the whole
    image, e.g. the full-resolution backbone; see :func:`train_classifier_stages`), whose
    logits on ``data`` are computed once, in eval mode; PPO's reward is unchanged.

    With ``schedule.rounds > 1``, stages 2 and 3 alternate: each round warm-starts the policy
    on the lookahead of the classifier as it is then, runs its share of the PPO iterations and
    fine-tunes on its share of the stage-3 epochs (the classifier improves on the patches
    the policy picks, the lookahead sharpens with it).
    """
    schedule = schedule or GFNetSchedule()
    rounds = schedule.rounds
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise InputError(f"rounds must be an integer >= 1, got {rounds!r}")
    soft = (batched_logits(teacher, data.x)  # once; a missing teacher is refused below
            if check_kd(kd_alpha, kd_temperature) and teacher is not None else None)
    kd = {"teacher_logits": soft, "kd_alpha": kd_alpha, "kd_temperature": kd_temperature}
    seed_everything(schedule.seed)
    log: list = []
    train_classifier_stages(net, data, schedule.classifier_epochs, policy="random",
                            lr=schedule.lr, batch_size=schedule.batch_size, seed=schedule.seed,
                            inked=schedule.inked, log=log, **kd)
    for r in range(rounds):
        share = (schedule.finetune_epochs * (r + 1)) // rounds - (
            schedule.finetune_epochs * r) // rounds
        iterations = (schedule.policy_iterations * (r + 1)) // rounds - (
            schedule.policy_iterations * r) // rounds
        warm_start_policy(net, data, schedule.search_epochs,
                          temperature=schedule.search_temperature,
                          samples=schedule.search_samples, lr=schedule.search_lr,
                          seed=schedule.seed + r, log=log)
        train_policy(net, data, iterations, batch=schedule.policy_batch,
                     config=schedule.ppo, seed=schedule.seed + r, log=log)
        train_classifier_stages(net, data, share, policy="learned",
                                lr=schedule.lr * schedule.finetune_lr_scale,
                                batch_size=schedule.batch_size,
                                seed=schedule.seed + 1000 + 100 * r, log=log, **kd)
    return log


@torch.no_grad()
def step_accuracies(net: GFNet, x: torch.Tensor, y: torch.Tensor, policy="learned",
                    batch_size: int = 500) -> list[float]:
    """Accuracy after every step (glance first) with ``policy`` choosing the patches."""
    net.eval()
    correct = None
    for i in range(0, len(x), batch_size):
        logits, _ = net.rollout(x[i: i + batch_size], policy)
        c = torch.stack([(lg.argmax(1) == y[i: i + batch_size]).sum() for lg in logits])
        correct = c if correct is None else correct + c
    return (correct.double() / len(x)).tolist()
