"""Benchmark: peak memory and time of the update's log-probs, chunked (himac.token_logp) against the plain
tensor arithmetic, measured in the same run.

    python tools/bench_logprobs.py                            # the LM head's output at Qwen2.5 widths, CPU
    python tools/bench_logprobs.py --rows 16 --device cuda    # a 1.5B update's micro-batch on a GPU
    python tools/bench_logprobs.py --update "shape:qwen2.5-1.5b-instruct?layers=2" --rows 4

Default level: random logits (rows, completion, vocabulary) in the model's dtype, the leaf a model's head
would hand over, and log pi of random targets with per-row temperatures and the marker ban, then the
backward of a weighted sum: the part of an update step that the two ways differ in.
`--update MODEL`: one micro-batch of `himac.update.rows_loss` (pi_ref forward, forward with gradients,
Eq. 3) and its backward through a shape model (random weights, for measurement only) loaded as
configs/sokoban_1p5b.yaml loads it (NF4, LoRA, gradient checkpointing; bf16 without NF4 on the CPU), with
`himac.policy.token_logprobs` swapped for the plain arithmetic in the baseline.

On the CPU each way runs in its own subprocess (peaks do not mix); on CUDA both run in one process, one
model load, since the allocator counts every tensor exactly and its peak is reset between them (`--in-process`
/ `--subprocesses` choose; gpu_check.sh saves a load of the 1.5B shape). Memory is the peak over what the
process held just before the step: on CUDA `max_memory_allocated`; on the CPU the resident-set high-water mark
(VmHWM, reset through /proc/self/clear_refs), with `MALLOC_MMAP_THRESHOLD_=65536` so that glibc maps
every large tensor on its own and gives it back when freed (the default threshold rises after the first
frees, and freed tensors would then stay resident). The CPU's own matrix-product buffers (the head in bf16
works in float32 there) are in the --update rows, not in the default level's.
Before timing, both ways are checked to agree on a small case (values and gradients), and one small
step runs first (kernels, pools); at the --update level each row also carries the step's loss, which
the two ways must give alike.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import Meter  # noqa: E402

from himac.token_logp import CHUNK_BYTES, reference_token_logprobs, token_logprobs  # noqa: E402

GiB = 2 ** 30
WAYS = {"plain": reference_token_logprobs, "chunked": token_logprobs}


def _inputs(rows: int, completion: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, completion, vocab, generator=g).to(device, dtype).requires_grad_(True)
    targets = torch.randint(8, vocab, (rows, completion), generator=g).to(device)
    temps = 0.8 + 0.4 * torch.rand(rows, generator=g)
    weights = torch.randn(rows, completion, generator=g).to(device)
    return logits, targets, temps, weights


def check_agreement(dtype: torch.dtype, device: str) -> tuple[float, float]:
    """Largest |difference| of values and of gradients between the two ways on a small case."""
    logits, targets, temps, weights = _inputs(3, 5, 1000, dtype, device)
    out = []
    for fn in WAYS.values():
        lp = fn(logits, targets, temps, [0, 1])
        (grad,) = torch.autograd.grad((lp * weights).sum(), logits)
        out.append((lp.detach(), grad.float()))
    return float((out[0][0] - out[1][0]).abs().max()), float((out[0][1] - out[1][1]).abs().max())


def run_head(way: str, args) -> dict:
    meter = Meter(torch.device(args.device))
    logits, targets, temps, weights = _inputs(args.rows, args.completion, args.vocab, getattr(torch, args.dtype),
                                              args.device)
    fn = WAYS[way]
    if way == "chunked":
        fn = functools.partial(fn, chunk_bytes=args.chunk_mib * 2**20)
    fn(logits[:1, :2], targets[:1, :2], temps[:1], [0]).sum().backward()  # warm-up (kernels, pools)
    logits.grad = None
    meter.reset()
    base = meter.now()
    t0 = time.perf_counter()
    lp = fn(logits, targets, temps, list(range(8)))
    forward_peak = meter.peak()[0] - base
    (lp * weights).sum().backward()
    if args.device == "cuda":
        torch.cuda.synchronize()
    return {"way": way, "forward_gib": forward_peak / GiB, "peak_gib": (meter.peak()[0] - base) / GiB,
            "s": time.perf_counter() - t0, "input_gib": logits.numel() * logits.element_size() / GiB}


def load_update(args) -> dict:
    """The --update level's model (as configs/sokoban_1p5b.yaml loads it), its micro-batch and weights, after
    one small step (kernels, cuBLAS, the allocator's pools)."""
    import himac.policy
    from himac import models
    from himac.experiment import load_config
    from himac.update import BLUEPRINT, Row, row_weights, rows_loss

    overrides = {"model": args.update, "device": args.device}
    if args.device == "cpu":  # bitsandbytes' NF4 on the CPU dequantises at every product: hours at 1.5B
        overrides.update(dtype="bfloat16", load_in_4bit=False)
    if args.no_nf4:
        overrides["load_in_4bit"] = False
    cfg = load_config("configs/sokoban_1p5b.yaml", overrides)
    model, tok = models.load(cfg.model)
    policy = himac.policy.Policy(model, tok)
    g = torch.Generator().manual_seed(0)
    rows = [Row(torch.randint(100, 1000, (args.prompt,), generator=g).tolist(),
                torch.randint(100, 1000, (args.completion,), generator=g).tolist(), BLUEPRINT, i, (-1.0) ** i)
            for i in range(args.rows)]
    model.train()
    small = [Row(rows[0].prompt_ids[:4], rows[0].completion_ids[:4], BLUEPRINT, 0, 1.0)]
    rows_loss(policy, small, row_weights(small, {BLUEPRINT}), cfg.update)[0].backward()
    return {"cfg": cfg, "model": model, "policy": policy, "rows": rows, "weights": row_weights(rows, {BLUEPRINT})}


def run_update(way: str, args, loaded: dict | None = None) -> dict:
    """One micro-batch of rows_loss + backward with `way`'s log-probs; `loaded`: load_update's (else loaded here)."""
    import himac.policy
    from himac.update import rows_loss

    loaded = loaded or load_update(args)
    cfg, model = loaded["cfg"], loaded["model"]
    for p in model.parameters():
        p.grad = None
    if args.device == "cuda":
        torch.cuda.empty_cache()
    meter = Meter(torch.device(args.device))
    meter.reset()
    base = meter.now()
    himac.policy.token_logprobs = WAYS[way]  # "plain": the baseline, the tensor arithmetic
    try:
        t0 = time.perf_counter()
        loss, _ = rows_loss(loaded["policy"], loaded["rows"], loaded["weights"], cfg.update)
        forward_peak = meter.peak()[0] - base
        loss.backward()
        if args.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    finally:
        himac.policy.token_logprobs = token_logprobs
    return {"way": way, "forward_gib": forward_peak / GiB, "peak_gib": (meter.peak()[0] - base) / GiB,
            "s": seconds, "beta": cfg.update.kl_beta, "held_gib": base / GiB,
            "load_in_4bit": cfg.model.load_in_4bit, "loss": loss.detach().item()}


def run_one(way: str, args, loaded: dict | None = None) -> dict:
    """`way`'s row. A way that runs out of device memory is a row saying so, not a crash (a 24 GB card may not
    hold the plain way at 16 rows)."""
    try:
        return run_update(way, args, loaded) if args.update else run_head(way, args)
    except torch.OutOfMemoryError:
        if args.device == "cuda":
            torch.cuda.empty_cache()
        return {"way": way, "oom": True, "forward_gib": float("nan"), "peak_gib": float("nan"), "s": float("nan"),
                "held_gib": float("nan"), "input_gib": float("nan")}


def in_process(args) -> list[dict]:
    """Both ways in this process, one model load (CUDA's allocator counts exactly; its peak is reset between)."""
    loaded = load_update(args) if args.update else None
    return [run_one(way, args, loaded) for way in WAYS]


def in_subprocesses(args, argv: list[str]) -> list[dict] | None:
    """Each way in its own process (the CPU's resident set keeps what one way freed); None when one failed."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads)}
    rows = []
    for way in WAYS:
        done = subprocess.run([sys.executable, __file__, "--one", way, *argv], env=env, capture_output=True,
                              text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stderr[-3000:])
            print(f"bench_logprobs: the {way} run failed (exit {done.returncode})", file=sys.stderr)
            return None
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=4, help="rows in the micro-batch (micro_batch_size)")
    ap.add_argument("--completion", type=int, default=512, help="completion tokens a row (blueprint_max_tokens)")
    ap.add_argument("--prompt", type=int, default=300, help="prompt tokens a row (--update only)")
    ap.add_argument("--vocab", type=int, default=151_936, help="vocabulary (Qwen2.5: 151,936)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--update", metavar="MODEL", help="measure rows_loss + backward through this model instead")
    ap.add_argument("--chunk-mib", type=int, default=CHUNK_BYTES // 2**20,
                    help="the chunked way's float32 working set per chunk of rows (head level)")
    ap.add_argument("--no-nf4", action="store_true", help="--update: load without NF4 (the CPU never uses it)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each subprocess")
    ap.add_argument("--json", type=Path, help="write both rows here")
    way = ap.add_mutually_exclusive_group()
    way.add_argument("--in-process", dest="in_process", action="store_true", default=None,
                     help="both ways in this process, one model load (the default on CUDA)")
    way.add_argument("--subprocesses", dest="in_process", action="store_false",
                     help="each way in its own process (the default on the CPU)")
    ap.add_argument("--one", choices=sorted(WAYS), help=argparse.SUPPRESS)  # a subprocess's own way
    args = ap.parse_args(argv)
    for name in ("rows", "completion", "prompt", "vocab", "threads", "chunk_mib"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return 0

    dv, dg = check_agreement(getattr(torch, args.dtype), args.device)
    print(f"agreement on a 3 x 5 x 1000 case ({args.dtype}): values {dv:.1e}, gradients {dg:.1e}")
    together = args.in_process if args.in_process is not None else args.device == "cuda"
    rows = in_process(args) if together else in_subprocesses(args, argv if argv is not None else sys.argv[1:])
    if rows is None:
        return 1
    what = ("rows_loss + backward through " + args.update) if args.update else "log-probs of the head's output"
    mem = "allocated" if args.device == "cuda" else "resident (VmHWM)"
    print(f"\n{what}: {args.rows} rows x {args.completion} completion tokens"
          + (f" (+ {args.prompt} prompt)" if args.update else "") + f", vocabulary {args.vocab:,}, {args.dtype}, "
          f"{args.device}, {args.threads} thread(s), " + ("both ways in one process" if together else
                                                          "each way in its own process")
          + (f"; the logits {rows[0]['input_gib']:.2f} GiB" if not args.update else "") + "\n")
    print(f"| way | forward peak GiB | forward + backward peak GiB | x plain | s | x plain |")
    print("|---|---:|---:|---:|---:|---:|")
    plain = rows[0]
    for r in rows:
        if r.get("oom"):
            print(f"| {r['way']} | out of memory | | | | |")
            continue
        x_mem, x_s = ("", "") if plain.get("oom") else (f"{r['peak_gib'] / plain['peak_gib']:.2f}",
                                                        f"{r['s'] / plain['s']:.2f}")
        print(f"| {r['way']} | {r['forward_gib']:.2f} | {r['peak_gib']:.2f} | {x_mem} | {r['s']:.1f} | {x_s} |")
    held = f"; before it the process held {rows[-1]['held_gib']:.2f} GiB" if args.update else ""
    if rows[-1].get("oom"):
        print("bench_logprobs: the chunked way ran out of memory", file=sys.stderr)
        return 1
    print(f"\npeaks over what the process held before the step ({mem}){held}")
    if args.update and not plain.get("oom"):  # the same step either way: the losses must agree
        print(f"loss: plain {plain['loss']:.6f}, chunked {rows[-1]['loss']:.6f}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k not in ("json", "one")},
                                         "agreement": {"values": dv, "gradients": dg}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
