"""A batch of env slots spread over worker processes and stepped in parallel.

For envs whose step costs milliseconds, not microseconds: an ALFWorld step on
TextWorld's PDDL engine takes 55-90 ms and a game load about 1 s, so 16-128
envs stepped one after another in the trainer's process would dominate an
iteration. Any env works: a worker builds its envs with the same `make(cfg)`
that envs.base.SerialPool uses, so `make` and `cfg` must pickle (a module-level
class or function and a config dataclass do).

Slot i lives in worker i % num_workers for the whole batch. `reset` and `step`
send every worker its share first and then collect the answers, so the workers
run at the same time; the trainer waits for the slowest one.

Same interface as SerialPool (`reset`, `step`, `env`, `close`, and `tasks`,
`task_types`, `infos`, `failed` after a reset), with the same containment, one level
further out:
- an env that raises during reset lists its slot in `failed`; one that raises
  during a step ends that slot's episode with info["error"]; the batch goes on;
- a worker that dies (a crash in native code, the OOM killer) or does not
  answer within `timeout_s` per env it holds is killed; every slot it held ends
  with info["error"], and a fresh worker takes its place at the next reset.

Workers are fresh interpreters (`python -c`, the trainer's sys.path, one
socketpair each), not multiprocessing children: forking a trainer that has run
torch and tokenizers threads can deadlock a child, and multiprocessing's
"spawn" re-imports the trainer's main module in every worker (torch and
transformers: ~3 s and ~250 MB each, and a footgun for scripts without a
`__main__` guard). A worker imports only what unpickling `make` needs.
"""
from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Callable

from envs.base import Obs, error_result


@dataclass
class SlotView:
    """What the trainer may read of an env living in a worker."""
    task: str
    task_type: str
    episode_info: dict = field(default_factory=dict)


class ProcPool:
    """SerialPool's interface over `num_workers` processes; `make(cfg)` builds each env in its worker."""

    def __init__(self, make: Callable[[Any], Any], cfg: Any, num_workers: int = 2, timeout_s: float = 60.0):
        if num_workers < 1:
            raise ValueError(f"num_workers = {num_workers!r}: a process pool needs at least one worker")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s = {timeout_s!r}: must be > 0")
        self.make, self.cfg, self.num_workers, self.timeout_s = make, cfg, num_workers, timeout_s
        self._workers: list[_Worker | None] = [None] * num_workers
        self.tasks: list[str] = []
        self.task_types: list[str] = []
        self.infos: list[dict] = []
        self.failed: dict[int, str] = {}
        self._views: list[SlotView] = []
        self._n = 0  # slots in the current batch
        self._dead: dict[int, str] = {}  # slot -> why its worker is gone (until the next reset)

    # -- the pool interface --------------------------------------------------------------
    def reset(self, seeds: list[int]) -> list[Obs]:
        """Fresh envs, one per seed, built in the workers. A slot whose env fails to load is in `failed`."""
        n = self._n = len(seeds)
        self.failed, self._dead = {}, {}
        shares = self._shares(range(n))
        for w, slots in shares.items():
            self._ensure(w)
        answers = self._call({w: ("reset", [(s, seeds[s]) for s in slots]) for w, slots in shares.items()},
                             {w: len(slots) for w, slots in shares.items()})
        obs: list[Obs | None] = [None] * n
        self._views = [SlotView("", "error") for _ in range(n)]
        for w, slots in shares.items():
            answer = answers[w]
            if isinstance(answer, _Lost):
                for s in slots:
                    self.failed[s] = answer.why
                    obs[s] = error_result(RuntimeError(answer.why))[0]
                continue
            for slot, o, err, view in answer:
                if err is not None:
                    self.failed[slot] = err
                    o = error_result(RuntimeError(err))[0]
                else:
                    self._views[slot] = view
                obs[slot] = o
        self.tasks = [v.task for v in self._views]
        self.task_types = [v.task_type for v in self._views]
        self.infos = [dict(v.episode_info) for v in self._views]
        return obs

    def step(self, slots: list[int], actions: list[Any]) -> list[tuple[Obs, float, bool, dict]]:
        """Step each slot with its action; results in the order of `slots`."""
        out: dict[int, tuple] = {}
        per_worker: dict[int, list[tuple[int, Any]]] = {}
        for slot, action in zip(slots, actions):
            if slot in self._dead or slot in self.failed:
                why = self._dead.get(slot) or f"this env failed to load: {self.failed[slot]}"
                out[slot] = error_result(RuntimeError(why))
            else:
                per_worker.setdefault(slot % self.num_workers, []).append((slot, action))
        answers = self._call({w: ("step", pairs) for w, pairs in per_worker.items()},
                             {w: len(pairs) for w, pairs in per_worker.items()})
        for w, pairs in per_worker.items():
            answer = answers[w]
            if isinstance(answer, _Lost):
                for slot, _ in pairs:
                    out[slot] = error_result(RuntimeError(answer.why))
            else:
                out.update(answer)
        return [out[s] for s in slots]

    def env(self, slot: int) -> SlotView:
        return self._views[slot]

    def close(self) -> None:
        """Stop every worker (politely, then by force)."""
        for i, w in enumerate(self._workers):
            if w is not None:
                w.stop()
                self._workers[i] = None

    def __del__(self):  # a pool dropped without close() must not leave processes behind
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- plumbing -----------------------------------------------------------------------
    def _shares(self, slots) -> dict[int, list[int]]:
        shares: dict[int, list[int]] = {}
        for s in slots:
            shares.setdefault(s % self.num_workers, []).append(s)
        return shares

    def _ensure(self, w: int) -> None:
        worker = self._workers[w]
        if worker is None or not worker.alive():
            if worker is not None:
                worker.stop()
            self._workers[w] = _Worker(self.make, self.cfg)

    def _call(self, requests: dict[int, tuple], sizes: dict[int, int]) -> dict[int, Any]:
        """Send every worker its request, then collect the answers (a _Lost for a worker that died)."""
        sent = {}
        for w, msg in requests.items():
            worker = self._workers[w]
            sent[w] = worker is not None and worker.send(msg)
        answers = {}
        for w in requests:
            worker = self._workers[w]
            answer = worker.receive(self.timeout_s * max(1, sizes[w])) if sent[w] else \
                _Lost(f"env worker {w} is not running")
            if isinstance(answer, _Lost):
                self._workers[w] = None
                if worker is not None:
                    worker.stop(polite=False)  # a hung worker would not hear "close"
                for s in range(w, self._n, self.num_workers):
                    self._dead[s] = answer.why
            answers[w] = answer
        return answers


