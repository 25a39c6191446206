"""Benchmark: one GRPO iteration of himac's flat loop beside TRL's GRPOTrainer, same task, model, LoRA and batch.

    python tools/bench_trl.py                                   # SmolLM2-135M (embedded), 2 prompts x group 4
    python tools/bench_trl.py --model tiny --iterations 1       # the tiny test model: a quick check
    python tools/bench_trl.py --prompts 2 --group 4 --max-new-tokens 8 --iterations 3 --json out.json
    python tools/bench_trl.py --device cuda --model shape:qwen2.5-1.5b-instruct --prompts 8 --group 8

Needs `pip install -e ".[bench]"` (trl). On the CPU (the default) both sides run with `--threads` torch
threads (default 1), in float32. `--device cuda`: both on the GPU in `--dtype` (default bfloat16; TRL
with `bf16=True`), every timed part closed by `torch.cuda.synchronize()` so a part's seconds hold its
kernels, and peak GPU memory (allocated and reserved, reset after the warm-up) beside the RSS. A shape
model (`shape:NAME`, himac/shapes.py: the users' architectures with random weights, for measurement
only) goes through both sides' loading as the others do; random weights write noise, so rewards mean
nothing there and most completions run to `--max-new-tokens` (the generated-tokens row shows both
sides' lengths).

The task is single-turn: a one-move Sokoban room (`max_solution_moves` 1, `max_steps` 1), the
flat agent's prompt (the chat template, then the prefilled "Direction:"), and the reward is the
env's return for the one move (+10.9 solved, -0.1 a move that does not solve it, -0.2 an answer
that names no single direction: the flat loop's invalid-answer penalty). himac runs
`Trainer.iteration` with `hierarchy: false`; TRL runs `GRPOTrainer.train` on a dataset of the same
prompts, in the same order, with a reward function that replays each completion in the same room.
The rooms are generated once, before either side starts (rejection sampling a one-move room
takes about 2 s), and both sides' envs read them from that table.

Matched: the model directory (himac's `model_path`: the embedded SmolLM2 dequantised to float32,
the tiny model, or a shape), LoRA (r, alpha, dropout 0, all linear layers; trainable parameter
counts are compared), the dtype (float32 on the CPU, --dtype on CUDA), no gradient checkpointing;
prompts per iteration, group size (TRL's `num_generations`), max new tokens, temperature 1.0 with
top-k/top-p/repetition penalty off, the stop set (EOS or any token containing a newline: himac's
executor rule, given to TRL through the model's generation config), lr, AdamW (weight decay 0,
constant lr), gradient clip 1.0, clip epsilon 0.2, KL beta (k3 estimator, reference = the adapter
switched off on both), one optimiser step per iteration (TRL: `num_iterations` 1, no gradient accumulation, so both take
pi_old as the detached current log-probs), and the loss aggregation (TRL `loss_type: grpo` = the
token mean of each completion, then the mean over completions = himac's `loss_aggregation:
sample` when each sample is one turn). Prompt token ids are checked equal. What still differs is
listed in docs/shapes.md ("Beside TRL").

Each side runs in its own subprocess (so peak memory does not mix), `--warmup` iterations first,
then `--iterations` timed ones. The same instruments time both:
- generation: the model's own `generate` (the PEFT model's method, wrapped on the instance);
- reward: himac's env pool (`reset` and `step`, wrapped on the instance), TRL's reward function;
- reference and policy forward: the function that computes per-token log-probs (himac's
  `Policy.logprobs`, TRL's `_get_per_token_logps_and_entropies`, wrapped on the instance),
  under no_grad (reference) or with gradients (the loss's forward);
- backward: `torch.Tensor.backward` (wrapped; both call `loss.backward()`, TRL through accelerate);
- optimiser step: torch's global optimiser step pre/post hooks;
- other: the iteration minus the above (tokenising, advantages, the loss arithmetic, gradient
  clipping, metrics and logging).
Each part is measured in wall-clock seconds and in CPU seconds of the calling thread; an
iteration in wall-clock and in the process's CPU seconds. With one torch thread the model's work
runs on that thread, so CPU seconds stay put when other jobs take the cores and wall-clock does
not: on a shared machine compare CPU seconds (the table's split is in CPU seconds unless
`--split wall`).
An iteration is `Trainer.iteration(t)` for himac and, for TRL, the time between two
`on_step_end` callbacks (a `TrainerCallback`: data loading, the step and the previous step's
logging). TRL's own profiling timers (`trl.extras.profiling`, which it only sends to W&B / MLflow
/ Trackio) are captured too and written to the JSON as a cross-check. Peak memory is the
process's resident-set high-water mark (VmHWM), reset after the warm-up, and for the whole process
(getrusage), each side in its own process. Prints a table: the median wall-clock and CPU seconds
per iteration, the split (means over the timed iterations), memory, and himac/TRL, all measured
in the same run; `--json PATH` writes every iteration of both sides.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GiB = 2 ** 30
SIDES = ("himac", "trl")
# (bucket key, row label) of the time split, in the table's order
BUCKETS = [("generate", "generation (model.generate)"), ("reward", "reward (env reset + step)"),
           ("ref_forward", "reference forward (no grad)"), ("policy_forward", "policy forward (loss)"),
           ("backward", "backward"), ("optimizer", "optimiser step")]


# -- the shared single-turn task --------------------------------------------------------------
def sokoban_config(spec: dict):
    from envs.sokoban import SokobanConfig
    return SokobanConfig(room_size=spec["room_size"], max_steps=1, min_solution_moves=1,
                         max_solution_moves=spec["max_solution_moves"])


def make_rooms(spec: dict) -> dict[str, list]:
    """seed -> (room_fixed, room_state, solution) as lists, for every iteration's rooms."""
    from envs import sokoban
    cfg = sokoban_config(spec)
    out = {}
    for seeds in spec["seeds"]:
        for s in seeds:
            fixed, state, solution = sokoban.generate(cfg, s)
            out[str(s)] = [fixed.tolist(), state.tolist(), solution]
    return out


