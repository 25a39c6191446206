"""Advantage estimators in one registry: the paper's Eq. 2 (GRPO) and the flat peers of
Table 3 / §4.3 (RLOO, GiGPO). Pure functions over tensors.

Every estimator reads the same `Samples` and returns the same shape: one advantage
per *step*, (S,). A sample is one blueprint (a single step: its whole completion)
or one trajectory (one step per executor turn); samples are grouped (a task's G
blueprints, or its M trajectories). An estimator that scores whole samples (GRPO,
RLOO) gives every step of a sample the sample's advantage; GiGPO adds a step-level
term. The loop picks one by name (`ESTIMATORS[cfg.advantage]`) and never looks at
which it got.

- grpo: Eq. 2, A_i = (R_i - mean_group) / (std_group + eps) (himac.groups).
- rloo: A_i = R_i - mean of the *other* returns in i's group (Ahmadian et al. 2024).
- gigpo: A = A^E + omega * A^S (Feng et al. 2025): Eq. 2 over the episode group plus
  Eq. 2 over *anchor-state groups*, the steps of one task's trajectories taken from
  an identical observation, each scored by its discounted return from that step on.
  On blueprints (one step each, every anchor its own) A^S is 0 and gigpo is grpo.
- step_grpo: Eq. 2 over the discounted step returns of *all* steps of a group pooled (no
  identical-state match): each turn is credited with what followed it, against the
  group's average turn. A departure, for dense per-step rewards (e.g. Sokoban's
  `shaping`), where a turn's own reward says most about it; with one step per sample
  (blueprints) it is grpo.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from himac.groups import group_advantages


@dataclass(frozen=True)
class Samples:
    """What every estimator reads. N samples in groups; S steps, each belonging to one sample."""
    returns: torch.Tensor  # (N,) one return per sample
    group: torch.Tensor  # (N,) long, the sample's group (its task)
    step_sample: torch.Tensor  # (S,) long, which sample each step belongs to
    step_anchor: torch.Tensor  # (S,) long, equal ids = identical observation (GiGPO's anchor state)
    step_reward: torch.Tensor  # (S,) the env reward of each step

    @classmethod
    def one_step_each(cls, returns: torch.Tensor, group: torch.Tensor) -> "Samples":
        """Samples that are a single step each (blueprints): every step its own anchor."""
        n = returns.numel()
        steps = torch.arange(n)
        return cls(returns, group, steps, steps, returns.clone())


@dataclass(frozen=True)
class Params:
    scale_std: bool = True  # divide by the group std (False: mean-centred, Dr. GRPO)
    eps: float = 1e-6  # Eq. 2's epsilon
    gamma: float = 0.95  # GiGPO: discount of the step returns
    step_weight: float = 1.0  # GiGPO: omega, weight of the step-level term
    std_floor: float = 0.0  # Eq. 2's std is at least this (reward units); 0: the paper's Eq. 2


Estimator = Callable[[Samples, Params], torch.Tensor]


def grpo(s: Samples, p: Params) -> torch.Tensor:  # (S,)
    """Eq. 2 over each group's returns, broadcast to the sample's steps."""
    return group_advantages(s.returns, s.group, p.scale_std, p.eps, p.std_floor)[s.step_sample]


def rloo_advantages(
    returns: torch.Tensor,  # (N,)
    group_index: torch.Tensor,  # (N,) long
) -> torch.Tensor:  # (N,)
    """A_i = R_i - mean of the other returns in i's group; a group of one has advantage 0.

    Equal to n/(n-1) times the mean-centred return.
    """
    returns = returns.double()
    _, inverse = torch.unique(group_index, return_inverse=True)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    count = torch.zeros(num_groups, dtype=returns.dtype).index_add_(0, inverse, torch.ones_like(returns))
    total = torch.zeros(num_groups, dtype=returns.dtype).index_add_(0, inverse, returns)
    others = count[inverse] - 1  # (N,)
    loo_mean = (total[inverse] - returns) / others.clamp(min=1)
    return torch.where(others > 0, returns - loo_mean, torch.zeros_like(returns)).float()


def rloo(s: Samples, p: Params) -> torch.Tensor:  # (S,)
    return rloo_advantages(s.returns, s.group)[s.step_sample]


def discounted_returns(rewards: list[float], gamma: float) -> list[float]:
    """R_t = sum_k gamma^k r_{t+k}: the return from each step of one trajectory onward."""
    out, acc = [0.0] * len(rewards), 0.0
    for t in range(len(rewards) - 1, -1, -1):
        acc = rewards[t] + gamma * acc
        out[t] = acc
    return out


def gigpo_advantages(
    episode_returns: torch.Tensor,  # (N,) one return per trajectory
    episode_group: torch.Tensor,  # (N,) long, the trajectory's episode group (its task)
    step_episode: torch.Tensor,  # (S,) long, which trajectory each step belongs to
    step_anchor: torch.Tensor,  # (S,) long, id of the step's observation (equal ids = identical state)
    step_returns: torch.Tensor,  # (S,) discounted return from the step onward
    step_weight: float = 1.0,
    scale_std: bool = True,
    eps: float = 1e-6,
    std_floor: float = 0.0,
) -> torch.Tensor:  # (S,)
    """A = A^E(episode) + omega * A^S(step), per step.

    A^E is Eq. 2 over the episode group. A^S is Eq. 2 over the anchor-state group:
    every step, across the episode group's trajectories, taken from the same
    observation (same `step_anchor` within the same episode group), scored by its
    discounted return. A state visited once forms a group of one and gets A^S = 0.
    """
    a_episode = group_advantages(episode_returns, episode_group, scale_std, eps, std_floor)[step_episode]  # (S,)
    if step_returns.numel() == 0:
        return a_episode
    # a step group = (episode group, anchor); fold the pair into one integer key
    pair = torch.stack([episode_group[step_episode], step_anchor], 1)  # (S, 2)
    _, step_group = torch.unique(pair, dim=0, return_inverse=True)  # (S,)
    a_step = group_advantages(step_returns, step_group, scale_std, eps, std_floor)  # (S,)
    return a_episode + step_weight * a_step


def gigpo(s: Samples, p: Params) -> torch.Tensor:  # (S,)
    return gigpo_advantages(s.returns, s.group, s.step_sample, s.step_anchor, step_returns_of(s, p.gamma),
                            p.step_weight, p.scale_std, p.eps, p.std_floor)


def step_returns_of(s: Samples, gamma: float) -> torch.Tensor:  # (S,)
    """Each step's discounted return from that step to the end of its sample."""
    out = torch.zeros(s.step_sample.numel())
    for i in range(s.returns.numel()):  # a sample's steps in their order
        at = (s.step_sample == i).nonzero().squeeze(1)
        out[at] = torch.tensor(discounted_returns(s.step_reward[at].tolist(), gamma), dtype=out.dtype)
    return out


def step_grpo(s: Samples, p: Params) -> torch.Tensor:  # (S,)
    """Eq. 2 over the step returns of each group's steps pooled."""
    return group_advantages(step_returns_of(s, p.gamma), s.group[s.step_sample], p.scale_std, p.eps, p.std_floor)


ESTIMATORS: dict[str, Estimator] = {"grpo": grpo, "rloo": rloo, "gigpo": gigpo, "step_grpo": step_grpo}
