"""GGUF export: the merge by hand, then the exported file in real llama.cpp against transformers.

Tiny test models (random, test-only) of both supported families: the Qwen2 `tiny` model
and a tiny Llama built here with the same tokenizer. Each carries a LoRA adapter with
random, clearly non-zero B, so a merge that dropped the adapter would show.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from envs.sokoban import PROMPTS
from himac import executor, export, models, planner
from himac.experiment import load_config
from himac.policy import Policy, as_role
from himac.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]


def make_run(path: Path, model: str = "tiny", lora_std: float = 0.2, seed: int = 1, **overrides) -> Path:
    """A run directory as coevolve writes it (config.yaml + checkpoint/adapter), with a random adapter."""
    settings = {"model": model, "load_in_4bit": False, "lora_r": 4, "blueprint_max_tokens": 12,
                "action_max_tokens": 4, "max_solution_moves": 1, "max_steps": 4, **overrides}
    cfg = load_config(ROOT / "configs" / "sokoban_cpu_paper.yaml", settings)
    run = RunDir(path)
    run.write_config(cfg.flat())
    torch.manual_seed(seed)
    model, _ = models.load(cfg.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, lora_std)
    model.save_pretrained(run.checkpoint / "adapter")
    return path


def tiny_llama_dir(path: Path) -> Path:
    """A random 2-layer Llama (GQA: 4 heads, 2 KV heads) with the tiny tokenizer. Test-only."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(models.model_path(models.ModelConfig(model="tiny")))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=None, rope_theta=10000.0)
    torch.manual_seed(3)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{family: run directory} for a tiny Qwen2 and a tiny Llama."""
    root = tmp_path_factory.mktemp("runs")
    return {"qwen2": make_run(root / "qwen2"),
            "llama": make_run(root / "llama", model=str(tiny_llama_dir(root / "llama-base")))}


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    """{family: (f32 GGUF path, peft model with its adapter active, tokenizer)}."""
    out = {}
    for fam, run in runs.items():
        path = export.export_run(run, tmp_path_factory.mktemp(fam) / "agent.gguf", "f32", progress=False)
        cfg, adapter = export.read_run(run)
        model, tok = models.load(cfg, adapter_dir=adapter)
        out[fam] = (path, model.eval(), tok)
    return out


def chat_prompts(tok) -> list[list[int]]:
    """Planner and executor prompts as the agent builds them (prefixes and <sub_done> rule included)."""
    from envs.sokoban import SokobanConfig, SokobanEnv
    env = SokobanEnv(SokobanConfig())
    obs = env.reset(5)
    enc = _Encoder(tok)
    plan = enc.encode(planner.build_messages(PROMPTS, env.task, obs, 3), PROMPTS.planner_prefix)
    act = enc.encode(executor.build_messages(PROMPTS, env.task, ["Push the box up.", "Done."], 1,
                                             [("up", "You moved up.")], obs), PROMPTS.executor_prefix)
    return [plan, act, act[:-5] + tok.encode(" <sub_done>", add_special_tokens=False)]


class _Encoder(Policy):
    """Policy.encode without a model (encode only needs the tokenizer)."""

    def __init__(self, tok):
        self.tokenizer = tok


# -- the merge, by hand ------------------------------------------------------------------
def test_merged_weight_is_base_plus_scaled_BA(runs):
    run = runs["qwen2"]
    cfg, adapter = export.read_run(run)
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    lora = load_file(adapter / "adapter_model.safetensors")
    base = load_file(Path(models.model_path(cfg)) / "model.safetensors")
    name = "model.layers.1.self_attn.v_proj"
    A = lora[f"base_model.model.{name}.lora_A.weight"]  # (r, in)
    B = lora[f"base_model.model.{name}.lora_B.weight"]  # (out, r)
    W = base[f"{name}.weight"]  # (out, in)
    expected = W + (acfg["lora_alpha"] / acfg["r"]) * (B @ A)  # 8 / 4 = 2
    assert acfg["lora_alpha"] / acfg["r"] == 2.0
    assert (expected - W).abs().max() > 1e-2  # the adapter really moves this layer
    state, _, _ = export.merged_state(cfg, adapter)
    torch.testing.assert_close(state[f"{name}.weight"], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(state[f"{name}.bias"], base[f"{name}.bias"], rtol=0, atol=0)  # bias untouched
    torch.testing.assert_close(state["model.norm.weight"], base["model.norm.weight"], rtol=0, atol=0)


def test_gguf_holds_the_merged_weights(runs, exported):
    import gguf
    path, _, _ = exported["qwen2"]
    cfg, adapter = export.read_run(runs["qwen2"])
    state, _, _ = export.merged_state(cfg, adapter)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    v = torch.from_numpy(tensors["blk.1.attn_v.weight"].data.copy())  # Qwen2: written as is
    torch.testing.assert_close(v, state["model.layers.1.self_attn.v_proj.weight"], rtol=0, atol=0)
    assert "output.weight" not in tensors  # tied embeddings: llama.cpp reuses token_embd


def test_rope_permutation_pairs_dimensions_the_llama_cpp_way():
    # one head of dim 4: HF pairs rows (0, 2) and (1, 3); llama.cpp wants them adjacent
    w = torch.arange(4.0)[:, None]
    assert export.permute_rope(w, n_head=1).flatten().tolist() == [0.0, 2.0, 1.0, 3.0]


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2)
    cfg.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(export.UnsupportedModel, match="GPT2LMHeadModel"):
        export.family(cfg)
    with pytest.raises(ValueError, match="q3_x"):
        export.write_gguf({}, cfg, None, "/nonexistent/x.gguf", "q3_x")


# -- the file in llama.cpp ----------------------------------------------------------------
@pytest.mark.parametrize("fam", ["qwen2", "llama"])
def test_tokenisation_equals_hf(exported, fam):
    pytest.importorskip("llama_cpp")
    from himac.llamacpp import LlamaCppPolicy
    path, _, tok = exported[fam]
    assert export.verify_tokenizer(path, tok) == []
    lc = LlamaCppPolicy(path, n_ctx=1024)
    from himac.policy import AgentPolicy
    assert isinstance(lc, AgentPolicy)  # the protocol evaluation runs on
    hf = _Encoder(tok)
    env_msgs = planner.build_messages(PROMPTS, "Push the box.", __import__("envs").Obs("#@$.#"), 2)
    sub_done_msgs = executor.build_messages(PROMPTS, "t", ["a <sub_done> b"], 0, [], __import__("envs").Obs("x"))
    for msgs, prefix in ((env_msgs, PROMPTS.planner_prefix), (sub_done_msgs, PROMPTS.executor_prefix)):
        assert lc.encode(msgs, prefix) == hf.encode(msgs, prefix)
    ids = tok.encode(" <sub_done>", add_special_tokens=False)
    assert lc.decode(ids) == tok.decode(ids, skip_special_tokens=True) == " <sub_done>"


@pytest.mark.parametrize("fam", ["qwen2", "llama"])
def test_f32_logits_equal_transformers(exported, fam):
    pytest.importorskip("llama_cpp")
    from himac.llamacpp import LlamaCppPolicy
    path, model, tok = exported[fam]
    lc = LlamaCppPolicy(path, n_ctx=1024)
    for prompt in chat_prompts(tok):  # the third shares a prefix with the second: KV-cache reuse path
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([prompt])).logits[0, -1].float()  # (V,), adapter active
        got = torch.from_numpy(lc.logits(prompt))
        assert ref.std() > 0.1  # non-degenerate logits
        torch.testing.assert_close(got, ref, rtol=0, atol=5e-4)  # measured: ~7e-5; a wrong rope layout: ~3e-2


def test_answers_picked_from_choices_match_transformers(exported):
    """action_choices under llama.cpp: the same candidate tokens as transformers' tokenizer, the same greedy
    pick, and sampled answers that are always one candidate and a stop token."""
    pytest.importorskip("llama_cpp")
    from himac import choices
    from himac.llamacpp import LlamaCppPolicy
    path, model, tok = exported["qwen2"]
    lc, hf = LlamaCppPolicy(path, n_ctx=1024, seed=1), Policy(model, tok)
    texts = [" up", " down", " left", " right", " <sub_done>"]
    cands = choices.encode(lc.tokenize, texts)
    assert cands == choices.encode(hf.tokenize, texts)
    _, act, done = chat_prompts(tok)
    prompts = [act, done]
    greedy_lc = lc.generate(prompts, 8, 0.0, choices=[cands] * 2)
    greedy_hf = hf.generate(prompts, 8, 0.0, choices=[cands] * 2)
    assert [c.ids[:-1] for c in greedy_lc] == [c.ids[:-1] for c in greedy_hf]
    for c in lc.generate(prompts * 8, 8, 1.0, choices=[cands] * 16):
        assert c.ids[:-1] in cands and c.ids[-1] in lc.eos_ids


def test_blueprints_picked_from_choices_match_transformers(exported):
    """blueprint_choices under llama.cpp: multi-token plans that branch after a shared start ("1. Push the box
    up." or on to a second line); the same greedy plans as transformers, and every sampled one a candidate."""
    pytest.importorskip("llama_cpp")
    from envs.base import SerialPool
    from envs.sokoban import SPEC, SokobanConfig
    from himac.llamacpp import LlamaCppPolicy
    path, model, tok = exported["qwen2"]
    lc, hf = LlamaCppPolicy(path, n_ctx=1024, seed=1), Policy(model, tok)
    pool = SerialPool(SPEC, SokobanConfig(room_size=6))
    first = pool.reset([3, 4, 5])
    cfg = planner.PlannerConfig(blueprint_choices=True, max_subgoals=2, blueprint_max_tokens=4)

    def plans(policy, n, temperature):
        return [z for g in planner.generate(policy, SPEC.prompts, list(pool.tasks), first, cfg, n,
                                            temperature=temperature) for z in g]
    assert [z.subgoals for z in plans(lc, 1, 0.0)] == [z.subgoals for z in plans(hf, 1, 0.0)]
    drawn = plans(lc, 8, 1.0)
    assert all(tuple(z.subgoals) in {tuple(p) for p in SPEC.prompts.blueprint_choices} for z in drawn)
    assert len({tuple(z.subgoals) for z in drawn}) > 1


def test_one_prefill_of_many_prompts_equals_transformers(exported):
    """One prefill call of several prompts (some borrowing a prefix cached by an earlier call or
    by an earlier prompt of the same call, one longer than the rest): each gets its own logits."""
    pytest.importorskip("llama_cpp")
    from himac.llamacpp import LlamaCppPolicy
    path, model, tok = exported["qwen2"]
    lc = LlamaCppPolicy(path, n_ctx=2048, n_seq=4)
    plan, act, done = chat_prompts(tok)
    long = act + tok.encode(" left right" * 40, add_special_tokens=False)
    calls = [[plan, act], [done, act[:-3], long, plan]]  # 2nd call: prefixes cached by the 1st, borrowed
    for prompts in calls:
        got = lc._slots.prefill(prompts)
        for prompt, row in zip(prompts, got):
            with torch.no_grad():
                ref = model(input_ids=torch.tensor([prompt])).logits[0, -1].float()  # (V,)
            torch.testing.assert_close(torch.from_numpy(row), ref, rtol=0, atol=5e-4)
    assert lc._slots.evaluated < sum(len(p) for c in calls for p in c)  # the cached prefixes were reused


def test_a_new_prompt_takes_a_free_slot_before_a_cached_one(exported):
    """A prompt that shares nothing with any cached sequence goes to an empty slot (the least recently used
    among equals), not over the sequence cached last: that one is still whole for its next prompt."""
    pytest.importorskip("llama_cpp")
    from himac.llamacpp import LlamaCppPolicy
    lc = LlamaCppPolicy(exported["qwen2"][0], n_ctx=1024, n_seq=2)
    a, b = [5, 6, 7, 8, 9] * 4, [11, 12, 13] * 4  # no common first token
    lc.prefill([a])
    lc.prefill([b])
    before = lc._slots.evaluated
    lc.prefill([a])
    assert lc._slots.evaluated - before == 1  # only its last token (for its logits): the rest was still cached


def test_4bit_run_exports_the_weights_it_was_trained_on(tmp_path):
    """base="trained": a QLoRA run is merged into its NF4-dequantised weights, so llama.cpp
    computes what the training policy (NF4 base + LoRA) computed."""
    pytest.importorskip("llama_cpp")
    from himac.llamacpp import LlamaCppPolicy
    run = make_run(tmp_path / "run", load_in_4bit=True)
    cfg, adapter = export.read_run(run)
    assert cfg.load_in_4bit
    model, tok = models.load(cfg, adapter_dir=adapter)
    prompt = chat_prompts(tok)[0]
    with torch.no_grad():
        ref = model.eval()(input_ids=torch.tensor([prompt])).logits[0, -1].float()  # (V,)
    trained = LlamaCppPolicy(export.export_run(run, tmp_path / "t.gguf", "f32", progress=False), n_ctx=1024)
    original = LlamaCppPolicy(export.export_run(run, tmp_path / "o.gguf", "f32", "original", progress=False),
                              n_ctx=1024)
    torch.testing.assert_close(torch.from_numpy(trained.logits(prompt)), ref, rtol=0, atol=5e-4)
    assert (torch.from_numpy(original.logits(prompt)) - ref).abs().max() > 5e-3  # NF4 rounding is visible


def test_quantised_exports_load_and_stay_close(runs, exported, tmp_path):
    pytest.importorskip("llama_cpp")
    import gguf

    from himac.llamacpp import LlamaCppPolicy
    path, _, tok = exported["qwen2"]
    prompt = chat_prompts(tok)[0]
    ref = LlamaCppPolicy(path, n_ctx=1024).logits(prompt)
    for quant, ftype, min_corr in (("bf16", 32, 0.999), ("f16", 1, 0.999), ("q8_0", 7, 0.99), ("q4_0", 2, 0.8),
                                    ("q4_k_m", 15, 0.8)):
        out = export.export_run(runs["qwen2"], tmp_path / f"{quant}.gguf", quant, progress=False)
        assert gguf.GGUFReader(out).fields["general.file_type"].contents() == ftype
        got = LlamaCppPolicy(out, n_ctx=1024).logits(prompt)
        corr = float(torch.corrcoef(torch.stack([torch.from_numpy(ref), torch.from_numpy(got)]))[0, 1])
        assert corr > min_corr, (quant, corr)
    assert (tmp_path / "q4_k_m.gguf").stat().st_size < (tmp_path / "f16.gguf").stat().st_size
    assert not list(tmp_path.glob("*.tmp"))  # the f16 intermediate of q4_k_m is gone


def test_quantised_prompts_beside_other_sequences_get_their_own_logits(runs, exported, tmp_path):
    """A bf16 GGUF: prompts prefilled beside other cached sequences, some borrowing their prefixes (a copy
    of another sequence's stream, its tail dropped), get the logits each has alone."""
    pytest.importorskip("llama_cpp")
    from himac.llamacpp import LlamaCppPolicy
    _, _, tok = exported["qwen2"]
    lc = LlamaCppPolicy(export.export_run(runs["qwen2"], tmp_path / "bf16.gguf", "bf16", progress=False),
                        n_ctx=2048, n_seq=4)
    plan, act, done = chat_prompts(tok)
    long = act + tok.encode(" left right" * 40, add_special_tokens=False)
    alone = {}
    for prompt in (plan, act, done, long):
        lc.clear_cache()
        alone[tuple(prompt)] = lc.logits(prompt)
    lc.clear_cache()
    for prompts in ([plan, act], [done, long, plan]):  # the 2nd call borrows the 1st's prefixes
        for prompt, row in zip(prompts, lc.prefill(prompts)):
            # measured: 0; attending to another sequence's tokens moves these logits (std 0.15) by 0.05-0.4
            assert abs(row - alone[tuple(prompt)]).max() < 1e-4
    assert lc._slots.evaluated < 2 * sum(map(len, alone))  # prefixes were reused, not all recomputed


def test_streams_grow_for_a_long_prompt_and_keep_the_adapter(runs, exported, tmp_path):
    """A prompt past the first 512-token streams rebuilds the context with longer ones: its logits still
    equal transformers' and the LoRA adapter is applied again; n_ctx still bounds a prompt + its answer."""
    pytest.importorskip("llama_cpp")
    from himac.llamacpp import LlamaCppPolicy
    merged_path, model, tok = exported["qwen2"]
    cfg, adapter = export.read_run(runs["qwen2"])
    base_state, hf_config, _ = export.merged_state(cfg, None)
    base = export.write_gguf(base_state, hf_config, tok, tmp_path / "base.gguf", "f32", progress=False)
    with_lora = LlamaCppPolicy(base, n_ctx=1024, lora_path=export.write_lora_gguf(adapter, hf_config,
                                                                                  tmp_path / "lora.gguf"))
    merged = LlamaCppPolicy(merged_path, n_ctx=1024)
    _, act, _ = chat_prompts(tok)
    long = act + tok.encode(" left right" * 400, add_special_tokens=False)[:700 - len(act)]
    assert len(long) == 700
    with_lora.logits(act)
    assert with_lora._slots.size == 512
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([long])).logits[0, -1].float()  # (V,), adapter active
    got = with_lora.logits(long)
    assert with_lora._slots.size == 1024
    merged.prefill([act], room=700 - len(act))  # room for decode_step: the streams grow before it, not during
    assert merged._slots.size == 1024
    for _ in range(700 - len(act)):
        merged.decode_step([(0, 7)])
    torch.testing.assert_close(torch.from_numpy(merged.logits(long)), ref, rtol=0, atol=5e-4)
    assert abs(got - merged.logits(long)).max() < 1e-3  # the adapter survived the rebuild
    with pytest.raises(ValueError, match="n_ctx=1024"):
        with_lora.generate([long], 400, 0.0)


