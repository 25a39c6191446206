"""Evaluate an agent greedily on held-out episodes: one greedy blueprint, then a greedy executor.

`evaluate_agent` takes any `himac.policy.AgentPolicy`, so the same episodes run
on the training model (transformers) or on an exported GGUF (llama.cpp); the
command line over both is himac/evaluate.py.

Held-out seeds come from `envs.seeds.eval_seeds`, a stream disjoint from the
training tasks', so "success" here is on rooms never trained on. Env-specific facts
of each episode (`pool.infos`: Sokoban's optimal move count, an ALFWorld game's
file) are copied into its record untouched, and the env's own `report` turns them
into summary numbers (Sokoban's optimality gap).

`open_loop_reference` is the bar a learning curve must clear to show that an agent reads
its observations: the best *fixed* action sequence (no observation used at all), chosen on
training rooms and measured on the held-out ones. A policy that collapses onto one
direction can still score well where such sequences do. Where the env has a hand-written
reading rule (`EnvSpec.rule`, Sokoban's "step toward the box"), its success is reported
beside it: what the simplest use of the observation reaches on the same rooms.
"""
from __future__ import annotations

import copy
import itertools
import time
from typing import Any

from envs import EnvSpec, get_spec
from envs.seeds import eval_seeds
from himac import executor, metrics, planner
from himac.policy import AgentPolicy, as_role


def evaluate_agent(policy: AgentPolicy, spec: EnvSpec, pool, seeds: list[int], pcfg: planner.PlannerConfig,
                   ecfg: executor.ExecutorConfig, flat: bool = False) -> dict:
    """Greedy planner + greedy executor on `seeds`; returns a flat report dict and per-episode records.

    `flat`: evaluate the hierarchy-free agent (no blueprint; see executor.py).
    """
    first = pool.reset(seeds)
    tasks, types, infos = list(pool.tasks), list(pool.task_types), list(pool.infos)
    if flat:
        blueprints = [planner.Blueprint(i, [], [], "", [], True, 0.0) for i in range(len(seeds))]
    else:
        blueprints = [g[0] for g in planner.generate(policy, spec.prompts, tasks, first, pcfg, n=1, temperature=0.0)]
    runnable = [i for i, b in enumerate(blueprints) if b.valid]
    trajs = executor.generate(policy, spec.prompts, spec.parse_action, pool, [seeds[i] for i in runnable],
                              [(i, blueprints[i].subgoals) for i in runnable], ecfg, greedy=True, flat=flat,
                              subgoal_check=spec.subgoal_check)
    by_task = {t.task: t for t in trajs}
    episodes = []
    for i, seed in enumerate(seeds):
        t = by_task.get(i)
        episodes.append({
            "seed": seed, "task_type": types[i], "blueprint": blueprints[i].text, "valid_blueprint": blueprints[i].valid,
            "success": bool(t and t.success), "return": t.ret if t else ecfg.halt_penalty,
            "env_steps": t.env_steps if t else 0, "end": t.end if t else "invalid_blueprint",
            "actions": [s.text.strip() for s in t.steps] if t else [], "moves": [s.move for s in t.steps] if t else [],
            **infos[i], **(t.episode if t else {})})
    if spec.rule is not None and spec.actions and getattr(pool, "cfg", None) is not None:
        mark_rule_agreement(spec, pool.cfg, episodes)
    return {**summarise(episodes, spec), "episodes": episodes}


def mark_rule_agreement(spec: EnvSpec, env_cfg: Any, episodes: list[dict]) -> None:
    """Add to each episode `rule_moves` (its env moves) and `rule_agree` (how many of them the env's reading
    rule, `spec.rule`, would also have made in that state), replaying its moves in a fresh env.

    Success only moves once a whole room is solved; this says whether the agent's single moves go where the
    observation points (Sokoban: toward the box) long before that: ~1/|actions| for a policy that ignores
    the observation, the share of a constant direction's states for a collapsed one.
    """
    env = spec.make(env_cfg)
    try:
        for e in episodes:
            moves = [m for m in e["moves"] if m in spec.actions]  # <sub_done> and invalid answers move nothing
            e["rule_moves"], e["rule_agree"] = len(moves), 0
            if not moves:
                continue
            env.reset(e["seed"])
            for m in moves:
                e["rule_agree"] += spec.rule(env) == m
                _, _, done, _ = env.step(m)
                if done:
                    break
    finally:
        env.close()


def summarise(episodes: list[dict], spec: EnvSpec) -> dict:
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
        report[f"return_mean/{tt}"] = sum(e["return"] for e in sub) / len(sub)
    report.update(metrics.actions("", [mv for e in episodes for mv in e["moves"]], spec.actions))
    moves = sum(e.get("rule_moves", 0) for e in episodes)
    if moves:  # the share of moves the reading rule agrees with (mark_rule_agreement)
        report["rule_agreement"] = sum(e.get("rule_agree", 0) for e in episodes) / moves
    if spec.report is not None:
        report.update(spec.report(episodes))
    return report


