"""`python -m himac.evaluate`: the hf and llamacpp backends on one checkpoint, the CLI as a user
runs it, and the embedded SmolLM2 GGUF (a real model) playing Sokoban through llama.cpp."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from envs.sokoban import parse_action
from himac import evaluate, models
from test_export import make_run

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--set", "max_steps=4", "--set", "blueprint_max_tokens=12", "--set", "action_max_tokens=4"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny Qwen2 (test-only) run directory whose random adapter makes it write varied answers."""
    return make_run(tmp_path_factory.mktemp("eval") / "run", seed=4)  # a seed whose greedy blueprints hold words


def evaluate_cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "himac.evaluate", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


def same_episode(e: dict) -> tuple:
    return e["seed"], e["blueprint"], e["actions"], e["success"], round(e["return"], 6), e["end"]


def test_hf_and_llamacpp_backends_play_the_same_episodes(run):
    pytest.importorskip("llama_cpp")
    cfg = evaluate.resolve_config(None, str(run), {})
    reports = {b: evaluate.run_evaluation(evaluate.load_backend(b, str(run), cfg, threads=1), cfg, 6, progress=False)
               for b in evaluate.BACKENDS}
    hf, lc = reports["hf"]["episodes"], reports["llamacpp"]["episodes"]
    assert sum(len(e["actions"]) for e in hf) >= 12  # executor turns really ran
    assert len({a for e in hf for a in e["actions"]}) >= 2  # and said different things
    assert [same_episode(e) for e in lc] == [same_episode(e) for e in hf]
    for key in ("success_rate", "return_mean", "blueprint_valid_rate", "success_rate/sokoban"):
        assert reports["hf"][key] == pytest.approx(reports["llamacpp"][key]), key


def test_cli_reports_the_same_for_both_backends(run, tmp_path):
    pytest.importorskip("llama_cpp")
    out = {b: tmp_path / f"{b}.json" for b in evaluate.BACKENDS}
    for b in evaluate.BACKENDS:
        proc = evaluate_cli("configs/sokoban_cpu_paper.yaml", "--checkpoint", run, "--backend", b, "--episodes", 3,
                            "--threads", 1,
                            *SHORT, "--out", out[b])
        assert "success_rate" in proc.stdout and "perf/episodes_per_s" in proc.stdout  # the table
    hf, lc = (json.loads(out[b].read_text()) for b in evaluate.BACKENDS)
    assert (run / "export" / "agent-f32.gguf").is_file()  # llamacpp on a run directory exports it first
    for key in ("success_rate", "return_mean", "success_rate/sokoban", "return_mean/sokoban", "perf/episodes_per_s",
                "perf/gen_tokens_per_s"):
        assert key in hf and key in lc, key
    assert len(hf["episodes"]) == 3 and hf["backend"] == "hf" and lc["backend"] == "llamacpp"
    # the model keys came from the run (tiny), not from the config file (smollm2-135m)
    assert [same_episode(e) for e in lc["episodes"]] == [same_episode(e) for e in hf["episodes"]]


def test_cli_errors_name_the_bad_value(run, tmp_path):
    proc = evaluate_cli("configs/sokoban_cpu_paper.yaml", "--checkpoint", tmp_path / "nope.gguf", check=False)
    assert proc.returncode == 2 and "nope.gguf" in proc.stderr and "Traceback" not in proc.stderr
    proc = evaluate_cli("--checkpoint", run, "--set", "gruop_size=3", check=False)
    assert proc.returncode == 2 and "gruop_size" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_embedded_smollm2_gguf_plays_sokoban_through_llamacpp():
    pytest.importorskip("llama_cpp")
    try:
        models.embedded_gguf("smollm2-135m")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    cfg = evaluate.resolve_config(str(ROOT / "configs" / "sokoban_cpu_paper.yaml"), "smollm2-135m", {"max_steps": 4})
    policy = evaluate.load_backend("llamacpp", "smollm2-135m", cfg, threads=1)
    report = evaluate.run_evaluation(policy, cfg, 3, progress=False)
    episodes = report["episodes"]
    assert report["blueprint_valid_rate"] > 0.5  # a real instruct model writes numbered plans
    answers = [a for e in episodes for a in e["actions"]]
    assert answers and any(parse_action(a)[1] for a in answers)  # and names directions
    assert all(e["end"] != "env_error" for e in episodes)
