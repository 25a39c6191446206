"""HiMAC iterative co-evolution training: Algorithm 1 of the paper (§3.4).

    python -m himac.coevolve configs/sokoban_cpu.yaml [--out DIR] [--set key=value ...]
    python -m himac.coevolve --resume DIR [--set iterations=20]

Each iteration takes B tasks (Algorithm 1 samples one instruction; we batch B for
throughput, each task its own group):
  Phase A, macro exploration (lines 3-9): sample G blueprints per task; score each
    by a greedy executor rollout without gradients; Eq. 2 advantages within each
    task's G; one update on blueprint tokens only.
  Phase B, micro adaptation (lines 10-14): z* = argmax_i R(z_i) per task (Eq. 4);
    M sampled executor rollouts under z*; Eq. 2 advantages within each task's M;
    one update on action tokens only.
pi_ref is the model with its LoRA adapter disabled; pi_old is the policy that
sampled (see update.py).

Departures from the paper, deliberate:
- A greedy rollout is a deterministic function of (task, blueprint), so identical
  blueprints of one task are rolled out once and share the return.
- A task whose G blueprints are all unparseable has no z*; it sits out Phase B.
- B > 1 tasks per iteration (the paper's line 2 samples one).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from envs import get_spec
from himac import config as C
from himac import executor, groups, models, planner
from himac.evaluate import eval_seeds, evaluate_agent
from himac.policy import Policy
from himac.rundir import RunDir
from himac.update import ACTION, BLUEPRINT, UpdateConfig, make_optimizer, policy_update


@dataclass
class RunConfig:
    env: str = "sokoban"
    """Environment name in envs.REGISTRY."""
    iterations: int = 100
    """Co-evolution iterations T (each runs Phase A then Phase B)."""
    tasks_per_iteration: int = 4
    """B: tasks per iteration; each is its own macro group and micro group."""
    seed: int = 0
    """Seeds the model's sampling and the training tasks; same seed, same tasks."""
    task_pool: int = 0
    """0: fresh tasks every iteration; N: a fixed training set of N tasks, visited in turn."""
    gen_batch_size: int = 16
    """Prompts per generate() call."""
    save_every: int = 1
    """Checkpoint every this many iterations (and always at the end)."""
    eval_episodes: int = 0
    """Held-out episodes evaluated greedily before training, every eval_every, and at the end (0: off)."""
    eval_every: int = 0
    """Evaluate every this many iterations (0: only before and after)."""
    sample_log: int = 1
    """Tasks per iteration whose blueprints and trajectories go to samples.jsonl."""
    time_budget_s: float = 0.0
    """Stop after the iteration that brings training time (evaluation excluded) past this (0: no limit)."""
    hierarchy: bool = True
    """False: the 'w/o hierarchy' ablation / flat baselines: no blueprint; M trajectories per task from
    the flat prompt, one update on their action tokens (with update key 'advantage': grpo, rloo, gigpo)."""
    coevolution: bool = True
    """False: the 'w/o co-evolution' ablation: Phase A and B both roll out with the iteration's starting
    policy and one optimiser step carries the blueprint and the action losses together."""
    blueprint_choice: str = "best"
    """Blueprint Phase B runs under: 'best' (z* = argmax return, Eq. 4) or 'random' (a seeded uniform pick
    among the task's valid blueprints: the 'random blueprint' ablation)."""

    def __post_init__(self):
        C.check(self.iterations >= 0, "iterations", self.iterations, "must be >= 0")
        C.check(self.tasks_per_iteration >= 1, "tasks_per_iteration", self.tasks_per_iteration, "must be >= 1")
        C.check(self.gen_batch_size >= 1, "gen_batch_size", self.gen_batch_size, "must be >= 1")
        C.check(self.save_every >= 1, "save_every", self.save_every, "must be >= 1")
        C.check(self.eval_episodes >= 0, "eval_episodes", self.eval_episodes, "must be >= 0")
        C.check(self.eval_every >= 0, "eval_every", self.eval_every, "must be >= 0")
        C.check(self.task_pool >= 0, "task_pool", self.task_pool, "must be >= 0")
        C.check(self.time_budget_s >= 0, "time_budget_s", self.time_budget_s, "must be >= 0")
        C.check(self.blueprint_choice in ("best", "random"), "blueprint_choice", self.blueprint_choice,
                "must be 'best' or 'random'")


