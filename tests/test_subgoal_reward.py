"""subgoal_reward: the executor is paid for a step that does what its sub-goal says (a departure, default 0).

Sokoban tells a push's direction; the executor pays the bonus on the step, counts the step as followed, and
Phase A scores blueprints without the pay (what the executor earns by obeying is not what the plan is worth).
The executors here are scripted (answer one fixed direction) or the random tiny test-only model."""
import dataclasses

import pytest

from envs.base import SerialPool
from envs.seeds import VALIDATION_OFFSET, eval_seeds
from envs.sokoban import ACTIONS, SPEC, SokobanConfig, moved_as_told, solution
from helpers import TextPolicy
from himac import executor
from himac.coevolve import Trainer
from himac.executor import ExecutorConfig
from himac.experiment import load_config
from himac.policy import Completion
from himac.rundir import RunDir

ROOMS = SokobanConfig(room_size=7, min_solution_moves=2, max_solution_moves=4, max_steps=4)


class Always(TextPolicy):
    """An AgentPolicy (real tokenizer) whose every answer is one direction."""

    def __init__(self, tokenizer, move):
        super().__init__(tokenizer)
        self.move = move

    def generate(self, prompts, max_new_tokens, temperature, stop_at_newline=False, **_):
        return [Completion(self.tokenize(f" {self.move}") + self.eos_ids, f" {self.move}") for _ in prompts]


def test_a_step_reports_which_way_it_moved_and_pushed():
    seed = eval_seeds(1, VALIDATION_OFFSET)[0]
    first = solution(ROOMS, seed)[0]  # rooms start with the player beside the box: the first move pushes
    env = SPEC.make(ROOMS)
    env.reset(seed)
    info = env.step(first)[3]
    assert info["pushed"] == info["moved"] == first
    back = {"up": "down", "down": "up", "left": "right", "right": "left"}[first]
    info = env.step(back)[3]
    assert info["pushed"] is None and info["moved"] == back  # stepping away moves no box
    seen = set()
    for s in eval_seeds(6, VALIDATION_OFFSET):
        for a in ACTIONS:  # "moved" is whether the player's cell changed: None into a wall
            env.reset(s)
            start = env.room_state.copy()
            moved = env.step(a)[3]["moved"]
            seen.add(moved is None)
            assert (moved == a) == (env.room_state != start).any() and moved in (a, None)
    assert seen == {True, False}
    assert moved_as_told("Push the box UP now.", {"moved": "up"})
    assert not moved_as_told("Push the box up.", {"moved": "left"})
    assert not moved_as_told("Push the box onto the target.", {"moved": "up"})
    assert not moved_as_told("Push the box up.", {"moved": None, "pushed": None})


def test_the_executor_is_paid_for_doing_what_its_sub_goal_says(tiny_tokenizer):
    seed = eval_seeds(1, VALIDATION_OFFSET)[0]
    move = solution(ROOMS, seed)[0]
    other = next(a for a in ACTIONS if a != move)
    cfg = ExecutorConfig(subgoal_reward=2.0, subgoal_step_limit=1, subgoal_overrun="advance")
    pool = SerialPool(SPEC, ROOMS)
    told, not_told = executor.generate(Always(tiny_tokenizer, move), SPEC.prompts, SPEC.parse_action, pool,
                                       [seed, seed], [(0, [f"Push the box {move}."]), (0, [f"Push the box {other}."])],
                                       cfg, greedy=True, subgoal_check=SPEC.subgoal_check)
    assert (told.followed, not_told.followed) == (1, 0)
    assert told.steps[0].reward - not_told.steps[0].reward == pytest.approx(2.0)
    assert told.ret - not_told.ret == pytest.approx(2.0)
    with pytest.raises(ValueError, match="subgoal_reward"):  # an env that cannot tell is refused, by name
        executor.generate(Always(tiny_tokenizer, move), SPEC.prompts, SPEC.parse_action, pool, [seed],
                          [(0, ["x"])], cfg, greedy=True)
    with pytest.raises(ValueError, match="subgoal_reward"):
        ExecutorConfig(subgoal_reward=float("nan"))


FAST = {"model": "tiny", "iterations": 1, "tasks_per_iteration": 2, "group_size": 2, "rollouts_per_blueprint": 2,
        "blueprint_max_tokens": 8, "action_max_tokens": 3, "max_steps": 3, "subgoal_step_limit": 2,
        "min_solution_moves": 1, "max_solution_moves": 3, "micro_batch_size": 8, "lora_r": 4,
        "blueprint_choices": True, "max_subgoals": 2, "action_choices": True, "subgoal_overrun": "advance"}


def _iteration(tmp_path, name, pay):
    trainer = Trainer(load_config(None, {**FAST, "subgoal_reward": pay}), RunDir(tmp_path / name))
    trainer.spec = dataclasses.replace(trainer.spec, subgoal_check=lambda goal, info: True)  # every step obeys
    metrics, _ = trainer.iteration(0)
    return metrics


def test_phase_a_scores_blueprints_without_the_executors_pay(tmp_path):
    free, paid = _iteration(tmp_path, "free", 0.0), _iteration(tmp_path, "paid", 50.0)
    assert paid["macro/return_mean"] == pytest.approx(free["macro/return_mean"])  # same seeds, same rollouts
    assert paid["micro/return_mean"] - free["micro/return_mean"] == pytest.approx(50.0 * free["micro/steps_mean"])
    assert paid["micro/subgoal_followed"] == free["micro/subgoal_followed"] == 1.0
