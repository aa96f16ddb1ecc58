"""Training glance and focus as the paper does, in three stages:

1. the classifier stages (glance CNN, focus CNN, fusion cell, classifier) with patches at
   random locations, the loss summed over every step;
2. the patch policy by PPO with everything else frozen: an episode is one image's focus steps,
   the reward of a step the gain in the true class's softmax probability;
3. the focus CNN and the classifier fine-tuned with the learned policy's patches.

Plus :func:`train_backbone`, the same optimiser and data for the full-resolution backbone
without exits (the equally trained control).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import InputError
from ..training.base import seed_everything
from .model import GFNet, mark_used
from .patch_policies import masked_scores
from .ppo import PPOConfig, gae, ppo_update

__all__ = ["GFNetSchedule", "train_classifier_stages", "train_policy", "train_backbone",
           "fit_gfnet", "step_accuracies"]


@dataclass(frozen=True)
class GFNetSchedule:
    """How long each stage trains.

    Attributes:
        classifier_epochs: stage 1 epochs (random patches).
        policy_iterations: stage 2 PPO iterations (one batch of rollouts each).
        policy_batch: images per PPO rollout batch.
        finetune_epochs: stage 3 epochs (learned patches).
        lr, batch_size, seed: the classifier stages' Adam rate, batch and seed.
        ppo: PPO hyper-parameters.
    """

    classifier_epochs: int = 4
    policy_iterations: int = 120
    policy_batch: int = 256
    finetune_epochs: int = 2
    lr: float = 2e-3
    batch_size: int = 128
    seed: int = 0
    ppo: PPOConfig = field(default_factory=PPOConfig)

    def to_json(self) -> dict:
        return asdict(self)


def _random_locations(used: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    scores = torch.rand(used.shape, generator=generator)
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


def _check_epochs(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InputError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def train_classifier_stages(net: GFNet, data, epochs: int, *, policy: str = "random",
                            lr: float = 2e-3, batch_size: int = 128, seed: int = 0,
                            log: list | None = None) -> list:
    """Stage 1 (``policy="random"``: every module but the patch policy, patches at random
    locations) or stage 3 (``policy="learned"``: the focus CNN and the classifier, patches
    where the frozen learned policy looks). The loss is the mean cross-entropy of all steps.
    """
    _check_epochs("epochs", epochs)
    if policy not in ("random", "learned"):
        raise InputError(f"the classifier stages train with 'random' (stage 1) or 'learned' "
                         f"(stage 3) patches, got {policy!r}")
    log = [] if log is None else log
    gen = torch.Generator().manual_seed(seed)
    steps = net.config.steps
    if policy == "random":
        trained = [net.glance, net.focus, net.classifier]
    else:
        trained = [net.focus.encoder, net.classifier]
    params = list({id(p): p for m in trained for p in m.parameters()}.values())
    for p in net.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    net.eval()

    def loss_fn(x, y):
        h, glance_map = net.glance(x)
        used = h.new_zeros(x.shape[0], net.grid.locations)
        if policy == "learned":
            with torch.no_grad():
                prior = net.policy.prior(x)
        loss = F.cross_entropy(net.classifier(h), y)
        for _ in range(steps):
            if policy == "random":
                location = _random_locations(used, gen)
            else:
                with torch.no_grad():
                    location = net.policy.choose(prior, h, glance_map, used)
            h = net.focus(x, h, location)
            used = mark_used(used, location)
            loss = loss + F.cross_entropy(net.classifier(h), y)
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


def train_backbone(backbone: nn.Module, data, epochs: int, *, lr: float = 2e-3,
                   batch_size: int = 128, seed: int = 0, log: list | None = None) -> list:
    """The full-resolution backbone, with the classifier stages' optimiser, schedule and data."""
    _check_epochs("epochs", epochs)
    log = [] if log is None else log
    _epochs(list(backbone.parameters()), data, epochs, lr, batch_size, seed,
            lambda x, y: F.cross_entropy(backbone(x), y), log, "backbone", [backbone])
    backbone.eval()
    return log


def fit_gfnet(net: GFNet, data, schedule: GFNetSchedule | None = None) -> list:
    """All three stages on ``data`` (a train :class:`~splitexit.data.Split`); returns the log."""
    schedule = schedule or GFNetSchedule()
    seed_everything(schedule.seed)
    log: list = []
    train_classifier_stages(net, data, schedule.classifier_epochs, policy="random",
                            lr=schedule.lr, batch_size=schedule.batch_size, seed=schedule.seed,
                            log=log)
    train_policy(net, data, schedule.policy_iterations, batch=schedule.policy_batch,
                 config=schedule.ppo, seed=schedule.seed, log=log)
    train_classifier_stages(net, data, schedule.finetune_epochs, policy="learned",
                            lr=schedule.lr / 4, batch_size=schedule.batch_size,
                            seed=schedule.seed + 1000, log=log)
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
