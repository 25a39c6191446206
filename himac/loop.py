"""The training loop around an iteration: everything Algorithm 1 does not say.

`TrainingLoop` holds what an iteration acts on (the policy, its optimisers, the env
pool) and runs iterations in order; a subclass supplies `iteration(t, bar)`, the
algorithm itself (himac.coevolve: HiMAC, and the flat baselines through the same
class). Around each iteration, here and nowhere else:
- the time budget (`time_budget_s`, on the wall or the CPU clock) and the evaluation
  schedule (before training, every `eval_every` iterations or `eval_every_minutes`,
  at the end), on held-out seeds (himac.evaluation);
- logging (metrics.jsonl, eval.jsonl, samples.jsonl, TensorBoard / W&B) and
  checkpoints (every `save_every`, and at the end), each written whole;
- Ctrl-C and SIGTERM (a scheduler's notice): the iteration in flight is dropped, the last
  completed one is checkpointed (by rank 0, from its own copy: no collective is needed);
- a run that keeps failing (NaN steps, a broken env) stops with its last good
  checkpoint;
- data-parallel ranks (torchrun): one clock, one writer (rank 0), one decision.
"""
from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import threading
import time

import torch
from tqdm.auto import tqdm

from envs import get_spec
from envs.seeds import eval_seeds
from himac import distributed as dist
from himac import models, reporting
from himac.evaluation import Metered, evaluate_agent, summarise
from himac.experiment import Config
from himac.policy import KeyedSampling, Policy
from himac.rundir import RunDir, crash_point, rng_state, set_rng_state
from himac.update import Optimizers

NONFINITE_PATIENCE = 3  # iterations in a row with NaN/inf steps before the run stops
ENV_ERROR_PATIENCE = 3  # iterations in a row with mostly env-error episodes before the run stops


class TrainingError(RuntimeError):
    """The run cannot go on (it stops cleanly; the last good checkpoint stays)."""


