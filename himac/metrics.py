"""The per-iteration metrics, built in one place for the hierarchical and the flat loop.

Flat names, one dict per iteration (README "Using it" lists them): `macro/*` for
Phase A (blueprints and their greedy rollouts), `micro/*` for the sampled
trajectories the executor is trained on (Phase B, or the flat agent's), `env/*`
for how episodes went, `time/*`, `gen/*`, `perf/*` for where the time went.

With several data-parallel ranks, each rank's raw values of an iteration (`light`:
without prompts and images) are gathered and `combine`d in task order, and the metrics
are computed once from them, so sums, means, spreads and shares are those of one process.
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter

import torch

from himac.executor import INVALID, SUB_DONE, Trajectory

ENDS = ("solved", "max_steps", "plan_exhausted", "subgoal_step_limit", "failure_keyword", "env_error")
FLAT_ENDS = ("solved", "max_steps", "failure_keyword", "env_error")  # a flat episode has no plan to end


def mean(xs) -> float:
    xs = list(xs)
    return float(sum(xs)) / len(xs) if xs else 0.0


def std(x: torch.Tensor) -> float:
    return float(x.std()) if x.numel() > 1 else 0.0


def trajectories(prefix: str, trajs: list[Trajectory], adv: torch.Tensor, hierarchy: bool) -> dict:
    """Outcomes of the trained-on (sampled) trajectories, and the spread of their per-step advantages."""
    m = {f"{prefix}/success_rate": mean(tr.success for tr in trajs),
         f"{prefix}/return_mean": mean(tr.ret for tr in trajs),
         f"{prefix}/adv_std": std(adv),
         f"{prefix}/steps_mean": mean(tr.env_steps for tr in trajs)}
    if hierarchy:
        m[f"{prefix}/subgoal_completion"] = mean(tr.subgoals_done / max(len(tr.subgoals), 1) for tr in trajs)
        m[f"{prefix}/subgoal_followed"] = sum(tr.followed for tr in trajs) / max(sum(tr.env_steps for tr in trajs), 1)
    return m


def actions(prefix: str, moves: list[str], names: tuple[str, ...] = ()) -> dict:
    """The executor's answers as a histogram: collapse shows as one action taking them all.

    `moves` are Step.move values (an action, SUB_DONE or INVALID). Shares are of all
    answers; `action_top_share` is the largest share of any one env action,
    `action_entropy` the entropy (nats) of the answers' distribution, SUB_DONE and
    INVALID included as categories. `names`: the env's fixed action set (EnvSpec.actions),
    which also gets one share each; envs without one (ALFWorld) report the top share only.
    """
    n = len(moves)
    if not n:
        return {}
    count = Counter(moves)
    acts = {a: c for a, c in count.items() if a not in (SUB_DONE, INVALID)}
    m = {"action_top_share": max(acts.values(), default=0) / n,
         "action_entropy": -sum(c / n * math.log(c / n) for c in count.values()),
         "sub_done_share": count[SUB_DONE] / n, "invalid_share": count[INVALID] / n,
         **{f"action_share/{a}": count[a] / n for a in names}}
    return {f"{prefix}/{k}" if prefix else k: v for k, v in m.items()}


def env_report(spec, trajs: list[Trajectory]) -> dict:
    """The env's own summary (EnvSpec.report) of training episodes, under env/."""
    if spec.report is None or not trajs:
        return {}
    records = [{"success": tr.success, "env_steps": tr.env_steps, "return": tr.ret, **tr.episode} for tr in trajs]
    return {f"env/{k}": v for k, v in spec.report(records).items()}


def env(trajs: list[Trajectory], ends: tuple[str, ...]) -> dict:
    """Env steps, the invalid-answer rate and the share of episodes ending each way."""
    steps = sum(tr.env_steps for tr in trajs)
    m = {"env/steps": steps, "env/invalid_action_rate": sum(tr.invalid for tr in trajs) / max(steps, 1)}
    m.update({f"env/end_{end}": mean(tr.end == end for tr in trajs) for end in ends})
    return m


def update(prefix: str, stats: dict) -> dict:
    """An update's own numbers (loss, kl, clipfrac, ratio_mean, grad_norm, tokens, update_s) under `prefix`."""
    return {f"{prefix}/{k}": v for k, v in stats.items()}


def timing(timings: dict, gen_s: float, gen_tokens: float, update_s: float) -> dict:
    return {"time/generate_s": gen_s, "time/update_s": update_s, "time/env_s": timings.get("env_s", 0.0),
            "gen/tokens": gen_tokens, "perf/gen_tokens_per_s": gen_tokens / gen_s if gen_s else 0.0}


def blueprints(flat_bp: list, returns: torch.Tensor, adv: torch.Tensor, greedy: list[Trajectory],
               success: list[bool], z_star: dict) -> dict:
    """Phase A: the B*G blueprints, their greedy returns and advantages, and the chosen z*."""
    n = max(len(flat_bp), 1)
    by_id = {id(z): s for z, s in zip(flat_bp, success)}
    return {"success_rate": sum(success) / n,  # Phase A greedy rollouts, invalid blueprints count as failures
            "macro/return_mean": float(returns.mean()),
            "macro/return_std": std(returns),
            "macro/adv_std": std(adv),
            **plans(flat_bp, z_star),
            "macro/unique_rollouts": len(greedy),
            "macro/z_star_success_rate": mean(by_id[id(z)] for z in z_star.values())}


