"""Does the hierarchy pay off? Train variants on equal terms, several seeds each, and compare
held-out learning curves with standard errors.

    python tools/bench_learning.py --config configs/sokoban_bench.yaml \\
        --variants himac,flat_grpo,flat_gigpo,no_coevolution --seeds 0,1,2 --minutes 60 --jobs 2 \\
        --eval-episodes 128 --eval-every 8 --out runs/bench
    python tools/bench_learning.py ... --validation      # choose settings on the validation rooms

The protocol:
- every run of every variant gets the same config and overrides, the same held-out
  rooms (`--eval-episodes` from the reporting range, or the separate validation range
  with `--validation`; settings are chosen there, results reported on the other), and
  the same budget: `--iterations` and `--minutes` of training time (evaluation
  excluded), wall-clock or, with `--clock cpu`, each run's own CPU time (the fair
  measure when other work shares the machine). Seed s gives the same training rooms to
  every variant;
- the untrained agent is evaluated once per kind of agent (hierarchical, flat, ...):
  before training every seed of a variant is the same model (LoRA starts at zero) on
  the same rooms, so it is one number, shared;
- each run is `python -m himac.coevolve` in its own process, `--jobs` at a time with
  `--threads` threads each (default: one thread per job when several run, which on the
  2-core CPU beats one job on two threads); an interrupted bench resumes unfinished runs
  from their checkpoints and keeps finished ones;
- the table gives, per variant, the mean and standard error over seeds of held-out
  success before, at the end, and the gain, with iterations, training time, env steps
  and generated tokens spent, and the executor's action histogram at the end (the
  largest share one action takes of all answers: collapse shows here);
- where the env has a small fixed action set (Sokoban), an open-loop reference on the
  same held-out rooms: the best constant action and the best fixed 3-action sequence,
  each played blind (no observation read), chosen on `--open-loop-rooms` training rooms. A curve above
  the sequence line is an agent that reads its observations; a collapsed agent sits on
  the constant line.

Writes OUT/<variant>/seed<k>/ (each a full run directory), OUT/<variant>/seed<k>.log,
OUT/curves.json, OUT/learning.png and prints the table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from envs import get_spec
from envs.seeds import VALIDATION_OFFSET, eval_seeds, task_seeds
from himac import config as C
from himac.evaluation import open_loop_reference
from himac.experiment import VARIANTS, load_config
from himac.rundir import RunDir

EVAL_KEYS = ("hierarchy", "sub_done")  # the variant keys that change what an untrained agent does


def start_key(name: str) -> str:
    """Variants whose untrained agents play alike share one start evaluation."""
    v = VARIANTS[name]
    return "_start-" + "-".join(f"{k}={v[k]}" for k in EVAL_KEYS if k in v) if any(k in v for k in EVAL_KEYS) \
        else "_start-default"


def settings(overrides: dict) -> list[str]:
    out = []
    for k, v in overrides.items():
        out += ["--set", f"{k}={json.dumps(v)}"]
    return out


class Job:
    def __init__(self, name: str, run: Path, argv: list[str]):
        self.name, self.run, self.argv = name, run, argv
        self.proc: subprocess.Popen | None = None

    @property
    def done(self) -> bool:
        return (self.run / "bench_done").is_file()

    def start(self, threads: int) -> None:
        argv = list(self.argv)
        if RunDir(self.run, create=False).has_checkpoint():  # interrupted: go on from its checkpoint
            argv = ["--resume", str(self.run), *argv[1:]]
        elif self.run.exists():
            shutil.rmtree(self.run)  # no checkpoint yet: start again from scratch, on equal terms
            argv += ["--out", str(self.run)]
        else:
            argv += ["--out", str(self.run)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.run.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(self.run.parent / f"{self.run.name}.log", "a")
        self.proc = subprocess.Popen([sys.executable, "-m", "himac.coevolve", *argv], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env)

    def poll(self) -> int | None:
        code = self.proc.poll()
        if code is not None:
            self.log.close()
            if code == 0:
                (self.run / "bench_done").write_text(time.strftime("%Y-%m-%d %H:%M:%S"))
        return code


def run_jobs(jobs: list[Job], parallel: int, threads: int) -> None:
    pending = [j for j in jobs if not j.done]
    for j in jobs:
        if j.done:
            print(f"{j.name}: done earlier, kept", file=sys.stderr)
    running: list[Job] = []
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            job.start(threads)
            running.append(job)
            print(f"{time.strftime('%H:%M:%S')} start {job.name}", file=sys.stderr)
        time.sleep(2)
        for job in list(running):
            code = job.poll()
            if code is not None:
                running.remove(job)
                print(f"{time.strftime('%H:%M:%S')} {'finished' if code == 0 else f'FAILED ({code})'} {job.name} "
                      f"(log: {job.run.parent / (job.run.name + '.log')})", file=sys.stderr)


# -- reading the runs -----------------------------------------------------------------------
def curve(run: Path, start: dict, clock: str = "wall") -> dict:
    """Held-out success at each evaluation of one run, with the training resources spent up to it
    (`train_s`: training seconds on the run's clock, wall or CPU)."""
    r = RunDir(run, create=False)
    spent = {-1: (0.0, 0, 0)}
    train_s = steps = tokens = 0
    key = "train_cpu_s" if clock == "cpu" else "train_s"
    for m in r.metrics():
        train_s, steps, tokens = m.get(key, train_s), steps + m.get("env/steps", 0), tokens + m.get("gen/tokens", 0)
        spent[m["iteration"]] = (train_s, steps, tokens)
    evals = [start] + [e for e in r.metrics("eval.jsonl") if e["iteration"] >= 0]
    out: dict = {k: [] for k in ("iteration", "train_s", "env_steps", "gen_tokens", "success", "return",
                                 "action_top_share", "rule_agreement")}
    for ev in evals:
        s, n, k = spent.get(ev["iteration"], (float("nan"), 0, 0))
        out["iteration"].append(ev["iteration"] + 1)  # iterations completed (0 = before training)
        out["train_s"].append(s)
        out["env_steps"].append(n)
        out["gen_tokens"].append(k)
        out["success"].append(ev["eval/success_rate"])
        out["return"].append(ev["eval/return_mean"])
        out["action_top_share"].append(ev.get("eval/action_top_share", float("nan")))
        out["rule_agreement"].append(ev.get("eval/rule_agreement", float("nan")))
    return out


def mean_se(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, float("nan")
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def summary(curves: dict[str, dict[str, dict]]) -> list[list]:
    rows = []
    for name, seeds in curves.items():
        runs = list(seeds.values())
        start = mean_se([c["success"][0] for c in runs])
        final = mean_se([c["success"][-1] for c in runs])
        gain = mean_se([c["success"][-1] - c["success"][0] for c in runs])
        best = mean_se([max(c["success"][1:], default=float("nan")) for c in runs])
        rows.append([name, len(runs), start[0], *final, *gain, best[0],
                     mean_se([c["iteration"][-1] for c in runs])[0], mean_se([c["train_s"][-1] / 60 for c in runs])[0],
                     mean_se([c["env_steps"][-1] for c in runs])[0], mean_se([c["gen_tokens"][-1] for c in runs])[0],
                     max((c["action_top_share"][-1] for c in runs), default=float("nan")),
                     mean_se([c.get("rule_agreement", [float("nan")])[-1] for c in runs])[0]])
    return rows


def table(rows: list[list]) -> str:
    head = ["variant", "seeds", "success@0", "final", "+-SE", "gain", "+-SE", "best", "iters", "train min",
            "env steps", "gen tokens", "top action (max)", "rule agrees"]
    fmt = [str, str, *[lambda v: f"{v:.3f}"] * 6, lambda v: f"{v:.1f}", lambda v: f"{v:.1f}",
           lambda v: f"{v:.0f}", lambda v: f"{v:.0f}", lambda v: f"{v:.2f}", lambda v: f"{v:.2f}"]
    cells = [head] + [[f(v) for f, v in zip(fmt, r)] for r in rows]
    width = [max(len(r[i]) for r in cells) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, width))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in width))
    return "\n".join(lines)


