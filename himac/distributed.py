"""Data-parallel training over torchrun ranks: the few collective operations the loop needs.

    torchrun --nproc_per_node N -m himac.coevolve CONFIG

Every rank holds the whole model and adapter; the B tasks of an iteration are split
into contiguous slices (`split`), so every macro group (a task's G blueprints) and
micro group (its M trajectories under z*) lies whole on one rank and Eq. 2 needs no
communication. What must be global is:
- Eq. 3's normalisation: the number of samples (or turns, or tokens) N of a step is
  summed over ranks (`all_sum`) before the local token weights are made;
- the gradient: LoRA gradients are summed over ranks (`all_reduce_grads`) before the
  norm clip and the optimiser step, so every rank takes the same step;
- every decision to skip or stop (`agree`), so no rank waits in a collective that the
  others never enter.
Only rank 0 writes the run directory; metrics are computed on every rank from the
gathered raw values (`all_gather`), so ranks also agree on every decision made from
them. Without torchrun (or with one rank) none of these functions communicates:
`active()` is False and they return their inputs.

The process group times out after `TIMEOUT_S` ($HIMAC_DIST_TIMEOUT_S, default 600: a rank
that died or hangs stops the others with an error instead of a silent wait); gloo on CPUs,
NCCL on CUDA with one device per LOCAL_RANK ($HIMAC_DIST_BACKEND=gloo forces gloo).
"""
from __future__ import annotations

import datetime
import importlib
import os

import torch
import torch.distributed as dist

TIMEOUT_S = float(os.environ.get("HIMAC_DIST_TIMEOUT_S", 600))  # longest one rank may wait for the others


class RankLost(RuntimeError):
    """A collective failed: another rank died, hung past the timeout, or the launcher stopped this one."""


def launched() -> bool:
    """True when torchrun (or another launcher) started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


# torch modules whose functions take `group=dist.group.WORLD` as a default argument: imported after the group
# exists (transformers' from_pretrained imports the first), each default holds the group for good, so
# destroy_process_group cannot free it and gloo's worker threads live on into interpreter shutdown, where one
# that drops a collective's tensor late aborts the process ("terminate called without an active exception":
# 4 of 127 finished two-rank runs on a 2-core machine). Imported before the group, the defaults hold None.
_WORLD_DEFAULTS = ("torch.distributed.nn.functional", "torch.distributed.optim.zero_redundancy_optimizer",
                   "torch.distributed.fsdp.sharded_grad_scaler")


def init() -> None:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); no-op alone."""
    if not launched() or dist.is_initialized():
        return
    for name in _WORLD_DEFAULTS:
        importlib.import_module(name)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "gloo"
    if torch.cuda.is_available() and os.environ.get("HIMAC_DIST_BACKEND", "") != "gloo":
        torch.cuda.set_device(local)
        backend = "nccl"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=TIMEOUT_S))


def close() -> None:
    """Leave the process group; with nothing else holding it, gloo's worker threads are joined here."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """Several ranks train together (gate every collective on this: one process stays as it always was)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0: the one that writes the run directory and the terminal."""
    return rank() == 0


def device_name(configured: str) -> str:
    """The device of this rank: with several ranks on CUDA, 'auto' and 'cuda' mean cuda:LOCAL_RANK."""
    if active() and configured in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return configured


def split(n: int, r: int | None = None, w: int | None = None) -> range:
    """Rank r's contiguous share of n items (the first n % w ranks get one more); ranks in order cover 0..n-1."""
    r, w = rank() if r is None else r, world() if w is None else w
    base, extra = divmod(n, w)
    lo = r * base + min(r, extra)
    return range(lo, lo + base + (1 if r < extra else 0))


# -- collectives (each is a no-op alone) --------------------------------------------------
def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _guard(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except RankLost:
        raise
    except (RuntimeError, dist.DistError) as e:  # gloo/NCCL report a dead peer or a timeout this way
        raise RankLost(f"rank {rank()} lost the other ranks ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                       "another rank died or hung") from None


def _all_reduce(values: list[float], op) -> list[float]:
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    _guard(dist.all_reduce, t, op=op)
    return t.tolist()


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sums over ranks, in float64 (counts stay exact)."""
    return _all_reduce(values, dist.ReduceOp.SUM)


def all_max(values: list[float]) -> list[float]:
    """Element-wise maxima over ranks."""
    return _all_reduce(values, dist.ReduceOp.MAX)


def agree(flag: bool) -> bool:
    """True on every rank when it is True on any rank (a skip or stop decision all ranks then take)."""
    return bool(all_max([float(flag)])[0]) if active() else bool(flag)


def offset(count: int) -> tuple[int, int]:
    """(items on lower ranks, items on all ranks): this rank's items get global ids offset .. offset+count-1."""
    if not active():
        return 0, count
    counts = all_gather(count)
    return sum(counts[:rank()]), sum(counts)


def all_gather(obj) -> list:
    """Every rank's `obj` (any picklable value), in rank order, on every rank."""
    if not active():
        return [obj]
    out: list = [None] * world()
    _guard(dist.all_gather_object, out, obj)
    return out


def broadcast(obj):
    """Rank 0's `obj` on every rank."""
    if not active():
        return obj
    box = [obj if is_main() else None]
    _guard(dist.broadcast_object_list, box, src=0)
    return box[0]


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum each parameter's gradient over ranks, in one flat buffer. A parameter with no gradient on any rank
    keeps none (AdamW then leaves it and its state alone, as in one process); on some ranks only, the others
    count it as zeros."""
    if not active() or not params:
        return
    dev = params[0].device if dist.get_backend() == "nccl" else torch.device("cpu")
    has = torch.tensor([float(p.grad is not None) for p in params], device=dev)  # (P,)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dev, torch.float32)
                      for p in params] + [has])
    _guard(dist.all_reduce, flat, op=dist.ReduceOp.SUM)
    has_any = flat[-len(params):] > 0
    k = 0
    for p, live in zip(params, has_any.tolist()):
        n = p.numel()
        if live:
            p.grad = flat[k:k + n].view_as(p).to(p.device, p.dtype).clone()
        k += n


def broadcast_params(params: list[torch.nn.Parameter]) -> None:
    """Copy rank 0's values of `params` to every rank (the same start, whatever each rank loaded)."""
    if not active():
        return
    dev = params[0].device if dist.get_backend() == "nccl" else torch.device("cpu")
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1).to(dev, torch.float32) for p in params])
        _guard(dist.broadcast, flat, src=0)
        k = 0
        for p in params:
            p.copy_(flat[k:k + p.numel()].view_as(p))
            k += p.numel()

