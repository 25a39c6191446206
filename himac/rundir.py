"""A run directory: everything needed to read, reproduce and resume a training run.

    config.yaml      the resolved flat config (every key, defaults included)
    run.json         seed, command line, package versions, device
    metrics.jsonl    one JSON object per iteration (flat metric names)
    eval.jsonl       held-out evaluations
    samples.jsonl    a few blueprints and trajectories per iteration, for reading
    progress.png     success, returns, answer quality and time per iteration, redrawn at each checkpoint
    checkpoint/      adapter/ (peft, safetensors), trainer.pt (optimizer, RNG, iteration)
    export/          GGUF exports of the checkpoint (agent-<quant>.gguf), made on demand

This class is the one place that knows the layout: the trainer, evaluation,
export and the tools ask it for paths.

Checkpoints are written to a temporary directory and renamed into place, so a
crash mid-write leaves the previous checkpoint intact. On resume, metric lines
newer than the checkpoint are dropped (they belong to an iteration that will run
again).
"""
from __future__ import annotations

import json
import os
import platform
import random
import shutil
import sys
import time
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

    def export_file(self, quant: str) -> Path:
        """Where the checkpoint's merged GGUF at precision `quant` is kept."""
        return self.path / "export" / f"agent-{quant}.gguf"

    def has_checkpoint(self) -> bool:
        return (self.checkpoint / "trainer.pt").is_file()

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
    def log(self, metrics: dict[str, Any], name: str = "metrics.jsonl") -> None:
        with open(self.path / name, "a") as f:
            f.write(json.dumps(metrics) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def metrics(self, name: str = "metrics.jsonl") -> list[dict[str, Any]]:
        path = self.path / name
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []

    def plot(self) -> Path | None:
        """Redraw progress.png from the logs (no-op before the first iteration)."""
        from himac.plots import plot_progress
        metrics = self.metrics()
        return plot_progress(metrics, self.metrics("eval.jsonl"), self.path / "progress.png") if metrics else None

    def drop_metrics_after(self, iteration: int) -> None:
        for name in ("metrics.jsonl", "samples.jsonl", "eval.jsonl"):
            path = self.path / name
            if path.is_file():
                keep = [ln for ln in path.read_text().splitlines()
                        if ln.strip() and json.loads(ln).get("iteration", -1) <= iteration]
                _atomic_text(path, "".join(ln + "\n" for ln in keep))

    # -- checkpoints ------------------------------------------------------------------
    def save_checkpoint(self, model, optimizer, iteration: int) -> None:
        tmp = self.path / "checkpoint.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp / self.adapter_dir.name)  # peft: adapter_config.json + adapter_model.safetensors
        state = {"iteration": iteration, "optimizer": optimizer.state_dict(), "rng": rng_state()}
        torch.save(state, tmp / "trainer.pt")
        old = self.path / "checkpoint.old"
        shutil.rmtree(old, ignore_errors=True)
        if self.checkpoint.exists():
            os.replace(self.checkpoint, old)
        os.replace(tmp, self.checkpoint)
        shutil.rmtree(old, ignore_errors=True)

    def load_trainer_state(self, optimizer) -> int:
        """Restore optimizer and RNG state; returns the last completed iteration."""
        state = torch.load(self.checkpoint / "trainer.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        return int(state["iteration"])


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
