#!/usr/bin/env bash
# One GPU check for a bare CUDA machine, in under 8 minutes, offline:
#
#     bash tools/gpu_check.sh                  # from the repository root or anywhere
#     GPU_CHECK_OUT=/tmp/gc bash tools/gpu_check.sh
#
# 1. the `gpu`-marked tests (python -m pytest -m gpu);
# 2. one co-evolution iteration of the Qwen2.5-1.5B shape through `python -m himac.coevolve
#    configs/sokoban_1p5b.yaml`, without and with NF4 (bf16 compute), shortened to 2 tasks, G = M = 4,
#    64-token blueprints, 32-token actions and 2 steps (the LM_SET line);
# 3. tools/bench_logprobs.py --update on the 1.5B shape at sokoban_1p5b.yaml's micro-batch (16 rows of 1024 + 512
#    tokens): one update step's peak with the chunked log-probs against the plain arithmetic (one process, one
#    load of the shape);
# 4. tools/bench_memory.py on the Qwen2.5-VL-3B shape at configs/sokoban_3b.yaml (NF4, G = M = 8,
#    8 tasks, 512-token blueprints: the generation batch and the longest update rows of the real
#    setting; executor actions shortened to 32 tokens and 2 steps to fit the time);
# then one table: the card (torch.cuda.get_device_name), seconds, peak allocated and reserved.
#
# Two more steps, not in the 8 minutes, run when named in GPU_CHECK_STEPS (space-separated; default
# "gpu-tests lm-1.5b logp-1.5b vl-3b", the four above):
#   mem-1.5b  tools/bench_memory.py on the 1.5B shape at configs/sokoban_1p5b.yaml's own batches (NF4, 8 tasks,
#             G = M = 8, micro-batch 16, 512-token blueprints; actions cut to 32 tokens and 2 steps, as for
#             VL-3B): the README's measured 1.5B row, per phase (about 2.5 minutes on an H200);
#   trl-1.5b  tools/bench_trl.py --device cuda on the 1.5B shape (8 prompts x group 8, 32 new tokens, 3 timed
#             iterations): himac's flat GRPO iteration beside TRL's GRPOTrainer, seconds and GPU memory.
#             Needs trl; a bare image lacks it: carry trl, datasets, dill and multiprocess wheels in .whl/
#             (1.8 MB, installed --no-deps; the image has their other needs).
# e.g. GPU_CHECK_STEPS="logp-1.5b mem-1.5b trl-1.5b" bash tools/gpu_check.sh: what is left once the check has run.
# Shape models (himac/shapes.py) are the exact architectures with random weights, written once
# into $HIMAC_CACHE (1.5B: 3.1 GB, VL-3B: 7.5 GB): shape model: random weights, for measurement only.
# Random weights never say <|im_end|>, so every generation runs to its token limit: the worst case.
#
# Without CUDA it says so and runs the same steps, CPU-sized (one-layer shapes with a 1024-token
# vocabulary, one task, G = M = 2, a few tokens), and exits 0 if they pass: that checks the script,
# not a card (about a minute on an idle 2-core machine).
#
# A bare CUDA image lacks some of himac's dependencies (gym-sokoban, bitsandbytes, pytest,
# matplotlib). Wheels in $HIMAC_WHEELS (default .whl/, git-ignored) are installed offline first:
#     pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_24_x86_64 \
#         -d .whl gym-sokoban==0.0.6 bitsandbytes==0.50.2 pytest pluggy iniconfig pygments packaging  # 44 MB
# (--no-deps: bitsandbytes would pull torch, gym-sokoban gym and pygame; only gym-sokoban's room
# generator is used) and carried along with the working tree. Without bitsandbytes the NF4 steps
# are skipped and the VL-3B bench runs in bf16; without matplotlib (the CLI draws progress.png
# at its checkpoint) the 1.5B iterations run through tools/bench_memory.py, the same
# Trainer.iteration without the checkpoint. The table says which.
set -u -o pipefail
cd "$(dirname "$0")/.."
# tools/*.py import himac from the checkout: a bare machine has not pip-installed it
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
OUT=${GPU_CHECK_OUT:-$(mktemp -d -t himac-gpu-check-XXXXXX)}
WHEELS=${HIMAC_WHEELS:-.whl}
STEP_TIMEOUT=${STEP_TIMEOUT:-300}
DEFAULT_STEPS="gpu-tests lm-1.5b logp-1.5b vl-3b"  # the check, under 8 minutes
STEPS=${GPU_CHECK_STEPS:-$DEFAULT_STEPS}
KNOWN="$DEFAULT_STEPS mem-1.5b trl-1.5b"
for s in $STEPS; do
  case " $KNOWN " in *" $s "*) ;; *) echo "gpu_check: unknown step '$s' in GPU_CHECK_STEPS (known: $KNOWN)" >&2; exit 2;; esac
