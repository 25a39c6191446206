"""tools/bench_eval.py at a shape model (cut down to two real-width Qwen2.5-1.5B layers and a 2048-word
vocabulary, so it runs in CI): exported through the GGUF writer, run by HF and by llama.cpp on the same
held-out episodes, with the shape note in the report and the same generated lengths on both sides."""
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
CUT = "shape:qwen2.5-1.5b-instruct?layers=2&vocab=2048"


def test_bench_eval_runs_a_shape_model_on_both_backends_with_fixed_lengths(capsys, monkeypatch, tmp_path):
    pytest.importorskip("llama_cpp")
    import tempfile

    import bench_eval
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the bench's exports go
    assert bench_eval.main(["--checkpoint", CUT, "--episodes", "1", "--quants", "f32", "--decode-tokens", "4",
                            "--pp-tokens", "32", "--threads", "1", "--decode-threads", "1,2",
                            "--set", "action_choices=true"]) == 0
    out = capsys.readouterr().out
    assert not list(tmp_path.glob("himac-bench-*"))  # the exports (GBs at 1.5B) are removed when it ends
    assert "shape model: random weights, for measurement only" in out
    rows: dict[str, list[str]] = {}
    for m in re.finditer(r"^((?:HF transformers|llama\.cpp export) \S+)\s+(.*)$", out, re.M):
        rows.setdefault(m.group(1).strip(), m.group(2).split())  # the first table: the evaluation
    hf, lc = rows["HF transformers float32"], rows["llama.cpp export f32"]
    assert len(hf) == len(lc) == 6  # success, episodes/s, gen tokens/s, x HF, tokens computed, generated tokens
    # random weights write noise: the caps (blueprint_max_tokens, one action word) fix both sides' lengths
    assert int(hf[-1]) == int(lc[-1]) > 0
    assert float(lc[1]) > 0 and float(hf[3]) == 1.0
    # prompt processing: alone and beside the other KV sequences, x HF, tokens computed, ceiling
    pp = re.findall(r"^llama\.cpp export f32\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)$", out, re.M)
    assert len(pp) == 1 and all(float(v) > 0 for v in pp[0])
    # the decode rows: one per thread count, each against the first (1 thread)
    decode = re.findall(r"^llama\.cpp export f32\s+(\d+)\s+\S+\s+(\S+)\s+\S+\s+\S+\s+(\S+)$", out, re.M)
    assert [d[0] for d in decode] == ["1", "2"]
    assert float(decode[0][2]) == 1.0 and float(decode[1][2]) == pytest.approx(float(decode[1][1]) / float(decode[0][1]),
                                                                               rel=1e-2)


def test_prompt_speed_beside_others_caches_them_first():
    """prefill_speed(beside=k) times one prompt while k other sequences of its length sit in the KV cache."""
    pytest.importorskip("llama_cpp")
    import bench_eval
    from himac import models
    from himac.llamacpp import LlamaCppPolicy
    policy = LlamaCppPolicy(models.embedded_gguf("smollm2-135m"), n_ctx=256, n_seq=4, n_threads=1)
    assert bench_eval.prefill_speed(policy, 16, repeats=1, beside=3) > 0
    assert policy._slots.evaluated == 2 * 4 * 16  # warm-up and one timed run, each 3 others + the prompt
    assert sum(1 for c in policy._slots.cached if c) == 4  # the timed prompt took the free slot


def test_bench_eval_names_a_bad_thread_count(capsys):
    import bench_eval
    with pytest.raises(SystemExit):
        bench_eval.main(["--decode-threads", "1,x"])
    assert "--decode-threads '1,x'" in capsys.readouterr().err
