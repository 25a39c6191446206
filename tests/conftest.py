import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_cfg():
    from himac.models import ModelConfig
    return ModelConfig(model="tiny", lora_r=8)


@pytest.fixture
def tiny_policy(tiny_cfg):
    """A fresh random tiny Qwen2 (test-only) with a LoRA adapter, wrapped as the shared policy."""
    from himac import models
    from himac.policy import Policy
    torch.manual_seed(0)
    model, tok = models.load(tiny_cfg)
    return Policy(model, tok, gen_batch_size=8)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_cfg):
    from transformers import AutoTokenizer

    from himac import models
    return AutoTokenizer.from_pretrained(models.model_path(tiny_cfg))


def has_cuda() -> bool:
    return torch.cuda.is_available()
