"""tools/probe_plans.py: oracle plans solve their rooms, and the probe tells an executor that follows its plan
from one that ignores it (two scripted executors, stand-ins for a trained model, which the probe measures)."""
import re
from pathlib import Path

import pytest

from envs import get_spec
from envs.seeds import VALIDATION_OFFSET, eval_seeds
from helpers import TextPolicy, load_tool
from himac import config as C
from himac.experiment import load_config
from himac.policy import Completion

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "sokoban_bench_shaped.yaml"


def load():
    return load_tool("probe_plans")


class Executor(TextPolicy):
    """Plans "1. Push the box onto the target."; as the executor, `obey=True` makes the move its sub-goal names
    next ("Move right, then up." : right, then up, counted by the segment's history lines), `obey=False`
    always answers up."""

    def __init__(self, tokenizer, obey: bool):
        super().__init__(tokenizer)
        self.obey = obey

    def answer(self, prompt: str) -> str:
        goal = re.search(r"Sub-goal \(\d+/\d+\): (.*)", prompt)
        if goal is None:
            return " Push the box onto the target."
        named = re.findall(r"\b(up|down|left|right)\b", goal.group(1)) if self.obey else []
        done = len(re.findall(r"^- ", prompt.split("Map (")[0], re.MULTILINE))  # this segment's steps so far
        return " " + (named[done] if done < len(named) else "up")

    def generate(self, prompts, max_new_tokens, temperature, stop_at_newline=False, choices=None, **_):
        out = []
        for ids in prompts:
            text = self.answer(self.tokenizer.decode(ids))
            out.append(Completion(self.tokenize(text) + self.eos_ids, text))
        return out


def config():
    # every step of a segment in the prompt (the obeying executor counts them)
    return load_config(CONFIG, C.parse_overrides(["history_window=4"]))


def test_oracle_plans_name_the_solution_and_solve_the_room():
    probe, cfg, spec = load(), config(), get_spec("sokoban")
    for seed in eval_seeds(6, VALIDATION_OFFSET):
        moves = spec.solution(cfg.env, seed)
        plan = probe.oracle_plan(moves, 3, 2)
        assert 1 <= len(plan) <= 2 and re.findall(r"up|down|left|right", " ".join(plan)) == moves
        env = spec.make(cfg.env)
        env.reset(seed)
        assert [env.step(m)[3].get("success", False) for m in moves][-1]
    assert probe.oracle_plan(list("abcdefg"), 2, 3) == ["Move a, then b.", "Move c, then d.",
                                                         "Move e, then f, then g."]
    with pytest.raises(ValueError, match="at least one move"):
        probe.oracle_plan([], 3, 2)


@pytest.mark.parametrize("obey", [True, False])
def test_the_probe_tells_a_follower_from_an_executor_that_ignores_its_plan(tiny_tokenizer, obey):
    probe, cfg, spec = load(), config(), get_spec("sokoban")
    rows = {r["condition"]: r for r in probe.probe(Executor(tiny_tokenizer, obey), spec, cfg,
                                                   eval_seeds(8, VALIDATION_OFFSET))}
    assert list(rows) == ["own", "task only", "oracle", "wrong"]
    task = "Push the box onto the target."
    assert rows["own"]["first = plan"] is None and rows["own"]["example"] == f"{task} | {task}"  # padded to 2
    if obey:
        assert rows["oracle"]["success"] == 1.0 and rows["oracle"]["first = plan"] == 1.0
        assert rows["oracle"]["first = solution"] == 1.0
        assert rows["wrong"]["first = plan"] == 1.0 and rows["wrong"]["success"] <= 0.5
    else:  # the same moves whatever the plan: the same success under all four
        assert len({r["success"] for r in rows.values()}) == 1
        assert rows["oracle"]["first = plan"] < 1.0


