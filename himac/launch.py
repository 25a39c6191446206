"""Starting, resuming and ending a training run from the command line, for any `loop.TrainingLoop`.

    python -m himac.coevolve CONFIG [--out DIR] [--set key=value ...]
    python -m himac.coevolve --resume DIR [--set iterations=20]

Checks come before anything is written: a bad config key or value, a run directory
that already holds another run or that another process is writing (one writer per
directory: himac.rundir.RunLock), a checkpoint that does not match the config (keys that
fix the adapter's or the optimiser's shape cannot change on resume), a truncated
adapter, a missing reporting extra. Each is one line naming the value, exit 2.
SIGTERM (a scheduler's or a preemptible machine's notice) stops a run as Ctrl-C does:
the last completed iteration is checkpointed, the summary says so, exit 143 (Ctrl-C: 130).
Under torchrun rank 0 checks and the others follow its decision; a rank lost midway
stops every rank with the checkpoint intact (exit 1).
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

from himac import config as C
from himac import distributed as dist
from himac import models, quiet, reporting
from himac.experiment import Config, load_config, sections
from himac.loop import TrainingError, TrainingLoop
from himac.rundir import RunDir, RunLock, RunLocked, UnsafeCheckpoint, read_trainer_state

# Keys that fix the shape of the adapter or of the optimiser state: a checkpoint cannot change them.
FIXED_ON_RESUME = ("env", "dtype", *models.ADAPTER_KEYS, "optimizer_per_role")


def main(argv: list[str] | None, loop: type[TrainingLoop], prog: str, description: str) -> int:
    """The training CLI of `loop`: returns the exit code (0 done, 1 stopped by an error, 2 bad input, 130 Ctrl-C)."""
    models.cuda_allocator_default()
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("config", nargs="?", help="flat YAML config (not needed with --resume)")
    ap.add_argument("--out", help="run directory (default: runs/<config name>-<time>)")
    ap.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set lr=1e-4 (repeatable)")
    ap.add_argument("--keys", metavar="ENV", nargs="?", const="sokoban",
                    help="print every config key for ENV (default sokoban) with its default, kind and meaning, "
                         "then exit")
    ap.add_argument("--verbose", action="store_true",
                    help="show every third-party warning, log line and progress bar (by default the known noise "
                         "of transformers, peft and bitsandbytes is filtered: himac/quiet.py)")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    if not args.verbose:
        quiet.quiet()
    if threading.current_thread() is threading.main_thread() and not dist.launched():
        signal.signal(signal.SIGTERM, _terminated)  # outside the loop (loading, the summary) as Ctrl-C is
    try:
        if args.keys:
            return _keys(args.keys)
        if not args.resume and not args.config:
            ap.error("a config file is required (or --resume DIR)")
        dist.init()  # under torchrun: join the other ranks (alone: nothing)
        try:
            if dist.active():
                _stop_on_sigterm()
            return _train(args, loop, started)
        except dist.RankLost as e:
            print(f"error: {e}. The run stopped; its last checkpoint is intact: continue it with --resume "
                  f"(on any number of ranks)", file=sys.stderr)
            return 1
        finally:
            dist.close()
    except KeyboardInterrupt as e:  # before or after the training loop (the loop handles its own)
        stop = signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT
        print(f"\nhimac: interrupted ({STOPPED_BY[stop]})", file=sys.stderr)
        return 128 + stop


def _keys(env: str) -> int:
    try:
        print(C.describe(sections(env)))
    except C.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _prepare(args: argparse.Namespace, out: str | None = None, checks: bool = True
             ) -> tuple[Config, RunDir, RunLock | None]:
    """The config, run directory and its lock for this start; ConfigError / UnsafeCheckpoint / RunLocked name what
    is wrong. Everything a config alone can refuse is checked before the directory is made; the lock is taken
    before anything in the directory is read, recovered or written. `out`: rank 0's run directory, for the other
    ranks, which skip the checks (`checks`) and the lock rank 0 holds."""
    overrides = C.parse_overrides(args.overrides)
    lock = None
    if args.resume:
        run = RunDir(args.resume, create=False)  # a typo must not create a folder
        if not run.path.is_dir():
            raise C.ConfigError(f"--resume {args.resume}: no checkpoint there (no such directory)")
        lock = run.lock() if checks else None
    try:
        if args.resume:
            if not run.has_checkpoint():
                raise C.ConfigError(f"--resume {args.resume}: no checkpoint there (expected checkpoint/trainer.pt)")
            saved = read_trainer_state(run.checkpoint / "trainer.pt")  # refuses an unsafe or broken file first
            if checks:
                check_adapter(run)
            cfg = load_config(args.config, overrides, base=resumed_config(run, saved))
            check_resume(saved, cfg)
            _check_machine(cfg)
        else:
            cfg = load_config(args.config, overrides)
            out = Path(out or args.out or f"runs/{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
            if checks and out.exists() and not out.is_dir():
                raise C.ConfigError(f"--out {out} is a file, not a directory")
            _check_machine(cfg)
            run = RunDir(out, create=False)
            lock = run.lock() if checks else None
            if checks and run.has_checkpoint():
                raise C.ConfigError(f"--out {out} already holds a checkpoint; use --resume {out} or another --out")
            if checks and run.has_logs():
                raise C.ConfigError(f"--out {out} already holds the logs of another run ({', '.join(run.has_logs())}) "
                                    "but no checkpoint; a new run would mix its rows with them: use another --out")
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return cfg, run, lock


def _check_machine(cfg: Config) -> None:
    """What this machine must offer the config: the device, the reporters' packages, a task per rank."""
    models.resolve_device(dist.device_name(cfg.model.device))  # 'cuda' on a machine without one fails here, named
    reporting.check_available(cfg.run.report_to)  # a missing extra fails here, before anything is written
    C.check(cfg.run.tasks_per_iteration >= dist.world(), "tasks_per_iteration", cfg.run.tasks_per_iteration,
            f"must be >= the number of ranks ({dist.world()}): each rank plays whole tasks")


