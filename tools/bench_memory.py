"""Benchmark: peak memory of one co-evolution iteration, phase by phase, on whatever device is present.

    python tools/bench_memory.py configs/sokoban_3b.yaml            # the 24 GB GPU setting
    python tools/bench_memory.py configs/sokoban_vl_cpu.yaml        # its CPU twin (tiny-vl)
    python tools/bench_memory.py CONFIG --set micro_batch_size=2 --set gen_batch_size=32
    python tools/bench_memory.py configs/sokoban_3b.yaml --model shape:qwen2.5-vl-3b-instruct   # no download
    python tools/bench_memory.py configs/sokoban_1p5b.yaml --model shape:qwen2.5-1.5b-instruct --json out.json

It builds the trainer of CONFIG (model, LoRA, optimiser, env pool) exactly as
`python -m himac.coevolve` does, runs one iteration (Phase A and Phase B) and prints
one row per phase: the peak memory while the phase ran, and its ratio to the
baseline measured in the same run, the memory held once the model and adapter are
loaded. Where the device is
- CUDA: torch.cuda.max_memory_allocated per phase (peaks reset between phases),
  and the peak reserved by the caching allocator (what nvidia-smi roughly shows);
- the CPU: the process's resident-set peak (VmHWM, reset between phases through
  /proc/self/clear_refs), which also counts Python and the libraries (the first row).
`--model` swaps the config's model, e.g. for a shape model (himac/shapes.py: the hub model's
exact architecture with random weights, built once into the cache); the report then says
"shape model: random weights, for measurement only". `--json PATH` also writes the rows.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

from himac import config as C
from himac.coevolve import Trainer
from himac.experiment import load_config
from himac.models import cuda_allocator_default
from himac.rundir import RunDir

GiB = 2 ** 30


class Meter:
    """now() and the peak since the last reset(), in bytes, for the device the model runs on."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS

    def now(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device)
        return _status_kib("VmRSS") * 1024

    def peak(self) -> tuple[int, int | None]:
        """(peak, peak reserved by the CUDA caching allocator or None)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device), torch.cuda.max_memory_reserved(self.device)
        return _status_kib("VmHWM") * 1024, None


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


class PhaseRecorder:
    """Stands in for the iteration's inner progress bar: each new phase name closes the previous one."""

    def __init__(self, meter: Meter):
        self.meter, self.rows, self.name, self.t0 = meter, [], None, 0.0

    def set_postfix_str(self, name: str) -> None:
        self.close()
        self.name, self.t0 = name, time.perf_counter()
        self.meter.reset()

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        if self.name is not None:
            peak, reserved = self.meter.peak()
            self.rows.append((self.name, peak, reserved, time.perf_counter() - self.t0))
            # as it happens: a slow iteration (1.5B NF4 on a CPU) stopped part-way still leaves its phases
            print(f"  {self.name}: peak {peak / GiB:.2f} GiB"
                  + (f", reserved {reserved / GiB:.2f} GiB" if reserved is not None else "")
                  + f", {self.rows[-1][3]:.1f} s", file=sys.stderr, flush=True)
        self.name = None


def model_bytes(model) -> tuple[int, int, int]:
    """(bytes of all weights as stored, of the vision tower, of the trainable LoRA weights)."""
    total = vision = lora = 0
    for n, p in model.named_parameters():
        size = p.numel() * p.element_size()
        total += size
        vision += size if ".visual." in n else 0
        lora += size if p.requires_grad else 0
    return total, vision, lora


def main(argv: list[str] | None = None) -> int:
    alloc = cuda_allocator_default()  # as python -m himac.coevolve runs
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--model", help="the model to measure instead of the config's (e.g. shape:qwen2.5-1.5b-instruct)")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    try:
        overrides = C.parse_overrides(args.overrides)
        if args.model:
            overrides["model"] = args.model
        cfg = load_config(args.config, overrides)
    except C.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from himac.models import SHAPE_NOTE, is_shape, model_path, resolve_device
    note = f" ({SHAPE_NOTE})" if is_shape(cfg.model.model) else ""
    meter = Meter(resolve_device(cfg.model.device))
    model_path(cfg.model)  # a shape or embedded model is written into the cache first, outside the rows
    before = meter.now()
    meter.reset()
    with tempfile.TemporaryDirectory() as tmp:
        tic = time.perf_counter()
        trainer = Trainer(cfg, RunDir(tmp))
        try:
            loaded = meter.now()
            load_peak, load_reserved = meter.peak()
            load_s = time.perf_counter() - tic
            print(f"  loaded in {load_s:.1f} s: {loaded / GiB:.2f} GiB held, peak {load_peak / GiB:.2f} GiB",
                  file=sys.stderr, flush=True)
            recorder = PhaseRecorder(meter)
            tic = time.perf_counter()
            metrics, _ = trainer.iteration(0, recorder)
            recorder.close()
            wall = time.perf_counter() - tic
            after = meter.now()
            weights, vision, lora = model_bytes(trainer.policy.model)
            device = str(trainer.policy.device)
            if meter.cuda:
                device += f" ({torch.cuda.get_device_name(meter.device)}; PYTORCH_CUDA_ALLOC_CONF={alloc})"
        finally:
            trainer.close()

    print(f"config {args.config}  model {cfg.model.model}{note}  device {device}  one iteration in {wall:.1f} s")
    print(f"weights as stored {weights / GiB:.2f} GiB (vision tower {vision / GiB:.2f}), "
          f"LoRA {lora / GiB:.3f} GiB; rows {metrics.get('macro/tokens', 0):.0f} blueprint + "
          f"{metrics.get('micro/tokens', 0):.0f} action tokens trained")
    what = "allocated" if meter.cuda else "resident (VmHWM)"
    print(f"\n| phase | peak {what} GiB | x baseline | reserved GiB | s |")
    print("|---|---|---|---|---|")
    print(f"| before the model (imports) | {before / GiB:.2f} | {before / loaded:.2f} | | |")
    res = f"{load_reserved / GiB:.2f}" if load_reserved is not None else ""
    print(f"| loading (model, LoRA, optimiser, envs) | {load_peak / GiB:.2f} | {load_peak / loaded:.2f} | {res} "
          f"| {load_s:.1f} |")
    print(f"| **baseline: model + LoRA loaded** | {loaded / GiB:.2f} | 1.00 | | |")
    for name, peak, reserved, secs in recorder.rows:
        res = f"{reserved / GiB:.2f}" if reserved is not None else ""
        print(f"| {name} | {peak / GiB:.2f} | {peak / loaded:.2f} | {res} | {secs:.1f} |")
    print(f"| after the iteration (optimiser state held) | {after / GiB:.2f} | {after / loaded:.2f} | | |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "config": args.config, "model": cfg.model.model, "note": SHAPE_NOTE if note else "", "device": device,
            "measure": what, "load_in_4bit": cfg.model.load_in_4bit, "dtype": cfg.model.dtype, "iteration_s": wall,
            "imports_gib": before / GiB, "loaded_gib": loaded / GiB, "load_peak_gib": load_peak / GiB,
            "load_reserved_gib": None if load_reserved is None else load_reserved / GiB, "load_s": load_s,
            "after_gib": after / GiB, "weights_gib": weights / GiB, "lora_gib": lora / GiB,
            "phases": [{"phase": n, "peak_gib": pk / GiB, "reserved_gib": None if r is None else r / GiB, "s": sec}
                       for n, pk, r, sec in recorder.rows]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
