"""Data-parallel scaling: iterations per minute and generated tokens per second at 1, 2, ... ranks.

    python tools/bench_scaling.py --config configs/sokoban_cpu_paper.yaml --ranks 1,2 --iterations 4 \\
        --out runs/bench_scaling
    python tools/bench_scaling.py --ranks 1,2 --iterations 1 --set model=tiny --set load_in_4bit=false  # a check

Each rank count trains the same config from scratch for `--iterations` iterations, in its own
run directory (OUT/ranks<N>/): one process, or `torchrun --standalone --nproc_per_node N`
(gloo on CPUs, NCCL on GPUs), each rank with `--threads` threads (default 1: on the 2-core
CPU two one-thread ranks are the fair comparison with one one-thread process). `sampling:
keyed` makes every rank count play the very same episodes, so the work is equal and only the
speed differs. Held-out evaluation is off. The first iteration is left out of the rates when
there are more (it pays for warm-up). Prints a table; writes OUT/scaling.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from himac.evaluation import format_table
from himac.rundir import RunDir


def train(config: str, ranks: int, iterations: int, overrides: list[str], out: Path, threads: int) -> float:
    """One run; returns its wall-clock seconds (start-up included)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] \
        if ranks > 1 else [sys.executable]
    sets = [f"iterations={iterations}", "eval_episodes=0", "sampling=keyed", *overrides]
    cmd = [*launcher, "-m", "himac.coevolve", config, "--out", str(out), *[a for s in sets for a in ("--set", s)]]
    shutil.rmtree(out, ignore_errors=True)
    tic = time.perf_counter()
    with open(f"{out}.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {out}.log")
    return time.perf_counter() - tic


def rates(run: Path) -> dict:
    rows = RunDir(run, create=False).metrics()
    timed = rows[1:] if len(rows) > 1 else rows  # the first iteration warms up
    wall = sum(r["wall_s"] for r in timed)
    return {"iterations": len(rows), "s_per_it": wall / len(timed), "it_per_min": 60 * len(timed) / wall,
            "gen_tok_per_s": sum(r["gen/tokens"] for r in timed) / wall,
            "train_tok_per_s": sum(r.get("macro/tokens", 0) + r.get("micro/tokens", 0) for r in timed) / wall,
            "cpu_s_per_it": sum(r["cpu_s"] for r in timed) / len(timed)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/sokoban_cpu_paper.yaml")
    ap.add_argument("--ranks", default="1,2", help="comma-separated rank counts")
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="threads per rank (OMP_NUM_THREADS)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default="runs/bench_scaling")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for n in [int(x) for x in args.ranks.split(",")]:
        total = train(args.config, n, args.iterations, args.overrides, out / f"ranks{n}", args.threads)
        results[n] = {**rates(out / f"ranks{n}"), "process_s": total}
        print(f"bench_scaling: {n} rank(s) done in {total:.0f}s", file=sys.stderr)
    base = results[min(results)]["it_per_min"]
    rows = [[n, r["iterations"], r["s_per_it"], r["it_per_min"], r["it_per_min"] / base, r["gen_tok_per_s"],
             r["train_tok_per_s"], r["cpu_s_per_it"], r["process_s"]] for n, r in results.items()]
    print(format_table(rows, ["ranks", "iterations", "s/it", "it/min", "speed-up", "gen tok/s", "train tok/s",
                              "cpu s/it", "process s"]))
    (out / "scaling.json").write_text(json.dumps({"config": args.config, "overrides": args.overrides,
                                                  "threads": args.threads, "results": results}, indent=2))


if __name__ == "__main__":
    main()