class Metered:
    """An AgentPolicy that forwards to another, counting generated tokens and generation seconds."""

    def __init__(self, policy: AgentPolicy, bar=None):
        self.policy, self.bar = policy, bar
        self.tokens, self.prompt_tokens, self.seconds, self.calls = 0, 0, 0.0, 0

    def encode(self, messages, prefix=""):
        return self.policy.encode(messages, prefix)

    def encode_images(self, messages, prefix, images):
        return self.policy.encode_images(messages, prefix, images)

    def decode(self, ids):
        return self.policy.decode(ids)

    def tokenize(self, text):
        return self.policy.tokenize(text)

    @property
    def eos_ids(self):
        return self.policy.eos_ids

    def role(self, name):
        return as_role(self.policy, name)

    def generate(self, prompts, *args, **kwargs):
        tic = time.perf_counter()
        out = self.policy.generate(prompts, *args, **kwargs)
        self.seconds += time.perf_counter() - tic
        self.tokens += sum(len(o.ids) for o in out)
        self.prompt_tokens += sum(len(p) for p in prompts)
        self.calls += 1
        if self.bar is not None:
            self.bar.set_postfix(tok_s=f"{self.tokens / max(self.seconds, 1e-9):.1f}", turns=self.calls)
        return out


def run_evaluation(policy: AgentPolicy, cfg, episodes: int, seed_offset: int = 0, chunk: int | None = None,
                   progress: bool = True) -> dict:
    """evaluate_agent over `episodes` held-out seeds in chunks (a progress bar ticks per chunk)."""
    from tqdm.auto import tqdm
    spec = get_spec(cfg.run.env)
    seeds = eval_seeds(episodes, seed_offset)
    chunk = chunk or max(cfg.run.gen_batch_size, 1)
    pool = spec.pool(cfg.env, evaluation=True)
    records: list[dict] = []
    tic = time.perf_counter()
    with tqdm(total=len(seeds), desc="evaluate", unit="ep", disable=not progress or None, dynamic_ncols=True) as bar:
        meter = Metered(policy, bar)
        try:
            for start in range(0, len(seeds), chunk):
                part = seeds[start:start + chunk]
                records += evaluate_agent(meter, spec, pool, part, cfg.planner, cfg.executor,
                                          flat=not cfg.run.hierarchy)["episodes"]
                bar.update(len(part))
        finally:
            pool.close()
    wall = time.perf_counter() - tic
    return {**summarise(records, spec), "time/wall_s": wall, "perf/episodes_per_s": len(records) / wall,
            "perf/generated_tokens": meter.tokens, "perf/prompt_tokens": meter.prompt_tokens,
            "perf/generate_s": meter.seconds,
            "perf/gen_tokens_per_s": meter.tokens / max(meter.seconds, 1e-9), "episodes": records}


def success_rates(spec: EnvSpec, env_cfg: Any, seeds: list[int], policies: list) -> list[float]:
    """Per policy (`(env, t) -> action`, t the step index), the share of `seeds`' episodes it solves. Each room
    is generated once (a reset can be slow) and every policy plays on a copy of it."""
    env = spec.make(env_cfg)
    solved = [0] * len(policies)
    try:
        for seed in seeds:
            env.reset(seed)
            for i, act in enumerate(policies):
                play = copy.deepcopy(env)
                t, done, info = 0, False, {}
                while not done:
                    _, _, done, info = play.step(act(play, t))
                    t += 1
                solved[i] += bool(info.get("success"))
    finally:
        env.close()
    return [x / max(len(seeds), 1) for x in solved]


def _blind(plan: tuple):
    """A fixed action sequence as a policy that ignores the env: its last action repeated to the end."""
    return lambda env, t: plan[min(t, len(plan) - 1)]


def open_loop_reference(spec: EnvSpec, env_cfg: Any, choose_seeds: list[int], seeds: list[int],
                        length: int = 3) -> dict:
    """The best constant action and the best fixed sequence of `length` actions (last one repeated), each chosen
    by its success on `choose_seeds` (ties: the first in order) and reported on `seeds`. Needs a small fixed action
    set (`spec.actions`, e.g. Sokoban's four directions) and an env that `copy.deepcopy` can copy:
    |actions|**length sequences are tried."""
    if not spec.actions:
        raise ValueError(f"env {spec.name!r} has no fixed action set: an open-loop reference needs one")
    kinds = {"constant": list(itertools.product(spec.actions, repeat=1)),
             "sequence": list(itertools.product(spec.actions, repeat=length))}
    scores = success_rates(spec, env_cfg, choose_seeds, [_blind(p) for p in kinds["constant"] + kinds["sequence"]])
    best = {}
    for kind, plans in kinds.items():
        mine, scores = scores[:len(plans)], scores[len(plans):]
        best[kind] = (plans[mine.index(max(mine))], max(mine))
    policies = [_blind(plan) for plan, _ in best.values()]
    if spec.rule is not None:  # closed loop, for contrast: the simplest policy that reads the observation
        policies.append(lambda env, t: spec.rule(env))
    held_out = success_rates(spec, env_cfg, seeds, policies)  # the held-out rooms made once for all of them
    ref = {kind: {"plan": list(plan), "chosen_on": chosen, "success": rate}
           for (kind, (plan, chosen)), rate in zip(best.items(), held_out)}
    if spec.rule is not None:
        ref["rule"] = {"plan": [spec.rule.__name__], "chosen_on": None, "success": held_out[-1]}
    return ref


def format_table(rows: list[list], headers: list[str]) -> str:
    """A plain aligned text table; numbers right-aligned, floats with 3 decimals."""
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = [all(isinstance(r[i], (int, float)) for r in rows) for i in range(len(headers))]

    def line(vals):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(vals, widths, numeric))
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def report_table(report: dict) -> str:
    rows = [[k, v] for k, v in report.items() if k != "episodes" and isinstance(v, (int, float))]
    return format_table(rows, ["metric", "value"])
