"""tools/bench_logprobs.py on small random logits (CPU): both ways agree, each runs in its own process, and the
chunked way's measured peak is well below the plain arithmetic's (a real measurement, not a fixed number)."""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


def test_the_chunked_log_probs_peak_below_the_plain_arithmetic(tmp_path, capsys):
    import bench_logprobs
    out = tmp_path / "lp.json"
    # 8 x 64 x 50,000 bf16 logits: 49 MiB; the plain backward builds several 98 MiB float32 copies, the chunked
    # way one bf16 gradient and a row's 12 MiB at a time (4 MiB chunks: one row each)
    assert bench_logprobs.main(["--rows", "8", "--completion", "64", "--vocab", "50000", "--device", "cpu",
                                "--chunk-mib", "4", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| plain |" in table and "| chunked |" in table
    r = json.loads(out.read_text())
    assert r["agreement"]["values"] < 1e-4 and r["agreement"]["gradients"] < 1e-4
    rows = {x["way"]: x for x in r["rows"]}
    assert rows["plain"]["peak_gib"] > 0.2  # the float32 copies were seen
    assert rows["chunked"]["peak_gib"] < 0.4 * rows["plain"]["peak_gib"]


def test_bench_logprobs_names_a_bad_size(capsys):
    import bench_logprobs
    with pytest.raises(SystemExit):
        bench_logprobs.main(["--rows", "0"])
    assert "--rows 0: must be >= 1" in capsys.readouterr().err


def test_a_way_out_of_device_memory_is_a_row_not_a_crash(monkeypatch, capsys):
    """A 24 GB card may not hold the plain way at 16 rows: its process reports it and the table says so."""
    import bench_logprobs

    def no_memory(way, args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(bench_logprobs, "run_head", no_memory)
    assert bench_logprobs.main(["--one", "plain", "--rows", "1", "--completion", "2", "--vocab", "10",
                                "--device", "cpu"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["way"] == "plain" and row["oom"] is True


def test_both_ways_in_one_process_share_one_load_and_give_the_same_loss(monkeypatch, capsys):
    """--in-process (CUDA's default: gpu_check loads the 1.5B shape once): the plain way really runs the tensor
    arithmetic, the chunked way himac's function, and the same step gives the same loss."""
    import bench_logprobs
    calls = {"plain": 0}
    plain = bench_logprobs.WAYS["plain"]

    def counted(*a, **k):
        calls["plain"] += 1
        return plain(*a, **k)

    monkeypatch.setitem(bench_logprobs.WAYS, "plain", counted)
    loads = []
    load = bench_logprobs.load_update
    monkeypatch.setattr(bench_logprobs, "load_update", lambda args: loads.append(1) or load(args))
    assert bench_logprobs.main(["--update", "shape:qwen2.5-1.5b-instruct?layers=1&vocab=1024", "--rows", "2",
                                "--prompt", "6", "--completion", "4", "--device", "cpu", "--in-process"]) == 0
    out = capsys.readouterr().out
    assert "both ways in one process" in out and "| plain |" in out and "| chunked |" in out
    assert len(loads) == 1
    # once in the agreement check, then pi_ref's forward and the forward with gradients of the plain way's step
    assert calls["plain"] == 3
    losses = [float(x) for x in out.split("loss: plain ")[1].split(", chunked ")]
    assert abs(losses[0] - losses[1]) < 1e-3 * max(1.0, abs(losses[0]))