class TrainingLoop:
    """The model, optimisers, env pool and run directory of a run; `train()` runs `iteration(t)` in order."""

    def __init__(self, cfg: Config, run: RunDir, resume: bool = False):
        self.cfg, self.run = cfg, run
        self.spec = get_spec(cfg.run.env)
        torch.manual_seed(cfg.run.seed)
        model_cfg = dataclasses.replace(cfg.model, device=dist.device_name(cfg.model.device)) if dist.active() \
            else cfg.model  # several ranks on CUDA: cuda:LOCAL_RANK each
        model, tokenizer = models.load(model_cfg, adapter_dir=run.adapter_dir if resume else None)
        dist.broadcast_params([p for p in model.parameters() if p.requires_grad])  # every rank starts from rank 0's
        self.policy = Policy(model, tokenizer, gen_batch_size=cfg.run.gen_batch_size)
        self.keyed = cfg.run.sampling == "keyed" or (cfg.run.sampling == "auto" and dist.active())
        self.optimizers = Optimizers(model, cfg.update)
        self.pool = self.spec.pool(cfg.env)
        self._eval_pool = None
        self.start = run.load_trainer_state(self.optimizers) + 1 if resume else 0
        if dist.active() and not self.keyed:  # one process stream per rank, or every rank would draw alike
            torch.manual_seed(cfg.run.seed * 7919 + self.start * 104_729 + dist.rank() + 1)
        self.reporter = reporting.Reporters()  # TensorBoard / W&B beside metrics.jsonl (launch sets them)
        self.checkpointed: int | None = self.start - 1 if resume else None  # the iteration the checkpoint holds
        self.interrupted: int | None = None  # the signal (SIGINT, SIGTERM) that stopped train()
        self._snapshot = None  # (iteration, adapter, optimiser state, RNG) of the last uncheckpointed iteration

    def iteration(self, t: int, bar=None) -> tuple[dict, list[dict]]:
        """One iteration: (its metrics, its samples.jsonl rows)."""
        raise NotImplementedError

    def tasks(self, t: int) -> tuple[int, list[int]]:
        """Iteration t's training tasks that this process plays (all of them alone, a contiguous slice under
        torchrun): (the first one's index among all B, their env seeds). Draws are keyed from here on."""
        if self.keyed:  # each draw from (seed, t, prompt, occurrence, position): the same on any number of ranks
            self.policy.sampling = KeyedSampling((self.cfg.run.seed, t))
        mine = dist.split(self.cfg.run.tasks_per_iteration)
        return mine.start, self.cfg.run.task_seeds(t)[mine.start:mine.stop]

    def evaluate(self, t: int) -> dict:
        """Greedy episodes on the held-out seeds (each rank plays its share); the eval.jsonl row."""
        seeds = eval_seeds(self.cfg.run.eval_episodes, self.cfg.run.eval_offset)
        n = len(seeds)
        if dist.active():
            seeds = seeds[dist.split(n).start:dist.split(n).stop]
        if self._eval_pool is None:
            self._eval_pool = self.spec.pool(self.cfg.env, evaluation=True)
        label = "before training" if t < 0 else f"after iteration {t}"
        with tqdm(total=len(seeds), desc=f"held-out eval ({label})", unit="ep", leave=False, dynamic_ncols=True,
                  disable=None if dist.is_main() else True) as bar:
            report = {"episodes": []}
            if seeds or not dist.active():
                report = evaluate_agent(Metered(self.policy, bar), self.spec, self._eval_pool, seeds,
                                        self.cfg.planner, self.cfg.executor, flat=not self.cfg.run.hierarchy)
            bar.update(len(seeds))
        if dist.active():
            report = summarise([e for part in dist.all_gather(report["episodes"]) for e in part], self.spec)
        if dist.is_main():
            tqdm.write(f"himac: held-out {label}: success {report['success_rate']:.3f}, return "
                       f"{report['return_mean']:.2f} ({n} episodes)", file=sys.stderr)
        return {"iteration": t, **{f"eval/{k}": v for k, v in report.items() if k != "episodes"}}

    def close(self) -> None:
        """Shut the env pools down (worker processes, open games)."""
        for pool in (self.pool, self._eval_pool):
            if pool is not None:
                pool.close()

    def train(self) -> list[dict]:
        """Every iteration from `start`. Ctrl-C or SIGTERM stops cleanly: the iteration in flight is abandoned,
        the last completed one is checkpointed (if it was not already) and `self.interrupted` names the signal."""
        history: list[dict] = []
        with _Interrupts() as guard:
            try:
                self._loop(history, guard)
            except KeyboardInterrupt:
                self.interrupted = guard.signal or signal.SIGINT
                with guard.deferred():  # a second signal does not break the checkpoint being written
                    self._checkpoint_last_completed(history)
        return history

    def _loop(self, history: list[dict], guard: _Interrupts) -> None:
        cfg, run = self.cfg, self.run
        if cfg.run.eval_episodes > 0 and self.start == 0 and cfg.run.eval_at_start:
            ev = self.evaluate(-1)
            with guard.deferred():
                if dist.is_main():
                    run.log(ev, "eval.jsonl")
                    self.reporter.log(ev, step=0)
            guard.check()
        bar = tqdm(range(self.start, cfg.run.iterations), desc="co-evolution", unit="it",
                   initial=self.start, total=cfg.run.iterations, dynamic_ncols=True, disable=not dist.is_main())
        clock, self._health = _Clock(cfg, run.metrics() if self.start else []), _Health(run)
        try:
            for t in bar:
                clock.start()
                with tqdm(total=5 if cfg.run.hierarchy else 2, desc=f"iteration {t}", leave=False, dynamic_ncols=True,
                          disable=None if dist.is_main() else True) as inner:
                    m, samples = self.iteration(t, inner)
                m.update(clock.stop())
                out_of_time = clock.out_of_time()
                last = t == cfg.run.iterations - 1 or out_of_time
                ev = self.evaluate(t) if cfg.run.eval_episodes > 0 and (last or clock.evaluation_due(t)) else None
                if ev is not None:
                    m.update({k: v for k, v in ev.items() if k != "iteration"})
                with guard.deferred():  # iteration t is done: its rows and checkpoint are written whole
                    self._finish(t, m, samples, ev, last, bar)
                history.append(m)
                if out_of_time:
                    if dist.is_main():
                        bar.write(f"himac: time budget {cfg.run.time_budget_s:.0f}s ({cfg.run.time_clock}) reached "
                                  f"after iteration {t}")
                    break
                guard.check()
        finally:
            bar.close()

    def _finish(self, t: int, m: dict, samples: list[dict], ev: dict | None, last: bool, bar) -> None:
        """Iteration t is done: log it everywhere, stop a run that keeps failing, checkpoint it when due (the last
        iteration, every save_every)."""
        if dist.is_main():  # every rank holds the same m (gathered); one writes it
            if ev is not None:
                self.run.log(ev, "eval.jsonl")
            self.run.log(m)
            for s in samples:
                self.run.log(s, "samples.jsonl")
            self.reporter.log(m, step=t + 1)
        self._health.check(t, m, bar)
        if last or (t + 1) % self.cfg.run.save_every == 0:
            crash_point("before_save")
            self._save(t)
        else:  # save_every > 1: keep what Ctrl-C would checkpoint before the next save
            self._snapshot = (t, *self._state())
        kl = m.get("micro/kl", m.get("macro/kl"))  # the executor's KL to pi_ref (the planner's in a run without B)
        live = {"success": f"{m['success_rate']:.2f}", "return": f"{m['macro/return_mean']:.2f}",
                **({"kl": f"{kl:.2g}"} if isinstance(kl, float) else {}), "s/it": f"{m['wall_s']:.0f}"}
        bar.set_postfix(ordered_dict=live)

    def check_finite(self, what: str) -> None:
        """Stop before the next rollout samples from non-finite adapter weights; the last checkpoint holds good
        ones."""
        if not all(torch.isfinite(p).all() for p in self.policy.model.parameters() if p.requires_grad):
            raise TrainingError(f"{what} left non-finite adapter weights; stopped, the last good checkpoint "
                                f"({self.run.checkpoint}) is kept")

    def _save(self, t: int) -> None:
        self.check_finite(f"iteration {t}")
        if not dist.is_main():  # the weights and optimiser state are the same on every rank
            self.checkpointed, self._snapshot = t, None
            return
        peft_cfg = getattr(self.policy.model, "peft_config", {}).get("default")
        card = reporting.model_card(self.run, self.cfg.flat(), t, getattr(peft_cfg, "base_model_name_or_path", None)
                                    or self.cfg.model.model)
        self.run.save_checkpoint(self.policy.model, self.optimizers, t, config=self.cfg.flat(), card=card)
        self.checkpointed, self._snapshot = t, None
        self.run.plot()

    def _state(self) -> tuple:
        """A CPU copy of what a checkpoint holds: the trainable weights, the optimiser state, the RNGs."""
        weights = {n: p.detach().to("cpu", copy=True) for n, p in self.policy.model.named_parameters()
                   if p.requires_grad}
        return weights, _to_cpu(self.optimizers.state_dict()), rng_state()

    def _checkpoint_last_completed(self, history: list[dict]) -> None:
        """After Ctrl-C: make the checkpoint hold the last completed iteration (the one in flight is dropped)."""
        if not history or self.checkpointed == history[-1]["iteration"]:
            return
        t, weights, optim, rng = self._snapshot if self._snapshot is not None else (None,) * 4
        if t != history[-1]["iteration"]:
            return
        params = dict(self.policy.model.named_parameters())
        with torch.no_grad():
            for name, w in weights.items():
                params[name].copy_(w)
        self.optimizers.load_state_dict(optim)
        set_rng_state(rng)
        self._save(t)


