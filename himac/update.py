"""The policy-gradient step shared by both levels: rows in, optimiser steps out.

A `Row` is one (prompt, completion) pair the policy generated: a blueprint
(kind BLUEPRINT, one row per blueprint) or one executor turn (kind ACTION, many
rows per trajectory). `policy_update` trains only the completion tokens of rows
whose kind is selected, which is how Phase A touches blueprint tokens only and
Phase B action tokens only (Algorithm 1, lines 9 and 14); the "w/o co-evolution"
ablation selects both kinds in one step.

Memory does not grow with G or M: rows are processed in micro-batches of
`micro_batch_size`, gradients accumulate, and the loss weights are fixed for the
whole batch first (groups.token_weights), so accumulation is exact.

With one optimiser step per phase (ppo_epochs = mini_batches = 1), pi_theta_old
equals pi_theta at the time of the gradient, so old log-probs are the detached
current ones and no extra forward pass is spent; with more steps they are computed
once, before the first step, as PPO does, and only then can Eq. 3's clip act.

Controls on how far one phase moves the shared weights (issue 11; the defaults are
what docs/results.md measured):
- one AdamW per role (`optimizer_per_role`, see `Optimizers`): Phase A's steps do not
  replay the executor's momentum, nor feed its second-moment estimate;
- one LoRA adapter per role (ModelConfig.role_adapters): each phase's steps run and
  train its own role's adapter (`policy_update` switches to it), so the executor's steps
  cannot move the planner nor the planner's the executor; each optimiser holds its own;
- no step at all when every selected row's advantage is 0 (`skip_zero_advantage`):
  Adam would otherwise move every weight by its momentum on a zero gradient;
- a linear learning-rate warm-up per optimiser (`warmup_steps`): Adam's first steps
  are sign steps of size lr on every LoRA weight;
- an early stop of a phase's steps once KL(pi_old || pi) passes `target_kl`.
A step whose loss or gradient norm is not finite is not taken (`nonfinite_steps`);
the trainer stops a run that keeps producing them and never checkpoints bad weights.

Data-parallel (torchrun, himac/distributed.py): each rank passes its own rows, whose
sample ids are global. The step's N (samples, turns or tokens), its mini-batch split,
its statistics and its gradient are summed over ranks, and every skip or stop is
agreed, so N ranks take the step one process would take on all the rows. Alone, no
collective runs and nothing changes.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from himac import distributed as dist
from himac import groups, models, vision
from himac.policy import TrainablePolicy, as_role

BLUEPRINT, ACTION = 1, 2  # token kinds: what a row's completion is
ADVANTAGES = ("grpo", "rloo", "gigpo", "step_grpo")
AGGREGATIONS = ("sample", "turn", "token")


@dataclass
class Row:
    prompt_ids: list[int]
    completion_ids: list[int]
    kind: int  # BLUEPRINT or ACTION
    sample: int  # blueprint / trajectory id; rows of one trajectory share it
    advantage: float
    temperature: float = 1.0  # sampling temperature, applied to logits in the update
    images: Any = None  # vision.Pixels of the prompt's images (visual observations), else None
    allowed: Any = None  # per completion position, the token ids the answer was picked among (action_choices)


@dataclass
class UpdateConfig:
    lr: float = 1e-5
    """AdamW learning rate of the LoRA parameters."""
    planner_lr: float | None = None
    """Learning rate of Phase A's blueprint-only steps (None: lr). Both roles share the LoRA
    weights, and Adam makes every step about lr long whatever the gradient's size, so a
    macro step on weak blueprint advantages still moves the executor by lr: a lower
    planner_lr keeps that drift down."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient norm clip before each optimiser step."""
    clip_eps: float = 0.2
    """epsilon of the clipped ratio in Eq. 3."""
    kl_beta: float = 0.01
    """beta of the KL penalty in Eq. 3 (paper: 0.01). 0 skips the reference forward."""
    planner_kl_beta: float | None = None
    """KL coefficient of Phase A's blueprint-only steps (None: kl_beta). Planner and executor
    share the LoRA weights, so the executor's steps move the planner too; a KL to the untrained
    reference on blueprint tokens alone is meant to hold the planner's prior without constraining
    the executor (on the push-plan benchmark 0.1 and 1.0 did not: docs/results.md)."""
    adv_eps: float = 1e-6
    """epsilon in the denominator of Eq. 2."""
    adv_scale_std: bool = True
    """Divide by the group std in Eq. 2 (False: mean-centred returns only, as in Dr. GRPO)."""
    adv_std_floor: float = 0.0
    """Eq. 2 divides by max(std, this), in reward units (0: the paper's Eq. 2). A floor keeps groups
    whose returns differ only by step costs from getting advantages as large as a real success's."""
    drop_zero_variance: bool = False
    """Groups whose returns are all equal (no signal) leave the update and its 1/N (DAPO's dynamic
    sampling); counted as macro/ and micro/zero_var_groups either way."""
    loss_aggregation: str = "sample"
    """Token weights of Eq. 3: 'sample' (1/N per blueprint or trajectory, token-mean inside), 'turn'
    (1/N per executor turn) or 'token' (every trained token the same)."""
    optimizer_per_role: bool = False
    """One AdamW state for the planner's (blueprint-only) steps and one for the executor's; False: one
    shared state, so a Phase A step replays the executor's momentum."""
    skip_zero_advantage: bool = False
    """Take no optimiser step when every trained row's advantage is 0 (Adam's momentum would still move
    every weight)."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up over each optimiser's first this many steps (0: none)."""
    target_kl: float = 0.0
    """Stop a phase's remaining steps (ppo_epochs x mini_batches) once the k3 estimate of
    KL(pi_old || pi) on the next mini-batch passes this (0: never)."""
    micro_batch_size: int = 8
    """Rows per forward/backward; gradients accumulate across micro-batches."""
    ppo_epochs: int = 1
    """Passes over a phase's rows."""
    mini_batches: int = 1
    """Optimiser steps per pass; samples are split between them whole."""
    advantage: str = "grpo"
    """Advantage estimator of trajectory groups: 'grpo' (Eq. 2), 'rloo' (leave-one-out baseline),
    'gigpo' (Eq. 2 over episodes + step_weight * Eq. 2 over identical-observation step groups) or
    'step_grpo' (a departure: Eq. 2 over the discounted step returns of a group's turns pooled).
    Blueprint (macro) groups use grpo or rloo; gigpo and step_grpo have no steps there and are grpo."""
    gigpo_step_weight: float = 1.0
    """omega: weight of GiGPO's step-level advantage."""
    gigpo_gamma: float = 0.95
    """Discount of the step returns GiGPO compares within a step group (and step_grpo within a group)."""

    def __post_init__(self):
        from himac.config import check
        check(self.lr > 0, "lr", self.lr, "must be > 0")
        check(self.max_grad_norm > 0, "max_grad_norm", self.max_grad_norm,
              "must be > 0 (a negative norm would flip the gradient, 0 would freeze it)")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        check(self.planner_lr is None or self.planner_lr > 0, "planner_lr", self.planner_lr, "must be > 0 or null")
        check(self.planner_kl_beta is None or self.planner_kl_beta >= 0, "planner_kl_beta", self.planner_kl_beta,
              "must be >= 0 or null")
        check(0 < self.clip_eps < 1, "clip_eps", self.clip_eps, "must be in (0, 1)")
        check(self.kl_beta >= 0, "kl_beta", self.kl_beta, "must be >= 0")
        check(self.adv_eps > 0, "adv_eps", self.adv_eps, "must be > 0")
        check(self.micro_batch_size >= 1, "micro_batch_size", self.micro_batch_size, "must be >= 1")
        check(self.ppo_epochs >= 1, "ppo_epochs", self.ppo_epochs, "must be >= 1")
        check(self.mini_batches >= 1, "mini_batches", self.mini_batches, "must be >= 1")
        check(self.advantage in ADVANTAGES, "advantage", self.advantage, f"must be one of {ADVANTAGES}")
        check(self.adv_std_floor >= 0, "adv_std_floor", self.adv_std_floor, "must be >= 0")
        check(self.loss_aggregation in AGGREGATIONS, "loss_aggregation", self.loss_aggregation,
              f"must be one of {AGGREGATIONS}")
        check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")
        check(self.target_kl >= 0, "target_kl", self.target_kl, "must be >= 0")
        check(0 <= self.gigpo_gamma <= 1, "gigpo_gamma", self.gigpo_gamma, "must be in [0, 1]")


