"""Data-parallel training: 2 gloo ranks on the CPU give what 1 process gives.

- the update alone: 2 ranks (torch.multiprocessing) holding half the samples each take the
  step 1 process takes on all of them (plain SGD, so every gradient's size shows), for each
  loss aggregation, mini-batch splits that leave a rank without rows, the norm clip and
  drop_zero_variance's skipped step;
- leaving: after a model load through transformers, close() frees the process group (no gloo
  thread left for interpreter shutdown, where one aborted finished runs);
- the loop as a user runs it: `torchrun --nproc_per_node 2 -m himac.coevolve` against
  `python -m himac.coevolve` on the same seed and tasks (sampling: keyed): equal metrics,
  evaluation and samples; resumed on 1 process, equal adapter weights; a rank killed in a
  resumed 2-rank run stops it with a message, a non-zero exit and a readable checkpoint;
  SIGTERM to torchrun stops every rank and rank 0 checkpoints the last completed iteration.
"""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from himac import distributed, groups
from himac.update import ACTION, Row, UpdateConfig, policy_update

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["configs/sokoban_cpu_paper.yaml", "--set", "model=tiny", "--set", "load_in_4bit=false",
        "--set", "sampling=keyed",
        "--set", "tasks_per_iteration=4", "--set", "group_size=3", "--set", "rollouts_per_blueprint=3",
        "--set", "blueprint_max_tokens=10", "--set", "action_max_tokens=4", "--set", "max_steps=3",
        "--set", "planner_temperature=2.0", "--set", "executor_temperature=2.0", "--set", "mini_batches=2",
        "--set", "micro_batch_size=3", "--set", "eval_episodes=3", "--set", "eval_every=1",
        "--set", "eval_at_start=false"]
NOT_COMPARED = ("time/", "perf/", "wall_s", "cpu_s", "elapsed_s", "train_s", "update_s")


# -- pure parts -----------------------------------------------------------------------------
def test_split_covers_every_item_once_in_order():
    assert [list(distributed.split(5, r, 2)) for r in range(2)] == [[0, 1, 2], [3, 4]]
    assert [list(distributed.split(4, r, 3)) for r in range(3)] == [[0, 1], [2], [3]]
    assert list(distributed.split(3)) == [0, 1, 2]  # alone: everything


@pytest.mark.parametrize("aggregation", ["sample", "turn", "token"])
def test_global_units_make_two_halves_weigh_as_the_whole(aggregation):
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0], [1, 1, 0]], dtype=torch.float32)  # (R, C)
    sample = torch.tensor([0, 0, 1, 2, 3])  # sample 2 has no trained token
    whole = groups.token_weights(mask, sample, aggregation)
    halves = [slice(0, 2), slice(2, 5)]  # samples 0 | 1, 2, 3
    units = sum(groups.aggregation_units(mask[h], sample[h], aggregation) for h in halves)
    assert units == {"sample": 3, "turn": 4, "token": 8}[aggregation]
    parts = torch.cat([groups.token_weights(mask[h], sample[h], aggregation, units) for h in halves])
    assert torch.allclose(parts, whole) and math.isclose(float(parts.sum()), 1.0, rel_tol=1e-6)


def test_keyed_sampling_does_not_depend_on_the_batch(tiny_policy):
    from himac.policy import KeyedSampling
    p = [tiny_policy.encode([{"role": "user", "content": f"Task {i}: push the box."}]) for i in range(3)]
    tiny_policy.sampling = KeyedSampling((0, 7))
    together = [c.ids for c in tiny_policy.generate([p[0], p[1], p[2], p[1]], 8, temperature=1.5)]
    tiny_policy.sampling = KeyedSampling((0, 7))
    alone = [c.ids for c in tiny_policy.generate([p[1]], 8, 1.5) + tiny_policy.generate([p[2], p[1]], 8, 1.5)]
    assert alone == together[1:]  # same prompt, same occurrence, same draw, whatever else is in the batch
    assert together[1] != together[3]  # the second copy of a prompt draws anew
    tiny_policy.sampling = KeyedSampling((0, 8))
    assert [c.ids for c in tiny_policy.generate([p[1]], 8, 1.5)] != [together[1]]  # another iteration, another draw


# -- the update on two ranks ----------------------------------------------------------------
CASES = [  # (update config, whether every sample of rank 0 has advantage 0, SGD learning rate)
    ({}, False, 0.5),
    ({"mini_batches": 3, "micro_batch_size": 2}, False, 0.5),  # rank 1 has no row in part 0, rank 0 none in 2
    ({"loss_aggregation": "turn", "mini_batches": 2, "max_grad_norm": 0.05}, False, 0.5),  # the clip acts
    ({"loss_aggregation": "token", "mini_batches": 2}, False, 0.5),
    ({"mini_batches": 2, "kl_beta": 0.1}, False, 0.5),  # the KL to pi_ref over two steps
    ({"drop_zero_variance": True}, True, 0.5),  # zero on rank 0 only: the step is still taken
]


