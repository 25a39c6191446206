"""A run directory: everything needed to read, reproduce and resume a training run.

    config.yaml      the resolved flat config (every key, defaults included)
    run.json         seed, command line, package versions, device
    metrics.jsonl    one JSON object per iteration (flat metric names)
    eval.jsonl       held-out evaluations
    samples.jsonl    a few blueprints and trajectories per iteration, for reading
    progress.png     success, returns, answer quality and time per iteration, redrawn at each checkpoint
    checkpoint/      adapter/ (peft, safetensors, and README.md: the model card), trainer.pt (optimizer, RNG,
                     iteration)
    export/          GGUF exports of the checkpoint (agent-<quant>.gguf), made on demand
    tensorboard/     TensorBoard event files (report_to: tensorboard)
    wandb/           the W&B run (report_to: wandb): offline-run-*/ and run-id, the id a resumed run continues
    .lock            the writer's pid and host while a run holds the directory (RunLock)

This class is the one place that knows the layout: the trainer, evaluation,
export and the tools ask it for paths.

A run directory has one writer: `RunDir.lock()` takes an exclusive lock before
anything is written or recovered, and a second process stops naming the holder.

Checkpoints are written to a temporary directory and renamed into place, so a
crash mid-write leaves the previous checkpoint intact. On resume, metric lines
newer than the checkpoint are dropped (they belong to an iteration that will run
again).
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import sys
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

PACKAGES = ("himac", "torch", "transformers", "peft", "bitsandbytes", "numpy", "gguf", "llama_cpp_python")


class RunDir:
    def __init__(self, path: str | Path, create: bool = True):
        """`create`: make the directory (a run being written); False to read an existing one."""
        self.path = Path(path)
        if create:
            self.path.mkdir(parents=True, exist_ok=True)

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint"

    @property
    def adapter_dir(self) -> Path:
        """The checkpoint's peft adapter directory (adapter_config.json + adapter_model.safetensors)."""
        return self.checkpoint / "adapter"

    @property
    def adapter_weights(self) -> Path:
        return self.adapter_dir / "adapter_model.safetensors"

    @property
    def model_card(self) -> Path:
        """The adapter's model card (README.md beside the peft files, as a hub upload expects)."""
        return self.adapter_dir / "README.md"

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / "tensorboard"

    @property
    def wandb_dir(self) -> Path:
        """W&B's own folder (wandb.init(dir=RUN) writes RUN/wandb/)."""
        return self.path / "wandb"

    @property
    def wandb_id_file(self) -> Path:
        return self.wandb_dir / "run-id"

    def lock(self) -> RunLock:
        """Hold this directory for one writer until the process exits (or `release()`); RunLocked names the
        process that holds it. The directory is made if need be."""
        self.path.mkdir(parents=True, exist_ok=True)
        return RunLock(self.path / ".lock")

    def export_file(self, quant: str) -> Path:
        """Where the checkpoint's merged GGUF at precision `quant` is kept."""
        return self.path / "export" / f"agent-{quant}.gguf"

    # -- config and provenance -------------------------------------------------------
    def write_config(self, flat: dict[str, Any]) -> None:
        _atomic_text(self.config_file, yaml.safe_dump(flat, sort_keys=False))

    def read_config(self) -> dict[str, Any]:
        return yaml.safe_load(self.config_file.read_text())

    def write_run_info(self, seed: int, device: str) -> None:
        versions = {}
        for name in PACKAGES:
            try:
                versions[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                versions[name] = None
        info = {"seed": seed, "argv": sys.argv, "python": platform.python_version(), "platform": platform.platform(),
                "device": device, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "versions": versions}
        runs = []
        if (self.path / "run.json").is_file():  # a resumed run keeps the history of its starts
            runs = json.loads((self.path / "run.json").read_text()).get("starts", [])
        _atomic_text(self.path / "run.json", json.dumps({**info, "starts": runs + [info["started"]]}, indent=2))

    # -- logs -------------------------------------------------------------------------
    LOGS = ("metrics.jsonl", "eval.jsonl", "samples.jsonl")

    def log(self, metrics: dict[str, Any], name: str = "metrics.jsonl") -> None:
        """Append one row; a NaN or infinite number is written as null (bare NaN is not JSON)."""
        with open(self.path / name, "a") as f:
            f.write(json.dumps(_finite(metrics), allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        crash_point(f"after_log:{name}")

    def metrics(self, name: str = "metrics.jsonl") -> list[dict[str, Any]]:
        """The rows of a log. A torn line (a crash mid-write) is dropped with a warning."""
        path = self.path / name
        if not path.is_file():
            return []
        rows = []
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                where = "its last line" if i == len(lines) - 1 else f"line {i + 1}"
                warnings.warn(f"{path}: {where} is torn (a crash while writing it?); dropped", stacklevel=2)
        return rows

    def has_logs(self) -> list[str]:
        """The log files of some run that are here (a fresh run must not append to them)."""
        return [n for n in self.LOGS if (self.path / n).is_file() and (self.path / n).stat().st_size]

    def plot(self) -> Path | None:
        """Redraw progress.png from the logs (no-op before the first iteration)."""
        from himac.plots import plot_progress
        metrics = self.metrics()
        return plot_progress(metrics, self.metrics("eval.jsonl"), self.path / "progress.png") if metrics else None

    def drop_metrics_after(self, iteration: int) -> None:
        """Cut every log back to the rows of iterations <= `iteration` (a resumed run rewrites the rest)."""
        for name in self.LOGS:
            if (self.path / name).is_file():
                keep = [r for r in self.metrics(name) if r.get("iteration", -1) <= iteration]
                _atomic_text(self.path / name, "".join(json.dumps(r, allow_nan=False) + "\n" for r in keep))

    # -- checkpoints ------------------------------------------------------------------
    # A checkpoint is written whole into checkpoint.tmp (COMPLETE is its last file), then
    # swapped in: checkpoint -> checkpoint.old, checkpoint.tmp -> checkpoint, old removed.
    # A crash anywhere in that leaves a complete checkpoint in one of the three places;
    # `_recover` puts the newest complete one back at checkpoint/ before anything reads it.
    def has_checkpoint(self) -> bool:
        self._recover()
        return (self.checkpoint / "trainer.pt").is_file()

    def save_checkpoint(self, model, optimizers, iteration: int, config: dict | None = None,
                        card: str | None = None) -> None:
        """Adapter (peft safetensors) + trainer state (optimisers, RNG, iteration, config) as one atomic unit.

        `optimizers` is anything with a state_dict() (an Optimizer, update.Optimizers); `config` the
        resolved flat config, kept with the weights it describes (resume checks against it); `card` the
        adapter's model card (README.md, in place of peft's empty template).
        """
        tmp, old = self.path / "checkpoint.tmp", self.path / "checkpoint.old"
        self._recover()
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp / self.adapter_dir.name)  # peft: adapter_config.json + adapter_model.safetensors
        if card is not None:
            (tmp / self.adapter_dir.name / self.model_card.name).write_text(card, encoding="utf-8")
        state = {"format": TRAINER_STATE_FORMAT, "iteration": iteration, "optimizers": optimizers.state_dict(),
                 "rng": rng_state(), **({"config": json.dumps(_finite(config))} if config is not None else {})}
        crash_point("checkpoint_tmp")
        torch.save(state, tmp / "trainer.pt")
        _sync_dir(tmp)
        (tmp / "COMPLETE").write_text(str(iteration))
        shutil.rmtree(old, ignore_errors=True)
        if self.checkpoint.exists():
            os.replace(self.checkpoint, old)
        crash_point("checkpoint_swap")
        os.replace(tmp, self.checkpoint)  # the swap: before it, old/ is complete; after it, checkpoint/ is
        shutil.rmtree(old, ignore_errors=True)

    def load_trainer_state(self, optimizers) -> int:
        """Restore optimiser and RNG state; returns the last completed iteration.

        The file is read with `torch.load(weights_only=True)`: tensors, numbers, strings and
        containers only, so a trainer.pt from someone else cannot run code here.
        """
        state = read_trainer_state(self.checkpoint / "trainer.pt")
        optimizers.load_state_dict(state["optimizers"])
        set_rng_state(state["rng"])
        return int(state["iteration"])

    def _recover(self) -> None:
        """Finish a checkpoint swap that a crash interrupted (see above)."""
        tmp, old = self.path / "checkpoint.tmp", self.path / "checkpoint.old"
        if self.checkpoint.exists():
            if old.exists():
                shutil.rmtree(old, ignore_errors=True)  # crashed just before the final clean-up
            return
        if (tmp / "COMPLETE").is_file():
            os.replace(tmp, self.checkpoint)  # crashed between the two renames: the new one is whole
        elif old.exists():
            os.replace(old, self.checkpoint)
        shutil.rmtree(old, ignore_errors=True)


class RunLocked(RuntimeError):
    """Another process is writing this run directory."""


class RunLock:
    """An exclusive `flock` on RUN/.lock, held for the life of the run, whose file names the holder.

    The kernel frees a flock when its process dies (kill -9 included; over NFS, when the
    server's lease on a crashed client runs out), so a dead holder never leaves the
    directory locked: the next writer takes it at once, and the file's old contents, a
    holder that is gone, become a warning (`taken_over`). Never waits: a held lock is an
    error at once. The file stays (emptied) on release, so no two processes ever lock
    two different files of the same name.
    """

    def __init__(self, path: Path):
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by subprocesses (PEP 446)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLocked(f"{path.parent} is in use by {_describe(holder)}; wait for it to end, or use another "
                            "directory") from None
        self.taken_over = _read_holder(fd)  # a holder that died without releasing: what the file still says
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self.fd: int | None = fd

    def describe_taken_over(self) -> str | None:
        """A warning when the lock was taken from a holder that no longer held it, else None."""
        if not self.taken_over:
            return None
        return (f"himac: warning: took over {self.path.parent} from {_describe(self.taken_over)}, which no longer "
                "holds it (killed, or its machine went down); its last checkpoint is what --resume continues")

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing the descriptor frees the flock
            self.fd = None


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another process"
    return f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('since')})"


