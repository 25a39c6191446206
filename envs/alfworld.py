"""ALFWorld (paper §4.1, Table 1) on alfworld's own TextWorld PDDL engine.

A game is a `game.tw-pddl` file (PDDL domain + problem + text grammar) played by
textworld's `PddlEnv` wrapped, as alfworld wraps it, in `AlfredDemangler`
(object ids -> "apple 1") and `AlfredInfos`; we ask it for `admissible_commands`
and `won`. Nothing of the game logic is reimplemented here.

Data are found by path, in the layout `alfworld-download` produces:
`<data_path>/json_2.1.1/<split>/<task-dir>/<trial>/game.tw-pddl`. `data_path` is
the config key, else `$ALFWORLD_DATA`; it may also name the `json_2.1.1` folder
itself or a `.tar.gz` of it (unpacked once under $HIMAC_CACHE/alfworld). Only
`game.tw-pddl` is read (`traj_data.json` may be absent). The task type comes
from the task directory's name, reported with the paper's six names: pick, look,
clean, heat, cool, pick2 (`eval/success_rate/<type>`; "All" is
`eval/success_rate`). Seed -> game: `games[seed % n]` over the sorted game list
of the split, so the same seed is always the same game; on the evaluation split
the i-th evaluation seed plays the i-th game of a fixed shuffle (see make_pool),
so `eval_episodes: 140` plays each valid_seen game once.

Episode:
- observation: the engine's text (the room at the start, then each command's
  feedback) followed by the admissible commands; `Obs.admissible` holds them
  (less "help", which prints the grammar's help text);
- reward: `success_reward` (10, the scale of verl-agent's ALFWorld and of our
  Sokoban's solved bonus) on the step that wins, else 0; `max_steps` (50) ends
  the episode unwon;
- invalid commands are counted (info["invalid"], info["invalid_commands"]) and
  cost a step. Two kinds: text that is no command at all (parse_action gives
  None; the executor adds its INVALID_PENALTY), and a command-shaped
  answer that is not admissible now (the env adds `invalid_command_penalty`,
  same size by default, and leaves the game untouched, as the engine would:
  it answers "Nothing happens.").

Why admissibility is judged in step(), not in parse_action: parse_action is a
pure function of the model's text and cannot see the game state. It accepts
any text shaped like an ALFWorld command (a known verb at the start of the
first line) and normalises it (case, spaces, quotes, a trailing full stop);
step() then compares it with the admissible list, exactly.

Games are slow to load (~1 s), so each process keeps loaded engines keyed by
game file and reuses them for the next episode on the same game (`reset` on a
loaded engine re-reads only the problem). Training uses `envs.procpool.ProcPool`
(`num_workers` processes) so a batch of envs steps in parallel.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import random
import re
import sys
import tarfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from envs.base import EnvSpec, Obs, Prompts, Range, SerialPool, absent, validate
from envs.cache import atomic_dir, cache_dir
from envs.seeds import eval_seeds

# task directory prefix -> the paper's name (Table 1: Pick, Look, Clean, Heat, Cool, Pick2)
TASK_TYPES = {
    "pick_and_place_simple": "pick",
    "look_at_obj_in_light": "look",
    "pick_clean_then_place_in_recep": "clean",
    "pick_heat_then_place_in_recep": "heat",
    "pick_cool_then_place_in_recep": "cool",
    "pick_two_obj_and_place": "pick2",
}
VERBS = ("go to", "take", "move", "put", "open", "close", "toggle", "use", "heat", "cool", "clean", "slice",
         "examine", "look", "inventory")
COMMAND = re.compile(r"^(?:" + "|".join(VERBS) + r")\b")
NOTHING_HAPPENS = "Nothing happens."
EVAL_SHUFFLE = 1234  # fixes the order in which evaluation visits a split's games
HOW_TO_GET_DATA = ("get the game files with `pip install alfworld && alfworld-download` (it fills "
                   "$ALFWORLD_DATA/json_2.1.1), then set data_path or $ALFWORLD_DATA")


class DataError(FileNotFoundError):
    """The ALFWorld data path is missing, empty or not in the json_2.1.1 layout."""


@dataclass
class AlfworldConfig:
    data_path: str = ""
    """(infra) Folder holding json_2.1.1/ (as alfworld-download makes it), that folder, or a .tar.gz of it; ''
    reads $ALFWORLD_DATA."""
    eval_data_path: str = ""
    """(infra) The same for the evaluation split ('': data_path)."""
    train_split: str = "train"
    """(paper) Split trained on (a folder under json_2.1.1)."""
    eval_split: str = "valid_seen"
    """(paper) Held-out split evaluated on: valid_seen (paper's in-distribution) or valid_unseen."""
    task_types: list[Literal["pick", "look", "clean", "heat", "cool", "pick2"]] = field(default_factory=list)
    """(infra) Keep only games of these types (pick, look, clean, heat, cool, pick2); empty: all six."""
    max_steps: Annotated[int, Range(ge=1)] = 50
    """(paper) Episode horizon in env steps (ALFWorld's usual 50)."""
    success_reward: float = 10.0
    """(paper) Reward on the step that completes the task (no other reward)."""
    invalid_command_penalty: float = -0.1
    """(paper) Reward of a command-shaped answer that is not admissible now (it changes nothing)."""
    num_workers: Annotated[int, Range(ge=0)] = 2
    """(infra) Env worker processes stepping games in parallel (0: step them in the trainer's process)."""
    env_timeout_s: Annotated[float, Range(gt=0)] = 120.0
    """(infra) A worker silent this long per game it holds is killed and its episodes fail."""
    engine_cache: Annotated[int, Range(ge=0)] = 32
    """(infra) Loaded games kept per process for reuse (a few MB each); 0: load every episode afresh."""

    def __post_init__(self):
        validate(self)


# -- data ----------------------------------------------------------------------------------
def data_root(path: str) -> Path:
    """config path / $ALFWORLD_DATA -> the json_2.1.1 folder (a .tar.gz is unpacked into the cache once)."""
    raw = path or os.environ.get("ALFWORLD_DATA", "")
    if not raw:
        raise DataError(f"no ALFWorld data path: config key 'data_path' is empty and $ALFWORLD_DATA is unset; "
                        f"{HOW_TO_GET_DATA}")
    p = Path(os.path.expandvars(raw)).expanduser()
    if p.is_file() and p.name.endswith((".tar.gz", ".tgz", ".tar")):
        p = _unpacked(p)
    if (p / "json_2.1.1").is_dir():
        return p / "json_2.1.1"
    if p.is_dir() and p.name == "json_2.1.1":
        return p
    what = "does not exist" if not p.exists() else "has no json_2.1.1 folder"
    raise DataError(f"ALFWorld data path '{p}' {what}; {HOW_TO_GET_DATA}")


def _unpacked(tarball: Path) -> Path:
    """Unpack `tarball` under $HIMAC_CACHE/alfworld/<name>/ once; a half-done unpack never counts."""
    name = tarball.name.split(".tar")[0].split(".tgz")[0]

    def unpack(tmp: Path) -> None:
        with tarfile.open(tarball) as tar:
            tar.extractall(tmp, filter="data")
        (tmp / ".complete").write_text(str(tarball))

    return atomic_dir(cache_dir() / "alfworld" / name, unpack, marker=".complete")


def task_type_of(task_dir: str) -> str:
    """'pick_cool_then_place_in_recep-Apple-None-CounterTop-14' -> 'cool'."""
    prefix = task_dir.split("-", 1)[0]
    if prefix not in TASK_TYPES:
        raise DataError(f"task directory '{task_dir}' is of no ALFWorld task type {list(TASK_TYPES)}")
    return TASK_TYPES[prefix]


@functools.lru_cache(maxsize=16)
def find_games(root: str, split: str, task_types: tuple[str, ...] = ()) -> tuple[tuple[str, str], ...]:
    """Sorted ((game file, task type), ...) of a split; a missing or empty split is a DataError."""
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        have = sorted(d.name for d in Path(root).iterdir() if d.is_dir())
        raise DataError(f"ALFWorld split '{split}' not found under {root} (it has: {have or 'nothing'}); "
                        f"{HOW_TO_GET_DATA}")
    games = []
    for path in sorted(split_dir.glob("*/*/game.tw-pddl")):
        kind = task_type_of(path.parent.parent.name)
        if not task_types or kind in task_types:
            games.append((str(path), kind))
    if not games:
        only = f" of types {list(task_types)}" if task_types else ""
        raise DataError(f"no game.tw-pddl files{only} under {split_dir}/<task-dir>/<trial>/; {HOW_TO_GET_DATA}")
    return tuple(games)


# -- the engine ----------------------------------------------------------------------------
def memoise_translation(capacity: int = 64) -> None:
    """Memoise fast-downward's PDDL -> SAS translation in this process (idempotent).

    A deliberate patch of a dependency, measured: textworld's PddlState translates
    the game's problem twice (plain and optimised for replanning) on every load
    *and every reset*, ~0.8 s together on a real game, although the result is a
    pure function of (domain, problem); textworld only reads it. Memoised, a
    reset on a loaded game takes ~0.1 s instead of ~1 s, and a replayed walkthrough
    gives the same texts and admissible commands (tested). Also: fast-downward
    rebinds `sys.argv` on each translation; we put the caller's back.
    """
    import fast_downward
    if getattr(fast_downward.pddl2sas, "himac_memo", False):
        return
    original = fast_downward.pddl2sas
    memo: OrderedDict = OrderedDict()

    def pddl2sas(domain: str, problem: str, verbose: bool = False, optimize: bool = False):
        key = (domain, problem, optimize)
        if key in memo:
            memo.move_to_end(key)
            return memo[key]
        argv = sys.argv
        try:
            memo[key] = result = original(domain, problem, verbose=verbose, optimize=optimize)
        finally:
            sys.argv = argv
        while len(memo) > capacity:
            memo.popitem(last=False)
        return result

    pddl2sas.himac_memo = True
    pddl2sas.__wrapped__ = original
    pddl2sas.cache_clear = memo.clear
    fast_downward.pddl2sas = pddl2sas


def load_engine(game: str | dict):
    """alfworld's TextWorld PDDL env for one game (a game.tw-pddl path, or its JSON as a dict)."""
    memoise_translation()
    import textworld
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos
    from textworld.envs.pddl import PddlEnv
    infos = textworld.EnvInfos(won=True, admissible_commands=True, policy_commands=False, extras=["gamefile"])
    env = AlfredInfos(AlfredDemangler(shuffle=False)(PddlEnv(infos)))
    env.load(game)
    return env


class _EngineCache:
    """Loaded engines of this process, keyed by game file, least recently used evicted.

    An engine plays one episode at a time: acquire() takes it out of the cache,
    release() puts it back for the next episode on the same game.
    """

    def __init__(self):
        self.free: OrderedDict[str, list] = OrderedDict()

    def acquire(self, path: str):
        engines = self.free.get(path)
        if engines:
            engine = engines.pop()
            if not engines:
                del self.free[path]
            return engine
        return load_engine(path)

    def release(self, path: str, engine, capacity: int) -> None:
        if capacity <= 0:
            engine.close()
            return
        self.free.setdefault(path, []).append(engine)
        self.free.move_to_end(path)
        while sum(len(v) for v in self.free.values()) > capacity:
            _, engines = next(iter(self.free.items()))
            engines.pop(0).close()
            if not engines:
                self.free.popitem(last=False)


ENGINES = _EngineCache()


# -- the env --------------------------------------------------------------------------------
def parse_action(text: str) -> tuple[str | None, bool]:
    """Model text -> (command, valid): the first line, normalised, if it is shaped like an ALFWorld command.

    Admissibility is the env's to judge (see the module docstring).
    """
    for line in text.splitlines():
        line = re.sub(r"^\s*(?:action|command)\s*:\s*", "", line.strip(), flags=re.IGNORECASE)
        line = re.sub(r"^(?:[-*>]|\d+[.)])\s+", "", line.strip())  # a copied list marker: "- go to ..."
        line = line.split(",")[0]  # no command has a comma: a copied list "go to a 1, go to b 1" -> its first
        line = " ".join(line.strip().strip("`'\"[]<>*").rstrip(".").lower().split())
        if line:
            return (line, True) if COMMAND.match(line) else (None, False)
    return None, False


def split_intro(text: str) -> tuple[str, str]:
    """The engine's first text -> (room description, task)."""
    body = text.split("=-", 2)[-1] if text.lstrip().startswith("-=") else text
    room, sep, task = body.partition("Your task is to:")
    if not sep:
        raise ValueError(f"no 'Your task is to:' in the game's intro text: {text[:200]!r}")
    return room.strip(), task.strip()


def require_alfworld() -> None:
    """An ImportError that says what to install, before anything else can fail for want of it."""
    missing = [m for m in ("alfworld", "textworld", "fast_downward") if absent(m)]
    if missing:
        raise ImportError(f"the alfworld env needs {missing}: pip install -e '.[alfworld]' "
                          f"(alfworld>=0.4.2 brings textworld and fast-downward)")



def _commands(state) -> list[str]:
    """The engine's admissible commands, less "help" (grammar help text, never part of a task)."""
    return [c for c in state["admissible_commands"] if c != "help"]


class AlfworldEnv:
    """One ALFWorld episode at a time. `seed_index` (seed -> game index) overrides seed % n_games."""

    def __init__(self, cfg: AlfworldConfig, evaluation: bool = False, seed_index: dict[int, int] | None = None):
        require_alfworld()
        self.cfg = cfg
        root = data_root((cfg.eval_data_path or cfg.data_path) if evaluation else cfg.data_path)
        self.games = find_games(str(root), cfg.eval_split if evaluation else cfg.train_split,
                                tuple(cfg.task_types))
        self.seed_index = seed_index or {}
        self.game: str | None = None
        self.engine = None
        self.task, self.task_type = "", ""
        self.episode_info: dict = {}

    def reset(self, seed: int) -> Obs:
        self.close()
        self.game, self.task_type = self.games[self.seed_index.get(seed, seed) % len(self.games)]
        self.episode_info = {"game": self.game}  # a walkthrough, not a proven optimum: no optimal_moves
        engine = ENGINES.acquire(self.game)
        try:
            state = engine.reset()
            room, self.task = split_intro(state.feedback)
        except BaseException:
            engine.close()  # a game that cannot start is not put back for reuse
            raise
        self.engine = engine
        self.steps, self.invalid, self.won = 0, 0, False
        self.admissible = _commands(state)
        return self._obs(room)

    def step(self, action: str | None) -> tuple[Obs, float, bool, dict]:
        if self.engine is None:
            raise RuntimeError("call reset(seed) before step()")
        self.steps += 1
        invalid = action is None or action not in self.admissible
        reward = 0.0
        if invalid:  # the engine is not asked: it would change nothing and answer the same
            self.invalid += 1
            feedback = NOTHING_HAPPENS
            if action is not None:
                reward = self.cfg.invalid_command_penalty
        else:
            try:
                state, _, _ = self.engine.step(action)
            except BaseException:
                self.engine.close()  # its state is unknown now: never reuse it
                self.engine = None
                raise
            feedback = state.feedback.strip()
            self.admissible = _commands(state)
            if state["won"] and not self.won:
                self.won, reward = True, self.cfg.success_reward
        done = self.won or self.steps >= self.cfg.max_steps
        info = {"success": self.won, "steps": self.steps, "invalid": invalid, "invalid_commands": self.invalid}
        return self._obs(feedback), reward, done, info

    def _obs(self, text: str) -> Obs:
        # One line, comma-separated (commands hold no commas). Listed one per line as "- cmd",
        # SmolLM2-135M answered "Action:" + newline + "- go to bed 1" (3 of 3 games, greedy),
        # which the executor's stop-at-newline cuts to nothing; inline, 2 of 3 were admissible.
        listing = ", ".join(self.admissible)
        return Obs(text=f"{text}\nAdmissible commands: {listing}.", feedback=text, admissible=list(self.admissible))

    def close(self) -> None:
        if self.engine is not None:
            ENGINES.release(self.game, self.engine, self.cfg.engine_cache)
            self.engine = None


def make_pool(spec: EnvSpec, cfg: AlfworldConfig, evaluation: bool):
    """Worker processes (cfg.num_workers) or, with 0, this process; on the train or the evaluation split.

    The data path is resolved here, in the trainer, so a bad path fails at start-up
    with its message, not as every episode's load error inside the workers.
    On the evaluation split, the i-th evaluation seed (envs.seeds.eval_seeds) plays the i-th game of a fixed
    shuffle of the split: `eval_episodes` = the split's size plays every game
    exactly once (the paper reports all of valid_seen), and fewer play a sample
    without repeats across all types (seed % n would repeat some games and miss
    others; the sorted order alone would give the first types only).
    """
    require_alfworld()
    key = "eval_data_path" if evaluation and cfg.eval_data_path else "data_path"
    # resolved here (a tarball unpacked once, $ALFWORLD_DATA read): workers get a plain folder
    cfg = dataclasses.replace(cfg, **{key: str(data_root(getattr(cfg, key)))})
    games = AlfworldEnv(cfg, evaluation).games  # a missing or empty split raises DataError now
    seed_index = None
    if evaluation:
        order = list(range(len(games)))
        random.Random(EVAL_SHUFFLE).shuffle(order)
        seed_index = dict(zip(eval_seeds(len(games)), order))
    make = functools.partial(AlfworldEnv, evaluation=evaluation, seed_index=seed_index)
    if cfg.num_workers == 0:
        return SerialPool(dataclasses.replace(spec, make=make), cfg)
    from envs.procpool import ProcPool
    return ProcPool(make, cfg, num_workers=cfg.num_workers, timeout_s=cfg.env_timeout_s)


PROMPTS = Prompts(
    planner_system=(
        "You plan household tasks in a text game (ALFWorld). You can go to places, take and move objects, "
        "open and close containers, heat with a microwave, cool with a fridge, clean with a sink and use a lamp. "
        "Write a plan of at most {max_subgoals} short sub-goals, one per line, numbered 1., 2., ..."),
    planner_user="Task: {task}\nWhat you see:\n{observation}\nWrite the numbered plan.",
    planner_prefix="1.",
    executor_system=(
        "You act in a household text game (ALFWorld). Each turn, answer with exactly one of the admissible "
        "commands, copied word for word."),
    executor_user=(
        "Task: {task}\nSub-goal ({index}/{count}): {subgoal}\n{history}Now:\n{observation}\n"
        "Answer with one admissible command.{sub_done_rule}"),
    executor_prefix="Action:",
    flat_system=(
        "You act in a household text game (ALFWorld). Each turn, answer with exactly one of the admissible "
        "commands, copied word for word."),
    flat_user="Task: {task}\n{history}Now:\n{observation}\nAnswer with one admissible command.",
    flat_prefix="Action:",
)

SPEC = EnvSpec(name="alfworld", config=AlfworldConfig, make=AlfworldEnv, parse_action=parse_action,
               prompts=PROMPTS, task_types=tuple(TASK_TYPES.values()), make_pool=make_pool)
