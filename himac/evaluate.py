"""Evaluate the hierarchical agent greedily: one greedy blueprint, then a greedy executor.

`evaluate_agent` works with any policy object that has `encode(messages)` and
`generate(prompts, max_new_tokens, temperature, stop_at_newline)`, so the same
episodes can run on the training model or on an exported one.

Held-out seeds come from `eval_seeds`, a stream disjoint from the training
tasks' (coevolve.task_seeds), so "success" here is on rooms never trained on.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from himac import executor, planner

EVAL_STREAM = 7_777_777  # salt that keeps evaluation seeds apart from training seeds


def eval_seeds(n: int, offset: int = 0) -> list[int]:
    return [int(np.random.SeedSequence([EVAL_STREAM, offset + i]).generate_state(1)[0]) for i in range(n)]


def evaluate_agent(policy, spec, pool, seeds: list[int], pcfg: planner.PlannerConfig,
                   ecfg: executor.ExecutorConfig, flat: bool = False) -> dict:
    """Greedy planner + greedy executor on `seeds`; returns a flat report dict and per-episode records.

    `flat`: evaluate the hierarchy-free agent (no blueprint; see executor.py).
    """
    first = pool.reset(seeds)
    tasks, types = list(pool.tasks), list(pool.task_types)
    optimal = [getattr(pool.env(i), "optimal_moves", None) for i in range(len(seeds))]
    if flat:
        blueprints = [planner.Blueprint(i, [], [], "", [], True, 0.0) for i in range(len(seeds))]
    else:
        blueprints = [g[0] for g in planner.generate(policy, spec.prompts, tasks, first, pcfg, n=1, temperature=0.0)]
    runnable = [i for i, b in enumerate(blueprints) if b.valid]
    trajs = executor.generate(policy, spec.prompts, spec.parse_action, pool, [seeds[i] for i in runnable],
                              [(i, blueprints[i].subgoals) for i in runnable], ecfg, greedy=True, flat=flat)
    by_task = {t.task: t for t in trajs}
    episodes = []
    for i, seed in enumerate(seeds):
        t = by_task.get(i)
        episodes.append({
            "seed": seed, "task_type": types[i], "blueprint": blueprints[i].text, "valid_blueprint": blueprints[i].valid,
            "success": bool(t and t.success), "return": t.ret if t else pcfg.blueprint_fail_penalty,
            "env_steps": t.env_steps if t else 0, "end": t.end if t else "invalid_blueprint",
            "optimal_moves": optimal[i], "actions": [s.text.strip() for s in t.steps] if t else []})
    return {**summarise(episodes), "episodes": episodes}


def summarise(episodes: list[dict]) -> dict:
    n = max(len(episodes), 1)
    report = {
        "episodes_run": len(episodes),
        "success_rate": sum(e["success"] for e in episodes) / n,
        "return_mean": sum(e["return"] for e in episodes) / n,
        "blueprint_valid_rate": sum(e["valid_blueprint"] for e in episodes) / n,
    }
    for tt in sorted({e["task_type"] for e in episodes}):
        sub = [e for e in episodes if e["task_type"] == tt]
        report[f"success_rate/{tt}"] = sum(e["success"] for e in sub) / len(sub)
        report[f"return_mean/{tt}"] = sum(e["return"] for e in sub) / len(sub)
    solved = [e for e in episodes if e["success"] and e["optimal_moves"] is not None]
    if solved:  # Sokoban: how many more moves than the BFS optimum, on solved rooms
        report["optimality_gap"] = sum(e["env_steps"] - e["optimal_moves"] for e in solved) / len(solved)
    return report


# -- command line: python -m himac.evaluate ------------------------------------------
# Either backend runs the same evaluate_agent on the same seeds; only the policy object
# differs (himac.policy.Policy over transformers, himac.llamacpp.LlamaCppPolicy over a GGUF).
BACKENDS = ("hf", "llamacpp")


def resolve_config(config: str | None, checkpoint: str, overrides: dict):
    """CONFIG's env/planner/executor keys, the checkpoint's model keys, then --set overrides."""
    from himac import config as C
    from himac.coevolve import load_config
    from himac.models import ModelConfig
    from himac.rundir import RunDir
    flat: dict = {}
    run_dir = Path(checkpoint) if Path(checkpoint).is_dir() else None
    if run_dir is not None:
        if not (run_dir / "config.yaml").is_file():
            raise C.ConfigError(f"--checkpoint {checkpoint}: a directory without config.yaml is not a run directory")
        flat.update(RunDir(run_dir).read_config())
    elif config is None:
        raise C.ConfigError(f"--checkpoint {checkpoint} is not a run directory: give a CONFIG for the env and agent")
    if config is not None:
        flat.update(C.load_yaml(config))
    if run_dir is not None:  # the checkpoint decides the model its adapter belongs to
        saved = RunDir(run_dir).read_config()
        flat.update({k: saved[k] for k in C.field_names(ModelConfig) if k in saved})
    flat.update(overrides)
    return load_config(None, base=flat)


def load_backend(backend: str, checkpoint: str, cfg, quant: str = "f32", threads: int | None = None,
                 n_ctx: int = 4096):
    """The policy object for `backend` over `checkpoint` (run dir, .gguf file or embedded model name)."""
    import dataclasses

    from himac import models
    path = Path(checkpoint)
    is_gguf, is_run = path.suffix == ".gguf", path.is_dir()
    if not (is_gguf or is_run or checkpoint in models.EMBEDDED):
        raise FileNotFoundError(f"--checkpoint {checkpoint}: expected a run directory, a .gguf file or one of "
                                f"{sorted(models.EMBEDDED)}")
    if is_gguf and not path.is_file():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such GGUF file")
    if backend == "llamacpp":
        from himac.llamacpp import LlamaCppPolicy
        if is_run:  # merge and export once; reused while the checkpoint is unchanged
            from himac import export
            adapter = path / "checkpoint" / "adapter" / "adapter_model.safetensors"
            gguf_path = path / "export" / f"agent-{quant}.gguf"
            if not gguf_path.is_file() or gguf_path.stat().st_mtime < adapter.stat().st_mtime:
                print(f"himac: exporting {path} to {gguf_path} ({quant})", file=sys.stderr)
                export.export_run(path, gguf_path, quant)
            path = gguf_path
        elif not is_gguf:
            path = models.embedded_gguf(checkpoint)
        return LlamaCppPolicy(path, n_ctx=n_ctx, n_threads=threads, seed=cfg.run.seed)
    from himac.policy import Policy
    if is_gguf:
        # transformers can dequantise a GGUF, but its GGUF tokenizer conversion renumbers tokens
        # (measured on an exported tiny model), so it would not be the agent that was trained.
        from himac.config import ConfigError
        raise ConfigError(f"--checkpoint {checkpoint}: the hf backend runs a run directory or an embedded model; "
                          "run a .gguf with --backend llamacpp")
    if threads:
        import torch
        torch.set_num_threads(threads)
    mcfg = cfg.model if is_run else dataclasses.replace(cfg.model, model=checkpoint)
    model, tok = models.load(mcfg, adapter_dir=path / "checkpoint" / "adapter" if is_run else None)
    return Policy(model, tok, gen_batch_size=cfg.run.gen_batch_size)


class Metered:
    """Forwards to a policy, counting generated tokens and generation seconds."""

    def __init__(self, policy, bar=None):
        self.policy, self.bar = policy, bar
        self.tokens, self.prompt_tokens, self.seconds, self.calls = 0, 0, 0.0, 0

    def encode(self, messages, prefix=""):
        return self.policy.encode(messages, prefix)

    def generate(self, prompts, *args, **kwargs):
        tic = time.perf_counter()
        out = self.policy.generate(prompts, *args, **kwargs)
        self.seconds += time.perf_counter() - tic
        self.tokens += sum(len(o.ids) for o in out)
        self.prompt_tokens += sum(len(p) for p in prompts)
        self.calls += 1
        if self.bar is not None:
            self.bar.set_postfix(tok_s=f"{self.tokens / max(self.seconds, 1e-9):.1f}", turns=self.calls)
        return out

    def __getattr__(self, name):
        return getattr(self.policy, name)


def run_evaluation(policy, cfg, episodes: int, seed_offset: int = 0, chunk: int | None = None,
                   progress: bool = True) -> dict:
    """evaluate_agent over `episodes` held-out seeds in chunks (a progress bar ticks per chunk)."""
    from tqdm.auto import tqdm

    from envs import get_spec
    spec = get_spec(cfg.run.env)
    seeds = eval_seeds(episodes, seed_offset)
    chunk = chunk or max(cfg.run.gen_batch_size, 1)
    pool = spec.pool(cfg.env, evaluation=True)
    records: list[dict] = []
    tic = time.perf_counter()
    with tqdm(total=len(seeds), desc="evaluate", unit="ep", disable=not progress or None, dynamic_ncols=True) as bar:
        meter = Metered(policy, bar)
        try:
            for start in range(0, len(seeds), chunk):
                part = seeds[start:start + chunk]
                records += evaluate_agent(meter, spec, pool, part, cfg.planner, cfg.executor)["episodes"]
                bar.update(len(part))
        finally:
            pool.close()
    wall = time.perf_counter() - tic
    return {**summarise(records), "time/wall_s": wall, "perf/episodes_per_s": len(records) / wall,
            "perf/generated_tokens": meter.tokens, "perf/prompt_tokens": meter.prompt_tokens,
            "perf/generate_s": meter.seconds,
            "perf/gen_tokens_per_s": meter.tokens / max(meter.seconds, 1e-9), "episodes": records}


def format_table(rows: list[list], headers: list[str]) -> str:
    """A plain aligned text table; numbers right-aligned, floats with 3 decimals."""
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = [all(isinstance(r[i], (int, float)) for r in rows) for i in range(len(headers))]

    def line(vals):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(vals, widths, numeric))
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def report_table(report: dict) -> str:
    rows = [[k, v] for k, v in report.items() if k != "episodes" and isinstance(v, (int, float))]
    return format_table(rows, ["metric", "value"])


def main(argv: list[str] | None = None) -> int:
    from himac import config as C
    ap = argparse.ArgumentParser(prog="python -m himac.evaluate",
                                 description="Greedy hierarchical evaluation on held-out seeds (HF or llama.cpp).")
    ap.add_argument("config", nargs="?", help="flat YAML config (env, planner, executor keys); "
                    "default with a run directory: its config.yaml")
    ap.add_argument("--checkpoint", required=True,
                    help="run directory (python -m himac.coevolve --out), a .gguf file, or an embedded model name "
                         "(smollm2-135m: the untrained base)")
    ap.add_argument("--backend", choices=BACKENDS, help="hf (transformers) or llamacpp; default: llamacpp for a "
                    ".gguf file, hf otherwise")
    ap.add_argument("--episodes", type=int, help="held-out episodes (default: the config's eval_episodes, or 16)")
    ap.add_argument("--seed-offset", type=int, default=0, help="start of the held-out seed stream")
    from himac.export import QUANTS
    ap.add_argument("--quant", default="f32", help="llamacpp on a run directory: precision of the GGUF it is "
                    f"exported to first ({', '.join(QUANTS)})")
    ap.add_argument("--threads", type=int, help="CPU threads of either backend (default: all cores)")
    ap.add_argument("--n-ctx", type=int, default=4096, help="llama.cpp context length")
    ap.add_argument("--out", help="write the report (metrics and every episode) as JSON here")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key (repeatable)")
    args = ap.parse_args(argv)
    backend = args.backend or ("llamacpp" if args.checkpoint.endswith(".gguf") else "hf")
    try:
        from himac.export import UnsupportedModel
        if args.quant not in QUANTS:
            raise C.ConfigError(f"--quant {args.quant!r}: must be one of {', '.join(QUANTS)}")
        cfg = resolve_config(args.config, args.checkpoint, C.parse_overrides(args.overrides))
        episodes = args.episodes if args.episodes is not None else (cfg.run.eval_episodes or 16)
        if episodes < 1:
            raise C.ConfigError(f"--episodes {episodes}: must be >= 1")
        policy = load_backend(backend, args.checkpoint, cfg, args.quant, args.threads, args.n_ctx)
    except (C.ConfigError, FileNotFoundError, UnsupportedModel, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = {"backend": backend, "checkpoint": args.checkpoint, "env": cfg.run.env, "seed_offset": args.seed_offset,
              **run_evaluation(policy, cfg, episodes, args.seed_offset)}
    print(f"himac evaluate: {cfg.run.env}, {episodes} held-out episodes, backend {backend}, {args.checkpoint}")
    print(report_table(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"himac: report written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
