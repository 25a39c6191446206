"""Evaluate the hierarchical agent greedily: one greedy blueprint, then a greedy executor.

`evaluate_agent` works with any policy object that has `encode(messages)` and
`generate(prompts, max_new_tokens, temperature, stop_at_newline)`, so the same
episodes can run on the training model or on an exported one.

Held-out seeds come from `eval_seeds`, a stream disjoint from the training
tasks' (coevolve.task_seeds), so "success" here is on rooms never trained on.
"""
from __future__ import annotations

import numpy as np

from himac import executor, planner

EVAL_STREAM = 7_777_777  # salt that keeps evaluation seeds apart from training seeds


def eval_seeds(n: int, offset: int = 0) -> list[int]:
    return [int(np.random.SeedSequence([EVAL_STREAM, offset + i]).generate_state(1)[0]) for i in range(n)]


def evaluate_agent(policy, spec, pool, seeds: list[int], pcfg: planner.PlannerConfig,
                   ecfg: executor.ExecutorConfig) -> dict:
    """Greedy planner + greedy executor on `seeds`; returns a flat report dict and per-episode records."""
    first = pool.reset(seeds)
    tasks, types = list(pool.tasks), list(pool.task_types)
    optimal = [getattr(pool.env(i), "optimal_moves", None) for i in range(len(seeds))]
    blueprints = [g[0] for g in planner.generate(policy, spec.prompts, tasks, first, pcfg, n=1, temperature=0.0)]
    runnable = [i for i, b in enumerate(blueprints) if b.valid]
    trajs = executor.generate(policy, spec.prompts, spec.parse_action, pool, [seeds[i] for i in runnable],
                              [(i, blueprints[i].subgoals) for i in runnable], ecfg, greedy=True)
    by_task = {t.task: t for t in trajs}
    episodes = []
    for i, seed in enumerate(seeds):
        t = by_task.get(i)
        episodes.append({
            "seed": seed, "task_type": types[i], "blueprint": blueprints[i].text, "valid_blueprint": blueprints[i].valid,
            "success": bool(t and t.success), "return": t.ret if t else pcfg.blueprint_fail_penalty,
            "env_steps": t.env_steps if t else 0, "end": t.end if t else "invalid_blueprint",
            "optimal_moves": optimal[i], "actions": [s.text.strip() for s in t.steps] if t else []})
    return {**summarise(episodes), "episodes": episodes}


def summarise(episodes: list[dict]) -> dict:
    n = max(len(episodes), 1)
    report = {
        "episodes_run": len(episodes),
        "success_rate": sum(e["success"] for e in episodes) / n,
        "return_mean": sum(e["return"] for e in episodes) / n,
        "blueprint_valid_rate": sum(e["valid_blueprint"] for e in episodes) / n,
    }
    for tt in sorted({e["task_type"] for e in episodes}):
        sub = [e for e in episodes if e["task_type"] == tt]
        report[f"success_rate/{tt}"] = sum(e["success"] for e in sub) / len(sub)
    solved = [e for e in episodes if e["success"] and e["optimal_moves"] is not None]
    if solved:  # Sokoban: how many more moves than the BFS optimum, on solved rooms
        report["optimality_gap"] = sum(e["env_steps"] - e["optimal_moves"] for e in solved) / len(solved)
    return report