@dataclass
class Config:
    run: RunConfig
    model: models.ModelConfig
    planner: planner.PlannerConfig
    executor: executor.ExecutorConfig
    update: UpdateConfig
    env: object  # the env's own dataclass (e.g. envs.sokoban.SokobanConfig)

    def flat(self) -> dict:
        return C.to_flat({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})


def sections(env_name: str) -> dict[str, type]:
    try:
        spec = get_spec(env_name)
    except KeyError as e:
        raise C.ConfigError(f"config key 'env' = {env_name!r}: {e.args[0]}") from None
    return {"run": RunConfig, "model": models.ModelConfig, "planner": planner.PlannerConfig,
            "executor": executor.ExecutorConfig, "update": UpdateConfig, "env": spec.config}


def load_config(path: str | Path | None, overrides: dict | None = None, base: dict | None = None) -> Config:
    """Flat YAML (or a base dict, e.g. a resumed run's config) + --set overrides -> Config."""
    flat = dict(base or {})
    if path is not None:
        flat.update(C.load_yaml(path))
    flat.update(overrides or {})
    env_name = flat.get("env", RunConfig.env)
    return Config(**C.route(flat, sections(env_name), str(path or "the run's config.yaml")))


POOL_SALT = 10**9  # keeps pool seeds apart from per-iteration seeds (no run has 10**9 iterations)
CHOICE_SALT = 31_337  # the random-blueprint ablation's own random stream


def task_seeds(cfg: RunConfig, iteration: int) -> list[int]:
    """Env seeds of the iteration's B training tasks: reproducible, and apart from eval seeds.

    With a task pool the iteration takes the next B of the N fixed tasks, cyclically.
    """
    B = cfg.tasks_per_iteration
    if cfg.task_pool:
        keys = [[cfg.seed, POOL_SALT, (iteration * B + b) % cfg.task_pool] for b in range(B)]
    else:
        keys = [[cfg.seed, iteration, b] for b in range(B)]
    return [int(np.random.SeedSequence(k).generate_state(1)[0]) for k in keys]