def test_the_cli_prints_one_row_per_blueprint(capsys):
    assert load().main(["--config", str(CONFIG), "--set", "model=tiny", "--rooms", "2"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^(own|task only|oracle|wrong) +([01]\.\d{3}) ", out, re.MULTILINE)
    assert [name for name, _ in rows] == ["own", "task only", "oracle", "wrong"]
    assert "oracle - wrong:" in out and "validation range" in out
    with pytest.raises(SystemExit):
        load().main(["--config", str(CONFIG), "--set", "model=tiny", "--rooms", "1"])


def test_with_blueprint_choices_the_oracle_is_the_candidate_plan_the_solution_carries_out():
    probe, spec = load(), get_spec("sokoban")
    cfg = load_config(ROOT / "configs" / "sokoban_bench_plans.yaml")
    cands = {tuple(p) for p in spec.prompts.blueprint_choices}
    seeds = eval_seeds(12, VALIDATION_OFFSET)
    moves = [spec.solution(cfg.env, s) for s in seeds]
    found = [probe.carried_out(spec, cfg.env, s, m) for s, m in zip(seeds, moves)]
    for plan, m in zip(found, moves):
        assert tuple(plan) in cands and plan[0] == f"Push the box {m[0]}."  # every room starts with a push
        named = re.findall(r"box (\w+)", " ".join(plan))
        assert all(d in m for d in named)
    # room 4 by hand: left pushes, down and left walk round the box, up pushes it onto the target
    assert moves[3] == ["left", "down", "left", "up"] and found[3] == ["Push the box left.", "Push the box up."]
    assert {len(p) for p in found} == {1, 2}  # one push direction or two
    assert probe.carried_out(spec, cfg.env, seeds[0], []) is None  # nothing carried out is no plan
    tasks = ["Push the box onto the target."] * len(seeds)
    table = probe.plans(cfg, moves, tasks, [[t] for t in tasks], found)
    assert table["oracle"][0] == [p + tasks[:2 - len(p)] for p in found]
    assert table["wrong"][0] == table["oracle"][0][1:] + table["oracle"][0][:1]


def test_planner_agreement_counts_only_rooms_with_an_oracle_plan():
    probe = load()
    a, b = ["Push the box left.", "Push the box up."], ["Push the box up."]
    got = probe.agreement([a, a[:1], b, a], [a, a, None, b])
    assert got == {"plan = oracle": 1 / 3, "first = oracle first": 2 / 3, "rooms": 3}
    with pytest.raises(ValueError, match="no room"):
        probe.agreement([a], [None])


class Planner(TextPolicy):
    """Writes, for the room whose map is in the prompt, the plan `plans` names for it (a stand-in planner that
    reads the map perfectly, or, with every room's plan shifted by one, one that reads it wrong)."""

    def __init__(self, tokenizer, plans: dict[str, list[str]]):
        super().__init__(tokenizer)
        self.plans = plans

    def generate(self, prompts, max_new_tokens, temperature, stop_at_newline=False, choices=None, **_):
        out = []
        for ids in prompts:
            text = self.decode(ids)
            plan = next(p for room, p in self.plans.items() if room in text)
            answer = "\n".join(f"{i + 1}. {g}" for i, g in enumerate(plan))
            answer = " " + answer[len("1."):].lstrip()  # the prompt ends in the prefilled "1."
            out.append(Completion(self.tokenize(answer) + self.eos_ids, answer))
        return out


def test_the_planner_check_scores_a_planner_that_reads_the_map_against_one_that_does_not(tiny_tokenizer):
    probe, spec = load(), get_spec("sokoban")
    cfg = load_config(ROOT / "configs" / "sokoban_bench_plans.yaml")
    seeds = eval_seeds(6, VALIDATION_OFFSET)
    pool = spec.pool(cfg.env, evaluation=True)
    try:
        maps = [obs.text for obs in pool.reset(seeds)]
    finally:
        pool.close()
    assert len(set(maps)) == len(seeds)
    oracles = [probe.carried_out(spec, cfg.env, s, list(spec.solution(cfg.env, s))) for s in seeds]
    right = probe.planner_check(Planner(tiny_tokenizer, dict(zip(maps, oracles))), spec, cfg, seeds)
    assert right == {"plan = oracle": 1.0, "first = oracle first": 1.0, "rooms": len(seeds)}
    shifted = dict(zip(maps, oracles[1:] + oracles[:1]))  # each room gets the next room's plan
    wrong = probe.planner_check(Planner(tiny_tokenizer, shifted), spec, cfg, seeds)
    assert wrong["plan = oracle"] < 1.0 and wrong["first = oracle first"] < 1.0


def test_planner_only_needs_blueprint_choices(capsys):
    with pytest.raises(SystemExit):
        load().main(["--config", str(CONFIG), "--set", "model=tiny", "--rooms", "2", "--planner-only"])
    plans = str(ROOT / "configs" / "sokoban_bench_plans.yaml")
    assert load().main(["--config", plans, "--set", "model=tiny", "--rooms", "2", "--planner-only"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"its plan = the oracle's in [01]\.\d{3} of 2 rooms", out) and "oracle - wrong" not in out
