"""Does the hierarchy pay off? Train several variants on equal terms and compare learning curves.

    python tools/bench_learning.py                         # CPU defaults: SmolLM2-135M, Sokoban
    python tools/bench_learning.py --variants himac,flat_grpo --minutes 20 --eval-every 3
    python tools/bench_learning.py --config configs/sokoban_1p5b.yaml --iterations 100   # a GPU

Every variant gets the same config, the same seed (so the same training rooms in the
same order), the same held-out evaluation rooms, and the same budget: `--iterations`,
and optionally `--minutes` of training wall-clock each (evaluation time excluded).
Variants are the paper's §4.3 ablations and flat baselines, each one config switch:

  himac              the full method
  flat_grpo          w/o hierarchy: one flat policy, GRPO over whole trajectories
  flat_rloo          the flat agent with RLOO's leave-one-out baseline
  flat_gigpo         the flat agent with GiGPO's episode + anchor-state step groups
  no_coevolution     planner and executor losses in one update step
  no_sub_done        a fixed T_limit steps per sub-goal instead of <sub_done>
  random_blueprint   Phase B under a random blueprint of the group instead of z*

Writes OUT/curves.json (held-out success per evaluation, against iterations, training
seconds, env steps and generated tokens), OUT/learning.png, each variant's full run
directory (OUT/<variant>/: metrics, samples, adapter) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from himac import config as C
from himac.experiment import VARIANTS


def train_variant(name: str, config: str, overrides: dict, out: Path) -> dict:
    """Train one variant to its budget; return its curve read back from the run directory."""
    from himac.coevolve import Trainer
    from himac.experiment import load_config
    from himac.rundir import RunDir
    cfg = load_config(config, {**overrides, **VARIANTS[name]})
    run = RunDir(out / name)
    run.write_config(cfg.flat())
    trainer = Trainer(cfg, run)
    print(f"\n== {name} ==  ({', '.join(f'{k}={v}' for k, v in VARIANTS[name].items()) or 'the full method'})",
          file=sys.stderr)
    try:
        trainer.train()
    finally:
        trainer.close()
    return curve(run.metrics(), run.metrics("eval.jsonl"))


def curve(metrics: list[dict], evals: list[dict]) -> dict:
    """Held-out success at each evaluation, with the training resources spent up to it."""
    spent = {-1: (0.0, 0, 0)}
    train_s = steps = tokens = 0
    for m in metrics:
        train_s, steps, tokens = m.get("train_s", train_s), steps + m.get("env/steps", 0), tokens + m.get("gen/tokens", 0)
        spent[m["iteration"]] = (train_s, steps, tokens)
    out: dict = {"iteration": [], "train_s": [], "env_steps": [], "gen_tokens": [], "success": [], "return": []}
    for ev in evals:
        s, n, k = spent.get(ev["iteration"], (float("nan"), 0, 0))
        out["iteration"].append(ev["iteration"] + 1)  # iterations completed (0 = before training)
        out["train_s"].append(s)
        out["env_steps"].append(n)
        out["gen_tokens"].append(k)
        out["success"].append(ev["eval/success_rate"])
        out["return"].append(ev["eval/return_mean"])
    out["train_success"] = [m["success_rate"] for m in metrics]
    return out


def summary_rows(curves: dict, target: float) -> list[list]:
    rows = []
    for name, c in curves.items():
        hit = next((it for it, s in zip(c["iteration"], c["success"]) if s >= target and it > 0), None)
        rows.append([name, c["success"][0] if c["success"] else float("nan"),
                     c["success"][-1] if c["success"] else float("nan"),
                     max(c["success"][1:], default=float("nan")), "-" if hit is None else hit,
                     c["iteration"][-1] if c["iteration"] else 0, c["train_s"][-1] if c["train_s"] else 0.0,
                     c["env_steps"][-1] if c["env_steps"] else 0, c["gen_tokens"][-1] if c["gen_tokens"] else 0])
    return rows


def table(rows: list[list], target: float) -> str:
    head = ["variant", "success@0", "final", "best", f"iters to {target:g}", "iters", "train s", "env steps",
            "gen tokens"]
    fmt = [lambda v: str(v), *[lambda v: f"{v:.3f}"] * 3, str, str, lambda v: f"{v:.0f}", str, lambda v: f"{v:.0f}"]
    cells = [head] + [[f(v) for f, v in zip(fmt, r)] for r in rows]
    width = [max(len(r[i]) for r in cells) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, width))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in width))
    return "\n".join(lines)


def plot(curves: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, c in curves.items():
        style = "-" if name == "himac" else "--" if name.startswith("flat") else ":"
        axes[0].plot(c["iteration"], c["success"], style, marker="o", ms=3, label=name)
        axes[1].plot([s / 60 for s in c["train_s"]], c["success"], style, marker="o", ms=3, label=name)
    axes[0].set_xlabel("co-evolution iterations")
    axes[1].set_xlabel("training wall-clock (min, evaluation excluded)")
    axes[0].set_ylabel("held-out greedy success rate")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_ylim(-0.03, 1.03)
    axes[1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/sokoban_cpu.yaml")
    ap.add_argument("--variants", default="himac,flat_grpo",
                    help=f"comma-separated, from: {', '.join(VARIANTS)}")
    ap.add_argument("--iterations", type=int, default=12, help="iteration budget per variant")
    ap.add_argument("--minutes", type=float, default=0.0, help="training wall-clock budget per variant (0: none)")
    ap.add_argument("--eval-every", type=int, default=3)
    ap.add_argument("--eval-episodes", type=int, default=32)
    ap.add_argument("--target", type=float, default=0.5, help="success rate for the 'iterations to target' column")
    ap.add_argument("--out", default=None, help="output directory (default runs/bench-learning-<time>)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key for every variant (repeatable)")
    args = ap.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        ap.error(f"--variants: unknown {unknown or names}; known: {', '.join(VARIANTS)}")
    if args.eval_episodes < 1:
        ap.error(f"--eval-episodes {args.eval_episodes}: the curves need at least 1 episode")
    try:
        overrides = C.parse_overrides(args.overrides)
    except C.ConfigError as e:
        ap.error(str(e))
    overrides.update({"iterations": args.iterations, "eval_every": args.eval_every,
                      "eval_episodes": args.eval_episodes, "time_budget_s": args.minutes * 60})
    out = Path(args.out or f"runs/bench-learning-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    result_path = out / "curves.json"
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    result.update({"config": args.config, "overrides": overrides, "target": args.target})
    curves = result.setdefault("curves", {})
    for name in names:
        if name in curves:  # finished in an earlier, interrupted call: keep it
            print(f"{name}: already in {result_path}, skipped", file=sys.stderr)
            continue
        if (out / name).exists():
            import shutil
            shutil.rmtree(out / name)  # a half-trained variant restarts from scratch, on equal terms
        curves[name] = train_variant(name, args.config, overrides, out)
        result_path.write_text(json.dumps(result, indent=1))  # nothing lost if a later variant crashes
    curves = {n: curves[n] for n in names}
    title = f"{Path(args.config).stem}: {args.iterations} it" + (f" / {args.minutes:g} min" if args.minutes else "") + \
        f", {args.eval_episodes} held-out episodes per point"
    plot(curves, out / "learning.png", title)
    print(table(summary_rows(curves, args.target), args.target))
    print(f"\ncurves: {result_path}\nplot:   {out / 'learning.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
