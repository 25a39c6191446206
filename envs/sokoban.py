"""Sokoban on gym-sokoban's room generator, without its gym env.

gym-sokoban's `SokobanEnv` needs `pkg_resources`, the old gym API and numpy < 2,
so we load only `gym_sokoban/envs/room_utils.py` (pure numpy + random) straight
from its file and reimplement the step in ~40 lines with gym-sokoban's own rules,
which tests cross-check against the original `SokobanEnv` on random actions:
- the four actions are gym-sokoban's *push* actions (1-4): a push into a box moves
  it if the cell behind is free, otherwise the player just moves if it can;
- reward: -0.1 a step, +1 a box onto a target, -1 a box off a target, +10 when
  every box is on a target; the episode ends when solved or after `max_steps`.
Departures, deliberate: (1) a box that the generator leaves standing on a target
is coded "box on target" (gym-sokoban leaves it coded "off target" and then pays
+1 for it on the first step); (2) an invalid model answer costs a step (-0.1)
and changes nothing, like gym-sokoban's no-op; (3) a box stuck in a corner off
target is reported as "deadlock" in the observation, so a failure keyword can end
the episode early (the state is unsolvable).

Observations are the text map, an RGB frame, or both (`observation`). The frame
is gym-sokoban's `room_to_rgb` (16-px tiles from its PNGs), rebuilt with the
tiles decoded once: one numpy gather per render (~10 us; gym-sokoban re-reads the
seven PNGs on every call, ~2.5 ms). tests/test_visual.py checks pixel equality.
With `observation: image` the map's text is replaced by IMAGE_ONLY_TEXT.

Room generation uses the global `random` and `np.random` streams; we seed both
from the episode seed and restore the caller's state afterwards, so the same seed
always gives the same room and nothing else's randomness is disturbed.
"""
from __future__ import annotations

import functools
import importlib.util
import random
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np

from envs.base import EnvSpec, Obs, Prompts, Range, check, validate

WALL, FLOOR, TARGET, BOX_ON, BOX, PLAYER = 0, 1, 2, 3, 4, 5  # gym-sokoban's cell codes
ACTIONS = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
GYM_ACTION = {"up": 1, "down": 2, "left": 3, "right": 4}  # gym-sokoban's push actions
STEP_PENALTY, BOX_ON_REWARD, BOX_OFF_PENALTY, SOLVED_REWARD = -0.1, 1.0, -1.0, 10.0
SYMBOLS = {WALL: "#", FLOOR: "_", TARGET: ".", BOX_ON: "*", BOX: "$", PLAYER: "@"}
PLAYER_ON_TARGET = "+"
# With `observation: image` the map is a frame; its tiles (gym-sokoban's) in words:
IMAGE_ONLY_TEXT = ("(shown in the image: brick walls, black floor, targets outlined in red, boxes are yellow "
                   "crates, a box on a target has a red frame, the player is the green figure)")
TILE = 16  # pixels per cell in gym-sokoban's renders
LEGEND = "# wall, _ floor, . target, $ box, * box on target, @ player, + player on target"