def make_optimizer(model, cfg: UpdateConfig, params: list | None = None) -> torch.optim.Optimizer:
    """AdamW over `params` (None: every trainable weight of `model`)."""
    params = [p for p in model.parameters() if p.requires_grad] if params is None else params
    if not params:
        raise ValueError("the model has no trainable parameters (is the LoRA adapter attached?)")
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class Optimizers:
    """The optimiser state(s) of a run: one shared AdamW, or one per role (`optimizer_per_role`; always
    with role_adapters, each over its own adapter's weights).

    `for_kinds(kinds)` is the optimiser of an update on those token kinds: the planner's
    for blueprint-only steps, the executor's for anything with actions (Phase B, the
    flat agent, the one joint step of the w/o co-evolution ablation).
    """

    def __init__(self, model, cfg: UpdateConfig):
        if models.has_role_adapters(model):  # one adapter per role: each optimiser holds its own weights only
            self.by_role = {role: make_optimizer(model, cfg, models.adapter_params(model, adapter))
                            for role, adapter in models.ROLE_ADAPTERS.items()}
            return
        executor = make_optimizer(model, cfg)
        self.by_role = {"executor": executor,
                        "planner": make_optimizer(model, cfg) if cfg.optimizer_per_role else executor}

    def for_kinds(self, kinds: set[int]) -> torch.optim.Optimizer:
        return self.by_role["planner" if kinds == {BLUEPRINT} else "executor"]

    def state_dict(self) -> dict:
        out = {"executor": self.by_role["executor"].state_dict()}
        if self.by_role["planner"] is not self.by_role["executor"]:
            out["planner"] = self.by_role["planner"].state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        if ("planner" in state) != (self.by_role["planner"] is not self.by_role["executor"]):
            raise ValueError("the checkpoint's optimiser states do not match optimizer_per_role")
        for role, sd in state.items():
            self.by_role[role].load_state_dict(sd)