done
want() { case " $STEPS " in *" $1 "*) return 0;; *) return 1;; esac; }
mkdir -p "$OUT"
START=$(date +%s)
echo "gpu_check: logs and results in $OUT"

# -- what this machine has -------------------------------------------------------
missing() {  # the distributions among himac's run-time needs that are not importable
  "$PY" - <<'EOF'
import importlib.util
need = {"gym_sokoban": "gym-sokoban", "bitsandbytes": "bitsandbytes", "pytest": "pytest",
        "matplotlib": "matplotlib", "yaml": "pyyaml", "PIL": "pillow", "tqdm": "tqdm"}
print(" ".join(dist for mod, dist in need.items() if importlib.util.find_spec(mod) is None))
EOF
}
MISSING=$(missing)
if [ -n "$MISSING" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  echo "gpu_check: not installed: $MISSING; installing what $WHEELS/ holds, offline"
  for dist in $MISSING; do
    nodeps=""; [ "$dist" = gym-sokoban ] && nodeps="--no-deps"
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" $nodeps "$dist" >>"$OUT/pip.log" 2>&1 \
      || echo "gpu_check: $dist: no usable wheel in $WHEELS/ (see $OUT/pip.log)"
  done
  MISSING=$(missing)
fi
if want trl-1.5b && ! "$PY" -c "import trl" >/dev/null 2>&1 && ls "$WHEELS"/trl-*.whl >/dev/null 2>&1; then
  echo "gpu_check: trl is not installed; installing trl, datasets, dill, multiprocess from $WHEELS/, offline, --no-deps"
  "$PY" -m pip install -q --no-index --no-deps --find-links "$WHEELS" trl datasets dill multiprocess >>"$OUT/pip.log" 2>&1 \
    || echo "gpu_check: trl: no usable wheels in $WHEELS/ (see $OUT/pip.log)"
fi
want trl-1.5b && ! "$PY" -c "import trl" >/dev/null 2>&1 && MISSING="${MISSING:+$MISSING }trl"
has() { case " $MISSING " in *" $1 "*) return 1;; *) return 0;; esac; }
[ -n "$MISSING" ] && echo "gpu_check: still missing: $MISSING"
if ! has gym-sokoban; then
  echo "gpu_check: gym-sokoban is missing (Sokoban rooms come from its generator): no step can run"; exit 1
fi

CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
if [ "$CUDA" = 1 ]; then
  CARD=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")
  SHAPE_LM="shape:qwen2.5-1.5b-instruct"
  SHAPE_VL="shape:qwen2.5-vl-3b-instruct"
  LM_SET="--set tasks_per_iteration=2 --set group_size=4 --set rollouts_per_blueprint=4
          --set blueprint_max_tokens=64 --set action_max_tokens=32 --set max_steps=2 --set subgoal_step_limit=2"
  VL_SET="--set tasks_per_iteration=8 --set blueprint_max_tokens=512 --set action_max_tokens=32
          --set max_steps=2 --set subgoal_step_limit=2"
  MEM_SET=$VL_SET  # the 1.5B config's own G, M, micro-batch and generation batch; the same cuts
  TRL_SET="--device cuda --prompts 8 --group 8 --max-new-tokens 32 --iterations 3"
else
  CARD="no CUDA device: CPU fall-back ($(nproc) cores), one-layer shapes, tiny settings: checks the script, not a card"
  SHAPE_LM="shape:qwen2.5-1.5b-instruct?layers=1&vocab=1024"
  SHAPE_VL="shape:qwen2.5-vl-3b-instruct?layers=1&vision_layers=1&vocab=1024"
  TINY="--set device=cpu --set dtype=float32 --set tasks_per_iteration=1 --set group_size=2
        --set rollouts_per_blueprint=2 --set blueprint_max_tokens=4 --set action_max_tokens=2 --set max_steps=1
        --set subgoal_step_limit=1 --set micro_batch_size=4 --set gen_batch_size=8"
  LM_SET=$TINY
  VL_SET=$TINY
  MEM_SET=$TINY
  TRL_SET="--prompts 1 --group 2 --max-new-tokens 2 --warmup 0 --iterations 1"
fi
echo "gpu_check: $CARD"
COMMON="--set iterations=1 --set eval_episodes=0"