@dataclass
class _Lost:
    why: str


class _Worker:
    """One worker process and our end of its socket."""

    def __init__(self, make, cfg):
        ours, theirs = socket.socketpair()
        code = f"from envs.procpool import worker_main; worker_main({theirs.fileno()})"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=[theirs.fileno()], env=env)
        theirs.close()
        self.conn = Connection(ours.detach())
        self.conn.send_bytes(pickle.dumps((make, cfg)))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, msg) -> bool:
        try:
            self.conn.send(msg)
            return True
        except (BrokenPipeError, OSError):
            return False

    def receive(self, timeout: float):
        try:
            if not self.conn.poll(timeout):
                return _Lost(f"env worker pid {self.proc.pid} gave no answer in {timeout:.0f} s and was killed")
            return self.conn.recv()
        except (EOFError, OSError):
            code = self.proc.wait(5) if self.proc.poll() is None else self.proc.returncode
            return _Lost(f"env worker pid {self.proc.pid} died (exit code {code})")

    def stop(self, polite: bool = True) -> None:
        if polite and self.proc.poll() is None:
            try:
                self.conn.send(("close", None))
                self.proc.wait(5)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.conn.close()


def worker_main(fd: int) -> None:
    """Entry point of a worker process (see _Worker): read (make, cfg), then serve."""
    conn = Connection(fd)
    try:
        make, cfg = pickle.loads(conn.recv_bytes())
    except EOFError:
        return
    _serve(conn, make, cfg)


def _serve(conn, make, cfg) -> None:
    """A worker's loop: holds the envs of its slots; answers reset/step/close requests."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle; it closes us
    envs: dict[int, Any] = {}
    while True:
        try:
            cmd, arg = conn.recv()
        except (EOFError, OSError):  # the trainer is gone
            cmd, arg = "close", None
        if cmd == "close":
            _close_all(envs)
            return
        if cmd == "reset":
            _close_all(envs)
            envs = {}
            out = []
            for slot, seed in arg:
                try:
                    env = make(cfg)
                    obs = env.reset(seed)
                    envs[slot] = env
                    out.append((slot, obs, None, SlotView(env.task, env.task_type,
                                                          dict(getattr(env, "episode_info", {})))))
                except Exception as e:  # noqa: BLE001 - containment is the point
                    out.append((slot, None, f"{type(e).__name__}: {e}", None))
            conn.send(out)
        elif cmd == "step":
            out = {}
            for slot, action in arg:
                try:
                    out[slot] = envs[slot].step(action)
                except Exception as e:  # noqa: BLE001
                    out[slot] = error_result(e)
            conn.send(out)
        else:
            raise ValueError(f"env worker: unknown request {cmd!r}")


def _close_all(envs: dict) -> None:
    for env in envs.values():
        try:
            env.close()
        except Exception:  # noqa: BLE001 - closing must not take the worker down
            pass
