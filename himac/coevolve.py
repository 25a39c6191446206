"""HiMAC iterative co-evolution training: Algorithm 1 of the paper (§3.4).

    python -m himac.coevolve configs/sokoban_cpu.yaml [--out DIR] [--set key=value ...]
    python -m himac.coevolve --resume DIR [--set iterations=20]

Each iteration takes B tasks (Algorithm 1 samples one instruction; we batch B for
throughput, each task its own group):
  Phase A, macro exploration (lines 3-9): sample G blueprints per task; score each
    by a greedy executor rollout without gradients; Eq. 2 advantages within each
    task's G; one update on blueprint tokens only.
  Phase B, micro adaptation (lines 10-14): z* = argmax_i R(z_i) per task (Eq. 4);
    M sampled executor rollouts under z*; Eq. 2 advantages within each task's M;
    one update on action tokens only.
pi_ref is the model with its LoRA adapter disabled; pi_old is the policy that
sampled (see update.py).

Data-parallel (torchrun --nproc_per_node N -m himac.coevolve CONFIG): each rank runs
Algorithm 1 on its contiguous slice of the B tasks, so every macro and micro group is
whole on one rank; the update sums Eq. 3's N and the gradient over ranks (update.py),
metrics come from every rank's raw values, and rank 0 alone writes the run directory.
With `sampling: keyed` (the default with several ranks) N ranks give what one process
gives on the same tasks, up to float summation order (himac/distributed.py).

Departures from the paper, deliberate:
- A greedy rollout is a deterministic function of (task, blueprint), so identical
  blueprints of one task are rolled out once and share the return.
- A task whose G blueprints are all unparseable has no z*; it sits out Phase B.
- B > 1 tasks per iteration (the paper's line 2 samples one).
- Optional (`macro_every: k`, default 1 = off): Phase A in full on every k-th iteration only; in
  between, z* is the planner's one greedy blueprint, unscored, and the planner is not updated.

The config, the variants and the advantage estimators come from himac.experiment;
the metrics from himac.metrics; the run directory's layout from himac.rundir.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from envs import get_spec
from envs.seeds import eval_seeds
from himac import config as C
from himac import distributed as dist
from himac import executor, metrics, models, planner, quiet, reporting
from himac.evaluation import Metered, evaluate_agent, mark_rule_agreement, summarise
from himac.experiment import (Config, blueprint_advantages, load_config, sections, trajectory_advantages,
                              without_silent)
from himac.policy import KeyedSampling, Policy
from himac.rundir import RunDir, UnsafeCheckpoint, crash_point, read_trainer_state, rng_state, set_rng_state
from himac.update import ACTION, BLUEPRINT, Optimizers, policy_update

CHOICE_SALT = 31_337  # the random-blueprint ablation's own random stream
NONFINITE_PATIENCE = 3  # iterations in a row with NaN/inf steps before the run stops
ENV_ERROR_PATIENCE = 3  # iterations in a row with mostly env-error episodes before the run stops


class TrainingError(RuntimeError):
    """The run cannot go on (it stops cleanly; the last good checkpoint stays)."""


class Trainer:
    """Holds the model, optimiser, env pool and run directory; `iteration(t)` is Algorithm 1's body."""

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
        self.reporter = reporting.Reporters()  # TensorBoard / W&B beside metrics.jsonl (main sets them)
        self.checkpointed: int | None = self.start - 1 if resume else None  # the iteration the checkpoint holds
        self.interrupted = False  # Ctrl-C stopped train()
        self._snapshot = None  # (iteration, adapter, optimiser state, RNG) of the last uncheckpointed iteration

    # -- Algorithm 1 ------------------------------------------------------------------
    def iteration(self, t: int, bar=None) -> tuple[dict, list[dict]]:
        if not self.cfg.run.hierarchy:
            return self.flat_iteration(t, bar)
        cfg, prompts = self.cfg, self.spec.prompts
        G, M, B = cfg.planner.group_size, cfg.executor.rollouts_per_blueprint, cfg.run.tasks_per_iteration
        timings: dict = {}
        phase = _Phases(bar)
        mine = dist.split(B)  # this rank's tasks (all of them alone); below, b indexes them and lo + b is global
        lo, seeds = mine.start, cfg.run.task_seeds(t)[mine.start:mine.stop]  # line 2: x ~ D
        B_all, B = B, len(seeds)
        self._key_sampling(t)

        # Phase A: macro exploration ------------------------------------------------------
        scored = t % cfg.run.macro_every == 0  # else a light iteration: one greedy blueprint, unscored
        phase("A: blueprints" if scored else "A: one greedy blueprint")
        tic = time.perf_counter()
        first = self.pool.reset(seeds)
        tasks = list(self.pool.tasks)
        timings["env_s"] = time.perf_counter() - tic
        tic = time.perf_counter()
        if not scored:
            G = 1
        blueprints = planner.generate(self.policy, prompts, tasks, first, cfg.planner, G,  # line 4, (B, G)
                                      temperature=None if scored else 0.0)
        timings["plan_generate_s"] = time.perf_counter() - tic
        flat_bp = [z for group in blueprints for z in group]  # (B*G,)
        macro_groups = torch.arange(B).repeat_interleave(G)  # (B*G,)
        m_macro: dict = {}
        if scored:
            unique: dict[tuple, int] = {}
            for z in flat_bp:
                if z.valid:
                    unique.setdefault((z.task, tuple(z.subgoals)), len(unique))
            phase("A: greedy rollouts")
            episodes = list(unique)  # [(task, subgoals)]
            greedy = executor.generate(self.policy, prompts, self.spec.parse_action, self.pool,
                                       [seeds[b] for b, _ in episodes], episodes, cfg.executor, greedy=True,
                                       timings=timings, subgoal_check=self.spec.subgoal_check)  # lines 5-7, no grad
            rollout = [greedy[unique[(z.task, tuple(z.subgoals))]] if z.valid else None for z in flat_bp]
            paid = cfg.executor.subgoal_reward  # the executor's pay for following is not the blueprint's worth
            returns = torch.tensor([r.ret - paid * r.followed if r else cfg.planner.blueprint_fail_penalty
                                    for r in rollout])  # (B*G,)
            success = [bool(r and r.success) for r in rollout]
            crashed = [bool(r and r.end == "env_error") for r in rollout]  # scored by a broken env: no signal
            ok = [i for i in range(B * G) if not crashed[i]]
            adv_a, silent_a = self._advantages(  # line 8
                [[a] for a in blueprint_advantages(returns[ok], macro_groups[ok], cfg.update).tolist()],
                [int(macro_groups[i]) for i in ok], ok, [1] * (B * G))
            keep = [i for i in ok if not (cfg.update.drop_zero_variance and int(macro_groups[i]) in silent_a)]
        else:  # nothing scored: no advantages, no planner rows; z* is the one blueprint
            greedy, returns, success, crashed = [], torch.zeros(B), [False] * B, [False] * B
            adv_a, silent_a, keep = [[0.0] for _ in range(B)], set(), []
        first_a, n_a = dist.offset(len(keep))  # sample ids are global: lower ranks' blueprints come first
        rows_a = planner.training_rows([flat_bp[i] for i in keep], [adv_a[i][0] for i in keep], first_a)
        if cfg.run.coevolution and scored:
            phase("A: update")
            m_macro = self._update(rows_a, {BLUEPRINT})  # line 9
        elif scored:
            phase("A: (update deferred)")

        # Phase B: micro adaptation -------------------------------------------------------
        phase("B: rollouts")
        z_star = choose_blueprints(blueprints, returns, cfg.run.blueprint_choice, key=[cfg.run.seed, CHOICE_SALT, t],
                                   usable=[not c for c in crashed], first=lo)  # line 11, Eq. 4
        episodes_b = [(b, z_star[b].subgoals) for b in sorted(z_star) for _ in range(M)]
        sampled = executor.generate(self.policy, prompts, self.spec.parse_action, self.pool,
                                    [seeds[b] for b, _ in episodes_b], episodes_b, cfg.executor, greedy=False,
                                    timings=timings, subgoal_check=self.spec.subgoal_check)  # line 12
        rows_b, adv_b, silent_b = self._trajectory_rows(sampled, sample_offset=n_a)  # line 13, per step
        m_micro: dict = {}
        phase("B: update")
        if cfg.run.coevolution:
            if dist.agree(bool(rows_b)):  # any rank's rows: every rank joins the step
                m_micro = self._update(rows_b, {ACTION})  # line 14
        else:  # w/o co-evolution: one step, both masks, on rollouts of the same starting policy
            m_macro = self._update(rows_a + rows_b, {BLUEPRINT, ACTION})

        samples = [{"iteration": t, "task": lo + b,
                    "blueprints": [{"text": z.text, "valid": z.valid,
                                    "return": float(returns[b * G + i]) if scored else None}
                                   for i, z in enumerate(blueprints[b])],
                    "z_star": z_star[b].subgoals if b in z_star else None,
                    "phase_b": _answers(sampled, b)}
                   for b in range(max(min(cfg.run.sample_log - lo, B), 0))]
        g = self._gather({"flat_bp": flat_bp, "returns": returns, "adv_a": _flat(adv_a), "greedy": greedy,
                          "success": success, "z_star": {lo + b: z for b, z in z_star.items()}, "sampled": sampled,
                          "adv_b": _flat(adv_b), "silent_a": len(silent_a), "silent_b": len(silent_b),
                          "timings": timings, "m_macro": m_macro, "m_micro": m_micro, "samples": samples})
        m_macro, m_micro, timings = g["m_macro"], g["m_micro"], g["timings"]
        if scored:
            macro = metrics.blueprints(g["flat_bp"], g["returns"], g["adv_a"], g["greedy"], g["success"],
                                       g["z_star"])
        else:  # no greedy scores to report: the headline success is Phase B's, as in a flat iteration
            macro = {**metrics.plans(g["flat_bp"], g["z_star"]),
                     "success_rate": metrics.mean(tr.success for tr in g["sampled"]),
                     "macro/return_mean": metrics.mean(tr.ret for tr in g["sampled"])}
        m = {"iteration": t, **macro, "macro/scored": float(scored),
             "macro/zero_var_groups": g["silent_a"] / B_all,
             **metrics.trajectories("micro", g["sampled"], g["adv_b"], hierarchy=True),
             "micro/zero_var_groups": g["silent_b"] / max(len(g["z_star"]), 1),
             **metrics.actions("micro", [s.move for tr in g["sampled"] for s in tr.steps], self.spec.actions),
             **self._rule_agreement(g["sampled"]),
             **metrics.env(g["greedy"] + g["sampled"], metrics.ENDS), **metrics.env_report(self.spec, g["sampled"]),
             **metrics.update("macro", m_macro), **metrics.update("micro", m_micro),
             **metrics.timing(timings, timings.get("generate_s", 0.0) + timings.get("plan_generate_s", 0.0),
                              timings.get("generated_tokens", 0.0) + sum(len(z.completion_ids) for z in g["flat_bp"]),
                              m_macro.get("update_s", 0.0) + m_micro.get("update_s", 0.0))}
        return m, g["samples"]

    def _rule_agreement(self, trajs: list) -> dict:
        """micro/rule_agreement: the share of the *sampled* training moves the env's reading rule would also
        have made (the evaluation's rule_agreement, for the policy being trained): reading shows here as a
        rise from ~1/|actions| long before a greedy evaluation's argmax moves."""
        if self.spec.rule is None or not self.spec.actions or getattr(self.pool, "cfg", None) is None or not trajs:
            return {}
        episodes = [{"seed": tr.seed, "moves": [s.move for s in tr.steps]} for tr in trajs]
        mark_rule_agreement(self.spec, self.pool.cfg, episodes)
        moves = sum(e["rule_moves"] for e in episodes)
        return {"micro/rule_agreement": sum(e["rule_agree"] for e in episodes) / moves} if moves else {}

    def flat_iteration(self, t: int, bar=None) -> tuple[dict, list[dict]]:
        """'w/o hierarchy': M flat trajectories per task, group advantages over each task's M, one update."""
        cfg, prompts = self.cfg, self.spec.prompts
        M, B = cfg.executor.rollouts_per_blueprint, cfg.run.tasks_per_iteration
        timings: dict = {}
        phase = _Phases(bar)
        mine = dist.split(B)
        lo, seeds = mine.start, cfg.run.task_seeds(t)[mine.start:mine.stop]
        B_all, B = B, len(seeds)
        self._key_sampling(t)
        phase("flat: rollouts")
        episodes = [(b, []) for b in range(B) for _ in range(M)]
        sampled = executor.generate(self.policy, prompts, self.spec.parse_action, self.pool,
                                    [seeds[b] for b, _ in episodes], episodes, cfg.executor, greedy=False,
                                    timings=timings, flat=True)
        rows, adv, silent = self._trajectory_rows(sampled)
        phase("flat: update")
        m_update = self._update(rows, {ACTION})
        samples = [{"iteration": t, "task": lo + b, "flat": _answers(sampled, b)}
                   for b in range(max(min(cfg.run.sample_log - lo, B), 0))]
        g = self._gather({"sampled": sampled, "adv": _flat(adv), "silent": len(silent), "timings": timings,
                          "m_update": m_update, "samples": samples})
        sampled, m_update, timings = g["sampled"], g["m_update"], g["timings"]
        m = {"iteration": t, "success_rate": metrics.mean(tr.success for tr in sampled),
             "macro/return_mean": metrics.mean(tr.ret for tr in sampled),  # the progress bar's and plot's "return"
             **metrics.trajectories("micro", sampled, g["adv"], hierarchy=False),
             "micro/zero_var_groups": g["silent"] / B_all,
             **metrics.actions("micro", [s.move for tr in sampled for s in tr.steps], self.spec.actions),
             **self._rule_agreement(sampled),
             **metrics.env(sampled, metrics.FLAT_ENDS), **metrics.env_report(self.spec, sampled),
             **metrics.update("micro", m_update),
             **metrics.timing(timings, timings.get("generate_s", 0.0), timings.get("generated_tokens", 0.0),
                              m_update.get("update_s", 0.0))}
        return m, g["samples"]

    def _key_sampling(self, t: int) -> None:
        if self.keyed:  # each draw from (seed, t, prompt, occurrence, position): the same on any number of ranks
            self.policy.sampling = KeyedSampling((self.cfg.run.seed, t))

    def _gather(self, piece: dict) -> dict:
        """This rank's raw iteration values, combined with every other rank's in task order (alone: as they are)."""
        if not dist.active():
            return piece
        return metrics.combine(dist.all_gather(metrics.light(piece)))

    def _advantages(self, per_step: list[list[float]], group: list[int], ok: list[int], steps: list[int]
                    ) -> tuple[list[list[float]], set[int]]:
        """Advantages of the samples `ok` (the others crashed: 0, never trained) spread back over all samples,
        silent groups' set to exactly 0; and the silent groups."""
        clean, silent = without_silent(per_step, group)
        out = [[0.0] * n for n in steps]
        for j, i in enumerate(ok):
            out[i] = clean[j]
        return out, silent

    def _trajectory_rows(self, trajs: list, sample_offset: int = 0) -> tuple[list, list[list[float]], set[int]]:
        """Eq. 2 (or the configured estimator) within each task's trajectories, and their training rows.

        Episodes whose env crashed leave their groups (their partial return says nothing about the
        policy); with drop_zero_variance, so do groups with nothing to compare.
        """
        ok = [i for i, tr in enumerate(trajs) if tr.end != "env_error"]
        adv, silent = self._advantages(trajectory_advantages([trajs[i] for i in ok], self.cfg.update),
                                       [trajs[i].task for i in ok], ok, [len(tr.steps) for tr in trajs])
        keep = [i for i in ok if not (self.cfg.update.drop_zero_variance and trajs[i].task in silent)]
        first = sample_offset + dist.offset(len(keep))[0]  # sample ids are global: lower ranks' come first
        return executor.training_rows([trajs[i] for i in keep], [adv[i] for i in keep], first), adv, silent

    def _update(self, rows, kinds: set[int]) -> dict:
        out = policy_update(self.policy, self.optimizers.for_kinds(kinds), rows, self.cfg.update, kinds)
        # Finite losses and gradients can still step into inf (an overflow in the optimiser): stop before the next
        # rollout samples from the broken weights; the last checkpoint holds good ones.
        if not all(torch.isfinite(p).all() for p in self.policy.model.parameters() if p.requires_grad):
            raise TrainingError(f"an optimiser step left non-finite adapter weights; stopped, the last good "
                                f"checkpoint ({self.run.checkpoint}) is kept")
        return out

    # -- evaluation and the loop --------------------------------------------------------
    def evaluate(self, t: int) -> dict:
        seeds = eval_seeds(self.cfg.run.eval_episodes, self.cfg.run.eval_offset)
        n = len(seeds)
        if dist.active():  # each rank plays its share; the episodes are gathered in seed order below
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
        """Algorithm 1's loop. Ctrl-C stops it cleanly: the iteration in flight is abandoned, the last completed
        one is checkpointed (if it was not already) and `self.interrupted` is set."""
        history: list[dict] = []
        with _Interrupts() as guard:
            try:
                self._loop(history, guard)
            except KeyboardInterrupt:
                self.interrupted = True
                with guard.deferred():  # a second Ctrl-C does not break the checkpoint being written
                    self._checkpoint_last_completed(history)
        return history

    def _loop(self, history: list[dict], guard: _Interrupts) -> None:
        cfg, run = self.cfg, self.run
        evaluating = cfg.run.eval_episodes > 0
        if evaluating and self.start == 0 and cfg.run.eval_at_start:
            ev = self.evaluate(-1)
            with guard.deferred():
                if dist.is_main():
                    run.log(ev, "eval.jsonl")
                    self.reporter.log(ev, step=0)
            guard.check()
        bar = tqdm(range(self.start, cfg.run.iterations), desc="co-evolution", unit="it",
                   initial=self.start, total=cfg.run.iterations, dynamic_ncols=True, disable=not dist.is_main())
        t_start = time.perf_counter()
        done_before = run.metrics() if self.start else []
        train_s = float(done_before[-1].get("train_s") or 0.0) if done_before else 0.0  # resumed: keep counting
        train_cpu_s = float(done_before[-1].get("train_cpu_s") or 0.0) if done_before else 0.0
        train_s, train_cpu_s = dist.broadcast((train_s, train_cpu_s))  # rank 0's logs count
        self._nonfinite = self._broken = 0  # iterations in a row with NaN steps / mostly env errors
        try:
            for t in bar:
                tic, cpu_tic = time.perf_counter(), time.process_time()
                with tqdm(total=5 if cfg.run.hierarchy else 2, desc=f"iteration {t}", leave=False,
                          dynamic_ncols=True, disable=None if dist.is_main() else True) as inner:
                    m, samples = self.iteration(t, inner)
                m["wall_s"] = time.perf_counter() - tic
                m["cpu_s"] = time.process_time() - cpu_tic  # this process's CPU time: fair under contention
                m["elapsed_s"] = time.perf_counter() - t_start
                if dist.active():  # rank 0's clock and every rank's CPU seconds: all take the same time decisions
                    m["wall_s"], m["elapsed_s"] = dist.broadcast((m["wall_s"], m["elapsed_s"]))
                    m["cpu_s"] = dist.all_sum([m["cpu_s"]])[0]
                train_s += m["wall_s"]
                train_cpu_s += m["cpu_s"]
                m["train_s"] = train_s  # training wall-clock so far, evaluation excluded
                m["train_cpu_s"] = train_cpu_s
                spent = train_cpu_s if cfg.run.time_clock == "cpu" else train_s
                out_of_time = bool(cfg.run.time_budget_s) and spent >= cfg.run.time_budget_s
                last = t == cfg.run.iterations - 1 or out_of_time
                every_s = cfg.run.eval_every_minutes * 60
                step_s = m["cpu_s"] if cfg.run.time_clock == "cpu" else m["wall_s"]
                timed = bool(every_s) and int(spent // every_s) > int((spent - step_s) // every_s)
                ev = None
                if evaluating and (last or timed or (cfg.run.eval_every and (t + 1) % cfg.run.eval_every == 0)):
                    ev = self.evaluate(t)
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
        cfg, run = self.cfg, self.run
        if dist.is_main():  # every rank holds the same m (gathered); one writes it
            if ev is not None:
                run.log(ev, "eval.jsonl")
            run.log(m)
            for s in samples:
                run.log(s, "samples.jsonl")
            self.reporter.log(m, step=t + 1)
        if m.get("env/end_env_error", 0) > 0.5:
            self._broken += 1
            if dist.is_main():
                bar.write(f"himac: warning: {m['env/end_env_error']:.0%} of iteration {t}'s episodes ended with an "
                          "env error (see samples.jsonl); they are left out of training")
            if self._broken >= ENV_ERROR_PATIENCE:
                raise TrainingError(f"most episodes ended with env errors in {self._broken} iterations in a row: the "
                                    f"environment is broken; last checkpoint: {run.checkpoint}")
        else:
            self._broken = 0
        bad = m.get("macro/nonfinite_steps", 0) + m.get("micro/nonfinite_steps", 0)
        self._nonfinite = self._nonfinite + 1 if bad else 0
        if self._nonfinite >= NONFINITE_PATIENCE:
            raise TrainingError(f"{self._nonfinite} iterations in a row had NaN/inf losses or gradients (their steps "
                                f"were skipped, so the weights are intact); last good checkpoint: {run.checkpoint}."
                                " Lower lr, or raise max_grad_norm only with care")
        if last or (t + 1) % cfg.run.save_every == 0:
            crash_point("before_save")
            self._save(t)
        else:  # save_every > 1: keep what Ctrl-C would checkpoint before the next save
            self._snapshot = (t, *self._state())
        kl = m.get("micro/kl", m.get("macro/kl"))  # the executor's KL to pi_ref (the planner's in a run without B)
        live = {"success": f"{m['success_rate']:.2f}", "return": f"{m['macro/return_mean']:.2f}",
                **({"kl": f"{kl:.2g}"} if isinstance(kl, float) else {}), "s/it": f"{m['wall_s']:.0f}"}
        bar.set_postfix(ordered_dict=live)

    def _save(self, t: int) -> None:
        run = self.run
        if not all(torch.isfinite(p).all() for p in self.policy.model.parameters() if p.requires_grad):
            raise TrainingError(f"iteration {t} left non-finite adapter weights; not checkpointed, the last "
                                f"good checkpoint ({run.checkpoint}) is kept")
        if not dist.is_main():  # the weights and optimiser state are the same on every rank
            self.checkpointed, self._snapshot = t, None
            return
        peft_cfg = getattr(self.policy.model, "peft_config", {}).get("default")
        card = reporting.model_card(run, self.cfg.flat(), t, getattr(peft_cfg, "base_model_name_or_path", None)
                                    or self.cfg.model.model)
        run.save_checkpoint(self.policy.model, self.optimizers, t, config=self.cfg.flat(), card=card)
        self.checkpointed, self._snapshot = t, None
        run.plot()

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


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


class _Interrupts:
    """Ctrl-C (SIGINT) in the training loop: outside `deferred()` it stops the iteration in flight at once
    (KeyboardInterrupt); inside (writing a finished iteration's logs and checkpoint) it is held until the block
    is done, and `check()` raises it then. Only the main thread can take signals; elsewhere this is a no-op."""

    def __init__(self):
        self.requested = False
        self._deferring = 0
        self._previous = None

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        self.requested = True
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
        if self.requested:
            raise KeyboardInterrupt


class _Phases:
    """Advances the inner progress bar and names the phase running now."""

    def __init__(self, bar):
        self.bar, self.n = bar, 0

    def __call__(self, name: str) -> None:
        if self.bar is not None:
            if self.n:
                self.bar.update(1)
            self.bar.set_postfix_str(name)
        self.n += 1


def choose_blueprints(blueprints: list[list], returns: torch.Tensor, choice: str, key: list[int],
                      usable: list[bool] | None = None, first: int = 0) -> dict:
    """The blueprint each task's Phase B runs under: {task index: Blueprint}.

    'best': z* = argmax_i R(z_i) over the task's valid blueprints, the first on ties
    (Eq. 4). 'random': a uniform pick among the valid ones from a stream seeded by
    `key` + the task index (the ablation). `usable[b * G + i]` False (a rollout the env
    crashed) rules a blueprint out. Tasks with no valid, usable blueprint are absent.
    `first`: the iteration-wide index of blueprints[0]'s task (a rank's slice), which seeds 'random'.
    """
    out = {}
    for b, group in enumerate(blueprints):
        G = len(group)
        valid = [i for i in range(G) if group[i].valid and (usable is None or usable[b * G + i])]
        if not valid:
            continue
        if choice == "best":
            i = max(valid, key=lambda i: (float(returns[b * G + i]), -i))
        else:
            i = valid[int(np.random.default_rng([*key, first + b]).integers(len(valid)))]
        out[b] = group[i]
    return out


# Keys that fix the shape of the adapter or of the optimiser state: a checkpoint cannot change them.
FIXED_ON_RESUME = ("env", "dtype", *models.ADAPTER_KEYS, "optimizer_per_role")


def resumed_config(run: RunDir, saved: dict) -> dict:
    """The config a resumed run starts from: the checkpoint's own copy (config.yaml is a readable copy; a
    truncated or edited one is reported, not trusted)."""
    import json
    import warnings
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
    import json
    if "config" not in saved:
        return
    ckpt, now = json.loads(saved["config"]), cfg.flat()
    for key in FIXED_ON_RESUME:
        C.check(ckpt.get(key) == now.get(key), key, now.get(key),
                f"cannot change on resume: the checkpoint was trained with {key} = {ckpt.get(key)!r}")


def _flat(per_step: list[list[float]]) -> torch.Tensor:
    return torch.tensor([a for steps in per_step for a in steps])


def _answers(trajs: list[executor.Trajectory], task: int) -> list[dict]:
    return [{"answers": [s.text.strip() for s in tr.steps], "return": tr.ret, "end": tr.end}
            for tr in trajs if tr.task == task]


def main(argv: list[str] | None = None) -> int:
    models.cuda_allocator_default()
    ap = argparse.ArgumentParser(prog="python -m himac.coevolve", description=__doc__.split("\n\n")[0])
    ap.add_argument("config", nargs="?", help="flat YAML config (not needed with --resume)")
    ap.add_argument("--out", help="run directory (default: runs/<config name>-<time>)")
    ap.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set lr=1e-4 (repeatable)")
    ap.add_argument("--keys", metavar="ENV", nargs="?", const="sokoban",
                    help="print every config key for ENV (default sokoban) with its default and meaning, then exit")
    ap.add_argument("--verbose", action="store_true",
                    help="show every third-party warning, log line and progress bar (by default the known noise "
                         "of transformers, peft and bitsandbytes is filtered: himac/quiet.py)")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    if not args.verbose:
        quiet.quiet()
    try:
        return _main(ap, args, started)
    except KeyboardInterrupt:  # before or after the training loop (the loop handles its own)
        print("\nhimac: interrupted (Ctrl-C)", file=sys.stderr)
        return 130


def _main(ap: argparse.ArgumentParser, args: argparse.Namespace, started: float) -> int:
    if args.keys:
        try:
            print(C.describe(sections(args.keys)))
        except C.ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    if not args.resume and not args.config:
        ap.error("a config file is required (or --resume DIR)")
    dist.init()  # under torchrun: join the other ranks (alone: nothing)
    try:
        if dist.active():
            _stop_on_sigterm()
        return _train(args, started)
    except dist.RankLost as e:
        print(f"error: {e}. The run stopped; its last checkpoint is intact: continue it with --resume "
              f"(on any number of ranks)", file=sys.stderr)
        return 1
    finally:
        dist.close()


def _prepare(args: argparse.Namespace, out: str | None = None, checks: bool = True) -> tuple[Config, RunDir]:
    """The config and run directory of this start; ConfigError / UnsafeCheckpoint name what is wrong. `out`:
    rank 0's run directory, for the other ranks, which skip the checks (`checks`) rank 0 made."""
    overrides = C.parse_overrides(args.overrides)
    if args.resume:
        run = RunDir(args.resume, create=False)  # a typo must not create a folder
        if not run.has_checkpoint():
            raise C.ConfigError(f"--resume {args.resume}: no checkpoint there (expected checkpoint/trainer.pt)")
        saved = read_trainer_state(run.checkpoint / "trainer.pt")  # refuses an unsafe or broken file first
        if checks:
            check_adapter(run)
        cfg = load_config(args.config, overrides, base=resumed_config(run, saved))
        check_resume(saved, cfg)
    else:
        cfg = load_config(args.config, overrides)
        out = Path(out or args.out or f"runs/{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
        if checks and out.exists() and not out.is_dir():
            raise C.ConfigError(f"--out {out} is a file, not a directory")
        run = RunDir(out, create=False)
        if checks and run.has_checkpoint():
            raise C.ConfigError(f"--out {out} already holds a checkpoint; use --resume {out} or another --out")
        if checks and run.has_logs():
            raise C.ConfigError(f"--out {out} already holds the logs of another run ({', '.join(run.has_logs())}) "
                                "but no checkpoint; a new run would mix its rows with them: use another --out")
    models.resolve_device(dist.device_name(cfg.model.device))  # 'cuda' on a machine without one fails here, named
    reporting.check_available(cfg.run.report_to)  # a missing extra fails here, before anything is written
    C.check(cfg.run.tasks_per_iteration >= dist.world(), "tasks_per_iteration", cfg.run.tasks_per_iteration,
            f"must be >= the number of ranks ({dist.world()}): each rank plays whole tasks")
    return cfg, run


def _train(args: argparse.Namespace, started: float) -> int:
    main_rank = dist.is_main()
    error, path = None, None
    if main_rank:  # rank 0 checks (and may recover) the run directory before any rank reads it
        try:
            cfg, run = _prepare(args)
            path = str(run.path)
        except (C.ConfigError, UnsafeCheckpoint) as e:
            error = str(e)
    error, path = dist.broadcast((error, path))
    if error is not None:
        if main_rank:
            print(f"error: {error}", file=sys.stderr)
        return 2
    if not main_rank:
        import warnings
        warnings.simplefilter("ignore")  # rank 0 has said it
        cfg, run = _prepare(args, out=path, checks=False)
    if not args.resume and main_rank:
        run = RunDir(run.path)
    trainer = Trainer(cfg, run, resume=bool(args.resume))
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
                wandb_project=cfg.run.wandb_project, wandb_mode=cfg.run.wandb_mode, quiet=not args.verbose,
                warn=lambda msg: print(msg, file=sys.stderr))
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
    if main_rank:
        print(reporting.run_summary(run, cfg.flat(), time.perf_counter() - started, interrupted=trainer.interrupted,
                                    checkpoint_iteration=trainer.checkpointed, reporters=tuple(cfg.run.report_to)))
    return 130 if trainer.interrupted else 0


def _stop_on_sigterm() -> None:
    """torchrun stops the surviving ranks with SIGTERM when one fails: say so instead of dying silently."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handle(signum, frame):
        raise dist.RankLost(f"rank {dist.rank()} was stopped by the launcher: another rank failed (its exit is in "
                            "torchrun's report)")
    signal.signal(signal.SIGTERM, handle)


if __name__ == "__main__":
    sys.exit(main())
