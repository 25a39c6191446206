"""tools/bench_learning.py end to end as a subprocess, with the tiny test-only model."""
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from envs.base import EnvSpec, Obs
from himac.evaluation import open_loop_reference
from tests.helpers import SCRIPTED_PROMPTS

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny", "tasks_per_iteration=2", "group_size=2", "rollouts_per_blueprint=2", "blueprint_max_tokens=8",
        "action_max_tokens=3", "max_steps=3", "max_solution_moves=3", "micro_batch_size=8", "lora_r=4"]


def test_bench_learning_seeds_variants_and_shared_start(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "tools/bench_learning.py", "--config", "configs/sokoban_cpu_paper.yaml",
           "--variants", "himac,flat_gigpo", "--seeds", "0,1",
           "--iterations", "2", "--eval-every", "1", "--eval-episodes", "2", "--jobs", "2", "--open-loop-rooms", "8", "--out", str(out)]
    for kv in TINY:
        cmd += ["--set", kv]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    curves = json.loads((out / "curves.json").read_text())["curves"]
    assert set(curves) == {"himac", "flat_gigpo"}
    for name, seeds in curves.items():
        assert set(seeds) == {"0", "1"}
        starts = {c["success"][0] for c in seeds.values()}
        assert len(starts) == 1  # one shared evaluation of the untrained agent
        for c in seeds.values():
            assert c["iteration"] == [0, 1, 2]  # before training, then after each iteration
            assert c["train_s"][0] == 0 and c["train_s"][2] > c["train_s"][1] > 0
            assert c["env_steps"][2] > c["env_steps"][1] > 0 and c["gen_tokens"][2] > 0
            assert all(0.0 <= s <= 1.0 for s in c["success"])
        # the runs themselves never evaluated before training: the shared start did, once
        for s in ("0", "1"):
            evals = [json.loads(x) for x in (out / name / f"seed{s}" / "eval.jsonl").read_text().splitlines()]
            assert [e["iteration"] for e in evals] == [0, 1]
    assert (out / "_start-default" / "eval.jsonl").is_file() and (out / "_start-hierarchy=False").is_dir()
    assert (out / "learning.png").stat().st_size > 10_000
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:4] == ["variant", "seeds", "success@0", "final"]
    assert any(line.split()[:2] == ["himac", "2"] for line in lines)
    # a second call keeps every finished run and only redraws
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stderr.count("done earlier, kept") == 6


