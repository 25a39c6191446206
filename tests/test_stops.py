"""One writer per run directory, and SIGTERM stopping a run as Ctrl-C does: real processes of
`python -m himac.coevolve` on the tiny test-only model."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from himac.loop import _Interrupts
from himac.rundir import RunDir, RunLocked

ROOT = Path(__file__).resolve().parents[1]
TINY = ["configs/sokoban_cpu_paper.yaml", "--set", "model=tiny", "--set", "load_in_4bit=false",
        "--set", "tasks_per_iteration=2", "--set", "group_size=2", "--set", "rollouts_per_blueprint=2",
        "--set", "blueprint_max_tokens=12", "--set", "action_max_tokens=4", "--set", "max_steps=3",
        "--set", "eval_episodes=0"]
TIMING = ("wall_s", "cpu_s", "elapsed_s", "train_s", "update_s")


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "himac.coevolve", *map(str, args)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "himac.coevolve", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def wait_for_rows(proc: subprocess.Popen, out: Path, n: int = 1) -> None:
    deadline = time.monotonic() + 600
    while len(rows(out / "metrics.jsonl")) < n:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.3)


def untimed(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not (k.startswith(("time/", "perf/")) or k.endswith(TIMING))}
            for r in rows(path)]


# -- the lock -------------------------------------------------------------------------------------
def test_the_lock_refuses_a_second_holder_and_frees_on_release(tmp_path):
    run = RunDir(tmp_path / "run")
    first = run.lock()
    with pytest.raises(RunLocked, match=rf"in use by pid {os.getpid()} on host {socket.gethostname()}"):
        RunDir(tmp_path / "run").lock()  # another open file description: flock refuses it, in-process too
    first.release()
    second = run.lock()
    assert second.describe_taken_over() is None  # released cleanly: nobody to warn about
    second.release()


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    first = start(*TINY, "--set", "iterations=50", "--out", out)
    try:
        wait_for_rows(first, out)
        for args in ([*TINY, "--out", out], ["--resume", out]):  # a second run, or a resume, of the same directory
            second = run(*args)
            assert second.returncode == 2, second.stderr[-2000:]
            assert f"{out} is in use by pid {first.pid} on host {socket.gethostname()}" in second.stderr
            assert "Traceback" not in second.stderr
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=600)
    finally:
        first.kill()
    iterations = [r["iteration"] for r in rows(out / "metrics.jsonl")]
    assert iterations == list(range(len(iterations)))  # one writer's rows, each once, in order


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_warning(tmp_path):
    out = tmp_path / "run"
    first = start(*TINY, "--set", "iterations=50", "--out", out)
    try:
        wait_for_rows(first, out)
    finally:
        first.kill()  # SIGKILL: no handler runs, the lock file still names it
        first.communicate()
    assert str(first.pid) in (out / ".lock").read_text()
    resumed = run("--resume", out, "--set", "iterations=2")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"took over {out} from pid {first.pid}" in resumed.stderr  # a warning, never a wait
    assert [r["iteration"] for r in rows(out / "metrics.jsonl")] == [0, 1]
    assert (out / ".lock").read_text() == ""  # released at the end


# -- SIGTERM ----------------------------------------------------------------------------------------
def test_sigterm_checkpoints_the_last_completed_iteration_and_resumes_to_the_same_run(tmp_path):
    """save_every=100: nothing would be saved before the end, so SIGTERM must checkpoint the last completed
    iteration itself; resumed, the run equals one that was never stopped."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run(*TINY, "--set", "iterations=3", "--out", straight).returncode == 0
    proc = start(*TINY, "--set", "iterations=3", "--set", "save_every=100", "--out", stopped)
    wait_for_rows(proc, stopped)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 143, stderr[-2000:]
    done = rows(stopped / "metrics.jsonl")
    state = torch.load(stopped / "checkpoint" / "trainer.pt", weights_only=True)
    assert state["iteration"] == done[-1]["iteration"] < 2  # the last completed one, not the one in flight
    assert "interrupted (SIGTERM)" in stdout and "Traceback" not in stderr
    assert f"continue with --resume {stopped}" in stderr
    resumed = run("--resume", stopped)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert untimed(stopped / "metrics.jsonl") == untimed(straight / "metrics.jsonl")
    assert untimed(stopped / "samples.jsonl") == untimed(straight / "samples.jsonl")
    a = load_file(straight / "checkpoint" / "adapter" / "adapter_model.safetensors")
    b = load_file(stopped / "checkpoint" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_signal_while_the_checkpoint_is_written_waits_for_it():
    """Inside deferred() (a finished iteration's logs and checkpoint being written) SIGTERM and Ctrl-C are held
    until the block ends, then stop the loop; the first signal is the one reported."""
    with _Interrupts() as guard:
        with guard.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # both handled here, neither raised
            written = True
        assert written and guard.signal == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            guard.check()
    assert signal.getsignal(signal.SIGTERM) is not guard._handle  # the handlers are given back