def _rows(zero_first_half: bool) -> list[Row]:
    g = torch.Generator().manual_seed(5)
    rows = []
    for s in range(6):
        for _ in range(1 + s % 3):
            prompt = torch.randint(10, 500, (int(torch.randint(4, 10, (1,), generator=g)),), generator=g).tolist()
            completion = torch.randint(10, 500, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
            adv = 0.0 if zero_first_half and s < 3 else float(torch.randn(1, generator=g))
            rows.append(Row(prompt, completion, ACTION, s, adv, temperature=0.8))
    return rows


def _updates(rank: int, world: int) -> list:
    from himac import models
    from himac.policy import Policy
    torch.manual_seed(0)
    model, tok = models.load(models.ModelConfig(model="tiny", lora_r=4))
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():  # LoRA B starts at 0, which would leave A without a gradient
        for name, p in trained.items():
            if "lora_B" in name:
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
    start = {n: p.detach().clone() for n, p in trained.items()}
    out = []
    for case, zero, lr in CASES:
        with torch.no_grad():
            for n, p in trained.items():
                p.copy_(start[n])
        mine = distributed.split(6, rank, world)
        rows = [r for r in _rows(zero) if r.sample in mine]
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)  # policy_update sets lr
        stats = policy_update(Policy(model, tok), opt, rows, UpdateConfig(**case, lr=lr), {ACTION})
        out.append(({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, stats))
    return out


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int) -> None:
    """Join a gloo group of `world` ranks the way coevolve does (himac.distributed.init, as under torchrun)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), HIMAC_DIST_BACKEND="gloo")
    distributed.TIMEOUT_S = 60  # a rank left waiting fails the test
    torch.set_num_threads(1)
    distributed.init()


def _update_worker(rank: int, world: int, port: int, out: str) -> None:
    _join(rank, world, port)
    try:
        torch.save(_updates(rank, world), f"{out}.{rank}")
    finally:
        distributed.close()


@pytest.mark.slow
def test_two_ranks_take_the_update_of_one_process(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_update_worker, args=(2, _free_port(), str(tmp_path / "out")), nprocs=2)
    ranks = [torch.load(tmp_path / f"out.{r}", weights_only=False) for r in range(2)]
    alone = _updates(0, 1)
    for (case, *_), one, *two in zip(CASES, alone, *ranks):
        for weights, stats in two:
            for k in ("loss", "grad_norm", "kl", "tokens", "steps", "steps_skipped"):
                assert math.isclose(stats[k], one[1][k], rel_tol=1e-5, abs_tol=1e-9), (case, k, stats[k], one[1][k])
            for name, w in weights.items():
                assert torch.allclose(w, one[0][name], rtol=1e-5, atol=1e-7), (case, name)
        assert two[0][0].keys() == one[0].keys() and one[1]["steps"] >= 1 and one[1]["grad_norm"] > 0


def _close_worker(rank: int, port: int, out: str) -> None:
    """A rank as coevolve runs it: join, load a model through transformers, leave; is the group freed?"""
    import weakref
    import torch.distributed as dist
    from himac import models
    _join(rank, 2, port)
    models.load(models.ModelConfig(model="tiny", load_in_4bit=False))  # from_pretrained imports torch.distributed.nn
    group = weakref.ref(dist.group.WORLD)
    distributed.close()
    Path(f"{out}.{rank}").write_text(str(group() is None))


def test_leaving_the_group_frees_it(tmp_path):
    """Nothing keeps the process group alive after close(), so gloo's worker threads end there and not in
    interpreter shutdown, where one of them aborted a finished 2-rank run (SIGABRT, ~1 run in 30)."""
    import torch.multiprocessing as mp
    mp.spawn(_close_worker, args=(_free_port(), str(tmp_path / "out")), nprocs=2)
    assert [(tmp_path / f"out.{r}").read_text() for r in range(2)] == ["True", "True"]


# -- the loop, as a user runs it ------------------------------------------------------------
def coevolve(*args, ranks=1, env=None, check=True):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] \
        if ranks > 1 else [sys.executable]
    proc = subprocess.run([*launcher, "-m", "himac.coevolve", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-4000:]}")
    return proc


def lines(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def same_rows(a: dict, b: dict) -> list[str]:
    """Keys whose values differ beyond float summation order (timings are not compared)."""
    bad = []
    for k in sorted(set(a) | set(b)):
        if any(s in k for s in NOT_COMPARED):
            continue
        x, y = a.get(k), b.get(k)
        if isinstance(x, float) and isinstance(y, float):
            if not math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-8):
                bad.append(f"{k}: {x} != {y}")
        elif x != y:
            bad.append(f"{k}: {x!r} != {y!r}")
    return bad


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process for 2 iterations; 2 ranks for the first of them."""
    base = tmp_path_factory.mktemp("dp")
    coevolve(*ARGS, "--set", "iterations=2", "--out", base / "one")
    coevolve(*ARGS, "--set", "iterations=1", "--out", base / "two", ranks=2)
    return base / "one", base / "two"