CRASH_POINTS = ("checkpoint_tmp", "checkpoint_swap", "after_log:metrics.jsonl", "after_log:eval.jsonl",
                "after_log:samples.jsonl", "before_save")
_passed: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Fault injection for tools/chaos.py: with $HIMAC_CRASH_AT = "NAME" or "NAME:K" the process kills itself
    (SIGKILL, no clean-up, as the OOM killer or a power cut would) the K-th time (default 1st) it passes
    the point NAME. Unset, this is one dictionary lookup. With $HIMAC_CRASH_RANK = R, only torchrun's rank R dies."""
    spec = os.environ.get("HIMAC_CRASH_AT")
    if not spec:
        return
    if os.environ.get("HIMAC_CRASH_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return
    target, _, k = spec.rpartition(":") if spec.rpartition(":")[2].isdigit() else (spec, "", "1")
    if target != name:
        return
    _passed[name] = _passed.get(name, 0) + 1
    if _passed[name] == int(k):
        os.kill(os.getpid(), signal.SIGKILL)


TRAINER_STATE_FORMAT = 2  # 2: weights_only-loadable (numpy RNG as tensors); 1 (no "format" key): pickled


class UnsafeCheckpoint(ValueError):
    """A trainer.pt that cannot be read without unpickling arbitrary objects."""


def read_trainer_state(path: Path) -> dict[str, Any]:
    import pickle
    try:
        state = torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpoint(
            f"{path} holds objects that only a full unpickle can read, which could run code, so it is refused. "
            f"A checkpoint written by himac before trainer-state format {TRAINER_STATE_FORMAT} looks like this: if "
            f"you made it yourself, convert it once with `python tools/convert_checkpoint.py {path.parent.parent}` "
            f"(details: {str(e).splitlines()[0][:200]})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise UnsafeCheckpoint(f"{path} is unreadable (truncated or not a trainer state): {e}") from None
    if not isinstance(state, dict) or state.get("format") != TRAINER_STATE_FORMAT:
        raise UnsafeCheckpoint(f"{path} is not a himac trainer state of format {TRAINER_STATE_FORMAT}")
    return state


def convert_legacy_trainer_state(run_dir: str | Path) -> Path:
    """Rewrite a format-1 (pickled) trainer.pt in the weights_only format. Unpickles the old file:
    only for checkpoints the user trusts (their own); the old file is kept as trainer.pt.legacy."""
    path = RunDir(run_dir, create=False).checkpoint / "trainer.pt"
    state = torch.load(path, weights_only=False)  # the user vouched for this file
    if state.get("format") == TRAINER_STATE_FORMAT:
        return path
    py, np_state = state["rng"]["python"], state["rng"]["numpy"]
    new = {"format": TRAINER_STATE_FORMAT, "iteration": int(state["iteration"]),
           "optimizers": {"executor": state["optimizer"]},
           "rng": {"python": py, "numpy": _numpy_state_to_tensors(np_state), "torch": state["rng"]["torch"],
                   **({"cuda": state["rng"]["cuda"]} if "cuda" in state["rng"] else {})}}
    os.replace(path, path.with_suffix(".pt.legacy"))
    torch.save(new, path)
    return path


def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from, as tensors and plain numbers (weights_only-loadable)."""
    state = {"python": random.getstate(), "numpy": _numpy_state_to_tensors(np.random.get_state()),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), int(n["pos"]), int(n["has_gauss"]),
                         float(n["cached_gaussian"])))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state_to_tensors(st) -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = st
    return {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _as_tuples(x):
    """random.setstate needs tuples; a loader may hand lists back."""
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def _sync_dir(path: Path) -> None:
    """fsync every file under `path`, so COMPLETE is never on disk before what it vouches for."""
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