def use_room_table(rooms: dict[str, list]) -> None:
    """Make `SokobanEnv.reset(seed)` read the pre-generated rooms (both sides' envs reset through it)."""
    import numpy as np

    from envs import sokoban
    generate = sokoban.generate

    def from_table(cfg, seed, max_tries=1000):
        if str(seed) not in rooms:
            return generate(cfg, seed, max_tries)
        fixed, state, solution = rooms[str(seed)]
        return np.array(fixed, dtype=np.int8), np.array(state, dtype=np.int8), list(solution)
    sokoban.generate = from_table


# -- instruments ------------------------------------------------------------------------------
class Clock:
    """Wall-clock seconds, CPU seconds of the calling thread, and calls per bucket, accumulated; `timed` wraps a
    callable into a bucket. With one torch thread the model's work runs on the calling thread, so its CPU
    seconds do not grow when other processes take the cores (wall-clock seconds do)."""

    def __init__(self, device: str = "cpu"):
        import torch
        # on a GPU the kernels run behind the Python: wait for them, so that each part holds its own work
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        self.total: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._open: dict[str, tuple[float, float]] = {}

    def start(self, name: str) -> None:
        self.sync()
        self._open[name] = (time.perf_counter(), time.thread_time())

    def stop(self, name: str) -> None:
        self.sync()
        wall, cpu = self._open.pop(name)
        self.add(name, time.perf_counter() - wall, time.thread_time() - cpu)

    def add(self, name: str, wall: float, cpu: float) -> None:
        self.total[name] += wall
        self.cpu[name] += cpu
        self.calls[name] += 1

    def timed(self, fn, bucket: str, no_grad_bucket: str | None = None):
        """`fn` timed into `bucket`, or into `no_grad_bucket` when called with gradients off."""
        import functools

        import torch

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            name = no_grad_bucket if no_grad_bucket and not torch.is_grad_enabled() else bucket
            self.sync()
            tic, cpu = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.add(name, time.perf_counter() - tic, time.thread_time() - cpu)
        return wrapper

    def install_torch_hooks(self) -> None:
        """backward and optimiser steps, process-wide: whoever calls them is timed the same way."""
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
        torch.Tensor.backward = self.timed(torch.Tensor.backward, "backward")
        register_optimizer_step_pre_hook(lambda opt, args, kwargs: self.start("optimizer"))
        register_optimizer_step_post_hook(lambda opt, args, kwargs: self.stop("optimizer"))

    def snapshot(self) -> dict:
        return {"total": dict(self.total), "cpu": dict(self.cpu), "calls": dict(self.calls)}


