"""tools/bench_trl.py end to end on the tiny test-only model: himac's flat loop beside TRL's GRPOTrainer.

Skipped where TRL is absent (CI does not install the `bench` extra)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parents[1]
P, G, TOKENS = 2, 2, 4


@pytest.mark.slow
def test_bench_trl_tiny_one_iteration(tmp_path):
    out = tmp_path / "trl.json"
    proc = subprocess.run([sys.executable, "tools/bench_trl.py", "--model", "tiny", "--prompts", str(P), "--group",
                           str(G), "--max-new-tokens", str(TOKENS), "--warmup", "1", "--iterations", "1",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    s = data["summary"]

    # the two sides trained the same thing: same adapter size, same prompt ids, no checkpointing, one thread
    assert s["himac"]["trainable_params"] == s["trl"]["trainable_params"] > 0
    assert s["trl"]["prompt_ids_match"] is True and s["trl"]["checkpointing"] is False
    assert s["himac"]["torch_threads"] == s["trl"]["torch_threads"] == [1]
    for side in ("himac", "trl"):
        x = s[side]
        rec = data["records"][side]
        assert len(rec["iterations"]) == 2  # warm-up + timed
        assert x["s_per_iteration_median"] > 0 and x["cpu_s_per_iteration_median"] > 0
        # every instrument fired once per iteration: one generate call for all P*G completions, one reference and
        # one policy forward, one backward, one optimiser step; the reward: himac's env reset + step, TRL's function
        assert x["calls_per_iteration"] == {"generate": 1, "reward": 2 if side == "himac" else 1, "ref_forward": 1,
                                            "policy_forward": 1, "backward": 1, "optimizer": 1}, side
        for split, total, other in (("split_mean_s", "s_per_iteration_mean", "other_mean_s"),
                                    ("split_mean_cpu_s", "cpu_s_per_iteration_mean", "other_mean_cpu_s")):
            parts = x[split]
            assert all(v > 0 for v in parts.values()), (side, split, parts)
            # the parts are disjoint and inside the iteration: they cannot add up to more than it
            assert sum(parts.values()) <= x[total] + 1e-6, (side, split, parts, x[total])
            assert x[other] == pytest.approx(x[total] - sum(parts.values()))
        assert P * G <= x["gen_tokens_per_iteration"] <= P * G * TOKENS
        assert -0.2 - 1e-6 <= x["reward_mean"] <= 10.9 + 1e-6  # one move: invalid -0.2 .. solved +10.9 (TRL: float32)
        assert 0 < x["rss_imports_gib"] <= x["rss_loaded_gib"] <= x["peak_process_gib"]
        # VmHWM and getrusage's maxrss are two kernel counters, updated at different moments: equal to ~1%
        assert x["rss_loaded_gib"] * 0.9 <= x["peak_timed_gib"] <= x["peak_process_gib"] * 1.02

    # the table: the rows, its numbers are the summary's, and the ratio column is himac / TRL (before rounding)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:5]]
            for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| measure")}
    head = "**CPU s / iteration** (process CPU time, median of 1)"
    for label in (head, "**s / iteration** (wall-clock, median of 1)", "- generation (model.generate)",
                  "- backward", "- optimiser step", "**peak RSS, timed iterations, GiB**"):
        assert label in rows, (label, list(rows))
    himac, trl, ratio = rows[head]
    assert float(himac) == pytest.approx(s["himac"]["cpu_s_per_iteration_median"], abs=0.006)
    assert float(trl) == pytest.approx(s["trl"]["cpu_s_per_iteration_median"], abs=0.006)
    ratio_now = s["himac"]["cpu_s_per_iteration_median"] / s["trl"]["cpu_s_per_iteration_median"]
    assert float(ratio) == pytest.approx(ratio_now, abs=0.006)


@pytest.mark.slow
def test_bench_trl_takes_a_shape_model(tmp_path):
    """A shape model (here the 1.5B architecture cut to one layer and a 1024-token vocabulary) goes through both
    sides' loading: the same LoRA, the same prompt ids from its stand-in tokenizer, and the report says the
    weights are random. (On a GPU the same command with --device cuda measures the users' model size.)"""
    out = tmp_path / "trl.json"
    shape = "shape:qwen2.5-1.5b-instruct?layers=1&vocab=1024"
    proc = subprocess.run([sys.executable, "tools/bench_trl.py", "--model", shape, "--prompts", "1", "--group", "2",
                           "--max-new-tokens", "3", "--warmup", "0", "--iterations", "1", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{shape}: shape model: random weights, for measurement only" in proc.stdout
    s = json.loads(out.read_text())["summary"]
    assert s["himac"]["trainable_params"] == s["trl"]["trainable_params"] > 0
    assert s["trl"]["prompt_ids_match"] is True
    for side in ("himac", "trl"):
        assert 2 <= s[side]["gen_tokens_per_iteration"] <= 2 * 3
        assert s[side]["gpu_peak_timed_gib"] is None  # the CPU run has no GPU rows
    assert "peak GPU allocated" not in proc.stdout


def test_bench_trl_names_a_missing_cuda_device(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    sys.path.insert(0, str(ROOT / "tools"))
    import bench_trl
    with pytest.raises(SystemExit):
        bench_trl.main(["--device", "cuda"])
    assert "--device cuda: torch sees no CUDA device here" in capsys.readouterr().err
