"""HiMAC iterative co-evolution: Algorithm 1 of the paper (§3.4), one function per phase.

    python -m himac.coevolve configs/sokoban_cpu.yaml [--out DIR] [--set key=value ...]
    python -m himac.coevolve --resume DIR [--set iterations=20]

Each iteration takes B tasks (line 2), each its own macro group and micro group:
  Phase A, macro exploration (lines 3-9, `phase_a`): G blueprints per task, each scored by
    a greedy executor rollout without gradients; Eq. 2 within each task's G; one update on
    blueprint tokens only.
  Phase B, micro adaptation (lines 10-14, `phase_b`): z* = argmax_i R(z_i) per task (Eq. 4);
    M sampled executor rollouts under z*; Eq. 2 within each task's M; one update on action
    tokens only.
The flat baselines ('w/o hierarchy', `hierarchy: false`) run Phase B alone, with no plan.
pi_ref is the model with its LoRA adapter disabled; pi_old is the policy that sampled
(himac/update.py). Everything around the algorithm (time budget, evaluation, logging,
checkpoints, Ctrl-C, data-parallel ranks) is himac/loop.py; the command line himac/launch.py.

Departures from the paper, deliberate:
- B > 1 tasks per iteration (line 2 samples one).
- A greedy rollout is a deterministic function of (task, blueprint), so identical
  blueprints of one task are rolled out once and share the return.
- A task whose G blueprints are all unparseable has no z*; it sits out Phase B.
- Episodes the env crashed leave their groups: a partial return says nothing of the policy.
- `macro_every: k` (default 1 = off): Phase A in full on every k-th iteration only; in
  between, z* is the planner's one greedy blueprint, unscored, and the planner is not updated.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from himac import distributed as dist
from himac import executor, launch, metrics, planner
from himac.evaluation import mark_rule_agreement
from himac.experiment import blueprint_advantages, trajectory_advantages, without_silent
from himac.loop import Phases, TrainingLoop
from himac.update import ACTION, BLUEPRINT, policy_update

CHOICE_SALT = 31_337  # the random-blueprint ablation's own random stream


class Trainer(TrainingLoop):
    """HiMAC's training run: `iteration(t)` is Algorithm 1's body (or the flat baseline's)."""

    def iteration(self, t: int, bar=None) -> tuple[dict, list[dict]]:
        return iteration(self, t, bar)


@dataclass
class Macro:
    """What Phase A leaves for Phase B and the metrics: (B, G) blueprints and, when scored, their returns."""
    blueprints: list[list[planner.Blueprint]]  # (B, G)
    returns: torch.Tensor  # (B*G,) greedy returns (zeros when unscored)
    success: list[bool]  # (B*G,)
    crashed: list[bool]  # (B*G,) the env crashed in the blueprint's rollout: no z*, no row
    greedy: list[executor.Trajectory]  # one per distinct valid (task, blueprint)
    adv: list[float]  # (B*G,)
    silent: set[int]  # tasks whose G returns were all equal
    rows: list  # the planner's training rows (line 9)
    n_rows: int  # their number on every rank: Phase B's sample ids come after them
    stats: dict  # the planner update's numbers
    scored: bool


@dataclass
class Micro:
    sampled: list[executor.Trajectory]  # (B*M,)
    adv: list[list[float]]  # per trajectory, per step
    silent: set[int]
    stats: dict  # the update's numbers


def iteration(tr: TrainingLoop, t: int, bar=None) -> tuple[dict, list[dict]]:
    """Algorithm 1's body for iteration t: (its metrics, its samples.jsonl rows)."""
    cfg, phase, timings = tr.cfg, Phases(bar), {}
    lo, seeds = tr.tasks(t)  # line 2: x ~ D, this process's share of the B tasks
    if not cfg.run.hierarchy:  # 'w/o hierarchy': Phase B alone, no plan
        micro = phase_b(tr, seeds, {b: [] for b in range(len(seeds))}, timings, phase, flat=True)
        g = _gather({"sampled": micro.sampled, "adv": _flat(micro.adv), "silent": len(micro.silent),
                     "timings": timings, "m_update": micro.stats, "samples": _samples(cfg, t, lo, len(seeds), micro)})
        return metrics.flat_iteration(t, g, tr.spec, cfg.run.tasks_per_iteration, _rule_agreement(tr, g["sampled"])), \
            g["samples"]
    macro = phase_a(tr, t, seeds, timings, phase)  # lines 3-9
    z_star = choose_blueprints(macro.blueprints, macro.returns, cfg.run.blueprint_choice,  # line 11, Eq. 4
                               key=[cfg.run.seed, CHOICE_SALT, t], usable=[not c for c in macro.crashed], first=lo)
    joint = None if cfg.run.coevolution else macro.rows  # 'w/o co-evolution': one step over both phases' rows
    micro = phase_b(tr, seeds, {b: z.subgoals for b, z in z_star.items()}, timings, phase,  # lines 12-14
                    sample_offset=macro.n_rows, joint=joint)
    m_macro, m_micro = (macro.stats, micro.stats) if joint is None else (micro.stats, {})
    flat_bp = [z for group in macro.blueprints for z in group]
    g = _gather({"flat_bp": flat_bp, "returns": macro.returns, "adv_a": torch.tensor(macro.adv),
                 "greedy": macro.greedy, "success": macro.success, "z_star": {lo + b: z for b, z in z_star.items()},
                 "sampled": micro.sampled, "adv_b": _flat(micro.adv), "silent_a": len(macro.silent),
                 "silent_b": len(micro.silent), "timings": timings, "m_macro": m_macro, "m_micro": m_micro,
                 "samples": _samples(cfg, t, lo, len(seeds), micro, macro, z_star)})
    return metrics.hierarchical_iteration(t, g, tr.spec, cfg.run.tasks_per_iteration, macro.scored,
                                          _rule_agreement(tr, g["sampled"])), g["samples"]


def phase_a(tr: TrainingLoop, t: int, seeds: list[int], timings: dict, phase) -> Macro:
    """Lines 3-9: G blueprints per task (line 4), each scored by a greedy executor rollout without gradients
    (lines 5-7), Eq. 2 within each task's G (line 8), one update on blueprint tokens only (line 9).
    An iteration off the macro_every beat writes one greedy blueprint per task and scores none."""
    cfg, spec, B = tr.cfg, tr.spec, len(seeds)
    scored = t % cfg.run.macro_every == 0
    G = cfg.planner.group_size if scored else 1
    phase("A: blueprints" if scored else "A: one greedy blueprint")
    first = _timed(timings, "env_s", tr.pool.reset, seeds)
    blueprints = _timed(timings, "plan_generate_s", planner.generate, tr.policy, spec.prompts,  # line 4, (B, G)
                        list(tr.pool.tasks), first, cfg.planner, G, temperature=None if scored else 0.0)
    if not scored:
        return Macro(blueprints, torch.zeros(B), [False] * B, [False] * B, [], [0.0] * B, set(), [], 0, {}, False)
    flat_bp = [z for group in blueprints for z in group]  # (B*G,)
    macro_groups = torch.arange(B).repeat_interleave(G)  # (B*G,)
    unique: dict[tuple, int] = {}  # a greedy rollout is a function of (task, blueprint): one each
    for z in flat_bp:
        if z.valid:
            unique.setdefault((z.task, tuple(z.subgoals)), len(unique))
    phase("A: greedy rollouts")
    greedy = executor.generate(tr.policy, spec.prompts, spec.parse_action, tr.pool, [seeds[b] for b, _ in unique],
                               list(unique), cfg.executor, greedy=True, timings=timings,
                               subgoal_check=spec.subgoal_check)  # lines 5-7, no grad
    rollout = [greedy[unique[(z.task, tuple(z.subgoals))]] if z.valid else None for z in flat_bp]
    paid = cfg.executor.subgoal_reward  # the executor's pay for following is not the blueprint's worth
    returns = torch.tensor([r.ret - paid * r.followed if r else cfg.executor.halt_penalty
                            for r in rollout])  # (B*G,)
    crashed = [bool(r and r.end == "env_error") for r in rollout]
    ok = [i for i in range(B * G) if not crashed[i]]
    adv, silent = _spread([[a] for a in blueprint_advantages(returns[ok], macro_groups[ok], cfg.update).tolist()],
                          [int(macro_groups[i]) for i in ok], ok, [1] * (B * G))  # line 8
    keep = [i for i in ok if not (cfg.update.drop_zero_variance and int(macro_groups[i]) in silent)]
    first_row, n_rows = dist.offset(len(keep))  # sample ids are global: lower ranks' blueprints come first
    rows = planner.training_rows([flat_bp[i] for i in keep], [adv[i][0] for i in keep], first_row)
    stats = {}
    if cfg.run.coevolution:
        phase("A: update")
        stats = _update(tr, rows, {BLUEPRINT})  # line 9
    else:
        phase("A: (update deferred)")
    return Macro(blueprints, returns, [bool(r and r.success) for r in rollout], crashed, greedy,
                 [a[0] for a in adv], silent, rows, n_rows, stats, True)


def phase_b(tr: TrainingLoop, seeds: list[int], plans: dict[int, list[str]], timings: dict, phase,
            flat: bool = False, sample_offset: int = 0, joint: list | None = None) -> Micro:
    """Lines 12-14: M sampled rollouts per task under its plan (`plans[b]`, z*'s sub-goals), Eq. 2 (or the
    configured estimator) within each task's M, one update on action tokens only. `flat`: the flat agent's whole
    iteration (no plan). `joint`: Phase A's rows, trained in this one step too ('w/o co-evolution')."""
    cfg, spec = tr.cfg, tr.spec
    phase("flat: rollouts" if flat else "B: rollouts")
    episodes = [(b, plans[b]) for b in sorted(plans) for _ in range(cfg.executor.rollouts_per_blueprint)]
    sampled = executor.generate(tr.policy, spec.prompts, spec.parse_action, tr.pool, [seeds[b] for b, _ in episodes],
                                episodes, cfg.executor, greedy=False, timings=timings, flat=flat,
                                subgoal_check=spec.subgoal_check)  # line 12
    ok = [i for i, trj in enumerate(sampled) if trj.end != "env_error"]
    adv, silent = _spread(trajectory_advantages([sampled[i] for i in ok], cfg.update),  # line 13, per step
                          [sampled[i].task for i in ok], ok, [len(trj.steps) for trj in sampled])
    keep = [i for i in ok if not (cfg.update.drop_zero_variance and sampled[i].task in silent)]
    rows = executor.training_rows([sampled[i] for i in keep], [adv[i] for i in keep],
                                  sample_offset + dist.offset(len(keep))[0])
    phase("flat: update" if flat else "B: update")
    stats = _update(tr, rows, {ACTION}) if joint is None else _update(tr, joint + rows, {BLUEPRINT, ACTION})  # l. 14
    return Micro(sampled, adv, silent, stats)


def choose_blueprints(blueprints: list[list], returns: torch.Tensor, choice: str, key: list[int],
                      usable: list[bool] | None = None, first: int = 0) -> dict:
    """The blueprint each task's Phase B runs under: {task index: Blueprint}.

    'best': z* = argmax_i R(z_i) over the task's valid blueprints, the first on ties
    (Eq. 4). 'random': a uniform pick among the valid ones from a stream seeded by
    `key` + the task index (the ablation). `usable[b * G + i]` False (a rollout the env
    crashed) rules a blueprint out. Tasks with no valid, usable blueprint are absent.
    `first`: the iteration-wide index of blueprints[0]'s task (a rank's slice), which seeds 'random'.
    """
    out = {}
    for b, group in enumerate(blueprints):
        G = len(group)
        valid = [i for i in range(G) if group[i].valid and (usable is None or usable[b * G + i])]
        if not valid:
            continue
        if choice == "best":
            i = max(valid, key=lambda i: (float(returns[b * G + i]), -i))
        else:
            i = valid[int(np.random.default_rng([*key, first + b]).integers(len(valid)))]
        out[b] = group[i]
    return out


# -- helpers of the phases ----------------------------------------------------------------
def _spread(per_step: list[list[float]], group: list[int], ok: list[int], steps: list[int]
            ) -> tuple[list[list[float]], set[int]]:
    """Advantages of the samples `ok` (the others crashed: 0, never trained) spread back over all samples,
    silent groups' set to exactly 0; and the silent groups."""
    clean, silent = without_silent(per_step, group)
    out = [[0.0] * n for n in steps]
    for j, i in enumerate(ok):
        out[i] = clean[j]
    return out, silent


def _update(tr: TrainingLoop, rows: list, kinds: set[int]) -> dict:
    out = policy_update(tr.policy, tr.optimizers.for_kinds(kinds), rows, tr.cfg.update, kinds)
    tr.check_finite("an optimiser step")  # finite losses can still step into inf (an overflow in the optimiser)
    return out


def _timed(timings: dict, key: str, fn, *args, **kwargs):
    tic = time.perf_counter()
    out = fn(*args, **kwargs)
    timings[key] = time.perf_counter() - tic
    return out


def _gather(piece: dict) -> dict:
    """This rank's raw iteration values, combined with every other rank's in task order (alone: as they are)."""
    return metrics.combine(dist.all_gather(metrics.light(piece))) if dist.active() else piece


def _rule_agreement(tr: TrainingLoop, trajs: list) -> dict:
    """micro/rule_agreement: the share of the *sampled* training moves the env's reading rule would also have made
    (the evaluation's rule_agreement, for the policy being trained): reading shows here as a rise from
    ~1/|actions| long before a greedy evaluation's argmax moves."""
    if tr.spec.rule is None or not tr.spec.actions or getattr(tr.pool, "cfg", None) is None or not trajs:
        return {}
    episodes = [{"seed": trj.seed, "moves": [s.move for s in trj.steps]} for trj in trajs]
    mark_rule_agreement(tr.spec, tr.pool.cfg, episodes)
    moves = sum(e["rule_moves"] for e in episodes)
    return {"micro/rule_agreement": sum(e["rule_agree"] for e in episodes) / moves} if moves else {}


def _samples(cfg, t: int, lo: int, B: int, micro: Micro, macro: Macro | None = None, z_star: dict | None = None
             ) -> list[dict]:
    """samples.jsonl rows: this rank's share of the iteration's first `sample_log` tasks."""
    out = []
    for b in range(max(min(cfg.run.sample_log - lo, B), 0)):
        row = {"iteration": t, "task": lo + b}
        if macro is None:
            row["flat"] = _answers(micro.sampled, b)
        else:
            G = len(macro.blueprints[b])
            row.update(blueprints=[{"text": z.text, "valid": z.valid,
                                    "return": float(macro.returns[b * G + i]) if macro.scored else None}
                                   for i, z in enumerate(macro.blueprints[b])],
                       z_star=z_star[b].subgoals if b in z_star else None, phase_b=_answers(micro.sampled, b))
        out.append(row)
    return out


def _flat(per_step: list[list[float]]) -> torch.Tensor:
    return torch.tensor([a for steps in per_step for a in steps])


def _answers(trajs: list[executor.Trajectory], task: int) -> list[dict]:
    return [{"answers": [s.text.strip() for s in trj.steps], "return": trj.ret, "end": trj.end}
            for trj in trajs if trj.task == task]


def main(argv: list[str] | None = None) -> int:
    return launch.main(argv, Trainer, "python -m himac.coevolve", __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
