"""Tiny ALFWorld games, generated: one room, 3-6 receptacles, one task of each of the six types.

Real ALFWorld games describe a whole AI2-THOR room (~100 objects) and take ~1 s
to load; tests need games that load in a fraction of that. These are real
tw-pddl games all the same: a PDDL problem written here on alfworld's own
`alfred.pddl` domain and `alfred.twl2` grammar (read from the installed alfworld
package), with object ids in ALFWorld's mangled form ("Apple_bar__plus_00_dot_10
..." -> "apple 1") and goals of the same shape as the real games' (copied in
structure from the json_2.1.1 files). The engine, the admissible commands and the
win check are all alfworld's/textworld's.

    python -m envs.alfworld_games OUT_DIR [--per-type N] [--seed S]

writes `OUT_DIR/json_2.1.1/{train,valid_seen}/<task-dir>/<trial>/game.tw-pddl`, the
layout `alfworld-download` produces, so `data_path: OUT_DIR` works like real data.
Each game's `walkthrough` is the PDDL planner's solution (textworld's
`policy_commands`, from fast-downward), computed at generation time.
"""
from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

# task type -> (ALFWorld task-directory prefix, task sentence)
KINDS = {
    "pick": ("pick_and_place_simple", "put a {obj} in {recep}."),
    "look": ("look_at_obj_in_light", "look at {obj} under the desklamp."),
    "clean": ("pick_clean_then_place_in_recep", "put a clean {obj} in {recep}."),
    "heat": ("pick_heat_then_place_in_recep", "put a hot {obj} in {recep}."),
    "cool": ("pick_cool_then_place_in_recep", "put a cool {obj} in {recep}."),
    "pick2": ("pick_two_obj_and_place", "put two {obj} in {recep}."),
}
# objects each kind may use, and where they may be put (kept to pairs that real games have)
TARGETS = {
    "pick": (["Apple", "Mug", "Book"], ["Fridge", "Cabinet", "Shelf"]),
    "look": (["Book", "CD", "AlarmClock"], []),
    "clean": (["Mug", "Apple", "Tomato"], ["Cabinet", "CounterTop", "Shelf"]),
    "heat": (["Apple", "Potato", "Egg"], ["CounterTop", "DiningTable"]),
    "cool": (["Apple", "Tomato", "Mug"], ["CounterTop", "DiningTable", "Cabinet"]),
    "pick2": (["CD", "Pen", "Book"], ["Drawer", "Shelf"]),
}
TOOL = {"clean": "SinkBasin", "heat": "Microwave", "cool": "Fridge"}
SURFACES = ["CounterTop", "DiningTable", "Desk", "SideTable", "Shelf", "GarbageCan", "Drawer", "Cabinet"]
OPENABLE = {"Fridge", "Microwave", "Cabinet", "Drawer"}
CLEANABLE = {"Mug", "Apple", "Tomato", "Potato", "Egg"}
HEATABLE = {"Apple", "Potato", "Egg", "Mug", "Tomato"}
COOLABLE = {"Apple", "Tomato", "Mug", "Potato", "Egg"}
DISTRACTORS = ["Pen", "CD", "Mug", "Book", "Egg"]


@dataclass
class TinyGame:
    kind: str  # pick, look, clean, heat, cool, pick2
    task: str
    task_dir: str  # e.g. "pick_and_place_simple-Apple-None-Fridge-0"
    data: dict  # the game.tw-pddl JSON: pddl_domain, grammar, pddl_problem, solvable, walkthrough


def alfworld_logic() -> tuple[str, str]:
    """alfworld's own PDDL domain and TextWorld grammar, from the installed package."""
    import alfworld
    data = Path(alfworld.__file__).parent / "data"
    return (data / "alfred.pddl").read_text(), (data / "alfred.twl2").read_text()


def mangle(name: str, x: float, y: float, z: float, suffix: str = "") -> str:
    """ALFWorld's object id encoding: 'Apple|+00.10|+00.90|-01.00' with | + - . spelt out."""
    text = f"{name}|{x:+06.2f}|{y:+06.2f}|{z:+06.2f}" + (f"|{suffix}" if suffix else "")
    return text.replace("|", "_bar_").replace("-", "_minus_").replace("+", "_plus_").replace(".", "_dot_")


