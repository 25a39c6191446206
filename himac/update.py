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

With one optimiser step per phase (mini_batches = 1, the paper's lines 9 and 14),
pi_theta_old equals pi_theta at the time of the gradient, so old log-probs are the
detached current ones and no extra forward pass is spent; with more steps they are
computed once, before the first step, as PPO does, and only then can Eq. 3's clip act.

Departures a shipped config uses (docs/results.md measures each), all off by default:
one AdamW per role (`optimizer_per_role`, see `Optimizers`), so Phase A's steps do not
replay the executor's momentum; one LoRA adapter per role (ModelConfig.role_adapters),
each phase training its own (`policy_update` switches to it), the planner's at its own
`planner_lr`; no step at all when no
row carries signal (`drop_zero_variance`), as Adam would otherwise move every weight by
its momentum on a zero gradient; a linear learning-rate warm-up (`warmup_steps`).
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
from typing import Annotated, Any, Literal

import torch

from envs.base import Range, validate
from himac import distributed as dist
from himac import groups, models, vision
from himac.policy import TrainablePolicy, as_role

BLUEPRINT, ACTION = 1, 2  # token kinds: what a row's completion is


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
    lr: Annotated[float, Range(gt=0)] = 1e-5
    """(paper) eta: AdamW learning rate of the LoRA parameters."""
    planner_lr: Annotated[float | None, Range(gt=0)] = None
    """(departure) Learning rate of Phase A's blueprint-only steps (None: lr). Adam makes every step about lr
    long whatever the gradient's size, so a macro step on weak blueprint advantages moves the weights by lr;
    with role_adapters a lower planner_lr keeps the planner's own adapter near its prior."""
    max_grad_norm: Annotated[float, Range(gt=0)] = 1.0
    """(infra) Gradient norm clip before each optimiser step."""
    clip_eps: Annotated[float, Range(gt=0, lt=1)] = 0.2
    """(paper) epsilon of the clipped ratio in Eq. 3."""
    kl_beta: Annotated[float, Range(ge=0)] = 0.01
    """(paper) beta of the KL penalty in Eq. 3 (paper: 0.01). 0 skips the reference forward."""
    adv_eps: Annotated[float, Range(gt=0)] = 1e-6
    """(paper) epsilon in the denominator of Eq. 2."""
    adv_std_floor: Annotated[float, Range(ge=0)] = 0.0
    """(departure) Eq. 2 divides by max(std, this), in reward units (0: the paper's Eq. 2). A floor keeps
    groups whose returns differ only by step costs from getting advantages as large as a real success's."""
    drop_zero_variance: bool = False
    """(departure) Groups whose returns are all equal (no signal) leave the update and its 1/N (DAPO's dynamic
    sampling), and a phase with no signal left takes no optimiser step (Adam's momentum would still move
    every weight); counted as macro/ and micro/zero_var_groups either way."""
    loss_aggregation: Literal["sample", "turn", "token"] = "sample"
    """(departure) Token weights of Eq. 3: 'sample' (1/N per blueprint or trajectory, token-mean inside: the
    paper), 'turn' (1/N per executor turn) or 'token' (every trained token the same)."""
    optimizer_per_role: bool = False
    """(departure) One AdamW state for the planner's (blueprint-only) steps and one for the executor's; False:
    one shared state, so a Phase A step replays the executor's momentum."""
    warmup_steps: Annotated[int, Range(ge=0)] = 0
    """(departure) Linear learning-rate warm-up over each optimiser's first this many steps (0: none): Adam's
    first steps are sign steps of size lr on every LoRA weight."""
    micro_batch_size: Annotated[int, Range(ge=1)] = 8
    """(infra) Rows per forward/backward; gradients accumulate across micro-batches."""
    mini_batches: Annotated[int, Range(ge=1)] = 1
    """(departure) Optimiser steps per phase, its samples split between them whole (1: one step, the paper's
    line 9 and 14); pi_old's log-probs are frozen before the first."""
    advantage: Literal["grpo", "rloo", "gigpo", "step_grpo"] = "grpo"
    """(paper) Advantage estimator of trajectory groups: 'grpo' (Eq. 2), the paper's baselines 'rloo'
    (leave-one-out) and 'gigpo' (Eq. 2 over episodes + Eq. 2 over identical-observation step groups), or
    'step_grpo' (a departure: Eq. 2 over the discounted step returns of a group's turns pooled). Blueprint
    (macro) groups use grpo or rloo; gigpo and step_grpo have no steps there and are grpo."""
    gigpo_gamma: Annotated[float, Range(ge=0, le=1)] = 0.95
    """(paper) Discount of the step returns GiGPO compares within a step group (and step_grpo within a
    group)."""

    def __post_init__(self):
        validate(self)


def make_optimizer(model, cfg: UpdateConfig, params: list | None = None) -> torch.optim.Optimizer:
    """AdamW over `params` (None: every trainable weight of `model`)."""
    params = [p for p in model.parameters() if p.requires_grad] if params is None else params
    if not params:
        raise ValueError("the model has no trainable parameters (is the LoRA adapter attached?)")
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)


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
              old_logp: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Eq. 3 loss of one micro-batch; `weights` (R, C) are this micro-batch's slice; `old_logp` (R, C) pi_old's
    log-probs (None: pi_old is the policy now, one step per phase)."""
    prompts = [r.prompt_ids for r in rows]
    completions = [r.completion_ids for r in rows]
    temps = _temperatures(rows)
    extra = {**vision.image_kwargs([r.images for r in rows]), **_allowed_kwargs(rows)}  # images, choices
    ref = None
    if cfg.kl_beta > 0:  # first: its (R, C, V) logits are freed before the forward with gradients keeps its own
        with torch.no_grad(), policy.reference():
            ref, _ = policy.logprobs(prompts, completions, temps, **extra)  # (R, C)
    logp, mask = policy.logprobs(prompts, completions, temps, **extra)  # (R, C) with grad
    C = logp.shape[1]
    w = weights[:, :C].to(logp.device) * mask  # (R, C)
    old = logp.detach() if old_logp is None else old_logp[:, :C].to(logp.device)
    adv = torch.tensor([r.advantage for r in rows], dtype=torch.float32, device=logp.device)  # (R,)
    return groups.clipped_surrogate(logp, old, ref, adv, w, clip_eps=cfg.clip_eps, beta=cfg.kl_beta)


def _temperatures(rows: list[Row]) -> torch.Tensor:
    """(R,) the temperature each row was sampled at (greedy rows: 1)."""
    return torch.tensor([r.temperature if r.temperature > 0 else 1.0 for r in rows])


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
    if cfg.drop_zero_variance and not dist.agree(any(r.advantage != 0 for r in rows)):
        return {"steps": 0.0, "steps_skipped": float(cfg.mini_batches), "tokens": 0.0,
                "update_s": time.perf_counter() - t0}
    policy.model.train()
    old = _old_logprobs(policy, rows, cfg.micro_batch_size) if cfg.mini_batches > 1 else {}
    lr = cfg.planner_lr if kinds == {BLUEPRINT} and cfg.planner_lr is not None else cfg.lr
    totals = dict.fromkeys(("loss", "kl", "approx_kl", "clipfrac", "ratio_mean", "grad_norm"), 0.0)
    tokens, done_steps, nonfinite = 0.0, 0, 0
    every_id = sorted(set().union(*dist.all_gather({r.sample for r in rows}))) if dist.active() else None
    for part in _split_samples(rows, cfg.mini_batches, every_id):
        part = sorted(part, key=lambda r: len(r.prompt_ids) + len(r.completion_ids))  # less padding
        units = int(dist.all_sum([row_units(part, kinds, cfg.loss_aggregation)])[0]) if dist.active() else None
        weights = row_weights(part, kinds, cfg.loss_aggregation, units) if part else None  # (R, C) fixed first
        step = dict.fromkeys(("loss", "kl", "approx_kl", "clipfrac", "ratio_mean"), 0.0)
        n_step = 0.0
        for start in range(0, len(part), cfg.micro_batch_size):
            chunk = part[start:start + cfg.micro_batch_size]
            old_lp = None
            if old:
                width = max(len(r.completion_ids) for r in chunk)
                old_lp = torch.stack([torch.nn.functional.pad(old[id(r)], (0, width - old[id(r)].numel()))
                                      for r in chunk])
            loss, stats = rows_loss(policy, chunk, weights[start:start + len(chunk)], cfg, old_lp)
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
        norm = _step(optimizer, cfg, lr, math.isfinite(step["loss"]))
        if norm is None:  # a NaN/inf loss or gradient: this step is not taken
            nonfinite += 1
            continue
        totals["grad_norm"] += norm
        done_steps += 1
        for k in step:
            totals[k] += step[k]
        tokens += n_step
    out = {"loss": totals["loss"] / max(done_steps, 1), "grad_norm": totals["grad_norm"] / max(done_steps, 1),
           "tokens": dist.all_sum([float(sum(len(r.completion_ids) for r in rows))])[0], "steps": float(done_steps),
           "steps_skipped": float(cfg.mini_batches - done_steps), "nonfinite_steps": float(nonfinite),
           "update_s": time.perf_counter() - t0}
    for k in ("kl", "approx_kl", "clipfrac", "ratio_mean"):
        out[k] = totals[k] / max(tokens, 1.0)
    return out


def _old_logprobs(policy: TrainablePolicy, rows: list[Row], size: int) -> dict[int, torch.Tensor]:
    """pi_old's log-probs of every row, frozen before the first of several steps changes theta: {id(row): (C,)}."""
    old = {}
    with torch.no_grad():
        for chunk in _chunks(rows, size):
            lp, _ = policy.logprobs([r.prompt_ids for r in chunk], [r.completion_ids for r in chunk],
                                    _temperatures(chunk), **vision.image_kwargs([r.images for r in chunk]),
                                    **_allowed_kwargs(chunk))
            for r, row_lp in zip(chunk, lp):
                old[id(r)] = row_lp.cpu()
    return old


def _step(optimizer: torch.optim.Optimizer, cfg: UpdateConfig, lr: float, finite_loss: bool) -> float | None:
    """One optimiser step on the accumulated gradient (summed over ranks, clipped, learning rate `lr` warmed up);
    the gradient's norm, or None when the loss or the gradient is not finite and the step is not taken."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    dist.all_reduce_grads(params)  # one gradient: the clip below sees the sum over ranks
    norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
    if dist.agree(not (math.isfinite(norm) and finite_loss)):
        optimizer.zero_grad(set_to_none=True)
        return None
    for g in optimizer.param_groups:
        taken = g.get("himac_steps", 0)  # saved with the optimiser: warm-up survives a resume
        g["lr"] = lr * (min(1.0, (taken + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0)
        g["himac_steps"] = taken + 1
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]