class Trainer:
    """Holds the model, optimiser, env pool and run directory; `iteration(t)` is Algorithm 1's body."""

    def __init__(self, cfg: Config, run: RunDir, resume: bool = False):
        self.cfg, self.run = cfg, run
        self.spec = get_spec(cfg.run.env)
        torch.manual_seed(cfg.run.seed)
        adapter = run.checkpoint / "adapter" if resume else None
        model, tokenizer = models.load(cfg.model, adapter_dir=adapter)
        self.policy = Policy(model, tokenizer, gen_batch_size=cfg.run.gen_batch_size)
        self.optimizer = make_optimizer(model, cfg.update)
        self.pool = self.spec.pool(cfg.env)
        self._eval_pool = None
        self.start = run.load_trainer_state(self.optimizer) + 1 if resume else 0

    # -- Algorithm 1 ------------------------------------------------------------------
    def iteration(self, t: int, bar=None) -> tuple[dict, dict]:
        if not self.cfg.run.hierarchy:
            return self.flat_iteration(t, bar)
        cfg, prompts = self.cfg, self.spec.prompts
        G, M, B = cfg.planner.group_size, cfg.executor.rollouts_per_blueprint, cfg.run.tasks_per_iteration
        timings: dict = {}
        phase = _Phases(bar)
        seeds = task_seeds(cfg.run, t)  # line 2: x ~ D

        # Phase A: macro exploration ------------------------------------------------------
        phase("A: blueprints")
        tic = time.perf_counter()
        first = self.pool.reset(seeds)
        tasks = list(self.pool.tasks)
        timings["env_s"] = time.perf_counter() - tic
        tic = time.perf_counter()
        blueprints = planner.generate(self.policy, prompts, tasks, first, cfg.planner, G)  # line 4, (B, G)
        timings["plan_generate_s"] = time.perf_counter() - tic
        flat_bp = [z for group in blueprints for z in group]  # (B*G,)
        unique: dict[tuple, int] = {}
        for z in flat_bp:
            if z.valid:
                unique.setdefault((z.task, tuple(z.subgoals)), len(unique))
        phase("A: greedy rollouts")
        episodes = list(unique)  # [(task, subgoals)]
        greedy = executor.generate(self.policy, prompts, self.spec.parse_action, self.pool,
                                   [seeds[b] for b, _ in episodes], episodes, cfg.executor, greedy=True,
                                   timings=timings)  # lines 5-7, no grad
        returns = torch.tensor([greedy[unique[(z.task, tuple(z.subgoals))]].ret if z.valid
                                else cfg.planner.blueprint_fail_penalty for z in flat_bp])  # (B*G,)
        success = [z.valid and greedy[unique[(z.task, tuple(z.subgoals))]].success for z in flat_bp]
        macro_groups = torch.arange(B).repeat_interleave(G)  # (B*G,)
        adv_macro = self._advantages(returns, macro_groups)  # line 8
        rows_a = planner.training_rows(flat_bp, adv_macro.tolist())
        m_macro: dict = {}
        if cfg.run.coevolution:
            phase("A: update")
            m_macro = policy_update(self.policy, self.optimizer, rows_a, cfg.update, {BLUEPRINT})  # line 9
        else:
            phase("A: (update deferred)")

        # Phase B: micro adaptation -------------------------------------------------------
        phase("B: rollouts")
        z_star = choose_blueprints(blueprints, returns, cfg.run.blueprint_choice,
                                   key=[cfg.run.seed, CHOICE_SALT, t])  # line 11, Eq. 4
        tasks_b = sorted(z_star)
        episodes_b = [(b, z_star[b].subgoals) for b in tasks_b for _ in range(M)]
        sampled = executor.generate(self.policy, prompts, self.spec.parse_action, self.pool,
                                    [seeds[b] for b, _ in episodes_b], episodes_b, cfg.executor, greedy=False,
                                    timings=timings)  # line 12
        m_micro, adv_micro = {}, torch.zeros(0)
        rows_b = []
        if sampled:
            adv_b = trajectory_advantages(sampled, cfg.update)  # line 13
            adv_micro = torch.tensor([a for per in adv_b for a in (per if isinstance(per, list) else [per])])
            rows_b = executor.training_rows(sampled, adv_b, sample_offset=len(rows_a))
        phase("B: update")
        if cfg.run.coevolution:
            if rows_b:
                m_micro = policy_update(self.policy, self.optimizer, rows_b, cfg.update, {ACTION})  # line 14
        else:  # w/o co-evolution: one step, both masks, on rollouts of the same starting policy
            m_macro = policy_update(self.policy, self.optimizer, rows_a + rows_b, cfg.update, {BLUEPRINT, ACTION})

        metrics = self._metrics(t, flat_bp, returns, success, adv_macro, greedy, m_macro, z_star, sampled,
                                adv_micro, m_micro, timings)
        samples = self._samples(t, blueprints, returns, z_star, sampled)
        return metrics, samples

    def flat_iteration(self, t: int, bar=None) -> tuple[dict, dict]:
        """'w/o hierarchy': M flat trajectories per task, group advantages over each task's M, one update."""
        cfg, prompts = self.cfg, self.spec.prompts
        M, B = cfg.executor.rollouts_per_blueprint, cfg.run.tasks_per_iteration
        timings: dict = {}
        phase = _Phases(bar)
        seeds = task_seeds(cfg.run, t)
        phase("flat: rollouts")
        episodes = [(b, []) for b in range(B) for _ in range(M)]
        sampled = executor.generate(self.policy, prompts, self.spec.parse_action, self.pool,
                                    [seeds[b] for b, _ in episodes], episodes, cfg.executor, greedy=False,
                                    timings=timings, flat=True)
        adv = trajectory_advantages(sampled, cfg.update)
        phase("flat: update")
        m_update = policy_update(self.policy, self.optimizer, executor.training_rows(sampled, adv),
                                 cfg.update, {ACTION})
        adv_t = torch.tensor([a for per in adv for a in (per if isinstance(per, list) else [per])])
        env_steps = sum(tr.env_steps for tr in sampled)
        gen_s = timings.get("generate_s", 0.0)
        m = {"iteration": t, "success_rate": _mean([tr.success for tr in sampled]),
             "macro/return_mean": _mean([tr.ret for tr in sampled]),
             "micro/success_rate": _mean([tr.success for tr in sampled]),
             "micro/return_mean": _mean([tr.ret for tr in sampled]),
             "micro/adv_std": float(adv_t.std()) if adv_t.numel() > 1 else 0.0,
             "micro/steps_mean": _mean([tr.env_steps for tr in sampled]),
             "env/steps": env_steps,
             "env/invalid_action_rate": sum(tr.invalid for tr in sampled) / max(env_steps, 1),
             "gen/tokens": timings.get("generated_tokens", 0.0)}
        for end in ("solved", "max_steps", "failure_keyword", "env_error"):
            m[f"env/end_{end}"] = _mean([tr.end == end for tr in sampled])
        m.update({f"micro/{k}": v for k, v in m_update.items()})
        m["time/generate_s"] = gen_s
        m["time/update_s"] = m_update.get("update_s", 0.0)
        m["time/env_s"] = timings.get("env_s", 0.0)
        m["perf/gen_tokens_per_s"] = m["gen/tokens"] / gen_s if gen_s else 0.0
        samples = [{"iteration": t, "task": b, "flat": [{"answers": [s.text.strip() for s in tr.steps],
                                                        "return": tr.ret, "end": tr.end}
                                                       for tr in sampled if tr.task == b]}
                   for b in range(min(cfg.run.sample_log, B))]
        return m, samples

    def _advantages(self, returns: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
        """Blueprint-group advantages: Eq. 2, or RLOO when the update's estimator says so."""
        u = self.cfg.update
        if u.advantage == "rloo":
            return groups.rloo_advantages(returns, group_index)
        return groups.group_advantages(returns, group_index, u.adv_scale_std, u.adv_eps)

    # -- bookkeeping ------------------------------------------------------------------
    def _metrics(self, t, flat_bp, returns, success, adv_macro, greedy, m_macro, z_star, sampled, adv_micro,
                 m_micro, timings) -> dict:
        n_bp = max(len(flat_bp), 1)
        all_trajs = greedy + sampled
        env_steps = sum(tr.env_steps for tr in all_trajs)
        m = {
            "iteration": t,
            "success_rate": sum(success) / n_bp,  # Phase A greedy rollouts, invalid blueprints count as failures
            "macro/return_mean": float(returns.mean()),
            "macro/return_std": float(returns.std()) if returns.numel() > 1 else 0.0,
            "macro/adv_std": float(adv_macro.std()) if adv_macro.numel() > 1 else 0.0,
            "macro/blueprint_valid_rate": sum(z.valid for z in flat_bp) / n_bp,
            "macro/subgoals_mean": sum(len(z.subgoals) for z in flat_bp) / n_bp,
            "macro/blueprint_tokens_mean": sum(len(z.completion_ids) for z in flat_bp) / n_bp,
            "macro/unique_rollouts": len(greedy),
            "macro/z_star_success_rate": _z_star_success(z_star, flat_bp, success),
            "micro/tasks": len(z_star),
            "micro/success_rate": _mean([tr.success for tr in sampled]),
            "micro/return_mean": _mean([tr.ret for tr in sampled]),
            "micro/adv_std": float(adv_micro.std()) if adv_micro.numel() > 1 else 0.0,
            "micro/subgoal_completion": _mean([tr.subgoals_done / max(len(tr.subgoals), 1) for tr in sampled]),
            "micro/steps_mean": _mean([tr.env_steps for tr in sampled]),
            "env/steps": env_steps,
            "env/invalid_action_rate": sum(tr.invalid for tr in all_trajs) / max(env_steps, 1),
        }
        for end in ("solved", "max_steps", "plan_exhausted", "subgoal_step_limit", "failure_keyword", "env_error"):
            m[f"env/end_{end}"] = _mean([tr.end == end for tr in all_trajs])
        m.update({f"macro/{k}": v for k, v in m_macro.items()})
        m.update({f"micro/{k}": v for k, v in m_micro.items()})
        gen_s = timings.get("generate_s", 0.0) + timings.get("plan_generate_s", 0.0)
        gen_tokens = timings.get("generated_tokens", 0.0) + sum(len(z.completion_ids) for z in flat_bp)
        m["time/generate_s"] = gen_s
        m["time/update_s"] = m_macro.get("update_s", 0.0) + m_micro.get("update_s", 0.0)
        m["time/env_s"] = timings.get("env_s", 0.0)
        m["gen/tokens"] = gen_tokens
        m["perf/gen_tokens_per_s"] = gen_tokens / gen_s if gen_s else 0.0
        return m

    def _samples(self, t, blueprints, returns, z_star, sampled) -> list[dict]:
        out = []
        G = self.cfg.planner.group_size
        for b in range(min(self.cfg.run.sample_log, len(blueprints))):
            out.append({
                "iteration": t, "task": b,
                "blueprints": [{"text": z.text, "valid": z.valid, "return": float(returns[b * G + i])}
                               for i, z in enumerate(blueprints[b])],
                "z_star": z_star[b].subgoals if b in z_star else None,
                "phase_b": [{"answers": [s.text.strip() for s in tr.steps], "return": tr.ret, "end": tr.end}
                            for tr in sampled if tr.task == b]})
        return out

    def evaluate(self, t: int) -> dict:
        seeds = eval_seeds(self.cfg.run.eval_episodes)
        if self._eval_pool is None:
            self._eval_pool = self.spec.pool(self.cfg.env, evaluation=True)
        report = evaluate_agent(self.policy, self.spec, self._eval_pool, seeds, self.cfg.planner, self.cfg.executor,
                                flat=not self.cfg.run.hierarchy)
        return {"iteration": t, **{f"eval/{k}": v for k, v in report.items() if k != "episodes"}}

    def close(self) -> None:
        """Shut the env pools down (worker processes, open games)."""
        for pool in (self.pool, self._eval_pool):
            if pool is not None:
                pool.close()

    # -- the loop ---------------------------------------------------------------------
    def train(self) -> list[dict]:
        cfg, run = self.cfg, self.run
        history = []
        evaluating = cfg.run.eval_episodes > 0
        if evaluating and self.start == 0:
            run.log(self.evaluate(-1), "eval.jsonl")
        bar = tqdm(range(self.start, cfg.run.iterations), desc="co-evolution", unit="it",
                   initial=self.start, total=cfg.run.iterations, dynamic_ncols=True)
        t_start = time.perf_counter()
        done_before = run.metrics() if self.start else []
        train_s = float(done_before[-1].get("train_s", 0.0)) if done_before else 0.0  # resumed: keep counting
        for t in bar:
            tic = time.perf_counter()
            with tqdm(total=5 if cfg.run.hierarchy else 2, desc=f"iteration {t}", leave=False, dynamic_ncols=True,
                      disable=None) as inner:
                metrics, samples = self.iteration(t, inner)
            metrics["wall_s"] = time.perf_counter() - tic
            metrics["elapsed_s"] = time.perf_counter() - t_start
            train_s += metrics["wall_s"]
            metrics["train_s"] = train_s  # training wall-clock so far, evaluation excluded
            out_of_time = bool(cfg.run.time_budget_s) and train_s >= cfg.run.time_budget_s
            last = t == cfg.run.iterations - 1 or out_of_time
            if evaluating and (last or (cfg.run.eval_every and (t + 1) % cfg.run.eval_every == 0)):
                ev = self.evaluate(t)
                run.log(ev, "eval.jsonl")
                metrics.update({k: v for k, v in ev.items() if k != "iteration"})
            run.log(metrics)
            for s in samples:
                run.log(s, "samples.jsonl")
            if last or (t + 1) % cfg.run.save_every == 0:
                run.save_checkpoint(self.policy.model, self.optimizer, t)
                run.plot()
            bar.set_postfix(success=f"{metrics['success_rate']:.2f}", ret=f"{metrics['macro/return_mean']:.2f}",
                            wall=f"{metrics['wall_s']:.0f}s")
            history.append(metrics)
            if out_of_time:
                bar.write(f"himac: time budget {cfg.run.time_budget_s:.0f}s reached after iteration {t}")
                break
        return history


class _Phases:
    """Advances the inner progress bar and names the phase running now."""

    def __init__(self, bar):
        self.bar, self.n = bar, 0

    def __call__(self, name: str) -> None:
        if self.bar is not None:
            if self.n:
                self.bar.update(1)
            self.bar.set_postfix_str(name)
        self.n += 1


def choose_blueprints(blueprints: list[list], returns: torch.Tensor, choice: str, key: list[int]) -> dict:
    """The blueprint each task's Phase B runs under: {task index: Blueprint}.

    'best': z* = argmax_i R(z_i) over the task's valid blueprints, the first on ties
    (Eq. 4). 'random': a uniform pick among the valid ones from a stream seeded by
    `key` + the task index (the ablation). Tasks with no valid blueprint are absent.
    """
    out = {}
    for b, group in enumerate(blueprints):
        G = len(group)
        valid = [i for i in range(G) if group[i].valid]
        if not valid:
            continue
        if choice == "best":
            i = max(valid, key=lambda i: (float(returns[b * G + i]), -i))
        else:
            i = valid[int(np.random.default_rng([*key, b]).integers(len(valid)))]
        out[b] = group[i]
    return out


def trajectory_advantages(trajs: list, cfg: UpdateConfig) -> list:
    """Advantages of a batch of trajectories grouped by task: one float per trajectory (grpo, rloo)
    or, for gigpo, one list of per-step floats per trajectory."""
    if not trajs:
        return []
    returns = torch.tensor([tr.ret for tr in trajs])  # (N,)
    group = torch.tensor([tr.task for tr in trajs])  # (N,)
    if cfg.advantage == "rloo":
        return groups.rloo_advantages(returns, group).tolist()
    if cfg.advantage == "grpo":
        return groups.group_advantages(returns, group, cfg.adv_scale_std, cfg.adv_eps).tolist()
    anchors: dict[str, int] = {}
    step_ep, step_anchor, step_ret = [], [], []
    for i, tr in enumerate(trajs):
        step_ret += groups.discounted_returns([s.reward for s in tr.steps], cfg.gigpo_gamma)
        step_ep += [i] * len(tr.steps)
        step_anchor += [anchors.setdefault(s.anchor, len(anchors)) for s in tr.steps]
    adv = groups.gigpo_advantages(returns, group, torch.tensor(step_ep, dtype=torch.long),
                                  torch.tensor(step_anchor, dtype=torch.long), torch.tensor(step_ret),
                                  cfg.gigpo_step_weight, cfg.adv_scale_std, cfg.adv_eps).tolist()
    out, k = [], 0
    for tr in trajs:
        out.append(adv[k:k + len(tr.steps)])
        k += len(tr.steps)
    return out


def _mean(xs) -> float:
    xs = list(xs)
    return float(sum(xs)) / len(xs) if xs else 0.0


def _z_star_success(z_star: dict, flat_bp: list, success: list[bool]) -> float:
    by_id = {id(z): s for z, s in zip(flat_bp, success)}
    return _mean([by_id[id(z)] for z in z_star.values()])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m himac.coevolve", description=__doc__.split("\n\n")[0])
    ap.add_argument("config", nargs="?", help="flat YAML config (not needed with --resume)")
    ap.add_argument("--out", help="run directory (default: runs/<config name>-<time>)")
    ap.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set lr=1e-4 (repeatable)")
    ap.add_argument("--keys", metavar="ENV", nargs="?", const="sokoban",
                    help="print every config key for ENV (default sokoban) with its default and meaning, then exit")
    args = ap.parse_args(argv)
    if args.keys:
        try:
            print(C.describe(sections(args.keys)))
        except C.ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        overrides = C.parse_overrides(args.overrides)
        if args.resume:
            run = RunDir(args.resume)
            if not run.has_checkpoint():
                raise C.ConfigError(f"--resume {args.resume}: no checkpoint there (expected checkpoint/trainer.pt)")
            cfg = load_config(args.config, overrides, base=run.read_config())
        else:
            if not args.config:
                ap.error("a config file is required (or --resume DIR)")
            cfg = load_config(args.config, overrides)
            out = args.out or f"runs/{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
            run = RunDir(out)
            if run.has_checkpoint():
                raise C.ConfigError(f"--out {out} already holds a checkpoint; use --resume {out} or another --out")
    except C.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run.write_config(cfg.flat())
    trainer = Trainer(cfg, run, resume=bool(args.resume))
    if args.resume:
        run.drop_metrics_after(trainer.start - 1)
    run.write_run_info(cfg.run.seed, str(trainer.policy.device))
    print(f"himac: run directory {run.path}  (iterations {trainer.start}..{cfg.run.iterations - 1})", file=sys.stderr)
    try:
        history = trainer.train()
    finally:
        trainer.close()
    if history:
        last = history[-1]
        print(f"himac: done. last iteration success_rate={last['success_rate']:.3f} "
              f"return={last['macro/return_mean']:.3f}; metrics in {run.path / 'metrics.jsonl'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
