"""The environment contract every himac environment follows.

An environment is three parts (after verl-agent): a stateful env with
`reset(seed)` / `step(action)`, a pure `parse_action(text) -> (action, valid)`
that projects model text onto the action space, and prompt templates kept as
constants. An `EnvSpec` bundles them and is registered by exact name in
`envs.REGISTRY`.

`step(None)` means "the model's text was not a valid action": the env spends a
step on it (so a model that never answers validly still runs out of budget) and
leaves the state unchanged.

Env-specific facts about an episode travel as plain dicts that nothing above this
layer interprets: `env.episode_info` at reset (Sokoban's optimal move count, an
ALFWorld game's file), which the pools hand up as `pool.infos`, and `info["episode"]`
in a step's info (facts known only as it ends, e.g. a score). Evaluation copies both
into each episode record; `EnvSpec.report` turns a list of records into the env's own
summary numbers (also reported for training episodes, as `env/<name>`).

`ConfigError`, `check`, `Range` and `validate` live here, at the bottom, because the
env config dataclasses use them as himac's own configs do (himac.config re-exports
them). A config field's bounds and choices are its type: `Annotated[int, Range(ge=1)]`,
`Literal["text", "image"]`; `validate(self)` in `__post_init__` checks them all,
naming the key. This package imports nothing of himac.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type, or an invalid value."""


def check(ok: bool, key: str, value: Any, why: str) -> None:
    """Raise ConfigError for `key` unless `ok`; used by the config dataclasses' __post_init__."""
    if not ok:
        raise ConfigError(f"config key '{key}' = {value!r}: {why}")


@dataclass(frozen=True)
class Range:
    """A number field's bounds, given as its type: `lr: Annotated[float, Range(gt=0)] = 1e-5`."""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def why(self, value: float) -> str | None:
        """What `value` breaks ('must be >= 1', 'must be in (0, 1)'), or None inside the bounds (NaN never is)."""
        if ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt)):
            return None
        lo = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else ""
        hi = f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else ""
        if lo and hi:
            return f"must be in {lo}, {hi}"
        if lo:
            return f"must be {'>=' if lo[0] == '[' else '>'} {lo[1:]}"
        return f"must be {'<=' if hi[-1] == ']' else '<'} {hi[:-1]}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def validate(obj: Any) -> None:
    """Check every field of config dataclass `obj`: a number is finite and within the bounds (Range) its type
    names, a choice among its Literal's (also a list's items); ConfigError names the first key that breaks them. Each config's
    __post_init__ calls it."""
    hints = typing.get_type_hints(type(obj), include_extras=True)
    for f in dataclasses.fields(obj):
        value, hint = getattr(obj, f.name), hints[f.name]
        check(not isinstance(value, float) or math.isfinite(value), f.name, value, "must be a finite number")
        rules = getattr(hint, "__metadata__", ())
        for rule in rules:
            if isinstance(rule, Range) and value is not None:
                why = rule.why(value)
                check(why is None, f.name, value, why or "")
        base = typing.get_args(hint)[0] if rules else hint
        items = value if typing.get_origin(base) is list else [value]
        if typing.get_origin(base) is list:
            base = typing.get_args(base)[0]
        if typing.get_origin(base) is typing.Literal:
            choices = typing.get_args(base)
            bad = [v for v in items if v not in choices]
            check(not bad, f.name, value, f"{bad[0]!r} is not one of " + ", ".join(map(repr, choices)) if bad else "")


@dataclass
class Obs:
    text: str  # the full observation the policy reads (map, room description, page)
    feedback: str = ""  # one line on what the last step did, for the executor's history
    image: np.ndarray | None = None  # (H, W, 3) uint8 for visual observations
    admissible: list[str] | None = None  # valid commands, for envs that enumerate them


class Env(Protocol):
    task: str  # natural-language instruction x for the current episode
    task_type: str  # category for per-type reporting ("sokoban", "pick", "clean", ...)
    episode_info: dict  # env-specific facts of the current episode, e.g. {"optimal_moves": 3}

    def reset(self, seed: int) -> Obs: ...

    def step(self, action: Any | None) -> tuple[Obs, float, bool, dict]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Prompts:
    """Templates; the executor/planner fill the {fields} named in each docstring line.

    planner_system, planner_user: {task} {observation} {max_subgoals}
    executor_system, executor_user: {task} {subgoal} {index} {count} {history} {observation} {sub_done_rule}
    flat_system, flat_user: {task} {history} {observation}

    A *_prefix is prefilled at the start of the assistant's answer (it is prompt,
    not trained); the parser reads prefix + completion. Small models need it:
    SmolLM2-135M writes a parseable numbered plan after "1." and names a
    direction after "Direction:", and mostly does neither without them.
    """
    planner_system: str
    planner_user: str
    executor_system: str
    executor_user: str
    flat_system: str = ""
    flat_user: str = ""
    planner_prefix: str = ""
    executor_prefix: str = ""
    flat_prefix: str = ""
    blueprint_choices: tuple = ()
    """The blueprints the planner may pick among with `blueprint_choices: true` (each a tuple of sub-goal
    sentences); () where the env has none and the planner can only write free text."""


