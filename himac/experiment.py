"""One experiment: its config, its variants, and the advantages its groups get.

- `Config` gathers one dataclass per component (run, model, planner, executor,
  update, env) from a flat YAML file plus `--set` overrides (himac.config does the
  routing and checking); `load_config` is the only way the entry points build one.
- `VARIANTS` names the paper's §4.3 ablations and the flat baselines, each a set of
  config overrides on top of any experiment: one switch each.
- `advantages` scores a phase's groups with the estimator the config names, through
  the registry in himac.estimators; the loop calls it without knowing which one.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch

from envs import get_spec
from envs.seeds import task_seeds
from himac import config as C
from himac import estimators, executor, models, planner
from himac.config import Range
from himac.update import UpdateConfig


@dataclass
class RunConfig:
    env: str = "sokoban"
    """(infra) Environment name in envs.REGISTRY."""
    iterations: Annotated[int, Range(ge=0)] = 100
    """(paper) Co-evolution iterations T (each runs Phase A then Phase B)."""
    tasks_per_iteration: Annotated[int, Range(ge=1)] = 4
    """(departure) B: tasks per iteration, each its own macro group and micro group (Algorithm 1, line 2,
    samples one); more tasks a step, for throughput."""
    seed: Annotated[int, Range(ge=0)] = 0
    """(infra) Seeds the model's sampling and the training tasks; same seed, same tasks."""
    gen_batch_size: Annotated[int, Range(ge=1)] = 16
    """(infra) Prompts per generate() call."""
    save_every: Annotated[int, Range(ge=1)] = 1
    """(infra) Checkpoint every this many iterations (and always at the end)."""
    eval_episodes: Annotated[int, Range(ge=0)] = 0
    """(infra) Held-out episodes evaluated greedily before training, every eval_every, and at the end (0: off)."""
    eval_every: Annotated[int, Range(ge=0)] = 0
    """(infra) Evaluate every this many iterations (0: only before and after)."""
    eval_every_minutes: Annotated[float, Range(ge=0)] = 0.0
    """(infra) Also evaluate after the iteration that brings training time (evaluation excluded) past each
    multiple of this (0: off): variants that iterate at different speeds are then compared at equal time."""
    eval_at_start: bool = True
    """(infra) Evaluate before the first iteration (a benchmark evaluating many seeds of one untrained agent
    does it once)."""
    eval_offset: Annotated[int, Range(ge=0)] = 0
    """(infra) First seed of the held-out stream (envs.seeds.eval_seeds); envs.seeds.VALIDATION_OFFSET picks
    the validation range, kept apart from the rooms results are reported on."""
    sample_log: Annotated[int, Range(ge=0)] = 1
    """(infra) Tasks per iteration whose blueprints and trajectories go to samples.jsonl."""
    time_budget_s: Annotated[float, Range(ge=0)] = 0.0
    """(infra) Stop after the iteration that brings training time (evaluation excluded) past this (0: no
    limit)."""
    time_clock: Literal["wall", "cpu"] = "wall"
    """(infra) What 'training time' counts for time_budget_s and eval_every_minutes: 'wall' (wall-clock) or
    'cpu' (the trainer process's CPU seconds: on a shared machine, every run gets the same compute whatever
    else runs; on a quiet one with one thread per run it equals wall-clock)."""
    sampling: Literal["auto", "global", "keyed"] = "auto"
    """(infra) Where sampled tokens draw their randomness: 'global' (the process's torch stream, so a
    prompt's sample depends on the batch it was generated in), 'keyed' (each draw seeded by seed, iteration,
    the prompt, its occurrence and the token position: samples do not depend on batching or on the number of
    data-parallel ranks, and N torchrun ranks give what one process gives) or 'auto' (keyed with several
    ranks, else global)."""
    hierarchy: bool = True
    """(paper) False: the 'w/o hierarchy' ablation / flat baselines: no blueprint; M trajectories per task
    from the flat prompt, one update on their action tokens (with `advantage`: grpo, rloo, gigpo)."""
    coevolution: bool = True
    """(paper) False: the 'w/o co-evolution' ablation: Phase A and B both roll out with the iteration's
    starting policy and one optimiser step carries the blueprint and the action losses together."""
    macro_every: Annotated[int, Range(ge=1)] = 1
    """(departure) Phase A in full (G blueprints, each scored by a greedy rollout, the planner's update) on
    every this many iterations, from iteration 0; between them the planner writes one greedy blueprint per
    task, which is z*, unscored, and the planner is not updated. 1 = every iteration (Algorithm 1). Phase A
    costs about as much generation as Phase B, so k > 1 gives the executor more updates per second."""
    blueprint_choice: Literal["best", "random"] = "best"
    """(paper) Blueprint Phase B runs under: 'best' (z* = argmax return, Eq. 4) or 'random' (a seeded
    uniform pick among the task's valid blueprints: the 'random blueprint' ablation)."""
    report_to: list[Literal["jsonl", "tensorboard", "wandb"]] = field(default_factory=lambda: ["jsonl"])
    """(infra) Where metrics go: 'jsonl' (metrics.jsonl, always written), 'tensorboard' (RUN/tensorboard/,
    pip install 'himac[tensorboard]'), 'wandb' (Weights & Biases, pip install 'himac[wandb]'; project and
    mode from $WANDB_PROJECT, default himac, and $WANDB_MODE, default offline); e.g. [jsonl, tensorboard]."""

    def __post_init__(self):
        C.validate(self)

    def task_seeds(self, iteration: int) -> list[int]:
        """Env seeds of the iteration's B training tasks (Algorithm 1, line 2: x ~ D)."""
        return task_seeds(self.seed, iteration, self.tasks_per_iteration)


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
    """Config section name -> dataclass, for an experiment on env `env_name`."""
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
    cfg = Config(**C.route(flat, sections(env_name), str(path or "the run's config.yaml")))
    check_groups(cfg)
    return cfg


