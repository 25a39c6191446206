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
    coevolve("configs/sokoban_cpu.yaml", "--set", "iterations=1", *FAST, "--set", "load_in_4bit=true",
             "--out", str(out))  # NF4 through the CLI (the CPU default itself trains f32 LoRA)
    (m,) = lines(out / "metrics.jsonl")
    for key in ("iteration", "success_rate", "wall_s", "macro/return_mean", "micro/return_mean",
                "env/invalid_action_rate", "time/generate_s", "time/update_s", "time/env_s", "eval/success_rate"):
        assert key in m, key
    assert m["iteration"] == 0 and 0.0 <= m["success_rate"] <= 1.0
    assert [e["iteration"] for e in lines(out / "eval.jsonl")] == [-1, 0]  # before and after training
    cfg = (out / "config.yaml").read_text()
    assert "model: tiny" in cfg and "group_size: 2" in cfg and "load_in_4bit: true" in cfg
    assert "macro_every: 2" in cfg  # and the file's own keys
    run = json.loads((out / "run.json").read_text())
    assert run["seed"] == 0 and run["versions"]["torch"]
    assert (out / "checkpoint" / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "checkpoint" / "trainer.pt").is_file()
    assert (out / "progress.png").stat().st_size > 10_000


def test_resume_continues_exactly_where_it_stopped(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["configs/sokoban_cpu_paper.yaml", *FAST, "--set", "load_in_4bit=false", "--set", "eval_episodes=0"]
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
    (["--set", "max_grad_norm=-1"], "max_grad_norm"),
    (["--set", "max_grad_norm=0"], "max_grad_norm"),
    (["--set", "lr=.inf"], "'lr'"),
    (["--set", "halt_penalty=.nan"], "halt_penalty"),
    (["--set", "seed=-1"], "seed"),
    (["--set", "device=banana"], "device"),
    (["--set", "device=cuda:7"], "device"),
    (["--set", "clip_eps=1.5"], "clip_eps"),
    (["--set", "subgoal_overrun=skip"], "subgoal_overrun"),
    (["--set", "group_size=1"], "group_size"),
    (["--set", "rollouts_per_blueprint=1"], "rollouts_per_blueprint"),
    (["--set", "lr=[1"], "lr=[1"),
])
def test_bad_config_exits_with_the_key_named(tmp_path, args, needle):
    proc = coevolve("configs/sokoban_cpu_paper.yaml", *args, "--out", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()  # nothing written for a run that never started


@pytest.mark.parametrize("content,needle", [
    (b"group_size: [1, 2\n", "not valid YAML at line"),
    (b"group_size: 2\nlr: \xff\xfe\n", "not UTF-8"),
])
def test_unreadable_config_files_are_named(tmp_path, content, needle):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    proc = coevolve(str(path), "--out", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2 and needle in proc.stderr and str(path) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_out_must_be_a_fresh_directory(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    proc = coevolve("configs/sokoban_cpu_paper.yaml", "--out", str(a_file), check=False)
    assert proc.returncode == 2 and "is a file" in proc.stderr
    logs_only = tmp_path / "logs"
    logs_only.mkdir()
    (logs_only / "metrics.jsonl").write_text('{"iteration": 0}\n')
    proc = coevolve("configs/sokoban_cpu_paper.yaml", "--out", str(logs_only), check=False)
    assert proc.returncode == 2 and "another run" in proc.stderr
    assert (logs_only / "metrics.jsonl").read_text() == '{"iteration": 0}\n'  # untouched


def test_resume_refuses_shape_changes_and_broken_files(tmp_path):
    out = tmp_path / "run"
    coevolve("configs/sokoban_cpu_paper.yaml", "--set", "iterations=1", *FAST, "--set", "eval_episodes=0",
             "--out", str(out))
    config = (out / "config.yaml").read_text()
    proc = coevolve("--resume", str(out), "--set", "lora_r=4", check=False)
    assert proc.returncode == 2 and "lora_r" in proc.stderr and "cannot change on resume" in proc.stderr
    assert (out / "config.yaml").read_text() == config  # a refused resume rewrites nothing
    proc = coevolve("--resume", str(out), "--set", "device=cuda:3", check=False)
    assert proc.returncode == 2 and (out / "config.yaml").read_text() == config
    # a truncated config.yaml does not silently resume on defaults: the checkpoint's copy is used
    (out / "config.yaml").write_text("env: sokoban\n")
    proc = coevolve("--resume", str(out), "--set", "iterations=2")
    assert "differs from the checkpoint's config" in proc.stderr
    assert "group_size: 2" in (out / "config.yaml").read_text()
    assert [m["iteration"] for m in lines(out / "metrics.jsonl")] == [0, 1]
    # a truncated adapter is named, not a traceback
    weights = out / "checkpoint" / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    proc = coevolve("--resume", str(out), "--set", "iterations=3", check=False)
    assert proc.returncode == 2 and "unreadable" in proc.stderr and "Traceback" not in proc.stderr


def test_metrics_are_valid_json_even_with_nan(tmp_path):
    from himac.rundir import RunDir
    run = RunDir(tmp_path / "r")
    run.log({"iteration": 0, "micro/loss": float("nan"), "x": [float("inf"), 1.0]})
    text = (tmp_path / "r" / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"iteration": 0, "micro/loss": None, "x": [None, 1.0]}
    with open(tmp_path / "r" / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 1, "micro/lo')  # torn by a crash
    with pytest.warns(UserWarning, match="torn"):
        assert [m["iteration"] for m in run.metrics()] == [0]
    with pytest.warns(UserWarning, match="torn"):
        run.drop_metrics_after(5)
    assert run.metrics() == [{"iteration": 0, "micro/loss": None, "x": [None, 1.0]}]


def test_existing_run_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    coevolve("configs/sokoban_cpu_paper.yaml", "--set", "iterations=1", *FAST, "--set", "eval_episodes=0",
             "--out", str(out))
    proc = coevolve("configs/sokoban_cpu_paper.yaml", *FAST, "--out", str(out), check=False)
    assert proc.returncode == 2 and "--resume" in proc.stderr
    proc = coevolve("--resume", str(tmp_path / "nothing"), check=False)
    assert proc.returncode == 2 and "no checkpoint" in proc.stderr