# -- the steps -------------------------------------------------------------------
: >"$OUT/steps.tsv"
step() {  # step NAME HOW -- command...: run it under a time limit, log it, record rc and seconds
  local name=$1 how=$2; shift 3
  local t0=$(date +%s) rc
  echo "gpu_check: $name ..."
  timeout "$STEP_TIMEOUT" "$@" >"$OUT/$name.log" 2>&1; rc=$?
  local secs=$(( $(date +%s) - t0 ))
  printf '%s\t%s\t%s\t%s\n' "$name" "$how" "$rc" "$secs" >>"$OUT/steps.tsv"
  if [ "$rc" != 0 ]; then echo "gpu_check: $name failed (exit $rc); its last lines:"; tail -n 15 "$OUT/$name.log"; fi
}
skip() { printf '%s\t%s\t-\t-\n' "$1" "skipped: $2" >>"$OUT/steps.tsv"; echo "gpu_check: $1 skipped: $2"; }

if ! want gpu-tests; then :
elif has pytest; then
  step gpu-tests "pytest -m gpu" -- "$PY" -m pytest -q -p no:cacheprovider -m gpu $(grep -l "mark.gpu" tests/test_*.py)
else
  skip gpu-tests "pytest missing"
fi

for nf4 in false true; do
  want lm-1.5b || break
  name=lm-1.5b-$([ $nf4 = true ] && echo nf4 || echo bf16)
  if [ $nf4 = true ] && ! has bitsandbytes; then skip "$name" "bitsandbytes missing"; continue; fi
  if has matplotlib; then
    step "$name" "himac.coevolve" -- "$PY" -m himac.coevolve configs/sokoban_1p5b.yaml --out "$OUT/run-$name" \
      --set model="$SHAPE_LM" --set load_in_4bit=$nf4 $COMMON $LM_SET
  else
    step "$name" "bench_memory (no matplotlib)" -- "$PY" tools/bench_memory.py configs/sokoban_1p5b.yaml \
      --model "$SHAPE_LM" --set load_in_4bit=$nf4 --json "$OUT/$name.json" $COMMON $LM_SET
  fi
done

# the update's log-probs, chunked against the plain arithmetic, at the 1.5B config's own micro-batch and its
# longest rows (16 x 1024 prompt + 512 completion tokens); seconds on a GPU (the shape is cached by now)
LP_NF4=""; has bitsandbytes || LP_NF4="--no-nf4"
if [ "$CUDA" = 1 ]; then LP_SET="--rows 16 --prompt 1024 --completion 512"; else LP_SET="--rows 2 --prompt 8 --completion 4"; fi
want logp-1.5b && step logp-1.5b "bench_logprobs" -- "$PY" tools/bench_logprobs.py --update "$SHAPE_LM" $LP_SET \
  $LP_NF4 --json "$OUT/logp.json"

NF4=true; has bitsandbytes || NF4=false
TAG=$([ $NF4 = true ] && echo nf4 || echo bf16)
want vl-3b && step vl-3b-$TAG "bench_memory" -- "$PY" tools/bench_memory.py \
  configs/sokoban_3b.yaml --model "$SHAPE_VL" --set load_in_4bit=$NF4 --json "$OUT/vl-3b.json" $COMMON $VL_SET

# the extras (GPU_CHECK_STEPS): the 1.5B config at its own batches, and the bench beside TRL
want mem-1.5b && step mem-1.5b-$TAG "bench_memory" -- "$PY" tools/bench_memory.py \
  configs/sokoban_1p5b.yaml --model "$SHAPE_LM" --set load_in_4bit=$NF4 --json "$OUT/mem-1.5b.json" $COMMON $MEM_SET
if ! want trl-1.5b; then :
elif has trl; then
  step trl-1.5b "bench_trl" -- "$PY" tools/bench_trl.py --model "$SHAPE_LM" $TRL_SET --split wall --json "$OUT/trl.json"
else
  skip trl-1.5b "trl missing (carry trl, datasets, dill, multiprocess wheels in $WHEELS/)"
fi

# -- one table -------------------------------------------------------------------
TOTAL=$(( $(date +%s) - START ))
"$PY" - "$OUT" "$CARD" "$SHAPE_LM" "$SHAPE_VL" "$TOTAL" "$CUDA" "$STEPS" "$DEFAULT_STEPS" <<'EOF'
import json, re, sys
from pathlib import Path
out, card, lm, vl, total, cuda = Path(sys.argv[1]), *sys.argv[2:5], int(sys.argv[5]), sys.argv[6] == "1"
steps, default = sys.argv[7].split(), sys.argv[7].split() == sys.argv[8].split()
mem = "allocated" if cuda else "resident (RSS)"
print(f"\n## himac GPU check: {card}\n")
print("shape model: random weights, for measurement only")
print(f"1.5B: {lm}; VL-3B: {vl}; total {total} s" + (" (target: under 480 s)" if default else
                                                      f" (steps: {' '.join(steps)})") + "\n")