def _mask(rows: list[Row], kinds: set[int]) -> tuple[torch.Tensor, torch.Tensor]:
    C = max(len(r.completion_ids) for r in rows)
    mask = torch.zeros(len(rows), C)  # (R, C)
    for i, r in enumerate(rows):
        if r.kind in kinds:
            mask[i, :len(r.completion_ids)] = 1
    return mask, torch.tensor([r.sample for r in rows])  # (R, C), (R,)


def row_weights(rows: list[Row], kinds: set[int], aggregation: str = "sample", units: int | None = None
                ) -> torch.Tensor:
    """(R, C) token weights over the rows of one optimiser step; unselected kinds weigh 0. `units`: the step's
    N over all ranks (groups.token_weights)."""
    mask, samples = _mask(rows, kinds)
    return groups.token_weights(mask, samples, aggregation, units)  # (R, C)


def row_units(rows: list[Row], kinds: set[int], aggregation: str = "sample") -> int:
    """This rank's share of the N that row_weights divides by."""
    return groups.aggregation_units(*_mask(rows, kinds), aggregation) if rows else 0


def rows_loss(policy: TrainablePolicy, rows: list[Row], weights: torch.Tensor, cfg: UpdateConfig,
              old_logp: torch.Tensor | None = None, beta: float | None = None) -> tuple[torch.Tensor, dict]:
    """Eq. 3 loss of one micro-batch; `weights` (R, C) are this micro-batch's slice; `beta`: the KL
    coefficient (None: cfg.kl_beta)."""
    beta = cfg.kl_beta if beta is None else beta
    prompts = [r.prompt_ids for r in rows]
    completions = [r.completion_ids for r in rows]
    temps = torch.tensor([r.temperature if r.temperature > 0 else 1.0 for r in rows])
    extra = {**vision.image_kwargs([r.images for r in rows]), **_allowed_kwargs(rows)}  # images, choices
    ref = None
    if beta > 0:  # first: its (R, C, V) logits are freed before the forward with gradients keeps its own
        with torch.no_grad(), policy.reference():
            ref, _ = policy.logprobs(prompts, completions, temps, **extra)  # (R, C)
    logp, mask = policy.logprobs(prompts, completions, temps, **extra)  # (R, C) with grad
    C = logp.shape[1]
    w = weights[:, :C].to(logp.device) * mask  # (R, C)
    old = logp.detach() if old_logp is None else old_logp[:, :C].to(logp.device)
    adv = torch.tensor([r.advantage for r in rows], dtype=torch.float32, device=logp.device)  # (R,)
    return groups.clipped_surrogate(logp, old, ref, adv, w, clip_eps=cfg.clip_eps, beta=beta)


