"""tools/bench_learning.py end to end as a subprocess, with the tiny test-only model."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny", "tasks_per_iteration=2", "group_size=2", "rollouts_per_blueprint=2", "blueprint_max_tokens=8",
        "action_max_tokens=3", "max_steps=3", "max_solution_moves=3", "micro_batch_size=8", "lora_r=4", "lora_alpha=8"]


def test_bench_learning_seeds_variants_and_shared_start(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "tools/bench_learning.py", "--variants", "himac,flat_gigpo", "--seeds", "0,1",
           "--iterations", "2", "--eval-every", "1", "--eval-episodes", "2", "--jobs", "2", "--out", str(out)]
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
