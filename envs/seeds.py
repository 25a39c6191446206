"""The seed streams that pick episodes: training tasks and held-out evaluation rooms.

An env turns a seed into an episode (a Sokoban room, an ALFWorld game), so the
streams decide what is trained on and what is held out. They live here, beside the
envs, so an env can map evaluation seeds onto its own split (ALFWorld's fixed
shuffle of valid_seen) without knowing the trainer.

- `task_seeds(seed, iteration, batch)`: the B training tasks of one iteration of a run
  with this seed; the same seed gives the same tasks in the same order.
- `eval_seeds(n, offset)`: held-out seeds, from a stream salted apart from every
  training stream. `offset` picks a range: 0.. is the reporting range;
  `VALIDATION_OFFSET`.. is a separate range for choosing settings, so nothing chosen
  on it has seen the rooms results are reported on.
"""
from __future__ import annotations

import numpy as np

EVAL_STREAM = 7_777_777  # salt that keeps evaluation seeds apart from training seeds
VALIDATION_OFFSET = 1_000_000  # eval_seeds(n, VALIDATION_OFFSET): the validation range


def _draw(key: list[int]) -> int:
    return int(np.random.SeedSequence(key).generate_state(1)[0])


def task_seeds(seed: int, iteration: int, batch: int) -> list[int]:
    """Env seeds of an iteration's `batch` training tasks: reproducible, and apart from eval seeds."""
    return [_draw([seed, iteration, b]) for b in range(batch)]


def eval_seeds(n: int, offset: int = 0) -> list[int]:
    """The held-out seeds offset .. offset + n - 1 of the evaluation stream."""
    return [_draw([EVAL_STREAM, offset + i]) for i in range(n)]
