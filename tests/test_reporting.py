"""Around a run: TensorBoard and W&B beside metrics.jsonl (resumed runs continue the same curves), a quiet
terminal, the run summary, the model card, and Ctrl-C stopping cleanly after saving."""
import json
import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from himac import quiet, reporting
from himac.rundir import RunDir
from test_coevolve_cli import FAST, ROOT, coevolve, lines

TINY = ["configs/sokoban_cpu_paper.yaml", *FAST, "--set", "load_in_4bit=false"]


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} as TensorBoard shows them (its own reader, purging what a restart replaced)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# -- reporters -----------------------------------------------------------------------------
def test_tensorboard_and_wandb_follow_a_crashed_and_resumed_run(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    args = [*TINY, "--set", "iterations=2", "--set", "report_to=[jsonl, tensorboard, wandb]", "--out", str(out)]
    # killed (as by the OOM killer) after iteration 1 was logged but before it was checkpointed
    proc = subprocess.run([sys.executable, "-m", "himac.coevolve", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HIMAC_CRASH_AT": "before_save:2"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    first = scalars(out / "tensorboard")
    assert [s for s, _ in first["success_rate"]] == [1, 2]  # iteration t is step t + 1
    run_id = (out / "wandb" / "run-id").read_text()

    proc = coevolve("--resume", str(out))  # redoes iteration 1
    rows, evals = lines(out / "metrics.jsonl"), lines(out / "eval.jsonl")
    assert [m["iteration"] for m in rows] == [0, 1]
    tb = scalars(out / "tensorboard")
    for key in ("success_rate", "macro/return_mean", "micro/return_mean", "env/invalid_action_rate", "wall_s"):
        assert tb[key] == [(m["iteration"] + 1, pytest.approx(m[key], rel=1e-6)) for m in rows], key  # one curve
    assert tb["eval/success_rate"] == [(0, pytest.approx(evals[0]["eval/success_rate"])),
                                       (2, pytest.approx(evals[1]["eval/success_rate"]))]
    assert not any("iteration" == k for k in tb)
    assert (out / "wandb" / "run-id").read_text() == run_id  # the same W&B run continues
    offline = sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 2  # one folder per start, one id
    data = b"".join(f.read_bytes() for f in offline[-1].glob("run-*.wandb"))
    for key in (b"success_rate", b"micro/return_mean", b"eval/success_rate", b"group_size"):
        assert key in data, key  # metrics under their metrics.jsonl names, the config as hyper-parameters
    assert "wandb:" not in proc.stderr  # quiet


def test_reporters_skip_what_is_not_a_finite_number_and_survive_a_broken_one(tmp_path):
    pytest.importorskip("tensorboard")
    run = RunDir(tmp_path / "run")
    reps = reporting.make_reporters(["jsonl", "tensorboard"], run, {"lr": 1e-5, "failure_keywords": ["deadlock"]})

    class Broken:
        def log(self, metrics, step):
            raise OSError("disk full")

        def close(self):
            pass

    said = []
    reps.reporters.append(Broken())
    reps.warn = said.append
    reps.log({"iteration": 0, "micro/kl": float("nan"), "micro/loss": float("inf"), "x": None, "s": "text",
              "success_rate": 0.5, "flag": True}, step=1)
    reps.log({"iteration": 1, "micro/kl": 0.25, "success_rate": 0.75}, step=2)
    reps.close()
    assert len(said) == 1 and "Broken" in said[0] and "disk full" in said[0]
    tb = scalars(run.tensorboard_dir)
    assert tb["success_rate"] == [(1, 0.5), (2, 0.75)]
    assert tb["micro/kl"] == [(2, 0.25)] and tb["flag"] == [(1, 1.0)]
    assert "micro/loss" not in tb and "x" not in tb and "s" not in tb
    assert reporting.scalars({"iteration": 3, "a": float("-inf"), "b": 2}) == {"b": 2}


def test_a_missing_extra_is_named_before_anything_is_written(tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(Exception, match=r"himac\[wandb\]"):
        reporting.check_available(["jsonl", "wandb"])
    reporting.check_available(["jsonl"])
    proc = coevolve(*TINY, "--set", "report_to=[jsonl, mlflow]", "--out", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2 and "report_to" in proc.stderr and "mlflow" in proc.stderr
    assert not (tmp_path / "x").exists()


# -- the quiet terminal -----------------------------------------------------------------------
def test_quiet_drops_the_known_noise_by_message_and_nothing_else(caplog):
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            quiet.quiet()
            warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
            warnings.warn("something else is deprecated", FutureWarning)
            with caplog.at_level(logging.WARNING):
                bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "offline")
                bnb.warning("Failed to load the CPU library")
        assert [str(w.message) for w in seen] == ["something else is deprecated"]
        assert [r.getMessage() for r in caplog.records] == ["Failed to load the CPU library"]
        from transformers.utils import logging as hf_logging
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        quiet.verbose()
    caplog.clear()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        with caplog.at_level(logging.WARNING):
            bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: offline")
    assert len(seen) == 1 and len(caplog.records) == 1  # --verbose: everything shows


# -- Ctrl-C, the summary and the model card -----------------------------------------------------
def test_ctrl_c_saves_the_last_completed_iteration_and_prints_the_summary(tmp_path):
    """save_every=100: nothing would be checkpointed before the end, so Ctrl-C must checkpoint the last completed
    iteration itself, from its copy, not the half-done weights of the iteration in flight."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "himac.coevolve", *TINY, "--set", "iterations=50",
                             "--set", "save_every=100", "--set", "eval_episodes=0", "--verbose", "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 130, stderr[-2000:]
    rows = lines(out / "metrics.jsonl")
    state = torch.load(out / "checkpoint" / "trainer.pt", weights_only=True)
    assert state["iteration"] == rows[-1]["iteration"] < 49  # the last completed one, not the one in flight
    assert "Traceback" not in stderr and "Loading weights" in stderr  # --verbose shows transformers' bars
    assert "interrupted (Ctrl-C)" in stdout and f"{len(rows)} of 50 iterations" in stdout
    assert f"checkpoint of iteration {rows[-1]['iteration']}" in stdout
    assert f"python -m himac.coevolve --resume {out}    # train on" in stdout  # to the configured 50


def test_summary_and_model_card_of_a_finished_run(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from himac import models
    out = tmp_path / "run"
    proc = coevolve(*TINY, "--set", "iterations=2", "--set", "eval_every=1", "--out", str(out))
    evals = lines(out / "eval.jsonl")
    assert [e["iteration"] for e in evals] == [-1, 0, 1]
    s = proc.stdout
    before, after = evals[0]["eval/success_rate"], evals[-1]["eval/success_rate"]
    assert f"{before:.3f} before training -> {after:.3f} after iteration 1" in s
    assert "best held-out" in s and "peak memory" in s and "GiB" in s and str(out) in s
    for command in (f"python -m himac.evaluate --checkpoint {out}", f"python -m himac.coevolve --resume {out}",
                    f"python tools/export_gguf.py --checkpoint {out}"):
        assert command in s, command
    for noise in ("Loading weights", "is_gradient_checkpointing"):  # the quiet terminal
        assert noise not in proc.stderr, noise

    run = RunDir(out, create=False)
    card = run.model_card.read_text()
    assert card.startswith("---\n") and "library_name: peft" in card and "Model Card for Model ID" not in card
    assert "| `group_size` | `2` |" in card and "| `model` | `'tiny'` |" in card
    for e in evals:
        assert f"{e['eval/success_rate']:.3f} | {e['eval/return_mean']:.3f} |" in card
    assert "PeftModel.from_pretrained" in card and "python -m himac.evaluate" in card
    base = AutoModelForCausalLM.from_pretrained(models.model_path(models.ModelConfig(model="tiny")))
    model = PeftModel.from_pretrained(base, str(run.adapter_dir))  # the ecosystem's loader reads the folder
    saved = load_file(run.adapter_weights)
    loaded = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
    assert saved and set(saved) == set(loaded)
    for name, w in saved.items():
        assert torch.equal(loaded[name], w), name  # the checkpoint's weights, not a fresh adapter