def config_arguments(ap) -> None:
    """A tool's `--config FILE` and repeatable `--set KEY=VALUE` (read back by config_from_args)."""
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def config_from_args(ap, args) -> Config:
    """The Config named by config_arguments' flags; a bad file or value exits through `ap.error`, naming it."""
    try:
        return load_config(args.config, C.parse_overrides(args.overrides))
    except C.ConfigError as e:
        ap.error(str(e))


def check_groups(cfg: Config) -> None:
    """A group of one has nothing to compare with: Eq. 2 gives it advantage 0 for ever."""
    C.check(cfg.executor.rollouts_per_blueprint >= 2, "rollouts_per_blueprint", cfg.executor.rollouts_per_blueprint,
            "must be >= 2: a group of one trajectory always has advantage 0, so the executor never learns")
    if cfg.model.role_adapters:
        C.check(cfg.run.hierarchy and cfg.run.coevolution, "role_adapters", True,
                "needs hierarchy and coevolution true: an adapter per role trains in the two phases of "
                "Algorithm 1 (the flat agent has one role; the joint step of no_coevolution one adapter)")
    if cfg.run.hierarchy:
        C.check(cfg.planner.group_size >= 2, "group_size", cfg.planner.group_size,
                "must be >= 2: a group of one blueprint always has advantage 0, so the planner never learns")


# -- variants: the §4.3 ablations and the flat baselines, one switch each -------------------
VARIANTS: dict[str, dict] = {
    "himac": {},  # the full method
    "flat_grpo": {"hierarchy": False},  # w/o hierarchy: one flat policy, GRPO over whole trajectories
    "flat_rloo": {"hierarchy": False, "advantage": "rloo"},  # the flat agent, RLOO's leave-one-out baseline
    "flat_gigpo": {"hierarchy": False, "advantage": "gigpo"},  # the flat agent, GiGPO's step groups
    "no_coevolution": {"coevolution": False},  # planner and executor losses in one update step
    "no_sub_done": {"sub_done": False},  # a fixed T_limit steps per sub-goal instead of <sub_done>
    "random_blueprint": {"blueprint_choice": "random"},  # Phase B under a random blueprint, not z*
}


# -- advantages ------------------------------------------------------------------------
def estimator_params(cfg: UpdateConfig) -> estimators.Params:
    return estimators.Params(eps=cfg.adv_eps, gamma=cfg.gigpo_gamma, std_floor=cfg.adv_std_floor)


def blueprint_advantages(returns: torch.Tensor, group: torch.Tensor, cfg: UpdateConfig) -> torch.Tensor:
    """(N,) advantages of N blueprints (one step each) in their task groups: Eq. 2 or the configured peer."""
    samples = estimators.Samples.one_step_each(returns, group)
    return estimators.ESTIMATORS[cfg.advantage](samples, estimator_params(cfg))


def trajectory_advantages(trajs: list[executor.Trajectory], cfg: UpdateConfig) -> list[list[float]]:
    """Per-step advantages of trajectories grouped by task: one list per trajectory, one float per step."""
    if not trajs:
        return []
    anchors: dict[str, int] = {}
    step_sample, step_anchor, step_reward = [], [], []
    for i, tr in enumerate(trajs):
        step_sample += [i] * len(tr.steps)
        step_anchor += [anchors.setdefault(s.anchor, len(anchors)) for s in tr.steps]
        step_reward += [s.reward for s in tr.steps]
    samples = estimators.Samples(
        returns=torch.tensor([tr.ret for tr in trajs]),  # (N,)
        group=torch.tensor([tr.task for tr in trajs]),  # (N,)
        step_sample=torch.tensor(step_sample, dtype=torch.long),  # (S,)
        step_anchor=torch.tensor(step_anchor, dtype=torch.long),  # (S,)
        step_reward=torch.tensor(step_reward, dtype=torch.float64))  # (S,)
    adv = estimators.ESTIMATORS[cfg.advantage](samples, estimator_params(cfg)).tolist()  # (S,)
    out, k = [], 0
    for tr in trajs:
        out.append(adv[k:k + len(tr.steps)])
        k += len(tr.steps)
    return out


def silent_groups(per_step: list[list[float]], group: list[int], tol: float = 1e-6) -> set[int]:
    """Groups in which every step of every sample has advantage 0 (to `tol`): nothing to compare.

    Under Eq. 2 that is a group whose returns are all equal (a group of one too); under
    GiGPO the step groups must be silent as well. DAPO's dynamic sampling drops such
    groups (`drop_zero_variance`); either way they are counted (`*/zero_var_groups`).
    """
    loud = {g for steps, g in zip(per_step, group) if any(abs(a) > tol for a in steps)}
    return set(group) - loud


def without_silent(per_step: list[list[float]], group: list[int]) -> tuple[list[list[float]], set[int]]:
    """Advantages with silent groups' set to exactly 0 (their float noise, e.g. 1e-11, is not signal),
    and the silent groups."""
    silent = silent_groups(per_step, group)
    return [[0.0] * len(steps) if g in silent else steps for steps, g in zip(per_step, group)], silent
