"""Diagnostic: does the executor listen to its plan?

    python tools/probe_plans.py --config configs/sokoban_bench_shaped.yaml                     # untrained SmolLM2
    python tools/probe_plans.py --config configs/sokoban_bench_shaped.yaml --checkpoint runs/x  # a trained run
    python tools/probe_plans.py --config configs/sokoban_bench_shaped.yaml --set model=tiny --rooms 4

The hierarchy can only pay off if the executor acts on the blueprint it is given: a sub-goal
is a line of its prompt, and nothing in the update makes it matter unless plans that are
followed earn more than plans that are not. This measures it directly. Every room (the
validation range unless `--reporting`) is played greedily by the executor, the same rollout
as Phase A's scoring, under hand-written blueprints:

- `own`: the planner's greedy blueprint (what evaluation and a light iteration use);
- `task only`: sub-goals that repeat the task ("Push the box onto the target."), no plan;
- `oracle`: the env's solution (EnvSpec.solution, Sokoban's BFS) as sub-goals naming the moves,
  "Move right, then up.", one sub-goal per `subgoal_step_limit` moves, at most `max_subgoals`;
  with `blueprint_choices`, the env's candidate blueprint the solution carries out instead
  ("Push the box right. | Push the box up.": each solution step read by EnvSpec.subgoal_check);
- `wrong`: the oracle plan of another room: well formed, as confident, and wrong here.

With `blueprint_choices` it first prints how often the planner's greedy plan is the oracle plan
(whole, and in its first sub-goal); `--planner-only` stops there (no executor rollout).

Each is padded to `max_subgoals` sub-goals with the task's sentence, so all four give the
executor the same number of moves.

It prints greedy success, moves made, and how often the first move is the solution's and the
plan's own first move. An executor that follows plans succeeds far more under `oracle` than
under `wrong`, and its first move is the plan's; one that ignores them scores the same on all
four rows. A planner can only teach it to follow by Phase A's scores, which are equal for every
blueprint while the executor ignores them (macro advantages 0).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from envs import get_spec  # noqa: E402
from envs.seeds import VALIDATION_OFFSET, eval_seeds  # noqa: E402
from himac import executor, models, planner  # noqa: E402
from himac.evaluate import load_backend  # noqa: E402
from himac.evaluation import format_table  # noqa: E402
from himac.experiment import config_arguments, config_from_args  # noqa: E402
from himac.policy import Policy  # noqa: E402


def oracle_plan(moves: list[str], step_limit: int, max_subgoals: int) -> list[str]:
    """The moves as sub-goals of `step_limit` moves each; the last sub-goal takes whatever is left over."""
    if not moves:
        raise ValueError("an oracle plan needs at least one move (the room is already solved?)")
    parts = [moves[i:i + step_limit] for i in range(0, len(moves), step_limit)]
    parts = parts[:max_subgoals - 1] + [sum(parts[max_subgoals - 1:], [])] if len(parts) > max_subgoals else parts
    return ["Move " + ", then ".join(p) + "." for p in parts]


def carried_out(spec, env_cfg, seed: int, moves: list[str]) -> list[str] | None:
    """The env's candidate blueprint (Prompts.blueprint_choices) that `moves` carry out in room `seed`: the
    sub-goal each push does (EnvSpec.subgoal_check on the steps that push a box, info["pushed"]; walking
    round the box between pushes carries out none), repeats merged; None when that is no candidate."""
    vocab = list(dict.fromkeys(g for plan in spec.prompts.blueprint_choices for g in plan))
    env = spec.make(env_cfg)
    try:
        env.reset(seed)
        done: list[str] = []
        for m in moves:
            info = env.step(m)[3]
            if not info.get("pushed"):
                continue
            hit = next((g for g in vocab if spec.subgoal_check(g, info)), None)
            if hit and (not done or done[-1] != hit):
                done.append(hit)
    finally:
        env.close()
    return done if tuple(done) in {tuple(p) for p in spec.prompts.blueprint_choices} else None


def plans(cfg, moves: list[list[str]], tasks: list[str], own: list[list[str]],
          oracles: list[list[str] | None] | None = None) -> dict[str, tuple[list, list]]:
    """Condition -> (blueprint per room, the moves it names per room or None), from each room's solution
    `moves` (and `oracles`, each room's oracle blueprint where one is given, else its moves as sub-goals).
    Every blueprint is padded to
    `max_subgoals` sub-goals with the task's sentence, so every condition gets the same step budget
    (a segment ends after `subgoal_step_limit` moves: a one-line plan would stop the episode sooner)."""
    limit, k = cfg.executor.subgoal_step_limit, cfg.planner.max_subgoals
    best = [o or oracle_plan(m, limit, k) for m, o in zip(moves, oracles or [None] * len(moves))]
    wrong, wrong_moves = best[1:] + best[:1], moves[1:] + moves[:1]  # the next room's

    def pad(plan: list[str], task: str) -> list[str]:
        return plan + [task] * (k - len(plan))
    return {"own": ([pad(p, t) for p, t in zip(own, tasks)], [None] * len(tasks)),
            "task only": ([pad([], t) for t in tasks], [None] * len(tasks)),
            "oracle": ([pad(p, t) for p, t in zip(best, tasks)], moves),
            "wrong": ([pad(p, t) for p, t in zip(wrong, tasks)], wrong_moves)}


def agreement(own: list[list[str]], oracles: list[list[str] | None]) -> dict[str, float]:
    """How often the planner's own plan is the oracle's, whole and in its first sub-goal, over the rooms that
    have an oracle plan among the candidates."""
    pairs = [(o, p) for o, p in zip(own, oracles) if p is not None]
    if not pairs:
        raise ValueError("no room has an oracle plan among the candidates")
    return {"plan = oracle": sum(o == p for o, p in pairs) / len(pairs),
            "first = oracle first": sum(bool(o) and o[0] == p[0] for o, p in pairs) / len(pairs),
            "rooms": len(pairs)}


def planner_check(policy, spec, cfg, seeds: list[int]) -> dict[str, float]:
    """The planner alone (no executor rollout): its greedy plan against the oracle plan, per room; needs
    `blueprint_choices` (free-text plans have no one right wording)."""
    if not (cfg.planner.blueprint_choices and spec.subgoal_check):
        raise ValueError("the planner check needs blueprint_choices: true and an env with a subgoal_check")
    pool = spec.pool(cfg.env, evaluation=True)
    try:
        first = pool.reset(seeds)
        own = planner.generate(policy, spec.prompts, list(pool.tasks), first, cfg.planner, 1, temperature=0.0)
    finally:
        pool.close()
    oracles = [carried_out(spec, cfg.env, s, list(spec.solution(cfg.env, s))) for s in seeds]
    return agreement([g[0].subgoals for g in own], oracles)


def probe(policy, spec, cfg, seeds: list[int]) -> list[dict]:
    """One row per condition: success, moves, first-move agreement with the solution and with the plan."""
    pool = spec.pool(cfg.env, evaluation=True)
    try:
        first = pool.reset(seeds)
        tasks = list(pool.tasks)
        own = planner.generate(policy, spec.prompts, tasks, first, cfg.planner, 1, temperature=0.0)
        own_plans = [g[0].subgoals or [t] for g, t in zip(own, tasks)]  # an unparsable plan: the task alone
        solutions = [list(spec.solution(cfg.env, s)) for s in seeds]
        oracles = ([carried_out(spec, cfg.env, s, m) for s, m in zip(seeds, solutions)]
                   if cfg.planner.blueprint_choices and spec.subgoal_check else None)
        rows = []
        for name, (bps, named) in plans(cfg, solutions, tasks, own_plans, oracles).items():
            trajs = executor.generate(policy, spec.prompts, spec.parse_action, pool, seeds,
                                      list(enumerate(bps)), cfg.executor, greedy=True,
                                      subgoal_check=spec.subgoal_check)
            firsts = [next((s.action for s in t.steps if s.action is not None), None) for t in trajs]
            n = len(trajs)
            rows.append({"condition": name, "success": sum(t.success for t in trajs) / n,
                         "moves": sum(sum(s.action is not None for s in t.steps) for t in trajs) / n,
                         "first = solution": sum(f == m[0] for f, m in zip(firsts, solutions)) / n,
                         "first = plan": (sum(f == m[0] for f, m in zip(firsts, named)) / n
                                          if named[0] is not None else None),
                         "example": " | ".join(bps[0])})
        return rows
    finally:
        pool.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    config_arguments(ap)
    ap.add_argument("--checkpoint", help="run directory (python -m himac.coevolve --out); default: the "
                    "config's untrained model")
    ap.add_argument("--rooms", type=int, default=128)
    ap.add_argument("--reporting", action="store_true",
                    help="the reporting range of held-out rooms (default: the validation range)")
    ap.add_argument("--planner-only", action="store_true",
                    help="only the planner's greedy plans against the oracle's (blueprint_choices; about a minute)")
    args = ap.parse_args(argv)
    cfg = config_from_args(ap, args)
    spec = get_spec(cfg.run.env)
    if spec.solution is None:
        ap.error(f"env {cfg.run.env!r} has no solver (EnvSpec.solution) to write oracle plans with")
    if args.rooms < 2:
        ap.error(f"--rooms {args.rooms}: needs at least 2 (the wrong plan is another room's)")
    if args.planner_only and not cfg.planner.blueprint_choices:
        ap.error("--planner-only needs blueprint_choices: true (free-text plans have no one right wording)")
    if args.checkpoint:
        policy = load_backend("hf", args.checkpoint, cfg)
    else:
        model, tok = models.load(cfg.model)
        policy = Policy(model, tok, gen_batch_size=cfg.run.gen_batch_size)
    seeds = eval_seeds(args.rooms, 0 if args.reporting else VALIDATION_OFFSET)
    rng = "reporting" if args.reporting else "validation"
    print(f"config {args.config}  checkpoint {args.checkpoint or cfg.model.model + ' (untrained)'}  "
          f"{len(seeds)} held-out rooms ({rng} range)" + ("" if args.planner_only else ", greedy executor") + "\n")
    if cfg.planner.blueprint_choices:
        a = planner_check(policy, spec, cfg, seeds)
        print(f"planner (greedy): its plan = the oracle's in {a['plan = oracle']:.3f} of {a['rooms']} rooms, "
              f"its first sub-goal = the oracle's first in {a['first = oracle first']:.3f}\n")
    if args.planner_only:
        return 0
    rows = probe(policy, spec, cfg, seeds)
    print(format_table([[r["condition"], f"{r['success']:.3f}", f"{r['moves']:.2f}", f"{r['first = solution']:.2f}",
                         "" if r["first = plan"] is None else f"{r['first = plan']:.2f}", r["example"][:60]]
                        for r in rows],
                       ["blueprint", "success", "moves", "first move = solution's", "first move = plan's",
                        "room 1's blueprint"]))
    by = {r["condition"]: r["success"] for r in rows}
    print(f"\noracle - wrong: {by['oracle'] - by['wrong']:+.3f} success (0: the executor ignores its plan)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
