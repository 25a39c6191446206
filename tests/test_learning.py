"""The real co-evolution loop learns, with a tiny test-only model on a deliberately easy setting.

What the tiny model can and cannot learn, measured while writing this test:
- random init: it never writes a numbered plan or a direction word, so every
  return is the same penalty and every advantage is 0: nothing to learn from;
- after a short format-only SFT (helpers.warm_start_tiny: plans and uniformly
  random directions) it answers in format but ignores the map;
- a map-dependent policy over a pool of 4 one-push rooms (up/left/down/left)
  is out of its reach: even *supervised* LoRA training on the correct answers
  leaves all four greedy answers the same after 100 steps. LoRA on a random
  2-layer model cannot route single-character map differences to the answer.
So the easy setting is one fixed one-push room: the loop has to discover which
of the four directions it needs. Greedy success starts at 0 (the warm-started
greedy answer is "down"; the room needs "up") and must reach 1.
"""
import numpy as np
import pytest

from helpers import warm_start_tiny
from himac.coevolve import Trainer
from himac.experiment import load_config
from himac.rundir import RunDir

ROOM = int(np.random.SeedSequence([0, 10**9, 0]).generate_state(1)[0])  # the one room this test was written on


class OneRoom(Trainer):
    """The same training room every iteration (a task distribution of one): a test double for line 2's x ~ D."""

    def tasks(self, t):
        lo, seeds = super().tasks(t)
        return lo, [ROOM] * len(seeds)


EASY = {"tasks_per_iteration": 4, "group_size": 2, "rollouts_per_blueprint": 8,
        "max_subgoals": 1, "blueprint_max_tokens": 16, "action_max_tokens": 4,
        "max_steps": 1, "min_solution_moves": 1, "max_solution_moves": 1, "subgoal_step_limit": 1,
        "lr": 5e-3, "kl_beta": 0.01, "lora_r": 8, "micro_batch_size": 16, "iterations": 10}


@pytest.mark.slow
def test_coevolution_raises_greedy_success_on_an_easy_room(tmp_path):
    model_dir = warm_start_tiny(tmp_path / "warm")
    cfg = load_config(None, {**EASY, "model": model_dir})
    history = OneRoom(cfg, RunDir(tmp_path / "run")).train()
    success = [m["success_rate"] for m in history]
    assert success[0] <= 0.25, success  # the warm start does not already solve it
    assert sum(success[-3:]) / 3 >= 0.75, success
    assert all(m["macro/blueprint_valid_rate"] > 0.5 for m in history)
