"""Benchmark: the same held-out evaluation episodes on the HF backend and the llama.cpp backend,
and llama.cpp's single-stream decode speed against the memory-bandwidth bound.

    python tools/bench_eval.py [--config configs/sokoban_cpu_paper.yaml] [--checkpoint smollm2-135m|RUN_DIR]
        [--episodes 8] [--quants f32,bf16,q8_0] [--decode-tokens 64] [--pp-tokens 256] [--threads N]
    python tools/bench_eval.py --checkpoint shape:qwen2.5-1.5b-instruct --hf-dtype bfloat16 \
        --quants bf16,q8_0,q4_0,q4_k_m --set action_choices=true      # the users' size, random weights
    python tools/bench_eval.py ... --decode-threads 1,2      # decode speed against threads: bandwidth or compute?

A shape model (docs/shapes.md) has the architecture of the named model and random weights: it
measures speed at that size and nothing else (the table says so). Its answers are noise, so the
generation lengths are the config's caps on both backends (blueprints run to
`blueprint_max_tokens`; `action_choices: true` fixes every executor answer to one action word);
the generated-token counts in the table show they match.

Rows, all measured in this run on this machine:
- evaluation: episodes/s and generated tokens/s (generated tokens over seconds spent
  in generate, prompt processing included) for HF and for llama.cpp on GGUFs of the
  same weights: the embedded Q4_1 file when the checkpoint is the embedded model,
  and exports of the (dequantised, merged) weights at each --quants precision;
  ratio = episodes/s over HF's.
- prompt processing: tokens/s of one --pp-tokens prompt evaluated in one call, HF f32
  vs each GGUF, and the ceiling it puts on "x HF": an evaluation made only of prompt
  processing (a fair model of this workload, where most time goes there) speeds up by
  at most (llama.cpp prompt tokens/s / HF's) / (share of tokens llama.cpp computes).
- decode: one sequence, tokens/s of single-token steps after a prompt, against the
  bound = memory bandwidth / bytes read per token (every weight once; the KV cache
  of a short context is negligible). Decode only reads weights, so the bandwidth is
  the best of read-only sums (torch, all threads) and copies (numpy one thread, torch
  all threads; read + write counted) of 512 MiB, over repeats: on a shared VM one
  measurement swings by 1.5x (46-70 GB/s seen on one quiet 2-core machine), and the
  best seen is the ceiling decode could reach.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from envs.seeds import eval_seeds
from himac import config as C, evaluate, export, models
from himac.evaluation import format_table, run_evaluation
from himac.llamacpp import LlamaCppPolicy


def memory_bandwidth(mib: int = 512, repeats: int = 10) -> float:
    """Bytes per second a large array moves through memory: the best of a read-only sum (what decode does
    with weights) and a copy (read + write counted), numpy and torch, over `repeats`."""
    a = np.ones(mib * 2**20 // 4, dtype=np.float32)
    b = np.empty_like(a)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    best = 0.0
    for moved, run in ((2, lambda: np.copyto(b, a)), (2, lambda: tb.copy_(ta)), (1, lambda: ta.sum())):
        run()  # touch the pages
        t = min(_timed(run) for _ in range(repeats))
        best = max(best, moved * a.nbytes / t)
    return best


def _timed(fn) -> float:
    tic = time.perf_counter()
    fn()
    return time.perf_counter() - tic


def weight_bytes(path: Path) -> int:
    import gguf
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


def hf_prefill_speed(model, n: int, repeats: int = 3) -> float:
    """transformers' prompt tokens/s: one forward of n random tokens, last logits only."""
    x = torch.randint(100, 1000, (1, n))
    with torch.inference_mode():
        model(x, logits_to_keep=1)  # warm-up
        return n / min(_timed(lambda: model(x, logits_to_keep=1)) for _ in range(repeats))


