"""tools/chaos.py on the tiny test-only model: a run killed (SIGKILL) between the checkpoint
swap's two renames, and one stopped by SIGTERM at a random moment, resume to the same adapter
and logs as an uninterrupted run, and NaN losses and poisoned weights never cost a checkpoint."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kill_inside_the_checkpoint_swap_sigterm_and_nan_faults(tmp_path):
    proc = subprocess.run([sys.executable, "tools/chaos.py", "--trials", "1", "--points", "checkpoint_swap",
                           "--no-random", "--sigterm", "1", "--nan", "1", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "kill trial  0 at checkpoint_swap" in out and "killed" in out and "OK, identical" in out
    assert "SIGTERM trial  0" in out and out.count("OK, identical") == 2
    assert out.count("NaN trial") == 3 and "FAIL" not in out
    assert "5/5 trials passed" in out