print(f"| step | how | result | step s | iteration s | peak {mem} GiB | peak reserved GiB |")
print("|---|---|---|---|---|---|---|")
bad = 0
for line in (out / "steps.tsv").read_text().splitlines():
    name, how, rc, secs = line.split("\t")
    it = peak = reserved = ""
    log = out / f"{name}.log"
    if rc not in ("0", "-"):
        bad += 1
    result = "skipped" if rc == "-" else ("ok" if rc == "0" else f"FAILED (exit {rc})")
    if name == "gpu-tests" and log.is_file():
        tail = log.read_text().strip().splitlines()
        result += f": {tail[-1].strip('= ')}" if tail else ""
    js = out / next((f"{k}.json" for k in ("vl-3b", "mem-1.5b") if name.startswith(k)), f"{name}.json")
    if name == "logp-1.5b" and rc == "0" and (out / "logp.json").is_file():  # bench_logprobs: chunked's peak
        lp = {r["way"]: r for r in json.loads((out / "logp.json").read_text())["rows"]}
        was = "out of memory" if lp["plain"].get("oom") else f"{lp['plain']['peak_gib']:.2f} GiB over the loaded model"
        result += f" (plain {was}, chunked {lp['chunked']['peak_gib']:.2f})"
        peak = f"{lp['chunked']['held_gib'] + lp['chunked']['peak_gib']:.2f}"
    elif name == "trl-1.5b" and rc == "0" and (out / "trl.json").is_file():  # bench_trl: both sides
        h, t = (json.loads((out / "trl.json").read_text())["summary"][k] for k in ("himac", "trl"))
        hs, ts = h["s_per_iteration_median"], t["s_per_iteration_median"]
        key = "gpu_peak_timed_gib" if cuda else "peak_process_gib"  # on the CPU: the whole process
        gib = lambda x: "?" if x is None else f"{x:.2f}"
        result += (f" (s / iteration: himac {hs:.2f}, TRL {ts:.2f}, {hs / ts:.2f}x; peak {mem} GiB: "
                   f"himac {gib(h.get(key))}, TRL {gib(t.get(key))})")
        it, peak = f"{hs:.2f}", gib(h.get(key))
        reserved = gib(h.get("gpu_reserved_timed_gib")) if cuda else ""
    elif rc == "0" and js.is_file():  # bench_memory's rows
        r = json.loads(js.read_text())
        phases = r["phases"]
        it = f"{r['iteration_s']:.1f}"
        peak = f"{max([r['load_peak_gib']] + [p['peak_gib'] for p in phases]):.2f}"
        res = [x for x in [r["load_reserved_gib"]] + [p["reserved_gib"] for p in phases] if x is not None]
        reserved = f"{max(res):.2f}" if res else ""
    elif rc == "0" and (out / f"run-{name}" / "metrics.jsonl").is_file():  # the CLI's run directory and summary
        rows = [json.loads(x) for x in (out / f"run-{name}" / "metrics.jsonl").read_text().splitlines() if x.strip()]
        it = f"{rows[-1]['wall_s']:.1f}" if rows and "wall_s" in rows[-1] else ""
        m = re.search(r"peak memory ([\d.]+) GiB RSS(?:, ([\d.]+) GiB CUDA allocated)?", log.read_text())
        peak = (m.group(2) if cuda else m.group(1)) or "" if m else ""
    print(f"| {name} | {how} | {result} | {secs} | {it} | {peak} | {reserved} |")
for stem, label in (("vl-3b", "VL-3B shape at sokoban_3b.yaml"), ("mem-1.5b", "1.5B shape at sokoban_1p5b.yaml's batches")):
    js = out / f"{stem}.json"
    if not js.is_file():
        continue
    r = json.loads(js.read_text())
    print(f"\n{label}, per phase ({r['device']}, load_in_4bit {r['load_in_4bit']}, {r['dtype']}; "
          f"weights {r['weights_gib']:.2f} GiB, LoRA {r['lora_gib']:.3f} GiB):\n")
    print(f"| phase | peak {mem} GiB | peak reserved GiB | s |\n|---|---|---|---|")
    fmt = lambda x: "" if x is None else f"{x:.2f}"
    print(f"| loading | {fmt(r['load_peak_gib'])} | {fmt(r['load_reserved_gib'])} | {r['load_s']:.1f} |")
    for p in r["phases"]:
        print(f"| {p['phase']} | {fmt(p['peak_gib'])} | {fmt(p['reserved_gib'])} | {p['s']:.1f} |")
sys.exit(1 if bad else 0)
EOF