def test_bench_learning_rejects_an_unknown_variant():
    proc = subprocess.run([sys.executable, "tools/bench_learning.py", "--variants", "himac,flat_ppo"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "flat_ppo" in proc.stderr


@dataclass
class KeyConfig:
    keys: dict = field(default_factory=dict)  # seed -> the one action sequence that solves its episode


class KeyEnv:
    """Episode `seed` is solved by exactly `keys[seed]`; it ends after that many actions."""
    task_type = "key"

    def __init__(self, cfg: KeyConfig):
        self.cfg = cfg

    def reset(self, seed: int) -> Obs:
        self.need, self.taken = list(self.cfg.keys[seed]), []
        return Obs(text="")

    def step(self, action):
        self.taken.append(action)
        end = len(self.taken) == len(self.need)
        return Obs(text=""), 0.0, end, {"success": end and self.taken == self.need}

    def close(self):
        pass


def test_open_loop_reference_is_chosen_on_one_set_and_reported_on_the_other():
    spec = EnvSpec("key", KeyConfig, KeyEnv, lambda text: (text, True), SCRIPTED_PROMPTS, actions=("a", "b"))
    keys = {0: "ba", 1: "ba", 2: "ba", 3: "ba", 4: "baa", 5: "aa", 6: "aa", 7: "aa",  # choosing rooms
            10: "aa", 11: "bb", 12: "ba", 13: "bb"}  # held-out rooms
    ref = open_loop_reference(spec, KeyConfig(keys), choose_seeds=list(range(8)), seeds=[10, 11, 12, 13], length=2)
    # constants: a solves 5-7 (3/8), b none; sequences: (b, a) with its last action repeated also solves 4 (5/8)
    assert ref["constant"] == {"plan": ["a"], "chosen_on": 3 / 8, "success": 1 / 4}
    assert ref["sequence"] == {"plan": ["b", "a"], "chosen_on": 5 / 8, "success": 1 / 4}
    sokoban_free = EnvSpec("key", KeyConfig, KeyEnv, lambda text: (text, True), SCRIPTED_PROMPTS)
    try:
        open_loop_reference(sokoban_free, KeyConfig(keys), [0], [10])
        raise AssertionError("an env without a fixed action set has no open-loop reference")
    except ValueError as e:
        assert "fixed action set" in str(e)


def test_reading_rule_is_played_closed_loop_and_reported_beside_the_open_loop_lines():
    def peek(env):  # a rule that reads the state: the next action of the episode's key
        return env.need[len(env.taken)]
    spec = EnvSpec("key", KeyConfig, KeyEnv, lambda text: (text, True), SCRIPTED_PROMPTS, actions=("a", "b"), rule=peek)
    keys = {0: "ab", 1: "ba", 10: "ab", 11: "bb", 12: "ba"}
    ref = open_loop_reference(spec, KeyConfig(keys), choose_seeds=[0, 1], seeds=[10, 11, 12], length=2)
    assert ref["rule"] == {"plan": ["peek"], "chosen_on": None, "success": 1.0}
    assert ref["sequence"]["success"] == 1 / 3  # blind, (a, b) only solves room 10


def test_sokoban_toward_box_rule_solves_the_rooms_in_line_and_no_others():
    from envs import get_spec
    from envs.sokoban import SokobanConfig, parse_room
    spec = get_spec("sokoban")
    env = spec.make(SokobanConfig(max_steps=6))
    for room, solvable in (("#######\n#.__$@#\n#######", True), ("####\n#@_#\n#$_#\n#._#\n####", True),
                           ("######\n#@___#\n#_$__#\n#_.__#\n######", False)):  # the last needs a side step
        env.load(*parse_room(room))
        done, info = False, {}
        while not done:
            _, _, done, info = env.step(spec.rule(env))
        assert info["success"] == solvable, room


def test_rule_agreement_counts_the_moves_the_reading_rule_would_also_make():
    """Each held-out episode's env moves are replayed and scored against the reading rule in the state each was
    made in: the rule's own play agrees on every move; answers that moved nothing are not counted."""
    from envs import get_spec
    from envs.sokoban import SokobanConfig
    from himac.evaluation import mark_rule_agreement, summarise
    from himac.executor import INVALID, SUB_DONE
    spec = get_spec("sokoban")
    cfg = SokobanConfig(room_size=7, min_solution_moves=2, max_solution_moves=4, max_steps=6)
    env = spec.make(cfg)
    ruled = []
    for seed in range(4):
        env.reset(seed)
        moves, done = [], False
        while not done:
            moves.append(spec.rule(env))
            _, _, done, _ = env.step(moves[-1])
        ruled.append({"seed": seed, "moves": moves})
    blind = [{"seed": seed, "moves": [SUB_DONE, INVALID] + ["up"] * 6} for seed in range(4)]
    # seed 3: the box 2 right in the player's row ("right"); after a step up it lies down-right ("down"):
    # the state before each move decides, so the step back down agrees and the step up does not
    turn = {"seed": 3, "moves": ["up", "down"]}
    episodes = ruled + blind + [turn]
    mark_rule_agreement(spec, cfg, episodes)
    assert all(e["rule_agree"] == e["rule_moves"] == len(e["moves"]) for e in ruled)
    assert (turn["rule_agree"], turn["rule_moves"]) == (1, 2)
    assert all(e["rule_moves"] <= 6 and e["rule_agree"] <= e["rule_moves"] for e in blind)
    assert sum(e["rule_agree"] for e in blind) < sum(e["rule_moves"] for e in blind)  # "up" is not always right
    for e in episodes:
        e.update(task_type="sokoban", success=False, valid_blueprint=True, **{"return": 0.0})
    agree = sum(e["rule_agree"] for e in episodes) / sum(e["rule_moves"] for e in episodes)
    assert summarise(episodes, spec)["rule_agreement"] == agree


def _bench_doc(overrides: dict, curves: dict) -> dict:
    base = {"iterations": 100, "eval_episodes": 128, "eval_offset": 0, "time_clock": "cpu", "time_budget_s": 1800.0}
    return {"config": "configs/sokoban_bench_shaped.yaml", "overrides": {**base, **overrides}, "seeds": [0, 1],
            "open_loop": None, "curves": curves}


def _curve(successes: list[float]) -> dict:
    n = len(successes)
    return {"iteration": list(range(n)), "train_s": [60.0 * i for i in range(n)], "env_steps": list(range(n)),
            "gen_tokens": list(range(n)), "success": successes, "return": [0.0] * n,
            "action_top_share": [0.5] * n, "rule_agreement": [0.5] * n}


def test_merge_labels_a_variant_by_its_bench_overrides_and_refuses_other_rooms(tmp_path):
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    a.write_text(json.dumps(_bench_doc({}, {"himac": {"0": _curve([0.0, 0.2]), "1": _curve([0.0, 0.4])},
                                            "flat_grpo": {"0": _curve([0.1, 0.5])}})))
    b.write_text(json.dumps(_bench_doc({"macro_every": 2}, {"himac": {"0": _curve([0.0, 0.6]),
                                                                      "1": _curve([0.0, 0.8])}})))
    c.write_text(json.dumps(_bench_doc({"eval_offset": 1000000}, {"himac": {"0": _curve([0.0, 0.1])}})))
    out = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "tools/bench_learning.py", "--merge", str(a), str(b), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "curves.json").read_text())
    assert list(doc["curves"]) == ["himac", "flat_grpo", "himac (macro_every=2)"]
    assert doc["curves"]["himac (macro_every=2)"]["1"]["success"] == [0.0, 0.8]  # b's runs, not a's
    rows = {line.split("  ")[0].strip(): line.split() for line in proc.stdout.splitlines()[2:5]}
    assert float(rows["himac (macro_every=2)"][-11]) == 0.7 and float(rows["himac"][-11]) == 0.3  # final means
    assert (out / "learning.png").stat().st_size > 10_000
    bad = subprocess.run([sys.executable, "tools/bench_learning.py", "--merge", str(a), str(c), "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "eval_offset" in bad.stderr and "same rooms" in bad.stderr


def test_merge_takes_a_bench_of_another_config_on_the_same_rooms_and_refuses_other_rooms(tmp_path):
    a, d, e = tmp_path / "a.json", tmp_path / "d.json", tmp_path / "e.json"
    a.write_text(json.dumps(_bench_doc({}, {"himac": {"0": _curve([0.0, 0.2])}})))
    d.write_text(json.dumps({**_bench_doc({"eval_every_minutes": 0.0}, {"himac": {"0": _curve([0.1, 0.9])}}),
                             "config": "configs/sokoban_bench_plans.yaml"}))  # same env keys, other method keys
    e.write_text(json.dumps({**_bench_doc({}, {"himac": {"0": _curve([0.1, 0.9])}}),
                             "config": "configs/sokoban_bench.yaml"}))  # other rooms
    out = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "tools/bench_learning.py", "--merge", str(a), str(d), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "curves.json").read_text())
    assert list(doc["curves"]) == ["himac", "himac (sokoban_bench_plans)"]
    assert doc["curves"]["himac (sokoban_bench_plans)"]["0"]["success"] == [0.1, 0.9]
    bad = subprocess.run([sys.executable, "tools/bench_learning.py", "--merge", str(a), str(e), "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "not the same rooms" in bad.stderr and "sokoban_bench.yaml" in bad.stderr


def test_merge_adds_a_later_benchs_other_seeds_of_a_variant_to_its_row_and_refuses_the_same_seed(tmp_path):
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    a.write_text(json.dumps(_bench_doc({}, {"himac": {"0": _curve([0.0, 0.2]), "1": _curve([0.0, 0.4])}})))
    b.write_text(json.dumps(_bench_doc({}, {"himac": {"3": _curve([0.0, 0.9])}})))  # seeds 3 of the same settings
    c.write_text(json.dumps(_bench_doc({}, {"himac": {"1": _curve([0.0, 0.9])}})))  # seed 1 again
    out = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "tools/bench_learning.py", "--merge", str(a), str(b), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "curves.json").read_text())
    assert list(doc["curves"]) == ["himac"] and sorted(doc["curves"]["himac"]) == ["0", "1", "3"]
    row = proc.stdout.splitlines()[2].split()
    assert row[0] == "himac" and int(row[1]) == 3 and float(row[3]) == 0.5  # seeds, final mean (0.2 + 0.4 + 0.9) / 3
    bad = subprocess.run([sys.executable, "tools/bench_learning.py", "--merge", str(a), str(c), "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "seed(s) 1 already" in bad.stderr