@pytest.mark.slow
def test_two_ranks_give_the_metrics_of_one_process(runs):
    one, two = runs
    a, b = lines(one / "metrics.jsonl"), lines(two / "metrics.jsonl")
    assert [m["iteration"] for m in b] == [0]
    assert same_rows(a[0], b[0]) == []
    assert a[0]["macro/adv_std"] > 0 and a[0]["macro/grad_norm"] > 0  # something was learnt from
    assert same_rows(lines(one / "eval.jsonl")[0], lines(two / "eval.jsonl")[0]) == []  # 3 episodes over 2 ranks
    assert lines(two / "eval.jsonl")[0]["eval/episodes_run"] == 3
    assert [s for s in lines(one / "samples.jsonl") if s["iteration"] == 0] == lines(two / "samples.jsonl")
    assert not list(two.glob("*.tmp")) and (two / "checkpoint" / "trainer.pt").is_file()


@pytest.mark.slow
def test_a_two_rank_run_resumes_on_one_process(runs, tmp_path):
    one, two = runs
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    coevolve("--resume", resumed, "--set", "iterations=2")
    a, b = lines(one / "metrics.jsonl"), lines(resumed / "metrics.jsonl")
    assert [m["iteration"] for m in b] == [0, 1]
    assert same_rows(a[1], b[1]) == []
    wa = load_file(one / "checkpoint" / "adapter" / "adapter_model.safetensors")
    wb = load_file(resumed / "checkpoint" / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-7), k


@pytest.mark.slow
def test_a_killed_rank_stops_the_run_and_keeps_the_checkpoint(runs, tmp_path):
    from himac.launch import check_adapter
    from himac.rundir import RunDir, read_trainer_state
    _, two = runs
    run = tmp_path / "killed"
    shutil.copytree(two, run)
    proc = coevolve("--resume", run, "--set", "iterations=3", ranks=2, check=False,
                    env={"HIMAC_CRASH_AT": "before_save", "HIMAC_CRASH_RANK": "1"})  # rank 1 dies in iteration 1
    assert proc.returncode != 0
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", proc.stderr)  # torchrun names the rank that died
    assert "rank 0 lost the other ranks" in proc.stderr or "rank 0 was stopped by the launcher" in proc.stderr, \
        proc.stderr[-3000:]  # and rank 0 says why it stops
    assert f"--resume {run}" in proc.stderr
    rd = RunDir(run, create=False)
    assert rd.has_checkpoint()
    assert read_trainer_state(rd.checkpoint / "trainer.pt")["iteration"] in (0, 1)
    check_adapter(rd)  # whole


@pytest.mark.slow
def test_sigterm_stops_every_rank_and_rank_0_saves_the_last_completed_iteration(tmp_path):
    """What a scheduler does before it kills a job: SIGTERM to torchrun, which passes it to every rank. Each
    abandons the iteration in flight; rank 0 checkpoints the last completed one from its own copy (save_every
    100: nothing else would have), and the run resumes on one process."""
    from himac.launch import check_adapter
    from himac.rundir import RunDir, read_trainer_state
    out = tmp_path / "term"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "himac.coevolve", *ARGS, "--set", "iterations=50", "--set", "save_every=100",
                             "--set", "eval_episodes=0", "--out", str(out)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 600
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode != 0
    assert "rank 0 was stopped by the launcher (SIGTERM)" in stderr, stderr[-3000:]
    done = lines(out / "metrics.jsonl")
    rd = RunDir(out, create=False)
    assert read_trainer_state(rd.checkpoint / "trainer.pt")["iteration"] == done[-1]["iteration"] < 49
    check_adapter(rd)
    last = done[-1]["iteration"]
    coevolve("--resume", out, "--set", f"iterations={last + 2}")
    assert [m["iteration"] for m in lines(out / "metrics.jsonl")] == list(range(last + 2))
