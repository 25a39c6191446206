"""The macro policy (planner): pi_macro(z | x) of Eq. 1, paper §3.2.

Given the task instruction x and the first observation, the shared model writes a
blueprint z = (g_1, ..., g_K): a numbered list of natural-language sub-goals.
Phase A (Algorithm 1, line 4) samples G blueprints per task; each is scored by
a greedy executor rollout (coevolve.py) and trained on its own tokens only.

A blueprint with no numbered line is unparseable: it is kept as a sample (its
tokens still get the macro gradient, with the low return it earned) but is not
executed; its return is the executor's `halt_penalty`, as if it had halted at once. More than K numbered lines are
cut to the first K (`max_subgoals`).

Same function names, in the same order, as executor.py.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated

from envs.base import Obs, Prompts, Range, validate
from himac import choices, vision
from himac.policy import Policy, as_role
from himac.update import BLUEPRINT, Row

# On a stripped line: "3. text", "3) text", "Step 3: text". Linear time: no pattern here can
# backtrack over a whitespace run (the old `\s*(.+?)\s*$` took 20 s on a 1 MB line).
SUBGOAL_LINE = re.compile(r"(?:step\s?)?(\d+)\s?[.):](.*)", re.IGNORECASE | re.DOTALL)
WORD = re.compile(r"[^\W\d_]")  # a sub-goal says something: at least one letter


@dataclass
class PlannerConfig:
    group_size: Annotated[int, Range(ge=1)] = 8
    """(paper) G: blueprints sampled per task in Phase A (paper: 8)."""
    max_subgoals: Annotated[int, Range(ge=1)] = 4
    """(paper) K: the most sub-goals a blueprint may hold; extra lines are dropped."""
    blueprint_max_tokens: Annotated[int, Range(ge=1)] = 128
    """(paper) Generation budget of one blueprint (the paper's response length: 512)."""
    planner_temperature: Annotated[float, Range(gt=0)] = 1.0
    """(paper) Sampling temperature of blueprints (> 0: the group needs diversity)."""
    blueprint_choices: bool = False
    """(departure) True: the planner picks its blueprint among the env's candidate plans
    (Prompts.blueprint_choices), decoded under the same prefix constraint as `action_choices`
    (himac/choices.py): natural-language sub-goals still, but only ones the env lists. False: free text,
    as in the paper."""

    def __post_init__(self):
        validate(self)


@dataclass
class Blueprint:
    task: int  # index of the task in the iteration's batch
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    subgoals: list[str]
    valid: bool
    temperature: float
    images: vision.Pixels | None = None  # the first frame, for visual observations
    allowed: list[list[int]] | None = None  # the token ids choosable at each completion position (blueprint_choices)


def build_messages(prompts: Prompts, task: str, obs: Obs, max_subgoals: int) -> list[dict]:
    fields = {"task": task, "observation": obs.text, "max_subgoals": max_subgoals}
    return [{"role": "system", "content": prompts.planner_system.format(**fields)},
            {"role": "user", "content": prompts.planner_user.format(**fields)}]


def parse_output(text: str, max_subgoals: int) -> tuple[list[str], bool]:
    """Blueprint text -> (sub-goals, valid). Numbered lines ("1. ...", "2) ...", "Step 3: ...") whose text
    holds a letter: "1.1.1.1" and whitespace are not sub-goals."""
    subgoals = []
    for line in text.splitlines():
        m = SUBGOAL_LINE.match(line.replace("**", "").strip())
        body = m.group(2).strip() if m else ""
        if body and WORD.search(body):
            subgoals.append(body)
            if len(subgoals) == max_subgoals:
                break
    return subgoals, bool(subgoals)


def generate(policy: Policy, prompts: Prompts, tasks: list[str], first_obs: list[Obs],
             cfg: PlannerConfig, n: int, temperature: float | None = None) -> list[list[Blueprint]]:
    """Sample n blueprints for each task: returns (B, n) nested lists. temperature 0 = greedy."""
    temp = cfg.planner_temperature if temperature is None else temperature
    encoded = [policy.encode_images(build_messages(prompts, t, o, cfg.max_subgoals), prompts.planner_prefix,
                                    vision.frames(o)) for t, o in zip(tasks, first_obs)]  # the planner sees frame 0
    flat = [ids for ids, _ in encoded for _ in range(n)]  # (B * n,)
    pixels = [px for _, px in encoded for _ in range(n)]  # (B * n,)
    cands = _choices(policy, prompts, cfg) if cfg.blueprint_choices else None
    budget = max([cfg.blueprint_max_tokens] + [len(c) + 1 for c in cands or []])  # room for a whole choice
    with as_role(policy, "planner"):
        outs = policy.generate(flat, budget, temp, **vision.image_kwargs(pixels),
                               **({"choices": [cands] * len(flat)} if cands else {}))
    groups: list[list[Blueprint]] = [[] for _ in tasks]
    for i, out in enumerate(outs):
        text = prompts.planner_prefix + out.text  # the prefilled "1." is part of the blueprint text
        subgoals, valid = parse_output(text, cfg.max_subgoals)
        allowed = choices.path(cands, out.ids, policy.eos_ids) if cands else None
        groups[i // n].append(Blueprint(i // n, flat[i], out.ids, text, subgoals, valid, temp, pixels[i], allowed))
    return groups


def _choices(policy: Policy, prompts: Prompts, cfg: PlannerConfig) -> list[list[int]]:
    """The candidate blueprints (blueprint_choices) as token ids: each written as the planner writes a plan,
    numbered lines after the prefilled prefix ("1."); plans of more than max_subgoals sub-goals are left out."""
    if not prompts.blueprint_choices:
        raise ValueError("blueprint_choices: true needs an env that lists candidate blueprints "
                         "(Prompts.blueprint_choices); this one lists none")
    plans = [p for p in prompts.blueprint_choices if len(p) <= cfg.max_subgoals]
    if not plans:
        raise ValueError(f"blueprint_choices: every candidate blueprint holds more than max_subgoals="
                         f"{cfg.max_subgoals} sub-goals")
    texts = []
    for plan in plans:
        text = "\n".join(f"{i + 1}. {g}" for i, g in enumerate(plan))
        if not text.startswith(prompts.planner_prefix):
            raise ValueError(f"blueprint_choices: a candidate ({text!r}) does not start with the planner's "
                             f"prefix {prompts.planner_prefix!r}")
        texts.append(" " + text[len(prompts.planner_prefix):].lstrip())
    return choices.encode(policy.tokenize, texts)


def training_rows(blueprints: list[Blueprint], advantages: list[float], sample_offset: int = 0) -> list[Row]:
    """One row per blueprint; only blueprint tokens are trained (Phase A, line 9)."""
    return [Row(b.prompt_ids, b.completion_ids, BLUEPRINT, sample_offset + i, float(a), b.temperature, b.images,
                b.allowed)
            for i, (b, a) in enumerate(zip(blueprints, advantages))]
