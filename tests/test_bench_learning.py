"""tools/bench_learning.py end to end as a subprocess, with the tiny test-only model."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny", "tasks_per_iteration=2", "group_size=2", "rollouts_per_blueprint=2", "blueprint_max_tokens=8",
        "action_max_tokens=3", "max_steps=3", "max_solution_moves=3", "micro_batch_size=8", "lora_r=4", "lora_alpha=8"]


def test_bench_learning_writes_curves_plot_and_table(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "tools/bench_learning.py", "--variants", "himac,flat_gigpo", "--iterations", "2",
           "--eval-every", "1", "--eval-episodes", "2", "--out", str(out)]
    for kv in TINY:
        cmd += ["--set", kv]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    curves = json.loads((out / "curves.json").read_text())["curves"]
    assert set(curves) == {"himac", "flat_gigpo"}
    for c in curves.values():
        assert c["iteration"] == [0, 1, 2]  # before training, then after each iteration
        assert c["train_s"][0] == 0 and c["train_s"][2] > c["train_s"][1] > 0
        assert c["env_steps"][2] > c["env_steps"][1] > 0 and c["gen_tokens"][2] > 0
        assert all(0.0 <= s <= 1.0 for s in c["success"])
    assert (out / "learning.png").stat().st_size > 10_000
    assert (out / "himac" / "metrics.jsonl").is_file() and (out / "flat_gigpo" / "eval.jsonl").is_file()
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["variant", "success@0", "final"]
    assert any(line.startswith("himac ") for line in lines) and any(line.startswith("flat_gigpo") for line in lines)


def test_bench_learning_rejects_an_unknown_variant():
    proc = subprocess.run([sys.executable, "tools/bench_learning.py", "--variants", "himac,flat_ppo"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "flat_ppo" in proc.stderr