def plans(flat_bp: list, z_star: dict) -> dict:
    """What the blueprints are, scored or not (a light iteration of macro_every scores none)."""
    n = max(len(flat_bp), 1)
    return {"macro/blueprint_valid_rate": sum(z.valid for z in flat_bp) / n,
            "macro/subgoals_mean": sum(len(z.subgoals) for z in flat_bp) / n,
            "macro/blueprint_tokens_mean": sum(len(z.completion_ids) for z in flat_bp) / n,
            "micro/tasks": len(z_star)}


def hierarchical_iteration(t: int, g: dict, spec, B: int, scored: bool, rule: dict) -> dict:
    """One HiMAC iteration's row, from every rank's values `g` (coevolve.iteration); `B`: tasks per iteration,
    `rule`: micro/rule_agreement when the env has a reading rule."""
    m_macro, m_micro, timings = g["m_macro"], g["m_micro"], g["timings"]
    if scored:
        macro = blueprints(g["flat_bp"], g["returns"], g["adv_a"], g["greedy"], g["success"], g["z_star"])
    else:  # no greedy scores to report: the headline success is Phase B's, as in a flat iteration
        macro = {**plans(g["flat_bp"], g["z_star"]),
                 "success_rate": mean(tr.success for tr in g["sampled"]),
                 "macro/return_mean": mean(tr.ret for tr in g["sampled"])}
    return {"iteration": t, **macro, "macro/scored": float(scored),
            "macro/zero_var_groups": g["silent_a"] / B,
            **trajectories("micro", g["sampled"], g["adv_b"], hierarchy=True),
            "micro/zero_var_groups": g["silent_b"] / max(len(g["z_star"]), 1),
            **actions("micro", [s.move for tr in g["sampled"] for s in tr.steps], spec.actions), **rule,
            **env(g["greedy"] + g["sampled"], ENDS), **env_report(spec, g["sampled"]),
            **update("macro", m_macro), **update("micro", m_micro),
            **timing(timings, timings.get("generate_s", 0.0) + timings.get("plan_generate_s", 0.0),
                     timings.get("generated_tokens", 0.0) + sum(len(z.completion_ids) for z in g["flat_bp"]),
                     m_macro.get("update_s", 0.0) + m_micro.get("update_s", 0.0))}


def flat_iteration(t: int, g: dict, spec, B: int, rule: dict) -> dict:
    """One flat-baseline iteration's row (the 'w/o hierarchy' agent): the same names as HiMAC's where they mean
    the same; no macro/ beyond the return the progress bar and plot show."""
    sampled, m_update, timings = g["sampled"], g["m_update"], g["timings"]
    return {"iteration": t, "success_rate": mean(tr.success for tr in sampled),
            "macro/return_mean": mean(tr.ret for tr in sampled),  # the progress bar's and plot's "return"
            **trajectories("micro", sampled, g["adv"], hierarchy=False),
            "micro/zero_var_groups": g["silent"] / B,
            **actions("micro", [s.move for tr in sampled for s in tr.steps], spec.actions), **rule,
            **env(sampled, FLAT_ENDS), **env_report(spec, sampled),
            **update("micro", m_update),
            **timing(timings, timings.get("generate_s", 0.0), timings.get("generated_tokens", 0.0),
                     m_update.get("update_s", 0.0))}


# -- several data-parallel ranks ---------------------------------------------------------
def light(piece: dict) -> dict:
    """A rank's iteration values without what metrics never read (prompt ids, images), for gathering.
    z* entries stay the very blueprint objects of the list, so one pickle keeps them one object."""
    out = dict(piece)
    swap: dict[int, object] = {}
    for key in ("flat_bp", "greedy", "sampled"):
        if key in out:
            out[key] = [swap.setdefault(id(x), _light(x)) for x in out[key]]
    if "z_star" in out:
        out["z_star"] = {b: swap.get(id(z), z) for b, z in out["z_star"].items()}
    return out


def _light(x):
    if isinstance(x, Trajectory):
        return dataclasses.replace(x, steps=[dataclasses.replace(s, prompt_ids=[], images=None) for s in x.steps])
    return dataclasses.replace(x, prompt_ids=[], images=None)  # a planner.Blueprint


def combine(pieces: list[dict]) -> dict:
    """Every rank's `light` values (rank order = task order) as one process would hold them: lists and tensors
    concatenated, counts summed, z* merged by global task, timings' seconds the slowest rank's and other timing
    counts summed, update statistics (already global, update.py) rank 0's with the slowest update_s."""
    out: dict = {}
    for key, first in pieces[0].items():
        values = [p[key] for p in pieces]
        if isinstance(first, torch.Tensor):
            out[key] = torch.cat(values)
        elif isinstance(first, list):
            out[key] = [x for v in values for x in v]
        elif key == "z_star":
            out[key] = {b: z for v in values for b, z in v.items()}
        elif key == "timings":
            names = {k for v in values for k in v}
            out[key] = {k: (max if k.endswith("_s") else sum)(v.get(k, 0.0) for v in values) for k in names}
        elif isinstance(first, dict):  # an update's numbers
            out[key] = dict(first, **({"update_s": max(v.get("update_s", 0.0) for v in values)} if first else {}))
        else:
            out[key] = sum(values)
    return out