def _load_room_utils():
    spec = importlib.util.find_spec("gym_sokoban")  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("gym-sokoban is not installed: pip install gym-sokoban")
    path = Path(list(spec.submodule_search_locations)[0]) / "envs" / "room_utils.py"
    mod_spec = importlib.util.spec_from_file_location("_himac_room_utils", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


room_utils = _load_room_utils()


@functools.lru_cache(maxsize=1)
def tiles() -> np.ndarray:
    """(7, 16, 16, 3) uint8: gym-sokoban's tiles indexed by cell code, 6 = player on target."""
    from PIL import Image
    spec = importlib.util.find_spec("gym_sokoban")
    surface = Path(list(spec.submodule_search_locations)[0]) / "envs" / "surface"
    names = ["wall", "floor", "box_target", "box_on_target", "box", "player", "player_on_target"]
    return np.stack([np.asarray(Image.open(surface / f"{n}.png").convert("RGB")) for n in names])


def render_rgb(room_fixed: np.ndarray, room_state: np.ndarray) -> np.ndarray:
    """(rows * 16, cols * 16, 3) uint8 frame, equal to gym-sokoban's room_to_rgb(state, fixed)."""
    code = room_state.astype(np.intp)
    code[(room_state == PLAYER) & (room_fixed == TARGET)] = 6
    h, w = code.shape
    return tiles()[code].transpose(0, 2, 1, 3, 4).reshape(h * TILE, w * TILE, 3)  # (h, w, 16, 16, 3) -> frame


@dataclass
class SokobanConfig:
    room_size: Annotated[int, Range(ge=4, le=16)] = 6
    """(paper) Rooms are room_size x room_size cells, walls included (paper: 6)."""
    num_boxes: Annotated[int, Range(ge=1)] = 1
    """(paper) Boxes (and targets) per room (paper: 1)."""
    max_steps: Annotated[int, Range(ge=1)] = 15
    """(paper) Episode horizon in env steps (paper §4.1: 15)."""
    min_solution_moves: Annotated[int, Range(ge=1)] = 1
    """(departure) Reject rooms whose optimal solution is shorter: a minimum-difficulty filter."""
    max_solution_moves: Annotated[int, Range(ge=0)] = 0
    """(departure) Reject rooms whose optimal solution is longer (0: no limit): rooms a 135M model can win
    within the CPU's budget."""
    observation: Literal["text", "image", "both", "text+coords"] = "text"
    """(paper) What the policy sees: 'text' (the ASCII map), 'image' (an RGB frame; needs a VL model),
    'both', or 'text+coords' (a departure: the map plus where each box and target lies relative to the
    player, in words)."""
    shaping: Annotated[float, Range(ge=0)] = 0.0
    """(departure) Potential-based reward shaping (Ng, Harada & Russell 1999), off at 0 (the paper's reward):
    every step adds shaping * (phi(s') - phi(s)), phi = -(each box's grid distance to its nearest target) -
    (the player's distance to the nearest box off target, minus 1). Over an episode the added rewards sum to
    shaping * (phi(end) - phi(start)) (nothing to farm by walking in circles, and the same optimal policy
    when episodes end solved); each step toward the box is paid at once instead of only through the final
    +10. Success is still the env's."""

    def __post_init__(self):
        validate(self)
        check(self.max_solution_moves == 0 or self.max_solution_moves >= self.min_solution_moves,
              "max_solution_moves", self.max_solution_moves, "must be 0 or >= min_solution_moves")


def parse_action(text: str) -> tuple[str | None, bool]:
    """Model text -> (direction, valid). Valid iff exactly one distinct direction word appears."""
    words = set(re.findall(r"\b(up|down|left|right)\b", text.lower()))
    if len(words) == 1:
        return words.pop(), True
    return None, False


def solve(room_fixed: np.ndarray, room_state: np.ndarray, max_states: int = 200_000) -> list[str] | None:
    """Breadth-first search for a shortest action sequence that solves the room.

    Returns the list of directions, or None if unsolvable (or over `max_states`).
    States are (player, boxes); moves follow the same push rules as `SokobanEnv.step`.
    """
    walls = room_fixed == WALL
    targets = frozenset(zip(*np.nonzero(room_fixed == TARGET)))
    player = tuple(np.argwhere(room_state == PLAYER)[0])
    boxes = frozenset(zip(*np.nonzero((room_state == BOX) | (room_state == BOX_ON))))
    if boxes <= targets:
        return []
    start = (player, boxes)
    parent = {start: None}
    queue = deque([start])
    while queue:
        state = queue.popleft()
        (pr, pc), bxs = state
        for name, (dr, dc) in ACTIONS.items():
            nxt = (pr + dr, pc + dc)
            if walls[nxt]:
                continue
            if nxt in bxs:
                behind = (nxt[0] + dr, nxt[1] + dc)
                if walls[behind] or behind in bxs:
                    continue
                new_boxes = (bxs - {nxt}) | {behind}
                if behind not in targets and _cornered(walls, behind):
                    continue  # dead state: never part of a solution
            else:
                new_boxes = bxs
            child = (nxt, new_boxes)
            if child in parent:
                continue
            parent[child] = (state, name)
            if new_boxes <= targets:
                path = []
                while parent[child] is not None:
                    child, move = parent[child]
                    path.append(move)
                return path[::-1]
            if len(parent) > max_states:
                return None
            queue.append(child)
    return None


def potential(room_fixed: np.ndarray, room_state: np.ndarray) -> float:
    """phi of `SokobanConfig.shaping`: minus the Manhattan distances left to walk and to push (0 when solved)."""
    targets = np.argwhere(room_fixed == TARGET)
    boxes = np.argwhere(room_state == BOX)  # boxes off target
    if not len(boxes):
        return 0.0
    player = np.argwhere(room_state == PLAYER)[0]
    push = sum(int(np.abs(targets - b).sum(1).min()) for b in boxes)
    walk = int(np.abs(boxes - player).sum(1).min()) - 1
    return -float(push + walk)


def _cornered(walls: np.ndarray, cell: tuple[int, int]) -> bool:
    r, c = cell
    vertical = walls[r - 1, c] or walls[r + 1, c]
    horizontal = walls[r, c - 1] or walls[r, c + 1]
    return bool(vertical and horizontal)


def parse_room(text: str) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of render_text: an ASCII map (same symbols) -> (room_fixed, room_state)."""
    rows = [r for r in text.strip("\n").splitlines()]
    if len({len(r) for r in rows}) != 1:
        raise ValueError("every row of a Sokoban map must have the same width")
    code = {v: k for k, v in SYMBOLS.items()}
    fixed = np.zeros((len(rows), len(rows[0])), dtype=np.int8)
    state = np.zeros_like(fixed)
    for r, row in enumerate(rows):
        for c, ch in enumerate(row):
            if ch == PLAYER_ON_TARGET:
                fixed[r, c], state[r, c] = TARGET, PLAYER
            elif ch in code:
                cell = code[ch]
                state[r, c] = cell
                fixed[r, c] = {BOX_ON: TARGET, BOX: FLOOR, PLAYER: FLOOR}.get(cell, cell)
            else:
                raise ValueError(f"unknown Sokoban map symbol {ch!r} at row {r}, column {c}")
    if (state == PLAYER).sum() != 1:
        raise ValueError("a Sokoban map needs exactly one player")
    return fixed, state


def render_text(room_fixed: np.ndarray, room_state: np.ndarray) -> str:
    rows = []
    for r in range(room_state.shape[0]):
        row = []
        for c in range(room_state.shape[1]):
            cell = room_state[r, c]
            if cell == PLAYER and room_fixed[r, c] == TARGET:
                row.append(PLAYER_ON_TARGET)
            else:
                row.append(SYMBOLS[int(cell)])
        rows.append("".join(row))
    return "\n".join(rows)


def _offset(dr: int, dc: int) -> str:
    parts = []
    if dr:
        parts.append(f"{abs(dr)} {'up' if dr < 0 else 'down'}")
    if dc:
        parts.append(f"{abs(dc)} {'left' if dc < 0 else 'right'}")
    return ", ".join(parts) or "here"


def describe(room_fixed: np.ndarray, room_state: np.ndarray) -> str:
    """Where the boxes and free targets are, counted in cells from the player, and the walls beside it.

    The same facts as the map, said the way a small language model can use them without
    counting characters in a grid: 'box: 1 up, 2 right' means one row up and two columns right.
    """
    pr, pc = (int(v) for v in np.argwhere(room_state == PLAYER)[0])
    boxes = [f"box: {_offset(r - pr, c - pc)}" for r, c in np.argwhere(room_state == BOX)]
    targets = [f"target: {_offset(r - pr, c - pc)}" for r, c in np.argwhere(room_fixed == TARGET)
               if room_state[r, c] != BOX_ON]
    walls = [name for name, (dr, dc) in ACTIONS.items() if room_fixed[pr + dr, pc + dc] == WALL]
    lines = ["From you: " + "; ".join(boxes + targets) + "." if boxes or targets else "Every box is on a target."]
    lines.append("Wall next to you: " + (", ".join(walls) if walls else "none") + ".")
    return "\n".join(lines)


class SokobanEnv:
    task_type = "sokoban"

    def __init__(self, cfg: SokobanConfig):
        self.cfg = cfg
        self.room_fixed = self.room_state = None
        self.optimal_moves: int | None = None
        self.task = ""

    @property
    def episode_info(self) -> dict:
        return {"optimal_moves": self.optimal_moves}

    # -- episode ---------------------------------------------------------------
    def reset(self, seed: int) -> Obs:
        fixed, state, solution = generate(self.cfg, seed)
        return self.load(fixed, state, len(solution))

    def load(self, room_fixed: np.ndarray, room_state: np.ndarray, optimal_moves: int | None = None) -> Obs:
        """Start an episode on a given room (hand-made levels, tests); reset(seed) generates one."""
        self.room_fixed, self.room_state = room_fixed.astype(np.int8).copy(), room_state.astype(np.int8).copy()
        if optimal_moves is None:
            solution = solve(self.room_fixed, self.room_state)
            optimal_moves = None if solution is None else len(solution)
        self.optimal_moves = optimal_moves
        self.steps = 0
        self.boxes_on_target = self._count_on_target()
        self.num_boxes = int(np.sum((self.room_state == BOX) | (self.room_state == BOX_ON)))
        n = self.num_boxes
        self.task = f"Push {'the box' if n == 1 else f'all {n} boxes'} onto {'the target' if n == 1 else 'the targets'}."
        return self._obs("The puzzle begins.")

    def step(self, action: str | None) -> tuple[Obs, float, bool, dict]:
        if self.room_state is None:
            raise RuntimeError("call reset(seed) before step()")
        self.steps += 1
        reward, pushed, moved = STEP_PENALTY, None, None
        before = potential(self.room_fixed, self.room_state) if self.cfg.shaping else 0.0
        if action is None:
            feedback = "Invalid action; nothing happened."
        elif action not in ACTIONS:
            raise ValueError(f"unknown Sokoban action {action!r}; expected one of {list(ACTIONS)}")
        else:
            boxes, player = self._boxes(), np.argwhere(self.room_state == PLAYER)[0].tolist()
            feedback = self._move(action)
            pushed = action if self._boxes() != boxes else None
            moved = action if np.argwhere(self.room_state == PLAYER)[0].tolist() != player else None
        on_target = self._count_on_target()
        if on_target > self.boxes_on_target:
            reward += BOX_ON_REWARD
        elif on_target < self.boxes_on_target:
            reward += BOX_OFF_PENALTY
        self.boxes_on_target = on_target
        if self.cfg.shaping:
            reward += self.cfg.shaping * (potential(self.room_fixed, self.room_state) - before)
        solved = on_target == self.num_boxes
        if solved:
            reward += SOLVED_REWARD
            feedback += " Every box is on a target: solved."
        elif self._deadlocked():
            feedback += " Deadlock: a box is stuck in a corner."
        done = solved or self.steps >= self.cfg.max_steps
        info = {"success": solved, "steps": self.steps, "pushed": pushed, "moved": moved}
        return self._obs(feedback), reward, done, info

    def _boxes(self) -> list[tuple[int, int]]:
        return [tuple(p) for p in np.argwhere((self.room_state == BOX) | (self.room_state == BOX_ON)).tolist()]

    def close(self) -> None:
        pass

    # -- mechanics (gym-sokoban's push rules) -----------------------------------
    def _move(self, action: str) -> str:
        dr, dc = ACTIONS[action]
        pr, pc = np.argwhere(self.room_state == PLAYER)[0]
        nr, nc = pr + dr, pc + dc
        br, bc = nr + dr, nc + dc
        h, w = self.room_state.shape
        if self.room_state[nr, nc] in (BOX, BOX_ON) and 0 <= br < h and 0 <= bc < w \
                and self.room_state[br, bc] in (FLOOR, TARGET):
            self.room_state[br, bc] = BOX_ON if self.room_fixed[br, bc] == TARGET else BOX
            self._put_player(pr, pc, nr, nc)
            return f"You pushed a box {action}."
        if self.room_state[nr, nc] in (FLOOR, TARGET):
            self._put_player(pr, pc, nr, nc)
            return f"You moved {action}."
        what = "a wall" if self.room_state[nr, nc] == WALL else "a box that cannot move"
        return f"You tried to move {action} but {what} is in the way."

    def _put_player(self, pr, pc, nr, nc) -> None:
        self.room_state[nr, nc] = PLAYER
        self.room_state[pr, pc] = self.room_fixed[pr, pc]

    def _count_on_target(self) -> int:
        return int(np.sum(self.room_state == BOX_ON))

    def _deadlocked(self) -> bool:
        walls = self.room_fixed == WALL
        return any(_cornered(walls, (r, c)) for r, c in np.argwhere(self.room_state == BOX))

    def _obs(self, feedback: str) -> Obs:
        mode = self.cfg.observation
        moves = list(ACTIONS)  # every direction is always a legal answer (into a wall: no move)
        if mode in ("text", "text+coords"):
            return Obs(text=self.text(), feedback=feedback, admissible=moves)
        image = render_rgb(self.room_fixed, self.room_state)
        return Obs(text=self.text() if mode == "both" else IMAGE_ONLY_TEXT, feedback=feedback, image=image,
                   admissible=moves)

    def text(self) -> str:
        map_text = render_text(self.room_fixed, self.room_state)
        if self.cfg.observation == "text+coords":
            return map_text + "\n" + describe(self.room_fixed, self.room_state)
        return map_text


def generate(cfg: SokobanConfig, seed: int, max_tries: int = 1000) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Seeded room -> (room_fixed, room_state, optimal solution). Same seed, same room."""
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        steps = int(1.7 * 2 * cfg.room_size)  # gym-sokoban's own random-walk length
        for _ in range(max_tries):
            try:
                fixed, state, _ = room_utils.generate_room(
                    dim=(cfg.room_size, cfg.room_size), num_steps=steps, num_boxes=cfg.num_boxes)
            except (RuntimeError, RuntimeWarning):  # gym-sokoban's "no room this try"
                continue
            fixed, state = fixed.astype(np.int8), state.astype(np.int8)
            boxes = (state == BOX) | (state == BOX_ON)
            state[boxes & (fixed == TARGET)] = BOX_ON
            state[boxes & (fixed != TARGET)] = BOX
            solution = solve(fixed, state)
            if solution is None or len(solution) < cfg.min_solution_moves:
                continue
            if cfg.max_solution_moves and len(solution) > cfg.max_solution_moves:
                continue
            return fixed, state, solution
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    raise RuntimeError(f"no Sokoban room for seed {seed} met the difficulty filter in {max_tries} tries "
                       f"(min_solution_moves={cfg.min_solution_moves}, "
                       f"max_solution_moves={cfg.max_solution_moves}); relax the filter")


OPPOSITE = {"up": "down", "down": "up", "left": "right", "right": "left"}
# Every room here starts with the player beside the box (gym-sokoban makes rooms by pulling the box
# backwards), and a 1-box room of a few moves is pushed in one direction or two: 71% and 29% of 200
# validation rooms (7x7, 2-4 moves). So a plan is one or two push directions, a U-turn never.
PUSH_PLANS = tuple((f"Push the box {d}.",) for d in ACTIONS) + tuple(
    (f"Push the box {d}.", f"Push the box {e}.") for d in ACTIONS for e in ACTIONS if e not in (d, OPPOSITE[d]))
PUSH = re.compile(r"push the box (up|down|left|right)\b", re.IGNORECASE)


def moved_as_told(subgoal: str, info: dict) -> bool:
    """EnvSpec.subgoal_check: the player moved the way the sub-goal "Push the box <direction>" names (a push
    that way moves the player that way too). Not "pushed that way": the player starts beside the box, on
    one side, so only a plan that is already right could be followed at the first step, and an executor
    paid for pushes alone would rarely learn to follow a plan at all (seen: 2-6% of its steps followed)."""
    m = PUSH.search(subgoal)
    return bool(m and info.get("moved") == m.group(1).lower())


MAP = "Map (" + LEGEND + "; row 0 is the top):\n{observation}\n"
PROMPTS = Prompts(
    planner_system=(
        "You plan Sokoban puzzles: the player @ walks and pushes boxes $ onto targets . "
        "(a box cannot be pulled). Write a plan of at most {max_subgoals} short sub-goals, "
        "one per line, numbered 1., 2., ... For example:\n1. Walk to the cell left of the box.\n"
        "2. Push the box right onto the target."),
    # the task before the map: with the map last, SmolLM2 copies it as its "plan" under greedy decoding
    planner_user="Task: {task}\n" + MAP + "Write the numbered plan.",
    planner_prefix="1.",
    executor_system="You play Sokoban: the player @ moves one cell a step, and moving into a box pushes it.",
    executor_user=(
        "Task: {task}\nSub-goal ({index}/{count}): {subgoal}\n{history}" + MAP +
        "Which way do you move: up, down, left or right?{sub_done_rule}"),
    executor_prefix="Direction:",
    flat_system="You play Sokoban: the player @ moves one cell a step, and moving into a box pushes it.",
    flat_user="Task: {task}\n{history}" + MAP + "Which way do you move: up, down, left or right?",
    flat_prefix="Direction:",
    blueprint_choices=PUSH_PLANS,
)


def toward_box(env: SokobanEnv) -> str:
    """The reading rule: step toward the (first) box off target, along its row or column when it shares
    one with the player, else vertically first. It solves exactly the rooms where player, box and target
    lie on one line with the box between: one word of a 'text+coords' observation ('box: 1 left') suffices."""
    pr, pc = np.argwhere(env.room_state == PLAYER)[0]
    boxes = np.argwhere(env.room_state == BOX)
    if not len(boxes):
        return "up"
    dr, dc = boxes[0][0] - pr, boxes[0][1] - pc
    if dr:
        return "up" if dr < 0 else "down"
    return "left" if dc < 0 else "right"


def solution(cfg: SokobanConfig, seed: int) -> list[str]:
    """The BFS-shortest moves that solve the room of `seed` (EnvSpec.solution)."""
    return generate(cfg, seed)[2]


def report(episodes: list[dict]) -> dict:
    """Sokoban's own summary: how many more moves than the BFS optimum, on solved rooms."""
    solved = [e for e in episodes if e["success"] and e.get("optimal_moves") is not None]
    if not solved:
        return {}
    return {"optimality_gap": sum(e["env_steps"] - e["optimal_moves"] for e in solved) / len(solved)}


SPEC = EnvSpec(name="sokoban", config=SokobanConfig, make=SokobanEnv, parse_action=parse_action,
               prompts=PROMPTS, task_types=("sokoban",), report=report, actions=tuple(ACTIONS), rule=toward_box,
               solution=solution, subgoal_check=moved_as_told)
