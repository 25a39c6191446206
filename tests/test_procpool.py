"""envs.procpool.ProcPool: same results as SerialPool, real parallelism, and containment of
envs that raise, crash their process or hang."""
import os
import time
from dataclasses import dataclass

import pytest

from envs.base import Obs, SerialPool
from envs.procpool import ProcPool
from envs.sokoban import SPEC as SOKOBAN
from envs.sokoban import SokobanConfig


@dataclass
class FaultConfig:
    step_sleep_s: float = 0.0


class FaultEnv:
    """A test env (a dependency of the pool, not the pool): action "raise" raises, "die" kills
    its process, "hang" never answers; a negative seed fails to load. Each step reports the
    worker pid and when it ran, so a test can see steps overlap in time."""
    task_type = "fault"

    def __init__(self, cfg: FaultConfig):
        self.cfg = cfg

    def reset(self, seed: int) -> Obs:
        if seed < 0:
            raise OSError(f"cannot load game {seed}")
        self.seed, self.t, self.task = seed, 0, f"task-{seed}"
        return Obs(text=f"start-{seed}")

    def step(self, action):
        if action == "raise":
            raise RuntimeError("engine exploded")
        if action == "die":
            os._exit(3)
        if action == "hang":
            time.sleep(3600)
        start = time.time()
        time.sleep(self.cfg.step_sleep_s)
        self.t += 1
        return Obs(text=f"obs-{self.seed}-{self.t}"), 1.0, False, \
            {"success": False, "pid": os.getpid(), "span": (start, time.time())}

    def close(self):
        pass


@pytest.fixture
def pool():
    pools = []

    def make(cfg=None, **kw):
        p = ProcPool(FaultEnv, cfg or FaultConfig(), **kw)
        pools.append(p)
        return p
    yield make
    for p in pools:
        p.close()


def test_sokoban_through_workers_matches_serial():
    cfg = SokobanConfig()
    seeds = [11, 12, 13]
    serial, procs = SerialPool(SOKOBAN, cfg), ProcPool(SOKOBAN.make, cfg, num_workers=2)
    try:
        a, b = serial.reset(seeds), procs.reset(seeds)
        assert [o.text for o in a] == [o.text for o in b]
        assert procs.tasks == serial.tasks and procs.task_types == ["sokoban"] * 3
        assert procs.infos == serial.infos and all(i["optimal_moves"] for i in procs.infos)
        for moves in (["up", "left", None], ["down", "right", "up"], ["left", "left", "down"]):
            ra, rb = serial.step([0, 1, 2], moves), procs.step([0, 1, 2], moves)
            assert [(o.text, r, d, i["success"]) for o, r, d, i in ra] == \
                   [(o.text, r, d, i["success"]) for o, r, d, i in rb]
        # a partial step keeps the order of the slots asked for
        rb = procs.step([2, 0], ["up", "up"])
        ra = serial.step([2, 0], ["up", "up"])
        assert [o.text for o, *_ in ra] == [o.text for o, *_ in rb]
    finally:
        procs.close()


def test_steps_run_in_two_processes_at_once(pool):
    p = pool(FaultConfig(step_sleep_s=0.3), num_workers=2)
    p.reset([1, 2])
    (_, _, _, i0), (_, _, _, i1) = p.step([0, 1], ["a", "a"])
    assert i0["pid"] != i1["pid"] and os.getpid() not in (i0["pid"], i1["pid"])
    (s0, e0), (s1, e1) = i0["span"], i1["span"]
    assert s1 < e0 and s0 < e1, "the two workers' steps did not overlap in time"


def test_load_failure_and_raising_step_are_contained(pool):
    p = pool(num_workers=2)
    obs = p.reset([5, -1, 7])
    assert set(p.failed) == {1} and "cannot load game -1" in p.failed[1]
    assert obs[0].text == "start-5" and obs[2].text == "start-7"
    assert p.tasks == ["task-5", "", "task-7"] and p.task_types == ["fault", "error", "fault"]
    (o0, _, d0, i0), (o2, _, d2, i2) = p.step([0, 2], ["raise", "a"])
    assert d0 and "engine exploded" in i0["error"] and not i0["success"]
    assert not d2 and o2.text == "obs-7-1" and "error" not in i2
    # the failed slot answers with an error if stepped anyway
    (_, _, d1, i1), = p.step([1], ["a"])
    assert d1 and "failed to load" in i1["error"]


def test_dead_worker_fails_its_slots_and_is_replaced(pool):
    p = pool(num_workers=2)
    p.reset([1, 2, 3, 4])  # worker 0 holds slots 0 and 2, worker 1 holds 1 and 3
    res = p.step([0, 1, 2, 3], ["die", "a", "a", "a"])
    for slot in (0, 2):
        assert res[slot][2] and "died" in res[slot][3]["error"]
    assert res[1][0].text == "obs-2-1" and res[3][0].text == "obs-4-1"
    # slot 2 shared the dead process: later steps fail fast instead of hanging
    (_, _, done, info), = p.step([2], ["a"])
    assert done and "died" in info["error"]
    # the next batch gets a fresh worker
    obs = p.reset([8, 9])
    assert not p.failed and [o.text for o in obs] == ["start-8", "start-9"]
    assert [r[0].text for r in p.step([0, 1], ["a", "a"])] == ["obs-8-1", "obs-9-1"]


def test_hanging_worker_times_out(pool):
    p = pool(num_workers=1, timeout_s=1.0)
    p.reset([1])
    tic = time.perf_counter()
    (_, _, done, info), = p.step([0], ["hang"])
    assert time.perf_counter() - tic < 10
    assert done and "no answer" in info["error"]
    assert [o.text for o in p.reset([2])] == ["start-2"]


def test_close_stops_the_processes(pool):
    p = pool(num_workers=2)
    p.reset([1, 2])
    procs = [w.proc for w in p._workers]
    p.close()
    assert all(pr.poll() is not None for pr in procs)


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="num_workers = 0"):
        ProcPool(FaultEnv, FaultConfig(), num_workers=0)
    with pytest.raises(ValueError, match="timeout_s = -1"):
        ProcPool(FaultEnv, FaultConfig(), timeout_s=-1)

