"""ALFWorld env speed: one game's load / reset / step, and a batch of envs stepped serially vs in worker processes.

    python tools/bench_alfworld.py --data ../shared/data/alfworld/alfworld_valid_seen.tar.gz --split valid_seen
    python tools/bench_alfworld.py --tiny            # generated tiny games, no data needed

Part 1 times alfworld's engine on a few games: a fresh load, a reset with
fast-downward's translation memoised (what envs/alfworld.py does) and without,
and a step (the game's walkthrough). Part 2 plays the same batch of `--envs`
games (`--steps` lockstep batch steps on their walkthroughs, then "look") through
SerialPool (num_workers 0, the baseline) and ProcPool with 1, 2, ... workers,
measured in this run, and prints each pool's time and its speed-up over serial,
next to the machine's own headroom measured in the same run (two plain CPU-bound
processes at once vs one after another): on a machine shared with other jobs
no pool can beat that.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from envs.alfworld import SPEC, AlfworldConfig, AlfworldEnv, load_engine
from envs.alfworld_games import write_tiny_games


def headroom(jobs: int = 2) -> float:
    """Speed-up this machine gives right now to `jobs` CPU-bound processes run at once instead
    of one after another: the ceiling for any pool's speed-up (other users' load lowers it)."""
    code = "s = 0\nfor i in range(10_000_000): s += i"
    tic = time.perf_counter()
    for _ in range(jobs):
        subprocess.run([sys.executable, "-c", code], check=True)
    one_by_one = time.perf_counter() - tic
    tic = time.perf_counter()
    for p in [subprocess.Popen([sys.executable, "-c", code]) for _ in range(jobs)]:
        p.wait()
    return one_by_one / (time.perf_counter() - tic)


def engine_times(games: list[str]) -> dict:
    import fast_downward
    load, reset_memo, reset_plain, step = [], [], [], []
    for path in games:
        if hasattr(fast_downward.pddl2sas, "cache_clear"):
            fast_downward.pddl2sas.cache_clear()  # a cold load, as a worker's first
        tic = time.perf_counter()
        engine = load_engine(path)
        load.append(time.perf_counter() - tic)
        engine.reset()  # fills the memo
        tic = time.perf_counter()
        engine.reset()
        reset_memo.append(time.perf_counter() - tic)
        memo = fast_downward.pddl2sas
        fast_downward.pddl2sas = memo.__wrapped__
        try:
            tic = time.perf_counter()
            engine.reset()
            reset_plain.append(time.perf_counter() - tic)
        finally:
            fast_downward.pddl2sas = memo
        for command in json.loads(Path(path).read_text())["walkthrough"]:
            tic = time.perf_counter()
            engine.step(command)
            step.append(time.perf_counter() - tic)
        engine.close()
    return {"load": load, "reset (memo)": reset_memo, "reset (no memo)": reset_plain, "step": step}


def play(cfg: AlfworldConfig, seeds: list[int], plans: list[list[str]], steps: int) -> dict:
    import fast_downward
    if hasattr(fast_downward.pddl2sas, "cache_clear"):
        fast_downward.pddl2sas.cache_clear()  # serial starts as cold as a fresh worker
    pool = SPEC.pool(cfg)
    try:
        out = {}
        tic = time.perf_counter()
        pool.reset(seeds)
        out["reset (cold)"] = time.perf_counter() - tic
        tic = time.perf_counter()
        pool.reset(seeds)
        out["reset (warm)"] = time.perf_counter() - tic
        slots = list(range(len(seeds)))
        tic = time.perf_counter()
        for t in range(steps):
            pool.step(slots, [p[t] if t < len(p) else "look" for p in plans])
        out["step batch"] = (time.perf_counter() - tic) / steps
        return out
    finally:
        pool.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="data_path: folder with json_2.1.1/, or a .tar.gz of it")
    ap.add_argument("--split", default="valid_seen")
    ap.add_argument("--tiny", action="store_true", help="use generated tiny games instead of --data")
    ap.add_argument("--envs", type=int, default=16, help="games in the batch")
    ap.add_argument("--steps", type=int, default=8, help="lockstep batch steps")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--engine-games", type=int, default=4, help="games timed one by one in part 1")
    args = ap.parse_args()
    if args.tiny:
        data = str(write_tiny_games(tempfile.mkdtemp(prefix="alfworld-tiny-"), splits=(args.split,), per_type=3))
    elif args.data:
        data = args.data
    else:
        ap.error("give --data PATH or --tiny")
    base = AlfworldConfig(data_path=data, train_split=args.split, num_workers=0)
    games = [g for g, _ in AlfworldEnv(base).games]
    n = len(games)
    seeds = [i * n // args.envs for i in range(args.envs)]  # spread over the sorted list: all task types
    plans = [json.loads(Path(games[s % n]).read_text())["walkthrough"] for s in seeds]

    print(f"{n} games in {args.split}; part 1 on {args.engine_games} of them (seconds)")
    print(f"| {'engine':16} | {'mean':>6} | {'median':>6} | {'n':>4} |")
    print(f"|{'-' * 18}|{'-' * 8}|{'-' * 8}|{'-' * 6}|")
    for name, xs in engine_times([games[s % n] for s in seeds[::max(1, args.envs // args.engine_games)]]).items():
        print(f"| {name:16} | {statistics.mean(xs):6.3f} | {statistics.median(xs):6.3f} | {len(xs):4d} |")

    print(f"\npart 2: {args.envs} envs, {args.steps} lockstep steps (seconds; speed-up = serial / this)")
    ceiling = {w: headroom(w) for w in args.workers if w > 1}
    for w, x in ceiling.items():
        print(f"machine headroom now: {w} CPU-bound processes at once run {x:.2f}x faster than one after another "
              f"({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f})")
    rows = [("serial (0 workers)", play(base, seeds, plans, args.steps))]
    for w in args.workers:
        cfg = AlfworldConfig(data_path=data, train_split=args.split, num_workers=w)
        rows.append((f"ProcPool {w} worker{'s' if w > 1 else ''}", play(cfg, seeds, plans, args.steps)))
    keys = list(rows[0][1])
    print("| pool | " + " | ".join(f"{k} | x" for k in keys) + " |")
    print("|---|" + "---:|---:|" * len(keys))
    for name, r in rows:
        cells = " | ".join(f"{r[k]:.3f} | {rows[0][1][k] / r[k]:.2f}" for k in keys)
        print(f"| {name} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