class _Clock:
    """Training time, evaluation excluded, on the wall and CPU clocks, counted on from the last logged iteration
    of a resumed run. Under torchrun: rank 0's wall clock and every rank's CPU seconds summed, so every rank takes
    the same time decisions."""

    def __init__(self, cfg: Config, done_before: list[dict]):
        self.cfg = cfg.run
        last = done_before[-1] if done_before else {}
        self.train_s, self.train_cpu_s = dist.broadcast((float(last.get("train_s") or 0.0),
                                                         float(last.get("train_cpu_s") or 0.0)))
        self.t_start = time.perf_counter()
        self.step_s = 0.0

    def start(self) -> None:
        self._tic, self._cpu_tic = time.perf_counter(), time.process_time()

    def stop(self) -> dict:
        """The iteration's times, for its metrics row."""
        m = {"wall_s": time.perf_counter() - self._tic,
             "cpu_s": time.process_time() - self._cpu_tic,  # this process's CPU time: fair under contention
             "elapsed_s": time.perf_counter() - self.t_start}
        if dist.active():
            m["wall_s"], m["elapsed_s"] = dist.broadcast((m["wall_s"], m["elapsed_s"]))
            m["cpu_s"] = dist.all_sum([m["cpu_s"]])[0]
        self.train_s += m["wall_s"]
        self.train_cpu_s += m["cpu_s"]
        self.step_s = m["cpu_s"] if self.cfg.time_clock == "cpu" else m["wall_s"]
        return {**m, "train_s": self.train_s, "train_cpu_s": self.train_cpu_s}

    @property
    def spent(self) -> float:
        return self.train_cpu_s if self.cfg.time_clock == "cpu" else self.train_s

    def out_of_time(self) -> bool:
        return bool(self.cfg.time_budget_s) and self.spent >= self.cfg.time_budget_s

    def evaluation_due(self, t: int) -> bool:
        """Iteration t ends an eval_every block, or brings training time past a multiple of eval_every_minutes."""
        every_s = self.cfg.eval_every_minutes * 60
        timed = bool(every_s) and int(self.spent // every_s) > int((self.spent - self.step_s) // every_s)
        return timed or bool(self.cfg.eval_every and (t + 1) % self.cfg.eval_every == 0)


class _Health:
    """Stops a run that keeps failing, several iterations in a row: most episodes ending in env errors (a broken
    environment), or NaN/inf losses (their steps were skipped, so the weights are intact)."""

    def __init__(self, run: RunDir):
        self.run, self.broken, self.nonfinite = run, 0, 0

    def check(self, t: int, m: dict, bar) -> None:
        if m.get("env/end_env_error", 0) > 0.5:
            self.broken += 1
            if dist.is_main():
                bar.write(f"himac: warning: {m['env/end_env_error']:.0%} of iteration {t}'s episodes ended with an "
                          "env error (see samples.jsonl); they are left out of training")
            if self.broken >= ENV_ERROR_PATIENCE:
                raise TrainingError(f"most episodes ended with env errors in {self.broken} iterations in a row: the "
                                    f"environment is broken; last checkpoint: {self.run.checkpoint}")
        else:
            self.broken = 0
        bad = m.get("macro/nonfinite_steps", 0) + m.get("micro/nonfinite_steps", 0)
        self.nonfinite = self.nonfinite + 1 if bad else 0
        if self.nonfinite >= NONFINITE_PATIENCE:
            raise TrainingError(f"{self.nonfinite} iterations in a row had NaN/inf losses or gradients (their steps "
                                f"were skipped, so the weights are intact); last good checkpoint: {self.run.checkpoint}."
                                " Lower lr, or raise max_grad_norm only with care")


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


class _Interrupts:
    """Ctrl-C (SIGINT) and SIGTERM in the training loop: outside `deferred()` either stops the iteration in flight
    at once (KeyboardInterrupt); inside (writing a finished iteration's logs and checkpoint) it is held until the
    block is done, and `check()` raises it then. `signal` is the first one that came. Only the main thread can
    take signals; elsewhere this is a no-op."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal: int | None = None
        self._deferring = 0
        self._previous: dict = {}

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        self.signal = self.signal or signum
        if not self._deferring:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self):
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1

    def check(self) -> None:
        if self.signal:
            raise KeyboardInterrupt


class Phases:
    """Advances an iteration's progress bar and names the phase running now: `phase("B: rollouts")`."""

    def __init__(self, bar):
        self.bar, self.n = bar, 0

    def __call__(self, name: str) -> None:
        if self.bar is not None:
            if self.n:
                self.bar.update(1)
            self.bar.set_postfix_str(name)
        self.n += 1