@pytest.mark.parametrize("fam", ["qwen2", "llama"])
def test_lora_gguf_on_the_base_equals_the_merged_model(runs, exported, fam, tmp_path):
    pytest.importorskip("llama_cpp")
    from himac.llamacpp import LlamaCppPolicy
    merged_path, _, tok = exported[fam]
    cfg, adapter = export.read_run(runs[fam])
    base_state, hf_config, _ = export.merged_state(cfg, None)  # a fresh adapter has B = 0: the base
    base = export.write_gguf(base_state, hf_config, tok, tmp_path / "base.gguf", "f32", progress=False)
    lora = export.write_lora_gguf(adapter, hf_config, tmp_path / "lora.gguf")
    prompt = chat_prompts(tok)[1]
    with_lora = LlamaCppPolicy(base, n_ctx=1024, lora_path=lora).logits(prompt)
    merged = LlamaCppPolicy(merged_path, n_ctx=1024).logits(prompt)
    plain = LlamaCppPolicy(base, n_ctx=1024).logits(prompt)
    assert abs(merged - plain).max() > 0.05  # the adapter matters
    assert abs(with_lora - merged).max() < 1e-3


def test_export_tool_end_to_end(runs, tmp_path):
    out = tmp_path / "agent.gguf"
    proc = subprocess.run([sys.executable, "tools/export_gguf.py", "--checkpoint", str(runs["llama"]), "--out",
                           str(out), "--quant", "f16"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.stat().st_size > 100_000
    try:
        import llama_cpp  # noqa: F401
        assert "tokenizer verified" in proc.stdout
    except ImportError:
        pass
    bad = subprocess.run([sys.executable, "tools/export_gguf.py", "--checkpoint", str(runs["llama"]), "--out",
                          str(tmp_path / "x.gguf"), "--quant", "q3"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "'q3'" in bad.stderr and "Traceback" not in bad.stderr
    missing = subprocess.run([sys.executable, "tools/export_gguf.py", "--checkpoint", str(tmp_path / "none"),
                              "--out", str(tmp_path / "y.gguf")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "not a run directory" in missing.stderr


def test_a_role_adapter_run_exports_the_base_and_each_roles_lora_and_runs_them_in_their_roles(tmp_path):
    """role_adapters: one GGUF cannot hold two policies; the base plus one LoRA GGUF per role does, and
    llama.cpp applies each in its role (the same logits as transformers with that adapter active)."""
    pytest.importorskip("llama_cpp")
    from himac.evaluate import load_backend
    run = make_run(tmp_path / "roles", role_adapters=True)
    out = export.export_run(run, tmp_path / "agent.gguf", "f32", progress=False)
    loras = export.role_lora_paths(out)
    assert sorted(loras) == ["executor", "planner"] and all(p.is_file() for p in loras.values())
    with pytest.raises(ValueError, match="--lora-out"):  # one adapter alone would be half the agent
        export.export_run(run, tmp_path / "other.gguf", "f32", lora_out=tmp_path / "x.gguf", progress=False)
    cfg, adapter = export.read_run(run)
    model, tok = models.load(cfg, adapter_dir=adapter)
    hf = Policy(model.eval(), tok)
    full = load_config(None, {**RunDir(run, create=False).read_config()})
    for cpp in (load_backend("llamacpp", str(tmp_path / "agent.gguf"), full),  # the base alone: no roles
                load_backend("llamacpp", str(run), full)):  # the run: exported on first use, roles applied
        prompt, want, got = chat_prompts(tok)[0], {}, {}
        for role in ("executor", "planner", "executor"):  # one prompt again and again: no cached prefix
            with hf.role(role), torch.no_grad():       # may leak from one role's adapter into the other's
                want[role] = model(input_ids=torch.tensor([prompt])).logits[0, -1].float().numpy()
            with as_role(cpp, role):
                got[role] = cpp.logits(prompt)
        if cpp.path == out:
            assert abs(got["planner"] - got["executor"]).max() == 0.0  # no adapter at all
            continue
        assert abs(want["planner"] - want["executor"]).max() > 0.05  # the two adapters differ
        for role in want:
            assert abs(got[role] - want[role]).max() < 1e-3, role
