"""The CUDA path: bf16 compute, NF4 on the GPU, gradient checkpointing, one co-evolution
iteration. Skipped without a CUDA device (the CI machines have none)."""
import pytest
import torch

from himac.coevolve import Trainer
from himac.experiment import load_config
from himac.rundir import RunDir

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("four_bit", [False, True])
def test_one_iteration_on_cuda(tmp_path, four_bit):
    cfg = load_config(None, {"model": "tiny", "tiny_hidden": 128, "device": "cuda", "dtype": "bfloat16",
                             "load_in_4bit": four_bit, "gradient_checkpointing": True, "iterations": 1,
                             "tasks_per_iteration": 2, "group_size": 2, "rollouts_per_blueprint": 2,
                             "blueprint_max_tokens": 12, "action_max_tokens": 4, "max_steps": 3})
    trainer = Trainer(cfg, RunDir(tmp_path))
    assert trainer.policy.device.type == "cuda"
    (m,) = trainer.train()
    assert m["iteration"] == 0 and m["macro/tokens"] > 0
    lora = [p for n, p in trainer.policy.model.named_parameters() if "lora_" in n]
    assert all(p.device.type == "cuda" and torch.isfinite(p).all() for p in lora)
