"""The run directory's checkpoints: trainer state without pickle (a file from someone else
cannot run code), exact RNG and optimiser round trips, old checkpoints converted only on
request, and a checkpoint swap interrupted at any point recovered."""
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from himac.rundir import RunDir, UnsafeCheckpoint, convert_legacy_trainer_state, read_trainer_state
from himac.update import Optimizers, UpdateConfig

ROOT = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this creates a file: what a malicious trainer.pt would do."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


class _Model(torch.nn.Module):
    """Stands in for the peft model: save_pretrained writes the adapter directory."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))

    def save_pretrained(self, path):
        Path(path).mkdir(parents=True)
        torch.save({"w": self.w.detach()}, Path(path) / "adapter_model.bin")


def _run_with_checkpoint(tmp_path) -> tuple[RunDir, Optimizers]:
    model = _Model()
    opts = Optimizers(model, UpdateConfig(lr=0.1, optimizer_per_role=True))
    model.w.grad = torch.ones(3)
    opts.for_kinds({1}).step()
    run = RunDir(tmp_path / "run")
    run.save_checkpoint(model, opts, 4)
    return run, opts


def test_a_pickle_payload_is_refused_and_never_runs(tmp_path):
    run, _ = _run_with_checkpoint(tmp_path)
    victim = tmp_path / "pwned"
    torch.save({"format": 2, "iteration": 0, "optimizers": {}, "rng": _Payload(victim)}, run.checkpoint / "trainer.pt")
    with pytest.raises(UnsafeCheckpoint, match="refused"):
        read_trainer_state(run.checkpoint / "trainer.pt")
    assert not victim.exists()
    # the same file through the command line: exit 2, a message, no traceback, still no file
    (run.path / "config.yaml").write_text("model: tiny\n")
    proc = subprocess.run([sys.executable, "-m", "himac.coevolve", "--resume", str(run.path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "refused" in proc.stderr and "Traceback" not in proc.stderr
    assert not victim.exists()
    # and the payload is real: an unrestricted load would have created the file
    torch.load(run.checkpoint / "trainer.pt", weights_only=False)
    assert victim.exists()


def test_trainer_state_round_trips_optimisers_and_every_rng(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    run, opts = _run_with_checkpoint(tmp_path)
    expect = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)  # scramble
    model = _Model()
    fresh = Optimizers(model, UpdateConfig(lr=0.1, optimizer_per_role=True))
    assert run.load_trainer_state(fresh) == 4
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expect
    a, b = opts.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys() == {"planner", "executor"}
    for role in a:
        for k, v in a[role]["state"].items():
            assert all(torch.equal(v[n], b[role]["state"][k][n]) for n in v)
    state = torch.load(run.checkpoint / "trainer.pt", weights_only=True)  # loadable without pickle
    assert state["format"] == 2


def test_old_pickled_checkpoints_are_converted_only_on_request(tmp_path):
    run, _ = _run_with_checkpoint(tmp_path)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))])
    legacy = {"iteration": 7, "optimizer": opt.state_dict(),
              "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}}
    torch.save(legacy, run.checkpoint / "trainer.pt")
    with pytest.raises(UnsafeCheckpoint, match="convert_checkpoint.py"):
        read_trainer_state(run.checkpoint / "trainer.pt")
    proc = subprocess.run([sys.executable, "tools/convert_checkpoint.py", str(run.path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    state = read_trainer_state(run.checkpoint / "trainer.pt")
    assert state["iteration"] == 7 and (run.checkpoint / "trainer.pt.legacy").is_file()
    np.random.seed(5)
    n = np.random.rand()
    np.random.set_state(legacy["rng"]["numpy"])
    before = np.random.rand()
    from himac.rundir import set_rng_state
    set_rng_state(state["rng"])
    assert np.random.rand() == before != n


@pytest.mark.parametrize("crash_after,expect", [("tmp_written", 4), ("old_moved", 5), ("tmp_moved", 5)])
def test_a_crash_inside_the_checkpoint_swap_is_recovered(tmp_path, crash_after, expect):
    import shutil
    run, _ = _run_with_checkpoint(tmp_path)  # iteration 4 at checkpoint/
    newer, _ = _run_with_checkpoint(tmp_path / "newer")
    model = _Model()
    newer.save_checkpoint(model, Optimizers(model, UpdateConfig(optimizer_per_role=True)), 5)
    tmp, old = run.path / "checkpoint.tmp", run.path / "checkpoint.old"
    shutil.copytree(newer.checkpoint, tmp)  # iteration 5, written whole (COMPLETE) into checkpoint.tmp
    assert (tmp / "COMPLETE").is_file()
    if crash_after in ("old_moved", "tmp_moved"):  # the swap's first rename: checkpoint -> checkpoint.old
        os.replace(run.checkpoint, old)
    if crash_after == "tmp_moved":  # its second: checkpoint.tmp -> checkpoint
        os.replace(tmp, run.checkpoint)
    assert RunDir(run.path, create=False).has_checkpoint()
    assert read_trainer_state(run.checkpoint / "trainer.pt")["iteration"] == expect
    assert not old.exists()


def test_an_unfinished_new_checkpoint_never_replaces_the_old_one(tmp_path):
    run, _ = _run_with_checkpoint(tmp_path)
    tmp = run.path / "checkpoint.tmp"
    os.replace(run.checkpoint, run.path / "checkpoint.old")  # crashed after moving the old one away...
    tmp.mkdir()
    (tmp / "trainer.pt").write_bytes(b"half")  # ...with a new one that never got its COMPLETE mark
    assert run.has_checkpoint() and read_trainer_state(run.checkpoint / "trainer.pt")["iteration"] == 4


def test_a_truncated_trainer_state_is_reported(tmp_path):
    run, _ = _run_with_checkpoint(tmp_path)
    data = (run.checkpoint / "trainer.pt").read_bytes()
    (run.checkpoint / "trainer.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnsafeCheckpoint, match="unreadable"):
        read_trainer_state(run.checkpoint / "trainer.pt")
