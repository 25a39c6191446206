"""WebShop env speed and the oracle's score on the test goals.

    python tools/bench_webshop.py [--data ../shared/data/webshop] [--goals 500] [--out bench.json]

- start-up: a fresh interpreter importing the env and loading the catalogue (products,
  goals, BM25 index), timed inside it (interpreter start-up itself excluded);
- reset and step times, per kind of step (search, open a product, choose an option, buy),
  over the oracle's episodes.
  Each time is taken twice: wall clock, and this process's CPU time, which other jobs on a
  shared machine do not inflate (a niced bench on a busy machine waits for the CPU);
- the oracle (envs.webshop.oracle_action: search, open the goal product, choose the goal's
  options, buy) on the first `--goals` test goals: score (100 x mean reward), success
  (share of reward 1.0) and how often the goal product was found. Four variants: the goal
  product looked for on page one only or on all five pages, and the search query being
  the whole goal text (instruction, options and price, what the agent is shown) or the
  product's instruction alone (without "with size: ..., and price lower than ...").
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from envs.webshop import WebshopConfig, WebshopEnv, oracle_action

ROOT = Path(__file__).resolve().parents[1]
STARTUP = ("import sys, time\nt, c = time.perf_counter(), time.process_time()\n"
           "from envs.webshop import WebshopConfig, WebshopEnv\n"
           "WebshopEnv(WebshopConfig(data_path=sys.argv[1]), evaluation=True)\n"
           "print(time.perf_counter() - t, time.process_time() - c)\n")
BASE_QUERY = re.compile(r"( with [^,]+?: .*)?(, and price lower than [\d.]+ dollars)?$")


def startup_s(data: str, runs: int) -> list[tuple[float, float]]:
    """(wall s, CPU s) of each fresh start-up."""
    out = []
    for _ in range(runs):
        proc = subprocess.run([sys.executable, "-c", STARTUP, data], cwd=ROOT, capture_output=True, text=True,
                              check=True)
        wall, cpu = proc.stdout.strip().splitlines()[-1].split()
        out.append((float(wall), float(cpu)))
    return out


def kind_of(action: str) -> str:
    if action.startswith("search["):
        return "search"
    if action == "click[buy now]":
        return "buy"
    return "open" if re.fullmatch(r"click\[b[0-9a-z]{9}\]", action) else "click"


def play(env: WebshopEnv, goals: int, pages: int, base_query: bool, times: dict | None = None) -> dict:
    """The oracle on the first `goals` test goals; appends (wall s, CPU s) per step kind to `times`."""
    scores, found = [], 0
    for i in range(goals):
        tic, cpu = time.perf_counter(), time.process_time()
        env.reset(i)
        if times is not None:
            times.setdefault("reset", []).append((time.perf_counter() - tic, time.process_time() - cpu))
        done, seen = False, False
        while not done:
            action = oracle_action(env, pages)
            if action is None:
                break
            if base_query and action.startswith("search["):
                action = f"search[{BASE_QUERY.sub('', env.task)}]"
            seen |= kind_of(action) == "open"
            tic, cpu = time.perf_counter(), time.process_time()
            _, _, done, info = env.step(action)
            if times is not None:
                times.setdefault(kind_of(action), []).append((time.perf_counter() - tic, time.process_time() - cpu))
        scores.append(info["episode"]["score"] if done else 0.0)
        found += seen
    return {"score": 100 * sum(scores) / goals, "success": sum(s == 1.0 for s in scores) / goals,
            "found": found / goals}


def summary_ms(pairs: list[tuple[float, float]]) -> dict:
    out = {"n": len(pairs)}
    for j, clock in enumerate(("wall", "cpu")):
        xs = sorted(p[j] for p in pairs)
        out.update({f"{clock}_mean_ms": 1000 * statistics.fmean(xs), f"{clock}_median_ms": 1000 * xs[len(xs) // 2],
                    f"{clock}_p95_ms": 1000 * xs[int(0.95 * (len(xs) - 1))], f"{clock}_max_ms": 1000 * xs[-1]})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "webshop"))
    ap.add_argument("--goals", type=int, default=500, help="test goals the oracle plays")
    ap.add_argument("--startup-runs", type=int, default=3)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)

    starts = startup_s(args.data, args.startup_runs)
    env = WebshopEnv(WebshopConfig(data_path=args.data, max_steps=30), evaluation=True)
    times: dict[str, list[float]] = {}
    result = {"goals": len(env.cat.goals), "test_goals": env.cfg.test_goals,
              "train_goals": len(env.cat.goals) - env.cfg.test_goals,
              "startup_s": {"runs_wall_cpu": starts, "wall_median": statistics.median(w for w, _ in starts),
                            "cpu_median": statistics.median(c for _, c in starts)}}
    for pages in (1, 5):
        for base in (False, True):
            name = f"oracle/{'page1' if pages == 1 else 'pages1-5'}/{'instruction' if base else 'goal_text'}"
            result[name] = play(env, args.goals, pages, base, times if (pages, base) == (1, False) else None)
    result["times"] = {k: summary_ms(v) for k, v in times.items()}
    steps = [t for k, v in times.items() if k != "reset" for t in v]
    result["times"]["any_step"] = summary_ms(steps)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