def tiny_game(kind: str, seed: int = 0, plan: bool = True) -> TinyGame:
    """One generated game of `kind`; `seed` varies the object, the places and a distractor.

    plan=True asks fast-downward for the solution and stores it as the walkthrough.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown tiny game kind {kind!r}; expected one of {list(KINDS)}")
    rng = random.Random(f"{kind}-{seed}")
    objs, goal_receps = TARGETS[kind]
    obj = rng.choice(objs)
    target = rng.choice(goal_receps) if goal_receps else "Desk"
    needed = [target] + ([TOOL[kind]] if kind in TOOL else []) + (["SideTable"] if kind == "look" else [])
    sources = [r for r in SURFACES if r not in needed and r not in OPENABLE]
    source = rng.choice(sources)
    receps = list(dict.fromkeys(needed + [source] + rng.sample([r for r in SURFACES if r not in needed + [source]],
                                                               rng.randint(0, 2))))
    rng.shuffle(receps)

    ids = {}  # recep name -> id
    lines_obj, init = ["agent1 - agent"], []
    locs = []
    for i, r in enumerate(receps):
        rid = mangle("Sink", -1.0 - i, 0.9, 0.3, "SinkBasin") if r == "SinkBasin" else mangle(r, -1.0 - i, 0.9, 0.3)
        ids[r] = rid
        loc = f"loc_bar_{i + 1}_bar_0_bar_0_bar_0"
        locs.append(loc)
        lines_obj += [f"{rid} - receptacle", f"{loc} - location"]
        init += [f"(receptacleType {rid} {r}Type)", f"(receptacleAtLocation {rid} {loc})"]
        if r in OPENABLE:
            init.append(f"(openable {rid})")
    start = "loc_bar_0_bar_0_bar_0_bar_0"
    lines_obj.append(f"{start} - location")
    init.append(f"(atLocation agent1 {start})")

    # objects: the target(s), a lamp for "look", one distractor
    placed = [(obj, source)]
    if kind == "pick2":
        placed.append((obj, rng.choice([r for r in receps if r not in (target,) and r not in OPENABLE] or [source])))
    if kind == "look":
        placed.append(("DeskLamp", "SideTable"))
    placed.append((rng.choice([d for d in DISTRACTORS if d != obj]), rng.choice(receps)))
    otypes = set()
    for j, (name, where) in enumerate(placed):
        oid = mangle(name, 0.1 * (j + 1), 0.9, -1.0 - j)
        otypes.add(name)
        loc = locs[receps.index(where)]
        lines_obj.append(f"{oid} - object")
        init += [f"(objectType {oid} {name}Type)", f"(inReceptacle {oid} {ids[where]})",
                 f"(objectAtLocation {oid} {loc})"]
        if name == "DeskLamp":
            init.append(f"(toggleable {oid})")
            continue
        init.append(f"(pickupable {oid})")
        for prop, group in (("cleanable", CLEANABLE), ("heatable", HEATABLE), ("coolable", COOLABLE)):
            if name in group:
                init.append(f"({prop} {oid})")
    lines_obj += [f"{t}Type - otype" for t in sorted(otypes)] + [f"{r}Type - rtype" for r in receps]
    init += [f"(canContain {r}Type {t}Type)" for r in receps for t in sorted(otypes) if t != "DeskLamp"]

    problem = (f"(define (problem tiny_{kind}_{seed})\n(:domain alfred)\n(:objects\n  "
               + "\n  ".join(lines_obj) + "\n)\n(:init\n  " + "\n  ".join(init) + "\n)\n"
               + _goal(kind, obj, target) + "\n)\n")
    domain, grammar = alfworld_logic()
    task = KINDS[kind][1].format(obj=obj.lower(), recep=target.lower())
    data = {"pddl_domain": domain, "grammar": grammar.replace("UNKNOWN GOAL.", task),
            "pddl_problem": problem, "solvable": True}
    task_dir = f"{KINDS[kind][0]}-{obj}-None-{'DeskLamp' if kind == 'look' else target}-{seed}"
    game = TinyGame(kind, task, task_dir, data)
    if plan:
        data["walkthrough"] = planner_solution(data)
    return game


def _goal(kind: str, obj: str, target: str) -> str:
    """Goals in the shape of the real games' (see a json_2.1.1 game.tw-pddl of each type)."""
    if kind == "look":
        return (f"(:goal (and (exists (?ot - object ?r - receptacle ?a - agent ?l - location) (and "
                f"(objectType ?ot DeskLampType) (toggleable ?ot) (isToggled ?ot) (receptacleAtLocation ?r ?l) "
                f"(atLocation ?a ?l) (inReceptacle ?ot ?r))) "
                f"(exists (?o - object ?a - agent) (and (objectType ?o {obj}Type) (holds ?a ?o)))))")
    if kind == "pick2":
        return (f"(:goal (and (exists (?r - receptacle) (exists (?o1 - object) (and (objectType ?o1 {obj}Type) "
                f"(receptacleType ?r {target}Type) (inReceptacle ?o1 ?r) (exists (?o2 - object) (and "
                f"(not (= ?o1 ?o2)) (objectType ?o2 {obj}Type) (receptacleType ?r {target}Type) "
                f"(inReceptacle ?o2 ?r))))))))")
    state = {"pick": "", "clean": "(cleanable ?o) (isClean ?o)", "heat": "(heatable ?o) (isHot ?o)",
             "cool": "(coolable ?o) (isCool ?o)"}[kind]
    return (f"(:goal (and (exists (?r - receptacle) (exists (?o - object) (and {state} "
            f"(objectType ?o {obj}Type) (receptacleType ?r {target}Type) (inReceptacle ?o ?r))))))")


def planner_solution(data: dict) -> list[str]:
    """textworld's `policy_commands` at the start of the game: fast-downward's plan, as commands."""
    import textworld
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler
    from textworld.envs.pddl import PddlEnv

    from envs.alfworld import memoise_translation
    memoise_translation()  # also keeps fast-downward from clobbering sys.argv
    env = AlfredDemangler(shuffle=False)(PddlEnv(textworld.EnvInfos(policy_commands=True)))
    env.load(data)
    plan = list(env.reset()["policy_commands"])
    env.close()
    if not plan:
        raise RuntimeError("fast-downward found no plan for a generated tiny game")
    return plan


def write_tiny_games(root: str | Path, splits: tuple[str, ...] = ("train", "valid_seen"), per_type: int = 1,
                     seed: int = 0) -> Path:
    """Write per_type games of every kind into each split; returns `root` (use it as data_path)."""
    root = Path(root)
    for s, split in enumerate(splits):
        for kind in KINDS:
            for i in range(per_type):
                game = tiny_game(kind, seed=seed + 1000 * s + i)
                trial = root / "json_2.1.1" / split / game.task_dir / f"trial_tiny_{seed + 1000 * s + i:05d}"
                trial.mkdir(parents=True, exist_ok=True)
                (trial / "game.tw-pddl").write_text(json.dumps(game.data))
    return root


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m envs.alfworld_games", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="folder to write json_2.1.1/ into")
    ap.add_argument("--per-type", type=int, default=1, help="games of each of the six types per split")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(write_tiny_games(args.out, per_type=args.per_type, seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