def prefill_speed(policy: LlamaCppPolicy, n: int, repeats: int = 3, beside: int = 0) -> float:
    """llama.cpp's prompt tokens/s: n fresh tokens (no cached prefix) in one prefill call. With `beside`,
    that many other sequences of n tokens are cached first (untimed), as an evaluation's other episodes are."""
    rng = np.random.default_rng(0)
    prompt, *others = ([int(t) for t in rng.integers(100, 1000, n)] for _ in range(beside + 1))

    def run():
        policy.clear_cache()
        if others:
            policy.prefill(others)
        return _timed(lambda: policy.prefill([prompt]))
    run()  # warm-up
    return n / min(run() for _ in range(repeats))


def decode_speed(policy: LlamaCppPolicy, prompt: list[int], n: int) -> float:
    """Single-stream decode tokens/s: greedy one-token steps (one sequence) after the prompt is cached."""
    token = int(np.argmax(policy.prefill([prompt], room=n)[0]))  # the engine: generate() would stop at an EOS
    tic = time.perf_counter()
    for _ in range(n):
        token = int(np.argmax(policy.decode_step([(0, token)])[0]))
    return n / (time.perf_counter() - tic)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/sokoban_cpu_paper.yaml")
    ap.add_argument("--checkpoint", default="smollm2-135m", help="run directory or embedded model name")
    ap.add_argument("--episodes", type=int, default=8)
    ap.add_argument("--quants", default="f32,bf16,q8_0", help="export precisions to run through llama.cpp")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--pp-tokens", type=int, default=256, help="prompt length for the prompt-processing rows")
    ap.add_argument("--threads", type=int, help="threads for both torch and llama.cpp (default: all cores)")
    ap.add_argument("--decode-threads", help="comma-separated thread counts for the decode rows, e.g. 1,2: "
                    "decode speed against threads tells a bandwidth-bound decode (flat) from a compute-bound one "
                    "(rising with threads) (default: --threads)")
    ap.add_argument("--hf-dtype", default="float32", choices=("float32", "bfloat16"),
                    help="the HF side's dtype for a named model (embedded or shape); a run keeps its own")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config overrides (e.g. action_choices=true)")
    args = ap.parse_args(argv)
    try:
        sweep = [int(t) for t in args.decode_threads.split(",")] if args.decode_threads else [args.threads]
    except ValueError:
        ap.error(f"--decode-threads {args.decode_threads!r}: expected thread counts like 1,2")
    if any(t is not None and t < 1 for t in sweep):
        ap.error(f"--decode-threads {args.decode_threads!r}: thread counts must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = models.is_shape(args.checkpoint)
    named = shape or args.checkpoint in models.EMBEDDED  # a model, not a run
    overrides = C.parse_overrides(args.overrides)
    if named:  # unquantised on both sides: HF in --hf-dtype, llama.cpp on GGUFs of the same weights
        overrides = {"load_in_4bit": False, "dtype": args.hf_dtype, **overrides}
    cfg = evaluate.resolve_config(args.config, args.checkpoint, overrides)
    if shape:
        print(f"{args.checkpoint}: {models.SHAPE_NOTE}", file=sys.stderr)

    tmp = Path(tempfile.mkdtemp(prefix="himac-bench-"))
    try:  # the exports are GBs at 1.5B (bf16 2.9 GiB): gone when the bench ends, however it ends
        return measure(args, cfg, shape, named, sweep, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def measure(args, cfg, shape: bool, named: bool, sweep: list, tmp: Path) -> int:
    """Export, evaluate on both backends, time prompt processing and decode, print the tables."""
    ggufs: dict[str, Path] = {}
    if named:
        if not shape:
            ggufs["embedded Q4_1"] = models.embedded_gguf(args.checkpoint)
        model_cfg, adapter = dataclasses.replace(cfg.model, model=args.checkpoint), None
    else:
        model_cfg, adapter = export.read_run(args.checkpoint)
    state, hf_config, tok = export.merged_state(model_cfg, adapter)
    for q in filter(None, args.quants.split(",")):
        ggufs[f"export {q}"] = export.write_gguf(state, hf_config, tok, tmp / f"{q}.gguf", q, progress=False)
    del state

    rows, results = [], {}
    print(f"evaluation: {args.episodes} held-out {cfg.run.env} episodes, {args.checkpoint}, "
          f"{torch.get_num_threads()} torch threads", file=sys.stderr)
    hf = evaluate.load_backend("hf", args.checkpoint, cfg)
    hf_name = f"HF transformers {cfg.model.dtype}"
    results[hf_name] = run_evaluation(hf, cfg, args.episodes)
    hf_pp = hf_prefill_speed(hf.model, args.pp_tokens)
    del hf
    from envs import get_spec
    from himac import planner
    spec = get_spec(cfg.run.env)
    env = spec.make(cfg.env)
    obs = env.reset(eval_seeds(1)[0])
    decode_messages = planner.build_messages(spec.prompts, env.task, obs, cfg.planner.max_subgoals)
    pp, decode = {}, {}
    for name, path in ggufs.items():  # one model load per GGUF for all three measurements
        policy = LlamaCppPolicy(path, n_threads=args.threads, seed=cfg.run.seed)
        r = results[f"llama.cpp {name}"] = run_evaluation(policy, cfg, args.episodes)
        r["computed"] = policy.evaluated_tokens / (r["perf/prompt_tokens"] + r["perf/generated_tokens"])
        pp[name] = prefill_speed(policy, args.pp_tokens)
        pp[name, "beside"] = prefill_speed(policy, args.pp_tokens, beside=policy.n_seq - 1)
        prompt = policy.encode(decode_messages, "")
        for threads in sweep:
            if threads != args.threads:  # another thread count: a fresh engine
                del policy
                policy = LlamaCppPolicy(path, n_threads=threads, seed=cfg.run.seed)
            policy.clear_cache()
            decode[name, threads] = decode_speed(policy, prompt, args.decode_tokens)
        del policy

    base = results[hf_name]["perf/episodes_per_s"]
    for name, r in results.items():
        rows.append([name, r["success_rate"], r["perf/episodes_per_s"], r["perf/gen_tokens_per_s"],
                     r["perf/episodes_per_s"] / base, r.get("computed", 1.0), r["perf/generated_tokens"]])
    if shape:
        print(f"\n{args.checkpoint}: {models.SHAPE_NOTE} (success is meaningless; speed is the point)")
    print("\n" + format_table(rows, ["backend", "success", "episodes/s", "gen tokens/s", "x HF",
                                               "tokens computed", "generated tokens"]))
    print("(tokens computed: share of prompt + generated tokens the model evaluated; llama.cpp reuses cached prefixes)")

    prows = [[hf_name, hf_pp, "", 1.0, 1.0, 1.0]]
    for name in ggufs:
        share = results[f"llama.cpp {name}"]["computed"]
        prows.append([f"llama.cpp {name}", pp[name], pp[name, "beside"], pp[name] / hf_pp, share,
                      pp[name] / hf_pp / share])
    print(f"\nprompt processing ({args.pp_tokens}-token prompt, one call)")
    print(format_table(prows, ["backend", "prompt tok/s", "beside others", "x HF", "tokens computed",
                               "ceiling x HF"]))
    print("(beside others: the same prompt while the other KV sequences each hold one of its length, as in an "
          "evaluation's batch; ceiling: the x HF an evaluation made only of prompt processing could reach)")

    bandwidth = memory_bandwidth()
    drows = []
    for name, path in ggufs.items():
        nbytes = weight_bytes(path)
        bound = bandwidth / nbytes
        for threads in sweep:
            tok_s = decode[name, threads]
            drows.append([f"llama.cpp {name}", threads or "all", nbytes / 2**20, tok_s, bound, tok_s / bound,
                          tok_s / decode[name, sweep[0]]])
    print(f"\nsingle-stream decode ({args.decode_tokens} tokens after a {len(prompt)}-token prompt); "
          f"memory bandwidth {bandwidth / 1e9:.2f} GB/s (best read or copy)")
    print(format_table(drows, ["model", "threads", "weights MiB", "decode tok/s", "bound tok/s", "of bound",
                               f"x {sweep[0] or 'all'} threads"]))
    if len(sweep) > 1:
        print("(decode reads every weight once a token: bandwidth-bound, it stays flat as threads are added; "
              "compute-bound, it rises with them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