def _on_grid(xs: list[float], ys: list[float], grid: list[float]) -> list[float]:
    """Linear interpolation of a curve on `grid`; after its last point it holds its last value."""
    out = []
    for g in grid:
        if g >= xs[-1]:
            out.append(ys[-1])
            continue
        j = next(i for i in range(1, len(xs)) if xs[i] >= g)
        t = (g - xs[j - 1]) / max(xs[j] - xs[j - 1], 1e-9)
        out.append(ys[j - 1] + t * (ys[j] - ys[j - 1]))
    return out


def reference(config: str, overrides: dict, episodes: int, offset: int, rooms: int = 256) -> dict | None:
    """The open-loop reference on the bench's held-out rooms, chosen on `rooms` training rooms (seed 0's first
    iteration stream), or None for an env without a fixed action set or with rooms = 0."""
    cfg = load_config(config, overrides)
    spec = get_spec(cfg.run.env)
    if not spec.actions or rooms <= 0:
        return None
    return open_loop_reference(spec, cfg.env, task_seeds(0, 0, rooms), eval_seeds(episodes, offset))


def plot(curves: dict[str, dict[str, dict]], path: Path, title: str, clock: str = "wall",
         ref: dict | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for (name, seeds), color in zip(curves.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3):
        runs = list(seeds.values())
        for ax, key, scale in ((axes[0], "train_s", 1 / 60), (axes[1], "iteration", 1)):
            for c in runs:
                ax.plot([x * scale for x in c[key]], c["success"], color=color, alpha=0.25, lw=0.8)
            end = max(max(c[key]) for c in runs) * scale
            grid = [end * i / 60 for i in range(61)]
            ys = [_on_grid([x * scale for x in c[key]], c["success"], grid) for c in runs]
            stats = [mean_se([y[i] for y in ys]) for i in range(len(grid))]
            m = [s[0] for s in stats]
            se = [0.0 if math.isnan(s[1]) else s[1] for s in stats]
            ax.plot(grid, m, color=color, lw=2, label=f"{name} (n={len(runs)})")
            ax.fill_between(grid, [a - b for a, b in zip(m, se)], [a + b for a, b in zip(m, se)], color=color,
                            alpha=0.2)
    for kind, style in (("sequence", "--"), ("constant", ":"), ("rule", "-.")):
        if ref and kind in ref:
            label = f"reading rule ({ref[kind]['plan'][0]})" if kind == "rule" else \
                f"open loop, best {'fixed sequence' if kind == 'sequence' else 'constant'} ({','.join(ref[kind]['plan'])})"
            for ax in axes:
                ax.axhline(ref[kind]["success"], color="grey", ls=style, lw=1.2, label=label if ax is axes[0] else None)
    axes[0].set_xlabel(f"training time (min of {clock}, evaluation excluded)")
    axes[1].set_xlabel("iterations")
    axes[0].set_ylabel("held-out greedy success (mean ± SE over seeds)")
    for ax in axes:
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.suptitle(title, fontsize=10)
    if len(labels) <= 6:
        axes[0].legend(fontsize=8)
        fig.tight_layout()
    else:  # a merged bench: the legend below both panels, where it hides no curve
        rows = (len(labels) + 1) // 2
        fig.set_size_inches(12, 4.5 + 0.22 * rows)
        fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.22 * rows / (4.5 + 0.22 * rows) + 0.01, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


SAME_ROOMS = ("eval_episodes", "eval_offset", "time_clock")  # merged benches must agree on these
WHEN_EVALUATED = ("eval_every", "eval_every_minutes")  # when a curve has points, not what was trained: no label


def merge(paths: list[Path]) -> dict:
    """Several benches' curves.json as one: the same config file, held-out rooms and clock, or a ValueError
    naming what differs. A variant whose bench had overrides the first bench lacks is labelled with them,
    e.g. 'himac (macro_every=2)', so two benches of one variant can share a table and a plot; a bench that ran
    other seeds of a variant with the same settings adds them to its row."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    first = docs[0]
    out = {**first, "merged_from": [str(p) for p in paths], "curves": {}}
    for path, doc in zip(paths, docs):
        other = ""  # a bench of another config joins when its env (the rooms) is the same; labelled by its name
        if doc["config"] != first["config"]:
            mine, theirs = (load_config(d["config"], {}).env for d in (first, doc))
            if mine != theirs:
                diff = [f"{f.name}={getattr(theirs, f.name)!r}" for f in dataclasses.fields(theirs)
                        if getattr(theirs, f.name) != getattr(mine, f.name, None)] or [type(theirs).__name__]
                raise ValueError(f"{path}: config {doc['config']!r} has env {', '.join(diff)}, unlike "
                                 f"{first['config']!r} of {paths[0]}: not the same rooms")
            other = Path(doc["config"]).stem
        for key in SAME_ROOMS:
            if doc["overrides"].get(key) != first["overrides"].get(key):
                raise ValueError(f"{path}: {key}={doc['overrides'].get(key)!r}, not "
                                 f"{first['overrides'].get(key)!r} like {paths[0]}: not the same rooms or clock")
        extra = {k: v for k, v in doc["overrides"].items()
                 if first["overrides"].get(k) != v and k not in WHEN_EVALUATED}
        words = ([other] if other else []) + [f"{k}={v}" for k, v in sorted(extra.items())]
        tag = f" ({', '.join(words)})" if words else ""
        for name, seeds in doc["curves"].items():
            label = name + tag
            clash = sorted(set(seeds) & set(out["curves"].get(label, {})), key=int)
            if clash:
                raise ValueError(f"{path}: variant {label!r} seed(s) {', '.join(clash)} already in an earlier file")
            out["curves"][label] = {**out["curves"].get(label, {}), **seeds}  # more seeds of one variant: one row
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/sokoban_cpu.yaml")
    ap.add_argument("--variants", default="himac,flat_grpo", help=f"comma-separated, from: {', '.join(VARIANTS)}")
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds, the same for every variant")
    ap.add_argument("--iterations", type=int, default=12, help="iteration budget per run")
    ap.add_argument("--minutes", type=float, default=0.0, help="training time budget per run (0: none)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="what --minutes counts: wall-clock, or the run's CPU time (fair on a machine other work shares)")
    ap.add_argument("--eval-every", type=int, default=3, help="evaluate every this many iterations (0: off)")
    ap.add_argument("--eval-every-minutes", type=float, default=0.0,
                    help="also evaluate at each multiple of this much training time: equal wall-clock points")
    ap.add_argument("--eval-episodes", type=int, default=32)
    ap.add_argument("--validation", action="store_true",
                    help="evaluate on the validation range (for choosing settings), not the reporting range")
    ap.add_argument("--open-loop-rooms", type=int, default=256,
                    help="training rooms the open-loop reference is chosen on (0: no reference)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time")
    ap.add_argument("--threads", type=int, default=0, help="threads per run (default: 1 if --jobs > 1, else all)")
    ap.add_argument("--out", default=None, help="output directory (default runs/bench-learning-<time>)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key for every variant (repeatable)")
    ap.add_argument("--merge", nargs="+", type=Path, metavar="CURVES_JSON",
                    help="run nothing: put these benches' curves.json (same config, rooms and clock) in one table "
                         "and plot, in --out")
    args = ap.parse_args(argv)
    if args.merge:
        return _merged(ap, args)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        ap.error(f"--variants: unknown {unknown or names}; known: {', '.join(VARIANTS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--seeds {args.seeds!r}: expected integers like 0,1,2")
    if not seeds:
        ap.error("--seeds: at least one seed")
    if args.eval_episodes < 1:
        ap.error(f"--eval-episodes {args.eval_episodes}: the curves need at least 1 episode")
    if args.jobs < 1:
        ap.error(f"--jobs {args.jobs}: must be >= 1")
    try:
        overrides = C.parse_overrides(args.overrides)
    except C.ConfigError as e:
        ap.error(str(e))
    overrides.update({"iterations": args.iterations, "eval_every": args.eval_every, "eval_episodes": args.eval_episodes,
                      "eval_every_minutes": args.eval_every_minutes,
                      "time_budget_s": args.minutes * 60, "time_clock": args.clock,
                      "eval_offset": VALIDATION_OFFSET if args.validation else 0})
    threads = args.threads or (1 if args.jobs > 1 else (os.cpu_count() or 1))
    out = Path(args.out or f"runs/bench-learning-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)

    starts = {start_key(n): n for n in names}
    jobs = [Job(key, out / key, [args.config, *settings({**overrides, **VARIANTS[n], "iterations": 0})])
            for key, n in starts.items()]
    run_jobs(jobs, args.jobs, threads)
    jobs = [Job(f"{n}/seed{s}", out / n / f"seed{s}",
                [args.config, *settings({**overrides, **VARIANTS[n], "seed": s, "eval_at_start": False})])
            for s in seeds for n in names]  # seed by seed: the runs that share the machine share rooms
    run_jobs(jobs, args.jobs, threads)

    curves: dict = {}
    for n in names:
        start = RunDir(out / start_key(n), create=False).metrics("eval.jsonl")[0]
        curves[n] = {s: curve(out / n / f"seed{s}", start, args.clock) for s in seeds
                     if (out / n / f"seed{s}" / "bench_done").is_file()}
    curves = {n: c for n, c in curves.items() if c}
    offset = overrides["eval_offset"]
    ref = reference(args.config, overrides, args.eval_episodes, offset, args.open_loop_rooms)
    (out / "curves.json").write_text(json.dumps({"config": args.config, "overrides": overrides, "seeds": seeds,
                                                 "threads": threads, "jobs": args.jobs, "open_loop": ref,
                                                 "curves": curves}, indent=1))
    rooms = "validation" if args.validation else "held-out"
    title = (f"{Path(args.config).stem}: {args.eval_episodes} {rooms} rooms, seeds {args.seeds}, "
             + (f"{args.minutes:g} min / " if args.minutes else "") + f"{args.iterations} it per run")
    if curves:
        plot(curves, out / "learning.png", title, "CPU time" if args.clock == "cpu" else "wall-clock", ref)
        print(table(summary(curves)))
    if ref:
        print(f"\nopen-loop reference on the same {args.eval_episodes} rooms (no observation read; chosen on "
              f"{args.open_loop_rooms} "
              f"training rooms): best constant {','.join(ref['constant']['plan'])} {ref['constant']['success']:.3f}, "
              f"best fixed sequence {','.join(ref['sequence']['plan'])} {ref['sequence']['success']:.3f}")
        if "rule" in ref:
            print(f"reading rule {ref['rule']['plan'][0]} (closed loop, hand-written) {ref['rule']['success']:.3f}")
    print(f"\ncurves: {out / 'curves.json'}\nplot:   {out / 'learning.png'}")
    return 0


def _merged(ap: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    missing = [str(p) for p in args.merge if not p.is_file()]
    if missing:
        ap.error(f"--merge: no such file {missing[0]}")
    try:
        doc = merge(args.merge)
    except ValueError as e:
        ap.error(f"--merge: {e}")
    out = Path(args.out or f"runs/bench-learning-merged-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "curves.json").write_text(json.dumps(doc, indent=1))
    o = doc["overrides"]
    rooms = "validation" if o.get("eval_offset") else "held-out"
    title = (f"{Path(doc['config']).stem}: {o.get('eval_episodes')} {rooms} rooms, "
             f"{len(args.merge)} benches merged")
    clock = "CPU time" if o.get("time_clock") == "cpu" else "wall-clock"
    plot(doc["curves"], out / "learning.png", title, clock, doc.get("open_loop"))
    print(table(summary(doc["curves"])))
    print(f"\ncurves: {out / 'curves.json'}\nplot:   {out / 'learning.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