@dataclass(frozen=True)
class EnvSpec:
    name: str
    config: type  # dataclass of the env's own flat config keys
    make: Callable[[Any], Env]  # config instance -> env
    parse_action: Callable[[str], tuple[Any, bool]]
    prompts: Prompts
    task_types: tuple[str, ...] = field(default=())
    make_pool: Callable[[Any, Any, bool], Any] | None = None
    """(spec, config, evaluation) -> env pool; None: a SerialPool. `evaluation` is True for
    the held-out pool (an env with splits points it at its evaluation split)."""
    report: Callable[[list[dict]], dict] | None = None
    """Episode records (each holding its `episode_info` keys) -> env-specific summary numbers."""
    actions: tuple[str, ...] = ()
    """The action set when it is small and fixed (Sokoban's directions), for per-action metrics."""
    rule: Callable[[Any], Any] | None = None
    """A one-line hand-written policy that reads the state (env -> action), e.g. Sokoban's "step toward the
    box": what the simplest use of the observation achieves, drawn beside learning curves."""
    solution: Callable[[Any, int], list] | None = None
    """(config, seed) -> actions that solve that episode (Sokoban's BFS), for diagnostics: the oracle plans of
    tools/probe_plans.py. None where the env has no solver."""
    subgoal_check: Callable[[str, dict], bool] | None = None
    """(active sub-goal, a step's info) -> whether that step did what the sub-goal says, for the executor's
    `subgoal_reward`. None where the env cannot tell (free-text sub-goals it has no reading of)."""

    def pool(self, cfg: Any, evaluation: bool = False):
        """The env pool for `cfg`: SerialPool unless the env brings its own (e.g. worker processes)."""
        if self.make_pool is None:
            return SerialPool(self, cfg)
        return self.make_pool(self, cfg, evaluation)


class SerialPool:
    """A batch of env slots stepped in this process, one after another.

    Right for envs whose step takes microseconds (Sokoban). An exception raised by
    an env during reset or step is contained: that slot's episode ends as a
    failure with info["error"] set, and the batch goes on.
    """

    def __init__(self, spec: EnvSpec, cfg: Any):
        self.spec, self.cfg = spec, cfg
        self.envs: list[Env] = []
        self.tasks: list[str] = []
        self.task_types: list[str] = []
        self.infos: list[dict] = []

    def reset(self, seeds: list[int]) -> list[Obs]:
        """Fresh envs, one per seed. A slot whose env fails to load is listed in `failed`."""
        self.close()
        self.envs, self.tasks, self.task_types, self.infos, out = [], [], [], [], []
        self.failed: dict[int, str] = {}
        for slot, seed in enumerate(seeds):
            try:
                env = self.spec.make(self.cfg)
                obs = env.reset(seed)
            except Exception as e:  # noqa: BLE001
                env, obs = _FailedEnv(e), error_result(e)[0]
                self.failed[slot] = f"{type(e).__name__}: {e}"
            self.envs.append(env)
            self.tasks.append(env.task)
            self.task_types.append(env.task_type)
            self.infos.append(dict(getattr(env, "episode_info", {})))
            out.append(obs)
        return out

    def step(self, slots: list[int], actions: list[Any]) -> list[tuple[Obs, float, bool, dict]]:
        out = []
        for slot, action in zip(slots, actions):
            try:
                out.append(self.envs[slot].step(action))
            except Exception as e:  # noqa: BLE001 - containment is the point
                out.append(error_result(e))
        return out

    def env(self, slot: int) -> Env:
        return self.envs[slot]

    def close(self) -> None:
        for env in self.envs:
            env.close()
        self.envs = []


def error_result(e: BaseException) -> tuple[Obs, float, bool, dict]:
    msg = f"{type(e).__name__}: {e}"
    return Obs(text=f"[environment error] {msg}", feedback="The environment failed."), 0.0, True, \
        {"success": False, "error": msg}


class _FailedEnv:
    """Stands in for an env that could not be created or reset."""
    task, task_type = "", "error"
    episode_info: dict = {}

    def __init__(self, error: BaseException):
        self.error = error

    def step(self, action):
        raise RuntimeError(f"this env failed to load: {self.error}")

    def close(self) -> None:
        pass


def absent(module: str) -> bool:
    """True when `module` cannot be imported here (not installed, or its imports blocked), without importing it:
    the optional envs check their extras with it before anything fails for want of them."""
    try:
        return importlib.util.find_spec(module) is None
    except ValueError:  # sys.modules[module] is None: imports of it are blocked
        return True
