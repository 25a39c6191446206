"""The micro policy (executor): pi_micro(a_t | o_<=t, z_phi(t)) of Eq. 1, paper §3.2.

One generation per env step, batched across every live episode. The executor's
context holds the task, the active sub-goal g_k and only the observations of the
current sub-goal segment (the last `history_window` steps of it, plus the current
observation): the "temporal attention mask" of §3.2. Earlier segments and the
rest of the blueprint are not shown.

A turn's answer is either an env action (projected by the env's `parse_action`)
or `<sub_done>`, which advances k <- k + 1 without touching the env. An episode
ends when:
- the env reports success ("solved") or its step budget runs out ("max_steps");
- `<sub_done>` is given for the last sub-goal while the task is unsolved
  ("plan_exhausted"): penalised with `halt_penalty`, since ending early must not
  beat playing on and failing;
- T_limit (`subgoal_step_limit`) env steps pass in one segment without
  `<sub_done>`: halted with `halt_penalty` ("subgoal_step_limit"), as the paper does.
  With `subgoal_overrun: advance` (a departure) the segment ends instead and the
  next sub-goal starts; only an overrun of the last sub-goal halts. A small executor
  that has not learnt `<sub_done>` then still reaches its later sub-goals;
- a failure keyword appears in the answer or the observation: halted with
  `halt_penalty` ("failure_keyword");
- the env raised ("env_error").
With `sub_done: false` (the paper's "w/o <sub_done>" ablation) the executor is
not told about `<sub_done>`; each sub-goal gets exactly T_limit steps, then the
next one starts.

`flat=True` runs the "w/o hierarchy" agent with the same machinery: no
blueprint, the env's flat prompt with the task and the last `history_window`
steps of the whole episode, no `<sub_done>` and no T_limit (only the env's own
step budget ends it).

Same function names, in the same order, as planner.py.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Literal

from envs.base import Obs, Prompts, Range, validate
from himac import choices, vision
from himac.policy import Policy, as_role
from himac.update import ACTION, Row

SUB_DONE = "<sub_done>"
INVALID = "(invalid)"
SUB_DONE_RULE = f" If the sub-goal is already achieved, answer {SUB_DONE}."
INVALID_PENALTY = -0.1  # added, on top of the env's own step cost, for an answer that is no action at all


@dataclass
class ExecutorConfig:
    rollouts_per_blueprint: Annotated[int, Range(ge=1)] = 8
    """(paper) M: trajectories sampled under z* per task in Phase B (paper: 8)."""
    subgoal_step_limit: Annotated[int, Range(ge=1)] = 5
    """(paper) T_limit: env steps allowed in one sub-goal segment."""
    action_max_tokens: Annotated[int, Range(ge=1)] = 16
    """(paper) Generation budget of one executor turn (the paper's response length: 512); it also stops at a
    newline."""
    executor_temperature: Annotated[float, Range(gt=0)] = 1.0
    """(paper) Sampling temperature of Phase B rollouts (Phase A's rollouts are greedy by design)."""
    failure_keywords: list[str] = field(default_factory=list)
    """(paper) Case-insensitive strings that halt the episode when the answer or observation has one."""
    halt_penalty: float = -1.0
    """(paper) Added to the return when T_limit or a failure keyword halts the episode, or <sub_done> on the
    last sub-goal ends it unsolved (ending early must not beat playing on and failing); also the return of an
    unparseable blueprint, which is not executed."""
    history_window: Annotated[int, Range(ge=0)] = 4
    """(paper) Most recent steps of the current segment shown to the executor."""
    max_prompt_tokens: Annotated[int, Range(ge=0)] = 0
    """(paper) Prompt budget (paper: 1024 for Sokoban); the oldest segment steps are dropped to fit, then the
    active sub-goal's text is cut. 0: none."""
    sub_done: bool = True
    """(paper) False: the 'w/o <sub_done>' ablation, a fixed T_limit steps per sub-goal."""
    subgoal_reward: float = 0.0
    """(departure) Added to a step that did what the active sub-goal says, as the env judges it
    (EnvSpec.subgoal_check; Sokoban: the player moved the way the sub-goal names). 0: none, the paper (the
    executor earns the task's reward only). Classic hierarchical RL's intrinsic reward: an executor paid for
    following its sub-goal follows even a plan it cannot yet see is right, so the planner's blueprints decide
    the outcome and Phase A's scores tell good plans from bad ones."""
    subgoal_overrun: Literal["halt", "advance"] = "halt"
    """(departure) A segment that reaches T_limit without <sub_done>: 'halt' the episode with halt_penalty (the
    paper), or 'advance' to the next sub-goal (halting only when the last one runs over)."""
    action_choices: bool = False
    """(departure) True: each answer is decoded under a constraint to one of the turn's candidates, the env's
    actions (Obs.admissible) and <sub_done>, and trained under the same restriction (himac/choices.py). False:
    free text parsed by the env, as in the paper."""

    def __post_init__(self):
        validate(self)


@dataclass
class Step:
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    action: Any  # parsed env action, or None
    valid: bool
    sub_done: bool
    subgoal: int  # k, the active sub-goal index when this answer was given
    reward: float = 0.0
    anchor: str = ""  # the observation the answer was given in (GiGPO's anchor state)
    images: Any = None  # vision.Pixels of the frame shown (visual observations), else None
    allowed: list[list[int]] | None = None  # the token ids choosable at each completion position (action_choices)

    @property
    def move(self) -> str:
        """What the answer did, for action histograms: the action, SUB_DONE, or INVALID."""
        return SUB_DONE if self.sub_done else str(self.action) if self.valid else INVALID


@dataclass
class Trajectory:
    task: int  # index of the task in the iteration's batch
    seed: int
    subgoals: list[str]
    temperature: float
    steps: list[Step] = field(default_factory=list)
    ret: float = 0.0
    success: bool = False
    end: str = ""  # why the episode ended (see module docstring)
    subgoals_done: int = 0
    followed: int = 0  # steps that did what their sub-goal says (counted where the env can tell)
    env_steps: int = 0
    invalid: int = 0
    error: str = ""
    episode: dict = field(default_factory=dict)  # env facts about the episode (a step's info["episode"])


def build_messages(prompts: Prompts, task: str, subgoals: list[str], k: int,
                   history: list[tuple[str, str]], obs: Obs, sub_done: bool = True) -> list[dict]:
    """Context of one executor turn: task, active sub-goal g_k, this segment's steps, current obs."""
    lines = "".join(f"- {a}: {fb}\n" for a, fb in history)
    fields = {"task": task, "subgoal": subgoals[k], "index": k + 1, "count": len(subgoals),
              "history": f"Steps so far in this sub-goal:\n{lines}" if history else "",
              "observation": obs.text, "sub_done_rule": SUB_DONE_RULE if sub_done else ""}
    return [{"role": "system", "content": prompts.executor_system.format(**fields)},
            {"role": "user", "content": prompts.executor_user.format(**fields)}]


def build_flat_messages(prompts: Prompts, task: str, history: list[tuple[str, str]], obs: Obs) -> list[dict]:
    """Context of one flat-agent turn ("w/o hierarchy"): task, recent steps, current obs."""
    lines = "".join(f"- {a}: {fb}\n" for a, fb in history)
    fields = {"task": task, "history": f"Recent steps:\n{lines}" if history else "", "observation": obs.text}
    return [{"role": "system", "content": prompts.flat_system.format(**fields)},
            {"role": "user", "content": prompts.flat_user.format(**fields)}]


def parse_output(text: str, parse_action: Callable[[str], tuple[Any, bool]],
                 sub_done: bool = True) -> tuple[Any, bool, bool]:
    """Answer -> (action, is_sub_done, valid). `<sub_done>` wins over any action words."""
    if sub_done and SUB_DONE in text:
        return None, True, True
    action, valid = parse_action(text)
    return action, False, valid


@dataclass
class _Live:
    traj: Trajectory
    slot: int
    obs: Obs
    k: int = 0
    segment_steps: int = 0
    history: list[tuple[str, str]] = field(default_factory=list)


def generate(policy: Policy, prompts: Prompts, parse_action, pool, seeds: list[int],
             blueprints: list[tuple[int, list[str]]], cfg: ExecutorConfig, greedy: bool,
             timings: dict | None = None, flat: bool = False,
             subgoal_check: Callable[[str, dict], bool] | None = None) -> list[Trajectory]:
    """Roll out one episode per (seed, blueprint), all in lockstep, one batched generation a turn.

    `blueprints[i]` is (task index, sub-goals) of episode i; `pool` is an env pool
    (envs.base.SerialPool or a parallel one) that gets one slot per episode.
    `flat`: the hierarchy-free agent (sub-goals ignored, see the module docstring).
    `subgoal_check`: the env's EnvSpec.subgoal_check, needed when cfg.subgoal_reward is set.
    """
    if cfg.subgoal_reward and not flat and subgoal_check is None:
        raise ValueError(f"subgoal_reward: {cfg.subgoal_reward} needs an env that can tell whether a step did "
                         f"what its sub-goal says (EnvSpec.subgoal_check); this one cannot, so set it to 0")
    if flat and not prompts.flat_user:
        raise ValueError("this env has no flat prompt (Prompts.flat_user), so hierarchy: false cannot run on it")
    temp = 0.0 if greedy else cfg.executor_temperature
    timings = timings if timings is not None else {}
    t0 = time.perf_counter()
    first = pool.reset(seeds)
    _add(timings, "env_s", time.perf_counter() - t0)
    ordered = [Trajectory(task, seed, list(subgoals), temp) for (task, subgoals), seed in zip(blueprints, seeds)]
    failed = getattr(pool, "failed", {})
    for slot, msg in failed.items():
        ordered[slot].end, ordered[slot].error = "env_error", msg
    live = [_Live(t, slot, obs) for slot, (t, obs) in enumerate(zip(ordered, first)) if slot not in failed]

    while live:
        t0 = time.perf_counter()
        encoded = [_prompt(policy, prompts, pool.tasks[x.slot], x, cfg, flat) for x in live]
        prompt_ids, pixels = [ids for ids, _ in encoded], [px for _, px in encoded]
        cands = [_choices(policy, x.obs, cfg, flat) for x in live] if cfg.action_choices else None
        budget = max([cfg.action_max_tokens] + [len(c) + 1 for cs in cands or [] for c in cs])  # a whole choice
        with as_role(policy, "executor"):
            outs = policy.generate(prompt_ids, budget, temp, stop_at_newline=True, **vision.image_kwargs(pixels),
                                   **({"choices": cands} if cands else {}))
        _add(timings, "generate_s", time.perf_counter() - t0)
        _add(timings, "generated_tokens", sum(len(o.ids) for o in outs))
        to_step: list[tuple[_Live, Step]] = []
        for i, (x, ids, px, out) in enumerate(zip(live, prompt_ids, pixels, outs)):
            text = (prompts.flat_prefix if flat else prompts.executor_prefix) + out.text
            action, done_flag, valid = parse_output(text, parse_action, cfg.sub_done and not flat)
            step = Step(ids, out.ids, text, action, valid, done_flag, x.k, anchor=vision.state_key(x.obs),
                        images=px, allowed=choices.path(cands[i], out.ids, policy.eos_ids) if cands else None)
            x.traj.steps.append(step)
            if done_flag:  # <sub_done>: next sub-goal, no env step
                x.traj.subgoals_done += 1
                x.k, x.segment_steps, x.history = x.k + 1, 0, []
                if x.k >= len(x.traj.subgoals):  # the plan is done but the task is not
                    x.traj.end = "plan_exhausted"
                    x.traj.ret += cfg.halt_penalty
                    step.reward += cfg.halt_penalty
            else:
                to_step.append((x, step))
        t0 = time.perf_counter()
        results = pool.step([x.slot for x, _ in to_step], [s.action if s.valid else None for _, s in to_step])
        _add(timings, "env_s", time.perf_counter() - t0)
        for (x, step), (obs, reward, env_done, info) in zip(to_step, results):
            if subgoal_check and not flat and subgoal_check(x.traj.subgoals[x.k], info):
                x.traj.followed += 1
                reward += cfg.subgoal_reward
            _apply(x, step, obs, reward, env_done, info, cfg, flat)
        live = [x for x in live if not x.traj.end]
    return ordered


def _choices(policy: Policy, obs: Obs, cfg: ExecutorConfig, flat: bool) -> list[list[int]]:
    """This turn's candidate answers (action_choices), as token ids: each action after a space (it follows the
    prefilled prefix, "Direction:"), then " <sub_done>" where the executor may say it."""
    actions = obs.admissible
    if not actions:
        raise ValueError("action_choices: true needs an env that lists the actions open at each step "
                         "(Obs.admissible); this one lists none")
    free = [a for a in actions if re.search(r"<[^<>]+>", a)]
    if free:  # WebShop's search[<your query>]: a slot for free text is no choice
        raise ValueError(f"action_choices: true cannot pick {free[0]!r}: the action holds free text; "
                         f"use action_choices: false with this env")
    texts = [f" {a}" for a in actions] + ([f" {SUB_DONE}"] if cfg.sub_done and not flat else [])
    return choices.encode(policy.tokenize, texts)


def _prompt(policy: Policy, prompts: Prompts, task: str, x: _Live, cfg: ExecutorConfig,
            flat: bool = False) -> tuple[list[int], vision.Pixels | None]:
    """This turn's prompt ids (and the current frame's pixels, if the obs has an image). Over
    max_prompt_tokens, the oldest steps of the segment go first; then the active sub-goal's text is
    cut from its end (a blueprint line can be as long as blueprint_max_tokens, and a sampled one
    that never breaks its line is one sub-goal of all of them)."""
    history = x.history[-cfg.history_window:] if cfg.history_window else []
    frames = vision.frames(x.obs)  # the executor sees the current frame
    subgoals = list(x.traj.subgoals)
    while True:
        if flat:
            ids, px = policy.encode_images(build_flat_messages(prompts, task, history, x.obs), prompts.flat_prefix,
                                           frames)
        else:
            ids, px = policy.encode_images(
                build_messages(prompts, task, subgoals, x.k, history, x.obs, cfg.sub_done),
                prompts.executor_prefix, frames)
        excess = len(ids) - cfg.max_prompt_tokens
        if not cfg.max_prompt_tokens or excess <= 0:
            return ids, px
        if history:
            history = history[1:]
            continue
        goal = [] if flat else policy.tokenizer.encode(subgoals[x.k], add_special_tokens=False)
        if len(goal) <= 1:  # nothing left to cut: the rest of the prompt alone is over the budget
            return ids, px
        subgoals[x.k] = policy.tokenizer.decode(goal[:max(len(goal) - excess, 1)])


def _apply(x: _Live, step: Step, obs: Obs, reward: float, env_done: bool, info: dict, cfg: ExecutorConfig,
           flat: bool = False) -> None:
    """Book one env step into the episode and decide whether (and why) it ends."""
    t = x.traj
    if not step.valid:
        t.invalid += 1
        reward += INVALID_PENALTY
    elif info.get("invalid"):  # well-formed but refused by the env (ALFWorld: not admissible now); the env priced it
        t.invalid += 1
    step.reward = reward
    t.episode.update(info.get("episode") or {})  # e.g. WebShop's score of the bought item
    t.ret += reward
    t.env_steps += 1
    x.segment_steps += 1
    shown = step.action if step.valid else f"(invalid) {step.text.strip()[:40]!r}"
    x.history.append((str(shown), obs.feedback or obs.text))
    x.obs = obs
    said = (step.text + "\n" + obs.text + "\n" + obs.feedback).lower()
    if info.get("error"):
        t.end, t.error = "env_error", info["error"]
    elif info.get("success"):
        t.success, t.end = True, "solved"
    elif any(kw.lower() in said for kw in cfg.failure_keywords):
        t.end, t.ret, step.reward = "failure_keyword", t.ret + cfg.halt_penalty, step.reward + cfg.halt_penalty
    elif env_done:
        t.end = "max_steps"
    elif flat:  # no segments: only the env's budget ends a flat episode
        pass
    elif x.segment_steps >= cfg.subgoal_step_limit:
        last_segment = x.k + 1 >= len(t.subgoals)
        if cfg.sub_done and (cfg.subgoal_overrun == "halt" or last_segment):
            t.end, t.ret, step.reward = "subgoal_step_limit", t.ret + cfg.halt_penalty, step.reward + cfg.halt_penalty
        else:  # fixed budget, or an overrun that moves on: the next sub-goal, whatever the segment's state
            x.k, x.segment_steps, x.history = x.k + 1, 0, []
            if x.k >= len(t.subgoals):
                t.end = "plan_exhausted"


def _add(timings: dict, key: str, value: float) -> None:
    timings[key] = timings.get(key, 0.0) + value


def training_rows(trajectories: list[Trajectory], advantages: list[list[float]], sample_offset: int = 0) -> list[Row]:
    """One row per executor turn; only action tokens are trained (Phase B, line 14).

    `advantages[i][j]` is the advantage of step j of trajectory i (himac.estimators:
    every estimator gives one per step).
    """
    rows = []
    for i, (t, per_step) in enumerate(zip(trajectories, advantages)):
        if len(per_step) != len(t.steps):
            raise ValueError(f"trajectory {i} has {len(t.steps)} steps but {len(per_step)} advantages")
        rows += [Row(s.prompt_ids, s.completion_ids, ACTION, sample_offset + i, float(adv), t.temperature, s.images,
                     s.allowed) for s, adv in zip(t.steps, per_step)]
    return rows