def _allowed_kwargs(rows: list[Row]) -> dict:
    """{'allowed': ...} for logprobs when some row's answer was picked from choices, else {} (every policy)."""
    return {"allowed": [r.allowed for r in rows]} if any(r.allowed for r in rows) else {}


def _split_samples(rows: list[Row], parts: int, ids: list[int] | None = None) -> list[list[Row]]:
    """Rows in `parts` mini-batches of whole samples, in sample-id order; parts with no sample are left out.
    `ids`: the sample ids of every rank (data-parallel): a part empty here but not elsewhere stays, empty."""
    ids = sorted({r.sample for r in rows}) if ids is None else ids
    bucket = {s: i * parts // len(ids) for i, s in enumerate(ids)}
    return [[r for r in rows if bucket[r.sample] == k] for k in sorted(set(bucket.values()))]


def policy_update(policy: TrainablePolicy, optimizer: torch.optim.Optimizer, rows: list[Row],
                  cfg: UpdateConfig, kinds: set[int]) -> dict[str, float]:
    """Clipped-surrogate steps on the completion tokens of `rows` whose kind is in `kinds`.

    Returns the update's numbers: loss, kl (to pi_ref), approx_kl (to pi_old), clipfrac,
    ratio_mean, grad_norm (means over the steps taken), tokens, steps, steps_skipped,
    update_s; {} when no row is selected.
    """
    if len(kinds) > 1 and models.has_role_adapters(getattr(policy, "model", None)):
        raise ValueError("one update step over blueprint and action tokens needs one shared adapter; "
                         "role_adapters gives each role its own (set coevolution true or role_adapters false)")
    with as_role(policy, "planner" if kinds == {BLUEPRINT} else "executor"):
        return _policy_update(policy, optimizer, rows, cfg, kinds)


def _policy_update(policy: TrainablePolicy, optimizer: torch.optim.Optimizer, rows: list[Row],
                   cfg: UpdateConfig, kinds: set[int]) -> dict[str, float]:
    rows = [r for r in rows if r.kind in kinds and r.completion_ids]
    if not dist.agree(bool(rows)):  # several ranks: one with no rows still joins the others' steps
        return {}
    t0 = time.perf_counter()
    planned = cfg.ppo_epochs * cfg.mini_batches
    if cfg.skip_zero_advantage and not dist.agree(any(r.advantage != 0 for r in rows)):
        return {"steps": 0.0, "steps_skipped": float(planned), "tokens": 0.0, "update_s": time.perf_counter() - t0}
    policy.model.train()
    old: dict[int, torch.Tensor] = {}
    if planned > 1:  # pi_old must be frozen before the first step changes theta
        with torch.no_grad():
            for chunk in _chunks(rows, cfg.micro_batch_size):
                temps = torch.tensor([r.temperature if r.temperature > 0 else 1.0 for r in chunk])
                lp, _ = policy.logprobs([r.prompt_ids for r in chunk], [r.completion_ids for r in chunk], temps,
                                        **vision.image_kwargs([r.images for r in chunk]), **_allowed_kwargs(chunk))
                for r, row_lp in zip(chunk, lp):
                    old[id(r)] = row_lp.cpu()
    base_lr = cfg.planner_lr if kinds == {BLUEPRINT} and cfg.planner_lr is not None else cfg.lr
    beta = cfg.planner_kl_beta if kinds == {BLUEPRINT} and cfg.planner_kl_beta is not None else cfg.kl_beta
    totals = {"loss": 0.0, "kl": 0.0, "approx_kl": 0.0, "clipfrac": 0.0, "ratio_mean": 0.0, "grad_norm": 0.0}
    tokens, done_steps, stopped, nonfinite = 0.0, 0, False, 0
    every_id = sorted(set().union(*dist.all_gather({r.sample for r in rows}))) if dist.active() else None
    for _ in range(cfg.ppo_epochs):
        for part in _split_samples(rows, cfg.mini_batches, every_id):
            part = sorted(part, key=lambda r: len(r.prompt_ids) + len(r.completion_ids))  # less padding
            units = int(dist.all_sum([row_units(part, kinds, cfg.loss_aggregation)])[0]) if dist.active() else None
            weights = row_weights(part, kinds, cfg.loss_aggregation, units) if part else None  # (R, C) fixed first
            step = {"loss": 0.0, "kl": 0.0, "approx_kl": 0.0, "clipfrac": 0.0, "ratio_mean": 0.0}
            n_step = 0.0
            for start in range(0, len(part), cfg.micro_batch_size):
                chunk = part[start:start + cfg.micro_batch_size]
                old_lp = None
                if old:
                    width = max(len(r.completion_ids) for r in chunk)
                    old_lp = torch.stack([torch.nn.functional.pad(old[id(r)], (0, width - old[id(r)].numel()))
                                          for r in chunk])
                loss, stats = rows_loss(policy, chunk, weights[start:start + len(chunk)], cfg, old_lp, beta)
                loss.backward()
                n = float(stats["tokens"])
                step["loss"] += float(loss.detach())
                for k in ("kl", "approx_kl", "clipfrac", "ratio_mean"):
                    step[k] += float(stats[k]) * n
                n_step += n
            if dist.active():  # the step's loss and statistics over every rank's rows
                keys = ("loss", "kl", "approx_kl", "clipfrac", "ratio_mean")
                *sums, n_step = dist.all_sum([step[k] for k in keys] + [n_step])
                step = dict(zip(keys, sums))
            if dist.agree(bool(cfg.target_kl and done_steps and step["approx_kl"] / max(n_step, 1.0) > cfg.target_kl)):
                optimizer.zero_grad(set_to_none=True)  # pi has moved far enough from pi_old: stop here
                stopped = True
                break
            params = [p for g in optimizer.param_groups for p in g["params"]]
            dist.all_reduce_grads(params)  # one gradient: the clip below sees the sum over ranks
            norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
            if dist.agree(not (math.isfinite(norm) and math.isfinite(step["loss"]))):
                optimizer.zero_grad(set_to_none=True)  # a NaN/inf loss or gradient: this step is not taken
                nonfinite += 1
                continue
            totals["grad_norm"] += norm
            for g in optimizer.param_groups:
                taken = g.get("himac_steps", 0)  # saved with the optimiser: warm-up survives a resume
                g["lr"] = base_lr * (min(1.0, (taken + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0)
                g["himac_steps"] = taken + 1
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done_steps += 1
            totals["loss"] += step["loss"]
            for k in ("kl", "approx_kl", "clipfrac", "ratio_mean"):
                totals[k] += step[k]
            tokens += n_step
        if stopped:
            break
    out = {"loss": totals["loss"] / max(done_steps, 1), "grad_norm": totals["grad_norm"] / max(done_steps, 1),
           "tokens": dist.all_sum([float(sum(len(r.completion_ids) for r in rows))])[0], "steps": float(done_steps),
           "steps_skipped": float(planned - done_steps), "nonfinite_steps": float(nonfinite),
           "update_s": time.perf_counter() - t0}
    for k in ("kl", "approx_kl", "clipfrac", "ratio_mean"):
        out[k] = totals[k] / max(tokens, 1.0)
    return out


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]
