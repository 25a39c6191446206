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


@pytest.mark.slow
def test_gpu_check_cpu_fallback_runs_every_step_and_prints_one_table(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the real check (minutes): bash tools/gpu_check.sh")
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    pytest.importorskip("gym_sokoban")
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "gc"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_OUT": str(out),
           "HIMAC_WHEELS": str(tmp_path / "no-wheels"), "STEP_TIMEOUT": "300"}
    proc = subprocess.run(["bash", "tools/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no CUDA device: CPU fall-back" in proc.stdout
    assert "shape model: random weights, for measurement only" in proc.stdout
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| step")}
    for step in STEPS:
        assert step in rows, (step, list(rows))
        assert rows[step][1].startswith("ok"), (step, rows[step])
    # the steps wrote what the table reads: the log-prob bench's two ways, and the VL-3B phases
    lp = {r["way"]: r for r in json.loads((out / "logp.json").read_text())["rows"]}
    assert set(lp) == {"plain", "chunked"} and not any(r.get("oom") for r in lp.values())
    vl = json.loads((out / "vl-3b.json").read_text())
    assert [p["phase"] for p in vl["phases"]][:2] == ["A: blueprints", "A: greedy rollouts"]
