"""tools/gpu_check.sh's CPU fall-back, end to end: the script a lent GPU runs first must not be found broken
on the device (its time is scarce). Without CUDA it runs every step CPU-sized (one-layer shapes, a
1024-token vocabulary, tiny settings): this checks the script, its steps' command lines and its table,
not a card. About a minute on two cores."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["gpu-tests", "lm-1.5b-bf16", "lm-1.5b-nf4", "logp-1.5b", "vl-3b-nf4"]


def _cpu_fallback(tmp_path, steps: str | None = None, timeout: int = 900):
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the real check (minutes): bash tools/gpu_check.sh")
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    out = tmp_path / "gc"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_OUT": str(out),
           "HIMAC_WHEELS": str(tmp_path / "no-wheels"), "STEP_TIMEOUT": "300"}
    env.pop("GPU_CHECK_STEPS", None)
    if steps is not None:
        env["GPU_CHECK_STEPS"] = steps
    proc = subprocess.run(["bash", "tools/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    lines = proc.stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("| step |")), len(lines))
    rows = {}
    for line in lines[start + 2:]:  # the steps' table: its header, its rule, then rows to the first blank line
        if not line.startswith("| "):
            break
        rows[line.split("|")[1].strip()] = [c.strip() for c in line.split("|")[2:-1]]
    return proc, out, rows


@pytest.mark.slow
def test_gpu_check_cpu_fallback_runs_every_step_and_prints_one_table(tmp_path):
    pytest.importorskip("gym_sokoban")
    pytest.importorskip("bitsandbytes")
    proc, out, rows = _cpu_fallback(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no CUDA device: CPU fall-back" in proc.stdout
    assert "shape model: random weights, for measurement only" in proc.stdout
    for step in STEPS:
        assert step in rows, (step, list(rows))
        assert rows[step][1].startswith("ok"), (step, rows[step])
    assert set(rows) == set(STEPS), "the extras run only when GPU_CHECK_STEPS names them"
    assert "(target: under 480 s)" in proc.stdout
    # the steps wrote what the table reads: the log-prob bench's two ways, and the VL-3B phases
    lp = {r["way"]: r for r in json.loads((out / "logp.json").read_text())["rows"]}
    assert set(lp) == {"plain", "chunked"} and not any(r.get("oom") for r in lp.values())
    vl = json.loads((out / "vl-3b.json").read_text())
    assert [p["phase"] for p in vl["phases"]][:2] == ["A: blueprints", "A: greedy rollouts"]


@pytest.mark.slow
def test_gpu_check_runs_the_named_extras_only(tmp_path):
    """GPU_CHECK_STEPS picks steps: here only the two extras a lent GPU has left to run (the 1.5B config at its own
    batches, and the bench beside TRL), CPU-sized; the table reads both of their JSON files."""
    pytest.importorskip("gym_sokoban")
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("trl")
    proc, out, rows = _cpu_fallback(tmp_path, "mem-1.5b trl-1.5b")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert set(rows) >= {"mem-1.5b-nf4", "trl-1.5b"}, list(rows)
    assert not set(rows) & set(STEPS), "steps not named ran"
    assert "(steps: mem-1.5b trl-1.5b)" in proc.stdout
    mem = json.loads((out / "mem-1.5b.json").read_text())
    assert mem["config"].endswith("sokoban_1p5b.yaml") and mem["load_in_4bit"] is True
    assert "A: update" in [p["phase"] for p in mem["phases"]]
    assert "1.5B shape at sokoban_1p5b.yaml's batches, per phase" in proc.stdout
    s = json.loads((out / "trl.json").read_text())["summary"]
    assert s["himac"]["trainable_params"] == s["trl"]["trainable_params"] > 0
    h, t = s["himac"]["s_per_iteration_median"], s["trl"]["s_per_iteration_median"]
    result = rows["trl-1.5b"][1]
    assert result.startswith("ok") and f"himac {h:.2f}, TRL {t:.2f}, {h / t:.2f}x" in result, result
    assert f"TRL {s['trl']['peak_process_gib']:.2f})" in result, result


def test_gpu_check_refuses_an_unknown_step_before_running_anything(tmp_path):
    proc, out, rows = _cpu_fallback(tmp_path, "logp-1.5b vl3b", timeout=60)
    assert proc.returncode == 2
    assert "unknown step 'vl3b' in GPU_CHECK_STEPS" in proc.stderr and "vl-3b" in proc.stderr
    assert not out.exists() and not rows
