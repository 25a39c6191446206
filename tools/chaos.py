"""Crash runs on purpose and check that nothing is lost and nothing goes silently wrong.

    python tools/chaos.py --trials 20            # kill -9 trials, SIGTERM trials, NaN trials; tiny test model
    python tools/chaos.py --trials 4 --sigterm 2 --nan 0     # quicker

Kill trials: a short run of `python -m himac.coevolve` (the tiny test-only model) is killed
with SIGKILL, at a random moment or at a named point inside the run directory's writes
(`himac.rundir.CRASH_POINTS`: between the checkpoint swap's two renames, while the new
checkpoint is half written, right after a log row, just before the first save). It is
then resumed (`--resume`) until it finishes, or restarted if it died before its first
checkpoint, and compared with an uninterrupted run of the same config: the adapter must
be bit-identical and every metric, evaluation and sample row equal, timing keys aside.

SIGTERM trials send the run SIGTERM (what Slurm, Kubernetes and preemptible machines send
before they kill a job) at a random moment: it must exit 143 having checkpointed its last
completed iteration (or 0 if it had finished), and resume to the same adapter and logs.

NaN trials run the trainer in this process with a NaN loss injected into the update
(once, and in every step from some iteration on) and with the weights poisoned: the
bad steps must be skipped and counted, a run that keeps failing must stop with a message,
and every checkpoint on disk must load, with finite weights.

Prints one line per trial and a summary; exit 1 if any trial failed.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from himac.rundir import CRASH_POINTS, RunDir, read_trainer_state

FAST = {"model": "tiny", "load_in_4bit": False, "quant_skip_modules": [], "tasks_per_iteration": 2, "group_size": 2,
        "rollouts_per_blueprint": 2, "blueprint_max_tokens": 12, "action_max_tokens": 4, "max_steps": 3,
        "eval_episodes": 2, "eval_every": 2, "iterations": 4, "sample_log": 2}
TIMING = ("wall_s", "cpu_s", "elapsed_s", "train_s", "update_s")


def _argv(settings: dict) -> list[str]:
    out = []
    for k, v in settings.items():
        out += ["--set", f"{k}={json.dumps(v)}"]
    return out


def coevolve(args: list[str], crash_at: str | None = None, kill_after: float | None = None,
             sig: int = signal.SIGKILL) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HIMAC_CRASH_AT", None)
    if crash_at:
        env["HIMAC_CRASH_AT"] = crash_at
    proc = subprocess.Popen([sys.executable, "-m", "himac.coevolve", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(sig)
    _, err = proc.communicate()
    if proc.returncode not in (0, -signal.SIGKILL, -signal.SIGTERM, 128 + signal.SIGTERM):  # -15: still importing
        raise RuntimeError(f"coevolve {' '.join(args[:3])} ... exited {proc.returncode}: {err[-2000:]}")
    return proc.returncode


def finish(config: str, settings: dict, run: Path) -> int:
    """Resume (or, with no checkpoint yet, restart) until the run exits cleanly; returns the restarts."""
    restarts = 0
    while True:
        if RunDir(run, create=False).has_checkpoint():
            code = coevolve(["--resume", str(run)])
        else:
            shutil.rmtree(run, ignore_errors=True)  # died before its first checkpoint: nothing to resume
            code = coevolve([config, *_argv(settings), "--out", str(run)])
        if code == 0:
            return restarts
        restarts += 1


def snapshot(run: Path) -> tuple[dict, dict]:
    r = RunDir(run, create=False)
    logs = {name: [{k: v for k, v in row.items() if not (k.startswith(("time/", "perf/")) or k.endswith(TIMING))}
                   for row in r.metrics(name)] for name in r.LOGS}
    return logs, load_file(r.adapter_weights)


def compare(ref: tuple[dict, dict], got: tuple[dict, dict]) -> str:
    """'' if equal, else what differs."""
    for name in ref[0]:
        if ref[0][name] != got[0][name]:
            return f"{name} differs ({len(ref[0][name])} vs {len(got[0][name])} rows)"
    if ref[1].keys() != got[1].keys():
        return "adapter tensors differ in names"
    bad = [k for k in ref[1] if not torch.equal(ref[1][k], got[1][k])]
    return f"adapter not bit-identical in {len(bad)} tensors" if bad else ""


# -- NaN trials (in this process) ---------------------------------------------------------------
def nan_trial(kind: str, tmp: Path, config: str) -> str:
    """'' if the run handled the fault as it should, else what went wrong."""
    from himac import update
    from himac.coevolve import Trainer
    from himac.experiment import load_config
    from himac.loop import TrainingError
    torch.set_num_threads(1)
    cfg = load_config(config, {**FAST, "eval_episodes": 0, "iterations": 5})
    run = RunDir(tmp / kind)
    trainer = Trainer(cfg, run)
    real_loss, calls = update.rows_loss, {"n": 0}

    def loss_with_nan(*a, **k):
        loss, stats = real_loss(*a, **k)
        calls["n"] += 1
        it = len(run.metrics())  # the iteration being trained
        if (kind == "once" and calls["n"] == 3) or (kind == "always" and it >= 1):
            loss = loss * float("nan")
        return loss, stats

    update.rows_loss = loss_with_nan
    stopped = ""
    try:
        if kind == "poison":  # weights themselves go bad after iteration 1: never checkpointed
            real_step = torch.optim.AdamW.step

            def step(self, *a, **k):
                out = real_step(self, *a, **k)
                if len(run.metrics()) >= 2:
                    with torch.no_grad():
                        self.param_groups[0]["params"][0].fill_(float("inf"))
                return out
            torch.optim.AdamW.step = step
        try:
            trainer.train()
        except TrainingError as e:
            stopped = str(e)
        finally:
            if kind == "poison":
                torch.optim.AdamW.step = real_step
            trainer.close()
    finally:
        update.rows_loss = real_loss
    rows = run.metrics()
    json.loads(json.dumps(rows, allow_nan=False))  # the log is valid JSON (no bare NaN)
    if not run.has_checkpoint():
        return "no checkpoint left"
    state = read_trainer_state(run.checkpoint / "trainer.pt")
    weights = load_file(run.adapter_weights)
    if not all(torch.isfinite(w).all() for w in weights.values()):
        return "a checkpoint holds non-finite weights"
    skipped = sum(r.get("macro/nonfinite_steps", 0) + r.get("micro/nonfinite_steps", 0) for r in rows)
    if kind == "once":
        if stopped or skipped != 1 or len(rows) != 5:
            return f"one NaN step: expected 1 skipped step and a finished run, got {skipped} and {len(rows)} rows"
    elif kind == "always":
        if "in a row" not in stopped or state["iteration"] >= 4:
            return f"persistent NaN: expected a stop with a message, got {stopped!r} at iteration {state['iteration']}"
    elif kind == "poison":
        if "non-finite" not in stopped or state["iteration"] != 1:
            return f"poisoned weights: expected a stop keeping iteration 1's checkpoint, got {stopped!r}, " \
                   f"iteration {state['iteration']}"
    return ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/sokoban_cpu_paper.yaml")
    ap.add_argument("--trials", type=int, default=20, help="kill -9 trials (half at named points, half at random)")
    ap.add_argument("--points", default=",".join(CRASH_POINTS), help="named crash points to cycle through")
    ap.add_argument("--no-random", action="store_true", help="every kill trial at a named point")
    ap.add_argument("--sigterm", type=int, default=2, help="SIGTERM trials, each at a random moment")
    ap.add_argument("--nan", type=int, default=1, help="rounds of the three NaN trials")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="keep the runs here (default: a temporary directory)")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    points = [x for x in args.points.split(",") if x]
    unknown = [x for x in points if x not in CRASH_POINTS]
    if unknown or not points:
        ap.error(f"--points: unknown {unknown or points}; known: {', '.join(CRASH_POINTS)}")
    tmp = Path(args.out or tempfile.mkdtemp(prefix="himac-chaos-"))
    tmp.mkdir(parents=True, exist_ok=True)
    results = []

    ref_run = tmp / "reference"
    shutil.rmtree(ref_run, ignore_errors=True)
    tic = time.perf_counter()
    coevolve([args.config, *_argv(FAST), "--out", str(ref_run)])
    duration = time.perf_counter() - tic
    ref = snapshot(ref_run)
    print(f"reference run: {duration:.0f} s", flush=True)

    for k in range(args.trials):
        run = tmp / f"trial{k}"
        shutil.rmtree(run, ignore_errors=True)
        if args.no_random or k % 2 == 0:  # a named point, the n-th time it is passed
            point = points[(k if args.no_random else k // 2) % len(points)]
            crash_at, what = f"{point}:{rng.randint(1, 3)}", f"at {point}"
            code = coevolve([args.config, *_argv(FAST), "--out", str(run)], crash_at=crash_at)
        else:
            delay = rng.uniform(0.2, 1.0) * duration
            what = f"after {delay:.1f} s"
            code = coevolve([args.config, *_argv(FAST), "--out", str(run)], kill_after=delay)
        restarts = finish(args.config, FAST, run)
        why = compare(ref, snapshot(run))
        results.append(not why)
        print(f"kill trial {k:2d} {what:34s} {'killed' if code else 'ran through':11s} resumed x{restarts + 1}: "
              f"{'OK, identical' if not why else 'FAIL: ' + why}", flush=True)

    for k in range(args.sigterm):
        run = tmp / f"term{k}"
        shutil.rmtree(run, ignore_errors=True)
        delay = rng.uniform(0.3, 1.0) * duration
        code = coevolve([args.config, *_argv(FAST), "--out", str(run)], kill_after=delay, sig=signal.SIGTERM)
        why = "" if code in (0, -signal.SIGTERM, 128 + signal.SIGTERM) else f"exit {code}, not 143"
        if code > 0 and not why:  # stopped in the loop: the checkpoint holds the last logged iteration
            rows = RunDir(run, create=False).metrics()
            state = read_trainer_state(run / "checkpoint" / "trainer.pt") if rows else None
            if rows and state["iteration"] != rows[-1]["iteration"]:
                why = f"checkpoint of iteration {state['iteration']}, last logged {rows[-1]['iteration']}"
        restarts = finish(args.config, FAST, run)
        why = why or compare(ref, snapshot(run))
        results.append(not why)
        print(f"SIGTERM trial {k:2d} after {delay:5.1f} s {'stopped' if code else 'ran through':11s} resumed "
              f"x{restarts + 1}: {'OK, identical' if not why else 'FAIL: ' + why}", flush=True)

    for r in range(args.nan):
        for kind in ("once", "always", "poison"):
            why = nan_trial(kind, tmp / f"nan{r}", args.config)
            results.append(not why)
            print(f"NaN trial {kind:7s}: {'OK' if not why else 'FAIL: ' + why}", flush=True)

    print(f"\n{sum(results)}/{len(results)} trials passed; runs in {tmp}")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
