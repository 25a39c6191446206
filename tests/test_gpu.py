"""The CUDA path: bf16 compute, NF4 on the GPU, gradient checkpointing, one co-evolution
iteration. Skipped without a CUDA device (the CI machines have none)."""
import functools

import pytest
import torch

from himac.coevolve import Trainer
from himac.experiment import load_config
from himac.rundir import RunDir

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("four_bit", [False, True])
def test_one_iteration_on_cuda(tmp_path, four_bit):
    cfg = load_config(None, {"model": "tiny?hidden=128", "device": "cuda", "dtype": "bfloat16",
                             "load_in_4bit": four_bit, "gradient_checkpointing": True, "iterations": 1,
                             "tasks_per_iteration": 2, "group_size": 2, "rollouts_per_blueprint": 2,
                             "blueprint_max_tokens": 12, "action_max_tokens": 4, "max_steps": 3})
    trainer = Trainer(cfg, RunDir(tmp_path))
    assert trainer.policy.device.type == "cuda"
    (m,) = trainer.train()
    assert m["iteration"] == 0 and m["macro/tokens"] > 0
    lora = [p for n, p in trainer.policy.model.named_parameters() if "lora_" in n]
    assert all(p.device.type == "cuda" and torch.isfinite(p).all() for p in lora)


def test_chunked_log_probs_on_cuda_match_and_peak_lower():
    """himac.token_logp on the GPU: the tensor arithmetic's values and gradients, at a fraction of its peak
    (bf16 logits 8 x 256 x 32,000 = 125 MiB; the plain backward builds several 250 MiB float32 copies)."""
    from himac.token_logp import reference_token_logprobs, token_logprobs
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 256, 32_000, generator=g).to("cuda", torch.bfloat16).requires_grad_(True)
    targets = torch.randint(2, 32_000, (8, 256), generator=g).cuda()
    temps = 0.8 + 0.4 * torch.rand(8, generator=g)
    peaks, out = {}, {}
    chunked = functools.partial(token_logprobs, chunk_bytes=2**25)  # one 31 MiB float32 row at a time
    for name, fn in (("plain", reference_token_logprobs), ("chunked", chunked)):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        lp = fn(logits, targets, temps, [0, 1])
        (grad,) = torch.autograd.grad(lp.sum(), logits)
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - base
        out[name] = (lp.detach(), grad.float())
    torch.testing.assert_close(out["chunked"][0], out["plain"][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["chunked"][1], out["plain"][1], rtol=1e-2, atol=1e-3)
    assert peaks["chunked"] < 0.4 * peaks["plain"], peaks


def test_bench_trl_on_cuda(tmp_path):
    """tools/bench_trl.py --device cuda on the tiny model: both sides on the GPU in bf16, every part timed after a
    synchronize, GPU peaks recorded and printed. Skipped where TRL is not installed (carry its wheels)."""
    pytest.importorskip("trl")
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "trl.json"
    proc = subprocess.run([sys.executable, "tools/bench_trl.py", "--device", "cuda", "--model", "tiny", "--prompts",
                           "1", "--group", "2", "--max-new-tokens", "4", "--warmup", "1", "--iterations", "1",
                           "--json", str(out)], cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads(out.read_text())["summary"]
    for side in ("himac", "trl"):
        x = s[side]
        assert 0 < x["gpu_loaded_gib"] <= x["gpu_peak_timed_gib"] <= x["gpu_reserved_timed_gib"], side
        assert x["calls_per_iteration"]["backward"] == 1 and x["split_mean_s"]["generate"] > 0, side
    assert "**peak GPU allocated, timed iterations, GiB**" in proc.stdout and "CUDA (" in proc.stdout