def _train(args: argparse.Namespace, loop: type[TrainingLoop], started: float) -> int:
    main_rank = dist.is_main()
    error, path, lock = None, None, None
    if main_rank:  # rank 0 checks (and may recover) the run directory before any rank reads it
        try:
            cfg, run, lock = _prepare(args)
            path = str(run.path)
        except (C.ConfigError, UnsafeCheckpoint, RunLocked) as e:
            error = str(e)
    error, path = dist.broadcast((error, path))
    if error is not None:
        if main_rank:
            print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        if not main_rank:
            cfg, run, _ = _prepare(args, out=path, checks=False)
        return _run(args, loop, started, cfg, run, lock)
    finally:
        if lock is not None:
            lock.release()


def _run(args: argparse.Namespace, loop: type[TrainingLoop], started: float, cfg: Config, run: RunDir,
         lock: RunLock | None) -> int:
    main_rank = dist.is_main()
    if not main_rank:
        warnings.simplefilter("ignore")  # rank 0 has said it
    elif lock.describe_taken_over():
        print(lock.describe_taken_over(), file=sys.stderr)
    trainer = loop(cfg, run, resume=bool(args.resume))
    if main_rank:
        run.write_config(cfg.flat())  # only now: a config that failed to load a trainer is never written
        if args.resume:
            run.drop_metrics_after(trainer.start - 1)
        run.write_run_info(cfg.run.seed, str(trainer.policy.device))
        ranks = f", {dist.world()} ranks" if dist.active() else ""
        print(f"himac: run directory {run.path}  (iterations {trainer.start}..{cfg.run.iterations - 1}{ranks})",
              file=sys.stderr)
    try:
        if main_rank:
            trainer.reporter = reporting.make_reporters(
                cfg.run.report_to, run, cfg.flat(), start_step=trainer.start + 1 if args.resume else 0,
                quiet=not args.verbose, warn=lambda msg: print(msg, file=sys.stderr))
        trainer.train()
    except TrainingError as e:
        if main_rank:
            print(f"error: {e}", file=sys.stderr)
        return 1
    except dist.RankLost as e:
        print(f"error: {e}. The run stopped; its last checkpoint ({run.checkpoint}) is intact: continue it with "
              f"--resume {run.path} (on any number of ranks)", file=sys.stderr)
        return 1
    finally:
        trainer.close()
        trainer.reporter.close()
    stop = trainer.interrupted  # the signal that stopped the loop, or None
    if stop == signal.SIGTERM:
        who = f"rank {dist.rank()} was stopped by the launcher" if dist.active() else "the run was stopped"
        print(f"himac: {who} (SIGTERM); the checkpoint holds iteration {trainer.checkpointed}: continue with "
              f"--resume {run.path}", file=sys.stderr)
    if main_rank:
        print(reporting.run_summary(run, cfg.flat(), time.perf_counter() - started,
                                    interrupted=STOPPED_BY.get(stop), checkpoint_iteration=trainer.checkpointed,
                                    reporters=tuple(cfg.run.report_to)))
    return 128 + stop if stop else 0


STOPPED_BY = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loop: stopped as Ctrl-C stops it, exit 143."""


def _terminated(signum, frame):
    raise Terminated


def _stop_on_sigterm() -> None:
    """torchrun stops the surviving ranks with SIGTERM when one fails: say so instead of dying silently."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handle(signum, frame):
        raise dist.RankLost(f"rank {dist.rank()} was stopped by the launcher: another rank failed (its exit is in "
                            "torchrun's report)")
    signal.signal(signal.SIGTERM, handle)


def resumed_config(run: RunDir, saved: dict) -> dict:
    """The config a resumed run starts from: the checkpoint's own copy (config.yaml is a readable copy; a
    truncated or edited one is reported, not trusted)."""
    if "config" not in saved:
        return run.read_config()
    ckpt = json.loads(saved["config"])
    try:
        on_disk = run.read_config() or {}
    except Exception:  # noqa: BLE001 - an unreadable copy is reported below like a differing one
        on_disk = {}
    differ = sorted(k for k in set(ckpt) | set(on_disk) if ckpt.get(k) != on_disk.get(k))
    if differ:
        warnings.warn(f"{run.config_file} differs from the checkpoint's config in {differ[:8]}; using the "
                      "checkpoint's (change keys with --set)", stacklevel=2)
    return ckpt


def check_adapter(run: RunDir) -> None:
    """The checkpoint's adapter must read back whole (a truncated file fails here, with its path)."""
    from safetensors import safe_open
    try:
        with safe_open(str(run.adapter_weights), "pt") as f:
            for name in f.keys():
                f.get_tensor(name)
    except Exception as e:  # noqa: BLE001 - safetensors raises several kinds; all mean the same here
        raise UnsafeCheckpoint(f"{run.adapter_weights} is unreadable (truncated?): {e}") from None


def check_resume(saved: dict, cfg: Config) -> None:
    if "config" not in saved:
        return
    ckpt, now = json.loads(saved["config"]), cfg.flat()
    for key in FIXED_ON_RESUME:
        C.check(ckpt.get(key) == now.get(key), key, now.get(key),
                f"cannot change on resume: the checkpoint was trained with {key} = {ckpt.get(key)!r}")
