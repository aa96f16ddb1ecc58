"""Proximal policy optimisation (PPO, clipped objective) for a discrete actor-critic with
masked actions: generalised advantage estimates and one update over a batch of rollouts.

Small and generic: the actor-critic is any callable ``state tensors -> (masked logits,
values)``; glance and focus trains its patch policy with it (:mod:`splitexit.glance.train`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import InputError

__all__ = ["PPOConfig", "gae", "ppo_update"]


@dataclass(frozen=True)
class PPOConfig:
    """Hyper-parameters of PPO.

    Attributes:
        lr: Adam learning rate.
        clip: clipping range of the probability ratio.
        epochs: passes over each batch of rollouts.
        minibatch: transitions per gradient step.
        gamma, lam: discount and GAE parameter.
        value_coef, entropy_coef: weights of the value loss and the entropy bonus.
        max_grad_norm: gradient clipping.
    """

    lr: float = 1e-3
    clip: float = 0.2
    epochs: int = 4
    minibatch: int = 256
    gamma: float = 0.9
    lam: float = 0.95
    value_coef: float = 0.5
    entropy_coef: float = 0.01
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.clip < 1 or not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise InputError(f"PPO needs 0 < clip < 1 and gamma, lam in [0, 1], got clip="
                             f"{self.clip}, gamma={self.gamma}, lam={self.lam}")
        if self.epochs < 1 or self.minibatch < 1 or self.lr <= 0:
            raise InputError("PPO needs epochs >= 1, minibatch >= 1 and lr > 0")


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns of episodes that end after the last step.

    Args:
        rewards, values: ``(N, T)``: reward after action ``t`` and the value of the state
            ``t`` acted in.

    Returns:
        ``(advantages, returns)``, both ``(N, T)``.
    """
    if rewards.shape != values.shape or rewards.dim() != 2:
        raise InputError(f"rewards {tuple(rewards.shape)} and values {tuple(values.shape)} "
                         "must both be (episodes, steps)")
    n, steps = rewards.shape
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(n, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(steps)):
        following = values[:, t + 1] if t + 1 < steps else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * following - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    return advantages, advantages + values


def ppo_update(actor_critic: Callable[..., tuple[torch.Tensor, torch.Tensor]],
               optimizer: torch.optim.Optimizer, states: Sequence[torch.Tensor],
               actions: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
               returns: torch.Tensor, config: PPOConfig, generator: torch.Generator | None = None
               ) -> dict:
    """One PPO update over a batch of transitions (flattened over episodes and steps).

    Args:
        actor_critic: ``actor_critic(*states) -> (logits, values)``; invalid actions' logits
            are a large finite negative number (``-inf`` would make the entropy's gradient
            NaN).
        states: per-transition state tensors, each ``(M, ...)``.
        actions, old_log_probs, advantages, returns: ``(M,)``.

    Returns:
        Mean policy loss, value loss, entropy and the fraction of clipped ratios.
    """
    m = actions.shape[0]
    if any(s.shape[0] != m for s in states) or not (
            old_log_probs.shape == advantages.shape == returns.shape == (m,)):
        raise InputError("every state tensor, action, log-probability, advantage and return "
                         "must have one row per transition")
    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    totals = {"policy_loss": 0.0, "value_loss": 0.0, "entropy": 0.0, "clipped": 0.0}
    count = 0
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for _ in range(config.epochs):
        order = torch.randperm(m, generator=generator)
        for start in range(0, m, config.minibatch):
            idx = order[start: start + config.minibatch]
            logits, values = actor_critic(*(s[idx] for s in states))
            dist = torch.distributions.Categorical(logits=logits)
            log_probs = dist.log_prob(actions[idx])
            ratio = torch.exp(log_probs - old_log_probs[idx])
            adv = advantages[idx]
            clipped = ratio.clamp(1 - config.clip, 1 + config.clip)
            policy_loss = -torch.min(ratio * adv, clipped * adv).mean()
            value_loss = (values - returns[idx]).pow(2).mean()
            entropy = -(dist.probs * dist.logits).sum(1).mean()
            loss = policy_loss + config.value_coef * value_loss - config.entropy_coef * entropy
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            totals["policy_loss"] += policy_loss.item()
            totals["value_loss"] += value_loss.item()
            totals["entropy"] += entropy.item()
            totals["clipped"] += float(((ratio - 1).abs() > config.clip).float().mean())
            count += 1
    return {k: v / max(1, count) for k, v in totals.items()}