def diff(after: dict, before: dict) -> dict:
    return {kind: {k: v - before[kind].get(k, 0) for k, v in after[kind].items()} for kind in ("total", "cpu", "calls")}


def status_kib(field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1)) if m else 0


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux) and CUDA's peak counters; False where the kernel refuses."""
    import torch
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_record(rec: dict, peak_reset: bool) -> None:
    import torch
    rec["peak_timed_gib"] = status_kib("VmHWM") * 1024 / GiB if peak_reset else None
    rec["peak_process_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB
    if torch.cuda.is_initialized():  # since the reset after the warm-up (TRL resets at its warm-up's step end)
        rec["gpu_peak_timed_gib"] = torch.cuda.max_memory_allocated() / GiB
        rec["gpu_reserved_timed_gib"] = torch.cuda.max_memory_reserved() / GiB


def loaded_record(rec: dict) -> None:
    """Memory with the model and LoRA loaded, before the first iteration."""
    import torch
    rec["rss_loaded_gib"] = status_kib("VmRSS") * 1024 / GiB
    if torch.cuda.is_initialized():
        rec["gpu_loaded_gib"] = torch.cuda.memory_allocated() / GiB


def versions() -> dict:
    import importlib.metadata as md
    out = {}
    for name in ("torch", "transformers", "peft", "accelerate", "trl"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


# -- himac's side -----------------------------------------------------------------------------
def himac_config(spec: dict):
    from himac.experiment import load_config
    P, G = spec["prompts"], spec["group"]
    return load_config(None, {
        "env": "sokoban", "room_size": spec["room_size"], "max_steps": 1, "min_solution_moves": 1,
        "max_solution_moves": spec["max_solution_moves"], "model": spec["model"], "device": spec["device"],
        "dtype": spec["dtype"], "load_in_4bit": False, "gradient_checkpointing": False, "lora_r": spec["lora_r"],
        "hierarchy": False, "tasks_per_iteration": P,
        "rollouts_per_blueprint": G, "action_max_tokens": spec["max_new_tokens"], "executor_temperature": 1.0,
        "lr": spec["lr"], "kl_beta": spec["beta"], "clip_eps": 0.2, "max_grad_norm": 1.0,
        "loss_aggregation": "sample", "micro_batch_size": P * G, "gen_batch_size": P * G, "seed": spec["seed"],
        "iterations": spec["warmup"] + spec["iterations"], "eval_episodes": 0})


def run_himac(spec: dict, rec: dict) -> None:
    import torch

    from himac.coevolve import Trainer
    from himac.rundir import RunDir
    cfg = himac_config(spec)
    assert [cfg.run.task_seeds(t) for t in range(len(spec["seeds"]))] == spec["seeds"], "task seeds differ"
    clock = Clock(spec["device"])
    clock.install_torch_hooks()
    with tempfile.TemporaryDirectory() as tmp:
        tic = time.perf_counter()
        trainer = Trainer(cfg, RunDir(tmp))
        rec["load_s"] = time.perf_counter() - tic
        loaded_record(rec)
        model = trainer.policy.model
        rec["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        model.generate = clock.timed(model.generate, "generate")
        trainer.policy.logprobs = clock.timed(trainer.policy.logprobs, "policy_forward", "ref_forward")
        trainer.pool.reset = clock.timed(trainer.pool.reset, "reward")  # the env: one reset and one step
        trainer.pool.step = clock.timed(trainer.pool.step, "reward")
        peak_reset = False
        try:
            for t in range(spec["warmup"] + spec["iterations"]):
                if t == spec["warmup"]:
                    peak_reset = reset_peak()
                before = clock.snapshot()
                tic, cpu = time.perf_counter(), time.process_time()
                m, _ = trainer.iteration(t)
                wall, cpu = time.perf_counter() - tic, time.process_time() - cpu
                d = diff(clock.snapshot(), before)
                rec["iterations"].append({
                    "wall_s": wall, "cpu_s": cpu, "torch_threads": torch.get_num_threads(), **d,
                    "gen_tokens": m.get("gen/tokens", 0.0), "reward_mean": m.get("macro/return_mean"),
                    "loss": m.get("micro/loss"), "kl": m.get("micro/kl")})
        finally:
            trainer.close()
    memory_record(rec, peak_reset)


# -- TRL's side -------------------------------------------------------------------------------
def run_trl(spec: dict, rec: dict) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.extras import profiling

    from envs.sokoban import PROMPTS, SokobanEnv, parse_action
    from himac import models
    from himac.executor import INVALID_PENALTY, build_flat_messages
    from himac.policy import Policy, chat_ids

    clock = Clock(spec["device"])
    clock.install_torch_hooks()
    log_metrics = profiling.ProfilingContext._log_metrics

    def keep_trl_timer(self, duration):  # TRL's own profiling points (wall-clock), kept here as well
        clock.add("trl/" + self.name.split(".", 1)[-1], duration, 0.0)
        log_metrics(self, duration)
    profiling.ProfilingContext._log_metrics = keep_trl_timer

    P, G, W, N = spec["prompts"], spec["group"], spec["warmup"], spec["iterations"]
    tic = time.perf_counter()
    path = models.model_path(models.ModelConfig(model=spec["model"]))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, spec["dtype"]))
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    stop = Policy(model, tok)  # himac's stop set for an executor turn: EOS or any token with a newline in it
    model.generation_config.eos_token_id = sorted(set(stop.eos_ids) | set(stop.newline_ids()))

    env = SokobanEnv(sokoban_config(spec))
    texts, seeds, match = [], [], True
    for it in spec["seeds"]:
        for s in it:
            obs = env.reset(s)
            messages = build_flat_messages(PROMPTS, env.task, [], obs)
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + PROMPTS.flat_prefix
            match &= list(tok(text=text)["input_ids"]) == chat_ids(tok, messages, PROMPTS.flat_prefix)
            texts.append(text)
            seeds.append(s)
    rec["prompt_ids_match"] = bool(match)

    def sokoban_return(prompts, completions, seed, **kwargs):
        """The flat loop's return of one move: the env's step reward, plus its penalty for an invalid answer."""
        out = []
        for text, s in zip(completions, seed):
            env.reset(int(s))
            action, valid = parse_action(PROMPTS.flat_prefix + text)
            _, reward, _, _ = env.step(action if valid else None)
            out.append(reward + (0.0 if valid else INVALID_PENALTY))
        return out

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.last, self.cpu, self.before = time.perf_counter(), time.process_time(), clock.snapshot()
            self.peak_reset = False

        def on_step_end(self, args, state, control, **kwargs):
            now, cpu, snap = time.perf_counter(), time.process_time(), clock.snapshot()
            rec["iterations"].append({"wall_s": now - self.last, "cpu_s": cpu - self.cpu,
                                      "torch_threads": torch.get_num_threads(), **diff(snap, self.before)})
            if state.global_step == W:
                self.peak_reset = reset_peak()
            self.last, self.cpu, self.before = time.perf_counter(), time.process_time(), clock.snapshot()

    with tempfile.TemporaryDirectory() as tmp:
        args = GRPOConfig(
            output_dir=tmp, use_cpu=spec["device"] == "cpu", bf16=spec["dtype"] == "bfloat16", fp16=False,
            seed=spec["seed"],
            activation_checkpointing=False, gradient_checkpointing=False,  # TRL's default is True; himac's False
            per_device_train_batch_size=P * G, gradient_accumulation_steps=1, num_generations=G,
            max_completion_length=spec["max_new_tokens"], temperature=1.0, top_p=1.0, top_k=0,
            repetition_penalty=1.0, learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
            optim="adamw_torch", weight_decay=0.0, max_grad_norm=1.0, beta=spec["beta"], epsilon=0.2,
            loss_type="grpo", scale_rewards="group", num_iterations=1, max_steps=W + N, shuffle_dataset=False,
            logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
        lora = LoraConfig(r=spec["lora_r"], lora_alpha=2 * spec["lora_r"], lora_dropout=0.0,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        callback = StepClock()
        trainer = GRPOTrainer(model=model, reward_funcs=clock.timed(sokoban_return, "reward"), args=args,
                              train_dataset=Dataset.from_dict({"prompt": texts, "seed": seeds}),
                              processing_class=tok, peft_config=lora, callbacks=[callback])
        rec["load_s"] = time.perf_counter() - tic
        loaded_record(rec)
        rec["trainable_params"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        rec["checkpointing"] = bool(getattr(trainer.model, "is_gradient_checkpointing", False))
        trainer.model.generate = clock.timed(trainer.model.generate, "generate")
        trainer._get_per_token_logps_and_entropies = clock.timed(trainer._get_per_token_logps_and_entropies,
                                                                 "policy_forward", "ref_forward")
        trainer.train()
        logs = [h for h in trainer.state.log_history if "step" in h and "loss" in h]
    for i, h in zip(rec["iterations"], logs):
        i.update({"gen_tokens": h.get("completions/mean_length", 0.0) * P * G, "reward_mean": h.get("reward"),
                  "loss": h.get("loss"), "kl": h.get("kl")})
    memory_record(rec, callback.peak_reset)


def worker(side: str, spec_file: str, out_file: str) -> int:
    import torch
    spec = json.loads(Path(spec_file).read_text())
    torch.set_num_threads(spec["threads"])
    from himac import quiet
    quiet.quiet()
    use_room_table(spec["rooms"])
    rec = {"side": side, "threads": spec["threads"], "iterations": [], "versions": versions()}
    if side == "trl":
        import trl  # noqa: F401 - its imports (datasets, pandas, pyarrow) count as the side's baseline
    rec["rss_imports_gib"] = status_kib("VmRSS") * 1024 / GiB
    (run_himac if side == "himac" else run_trl)(spec, rec)
    Path(out_file).write_text(json.dumps(rec, indent=1))
    return 0


# -- the parent: both sides, one table ---------------------------------------------------------
def summarise(rec: dict, warmup: int) -> dict:
    timed = rec["iterations"][warmup:]
    n = len(timed)
    walls, cpus = [i["wall_s"] for i in timed], [i["cpu_s"] for i in timed]
    mean = {k: sum(i["total"].get(k, 0.0) for i in timed) / n for k, _ in BUCKETS}
    mean_cpu = {k: sum(i["cpu"].get(k, 0.0) for i in timed) / n for k, _ in BUCKETS}
    calls = {k: sum(i["calls"].get(k, 0) for i in timed) / n for k, _ in BUCKETS}
    trl_own = sorted({k for i in timed for k in i["total"] if k.startswith("trl/")})
    return {"s_per_iteration_median": statistics.median(walls), "s_per_iteration_mean": sum(walls) / n,
            "s_per_iteration": walls, "cpu_s_per_iteration_median": statistics.median(cpus),
            "cpu_s_per_iteration": cpus, "torch_threads": sorted({i["torch_threads"] for i in timed}),
            "cpu_s_per_iteration_mean": sum(cpus) / n, "split_mean_s": mean, "split_mean_cpu_s": mean_cpu,
            "calls_per_iteration": calls, "other_mean_s": sum(walls) / n - sum(mean.values()),
            "other_mean_cpu_s": sum(cpus) / n - sum(mean_cpu.values()),
            "gen_tokens_per_iteration": sum(i.get("gen_tokens") or 0.0 for i in timed) / n,
            "reward_mean": _mean([i.get("reward_mean") for i in timed]),
            "trl_profiling_mean_s": {k[4:]: sum(i["total"].get(k, 0.0) for i in timed) / n for k in trl_own},
            **{k: rec.get(k) for k in ("load_s", "rss_imports_gib", "rss_loaded_gib", "peak_timed_gib",
                                       "peak_process_gib", "gpu_loaded_gib", "gpu_peak_timed_gib",
                                       "gpu_reserved_timed_gib", "trainable_params", "prompt_ids_match",
                                       "checkpointing", "versions")}}


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def table(s: dict, n: int, split: str = "cpu") -> str:
    """The markdown table; `split` 'cpu' shows the time split in CPU seconds, 'wall' in wall-clock seconds."""
    h, t = s["himac"], s["trl"]
    key, other, total = {"cpu": ("split_mean_cpu_s", "other_mean_cpu_s", "cpu_s_per_iteration_mean"),
                         "wall": ("split_mean_s", "other_mean_s", "s_per_iteration_mean")}[split]

    def row(label, a, b, fmt="{:.2f}", ratio=True):
        cell = (lambda v: "" if v is None else fmt.format(v))
        r = f"{a / b:.2f}" if ratio and a is not None and b else ""
        return f"| {label} | {cell(a)} | {cell(b)} | {r} |"
    lines = ["| measure | himac | TRL | himac/TRL |", "|---|---:|---:|---:|",
             row(f"**s / iteration** (wall-clock, median of {n})", h["s_per_iteration_median"],
                 t["s_per_iteration_median"]),
             row(f"**CPU s / iteration** (process CPU time, median of {n})", h["cpu_s_per_iteration_median"],
                 t["cpu_s_per_iteration_median"]),
             row(f"{'CPU' if split == 'cpu' else 'wall-clock'} s / iteration, mean: the split below", h[total],
                 t[total])]
    for bucket, label in BUCKETS:
        lines.append(row(f"- {label}", h[key][bucket], t[key][bucket]))
    lines += [row("- other (tokenising, advantages, loss arithmetic, clipping, logging)", h[other], t[other]),
              row("generated tokens / iteration", h["gen_tokens_per_iteration"], t["gen_tokens_per_iteration"],
                  "{:.1f}"),
              row("mean reward", h["reward_mean"], t["reward_mean"], "{:.2f}", ratio=False),
              row("RSS after imports, GiB", h["rss_imports_gib"], t["rss_imports_gib"]),
              row("RSS with model + LoRA loaded, GiB", h["rss_loaded_gib"], t["rss_loaded_gib"]),
              row("**peak RSS, timed iterations, GiB**", h["peak_timed_gib"], t["peak_timed_gib"]),
              row("peak RSS, whole process, GiB", h["peak_process_gib"], t["peak_process_gib"]),
              row("load + set-up s (wall-clock)", h["load_s"], t["load_s"])]
    if h.get("gpu_peak_timed_gib") is not None:
        lines += [row("GPU allocated with model + LoRA loaded, GiB", h["gpu_loaded_gib"], t["gpu_loaded_gib"]),
                  row("**peak GPU allocated, timed iterations, GiB**", h["gpu_peak_timed_gib"],
                      t["gpu_peak_timed_gib"]),
                  row("peak GPU reserved, timed iterations, GiB", h["gpu_reserved_timed_gib"],
                      t["gpu_reserved_timed_gib"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m",
                    help="himac model name: smollm2-135m (embedded), tiny, or a shape (shape:qwen2.5-1.5b-instruct)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", choices=("float32", "bfloat16"),
                    help="both sides' weights (default: float32 on the CPU, bfloat16 on CUDA)")
    ap.add_argument("--prompts", type=int, default=2, help="prompts (rooms) per iteration")
    ap.add_argument("--group", type=int, default=4, help="completions per prompt (GRPO group, TRL num_generations)")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=3, help="timed iterations")
    ap.add_argument("--warmup", type=int, default=1, help="iterations run first and left out")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--beta", type=float, default=0.01, help="KL coefficient (0 skips the reference forward)")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--room-size", type=int, default=6)
    ap.add_argument("--max-solution-moves", type=int, default=1, help="the rooms' optimum: 1 = one-move rooms")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each side's process")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", choices=("cpu", "wall"),
                    help="the time split in CPU seconds (steady on a shared machine; the CPU's default) or wall-clock "
                         "seconds (CUDA's default: the host thread's CPU time is not the GPU's)")
    ap.add_argument("--json", help="also write both sides' records and the summary here")
    ap.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.spec, args.out)
    if args.prompts < 1 or args.group < 2 or args.iterations < 1 or args.warmup < 0:
        ap.error("need --prompts >= 1, --group >= 2, --iterations >= 1, --warmup >= 0")
    import importlib.util
    if importlib.util.find_spec("trl") is None:
        print("error: TRL is not installed: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device here")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.split = args.split or ("wall" if args.device == "cuda" else "cpu")

    from envs.seeds import task_seeds
    from himac import models
    P = args.prompts
    spec = {"model": args.model, "device": args.device, "dtype": args.dtype, "prompts": P, "group": args.group,
            "max_new_tokens": args.max_new_tokens,
            "iterations": args.iterations, "warmup": args.warmup, "lr": args.lr, "beta": args.beta,
            "lora_r": args.lora_r, "room_size": args.room_size,
            "max_solution_moves": args.max_solution_moves, "threads": args.threads, "seed": args.seed,
            "seeds": [task_seeds(args.seed, t, P) for t in range(args.warmup + args.iterations)]}
    tic = time.perf_counter()
    spec["rooms"] = make_rooms(spec)
    print(f"bench_trl: {len(spec['rooms'])} rooms generated in {time.perf_counter() - tic:.0f} s", file=sys.stderr)
    records = {}
    with tempfile.TemporaryDirectory() as tmp:
        spec_file = Path(tmp) / "spec.json"
        spec_file.write_text(json.dumps(spec))
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
               "TOKENIZERS_PARALLELISM": "false"}
        for side in SIDES:  # one after the other: they never share the CPU
            out = Path(tmp) / f"{side}.json"
            tic = time.perf_counter()
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", side, "--spec",
                                   str(spec_file), "--out", str(out)], cwd=ROOT, env=env,
                                  stdout=sys.stderr)  # TRL prints its log lines: keep stdout for the table
            if proc.returncode != 0:
                print(f"error: the {side} side failed (exit {proc.returncode})", file=sys.stderr)
                return 1
            records[side] = json.loads(out.read_text())
            print(f"bench_trl: {side} done in {time.perf_counter() - tic:.0f} s", file=sys.stderr)
    summary = {side: summarise(records[side], args.warmup) for side in SIDES}
    v = records["trl"]["versions"]
    device = (f"CUDA ({torch.cuda.get_device_name(0)})" if args.device == "cuda"
              else f"CPU, {args.threads} torch thread(s)")
    if models.is_shape(args.model):
        print(f"{args.model}: {models.SHAPE_NOTE} (rewards mean nothing; speed and memory are the point)")
    print(f"model {args.model}, {P} prompts x group {args.group}, {args.max_new_tokens} new tokens, "
          f"LoRA r {args.lora_r} alpha {2 * args.lora_r}, beta {args.beta}, lr {args.lr}; {device}, {args.dtype}; "
          f"{args.warmup} warm-up + {args.iterations} timed iterations; "
          + ", ".join(f"{k} {x}" for k, x in v.items()))
    print(f"trainable LoRA parameters: himac {summary['himac']['trainable_params']:,}, "
          f"TRL {summary['trl']['trainable_params']:,}; prompt token ids equal: {summary['trl']['prompt_ids_match']}")
    print()
    print(table(summary, args.iterations, args.split))
    own = summary["trl"]["trl_profiling_mean_s"]
    if own:
        print("\nTRL's own profiling timers (mean s / timed iteration): "
              + ", ".join(f"{k} {x:.2f}" for k, x in own.items()))
    print(f"(the split: {args.split} seconds, means over the timed iterations; 'other' = the mean iteration minus "
          "the timed parts)")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": {k: x for k, x in spec.items() if k != "rooms"},
                                               "summary": summary, "records": records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
