"""Smoke runs of `python -m himac.coevolve` as a user runs it (subprocesses, tiny test model)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--set", "model=tiny", "--set", "tasks_per_iteration=2", "--set", "group_size=2",
        "--set", "rollouts_per_blueprint=2", "--set", "blueprint_max_tokens=12", "--set", "action_max_tokens=4",
        "--set", "max_steps=3", "--set", "eval_episodes=2"]


def coevolve(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "himac.coevolve", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


def lines(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def test_one_iteration_of_the_cpu_config(tmp_path):
    out = tmp_path / "run"
    coevolve("configs/sokoban_cpu.yaml", "--set", "iterations=1", *FAST, "--out", str(out))
    (m,) = lines(out / "metrics.jsonl")
    for key in ("iteration", "success_rate", "wall_s", "macro/return_mean", "micro/return_mean",
                "env/invalid_action_rate", "time/generate_s", "time/update_s", "time/env_s", "eval/success_rate"):
        assert key in m, key
    assert m["iteration"] == 0 and 0.0 <= m["success_rate"] <= 1.0
    assert [e["iteration"] for e in lines(out / "eval.jsonl")] == [-1, 0]  # before and after training
    cfg = (out / "config.yaml").read_text()
    assert "model: tiny" in cfg and "group_size: 2" in cfg and "load_in_4bit: true" in cfg
    run = json.loads((out / "run.json").read_text())
    assert run["seed"] == 0 and run["versions"]["torch"]
    assert (out / "checkpoint" / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "checkpoint" / "trainer.pt").is_file()
    assert (out / "progress.png").stat().st_size > 10_000


def test_resume_continues_exactly_where_it_stopped(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["configs/sokoban_cpu.yaml", *FAST, "--set", "load_in_4bit=false", "--set", "eval_episodes=0"]
    coevolve(*common, "--set", "iterations=2", "--out", str(straight))
    coevolve(*common, "--set", "iterations=1", "--out", str(split))
    coevolve("--resume", str(split), "--set", "iterations=2")
    a, b = lines(straight / "metrics.jsonl"), lines(split / "metrics.jsonl")
    assert [m["iteration"] for m in b] == [0, 1]
    for key in ("success_rate", "macro/return_mean", "micro/return_mean", "macro/blueprint_tokens_mean", "env/steps"):
        assert a[1][key] == b[1][key], key
    wa = load_file(straight / "checkpoint" / "adapter" / "adapter_model.safetensors")
    wb = load_file(split / "checkpoint" / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k


@pytest.mark.parametrize("args,needle", [
    (["--set", "group_size=0"], "group_size"),
    (["--set", "gruop_size=4"], "gruop_size"),
    (["--set", "lr=fast"], "'lr'"),
    (["--set", "env=chess"], "chess"),
])
def test_bad_config_exits_with_the_key_named(tmp_path, args, needle):
    proc = coevolve("configs/sokoban_cpu.yaml", *args, "--out", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr


def test_existing_run_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    coevolve("configs/sokoban_cpu.yaml", "--set", "iterations=1", *FAST, "--set", "eval_episodes=0", "--out", str(out))
    proc = coevolve("configs/sokoban_cpu.yaml", *FAST, "--out", str(out), check=False)
    assert proc.returncode == 2 and "--resume" in proc.stderr
    proc = coevolve("--resume", str(tmp_path / "nothing"), check=False)
    assert proc.returncode == 2 and "no checkpoint" in proc.stderr
