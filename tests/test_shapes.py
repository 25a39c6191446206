"""Shape models (himac/shapes.py): the published Qwen configs, their parameter counts, and a cut-down
shape through the production loader (LoRA, NF4, an image) to logits over its vocabulary.

The expected numbers here are typed in again from the hub's config.json files and model cards, on
purpose: a value mistyped in shapes.py must not be able to agree with itself."""
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from himac import models, shapes
from himac.config import ConfigError
from himac.policy import Policy, chat_ids

# name -> (layers, hidden, intermediate, heads, KV heads, vocab, tied, max positions), from each config.json
PUBLISHED = {
    "qwen2.5-1.5b-instruct": (28, 1536, 8960, 12, 2, 151936, True, 32768),
    "qwen2.5-7b-instruct": (28, 3584, 18944, 28, 4, 152064, False, 32768),
    "qwen2.5-vl-3b-instruct": (36, 2048, 11008, 16, 2, 151936, True, 128000),
    "qwen2.5-vl-7b-instruct": (28, 3584, 18944, 28, 4, 152064, False, 128000),
}
# name -> (parameters, of which not in the embedding and head), model cards / hub pages:
# 1.5B "1.54B (1.31B non-embedding)", 7B "7.61B (6.53B non-embedding)", VL-3B "3.75B", VL-7B "8.29B";
# they round or cut to 3 digits (7B: 7.6156B is "7.61B"), so a count may differ by one in the last digit
COUNTS = {"qwen2.5-1.5b-instruct": (1.54e9, 1.31e9), "qwen2.5-7b-instruct": (7.61e9, 6.53e9),
          "qwen2.5-vl-3b-instruct": (3.75e9, None), "qwen2.5-vl-7b-instruct": (8.29e9, None)}
CUT = "shape:qwen2.5-1.5b-instruct?layers=2&vocab=2048"
CUT_VL = "shape:qwen2.5-vl-3b-instruct?layers=1&vision_layers=1&vocab=2048"


@pytest.mark.parametrize("name", PUBLISHED)
def test_configs_are_the_published_ones(name):
    cfg = shapes.hf_config(f"shape:{name}")
    text = cfg.get_text_config()
    layers, hidden, inter, heads, kv, vocab, tied, positions = PUBLISHED[name]
    assert (text.num_hidden_layers, text.hidden_size, text.intermediate_size, text.num_attention_heads,
            text.num_key_value_heads, text.vocab_size, text.max_position_embeddings) == (
        layers, hidden, inter, heads, kv, vocab, positions)
    assert cfg.tie_word_embeddings is tied
    assert text.rope_parameters["rope_theta"] == 1e6 and text.rms_norm_eps == 1e-6
    if "vl" in name:
        v = cfg.vision_config
        assert (v.depth, v.hidden_size, v.intermediate_size, v.num_heads, v.out_hidden_size, v.patch_size,
                v.spatial_merge_size, v.window_size, v.fullatt_block_indexes) == (
            32, 1280, 3420, 16, hidden, 14, 2, 112, [7, 15, 23, 31])
        assert text.rope_parameters["mrope_section"] == [16, 24, 24]
        # Qwen's vision token ids, which the stand-in tokenizer puts at the same places
        assert (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id) == (
            151655, 151656, 151652, 151653)
    assert text.eos_token_id == 151645  # <|im_end|>


@pytest.mark.parametrize("name", PUBLISHED)
def test_parameter_counts_match_the_model_cards(name):
    model = shapes.meta_model(f"shape:{name}")  # meta device: no memory
    total = sum(p.numel() for p in model.parameters())
    published, body = COUNTS[name]
    assert abs(total - published) <= 0.01e9, f"{total / 1e9:.4f}B against the published {published / 1e9}B"
    if body is not None:  # the cards round to 3 digits; the non-embedding count also pins vocab x tied
        embedding = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" in n or "lm_head" in n)
        assert abs(total - embedding - body) <= 0.01e9


def test_special_token_ids_are_qwens():
    ids = shapes.token_ids(151936)
    assert (ids["<|endoftext|>"], ids["<|im_start|>"], ids["<|im_end|>"], ids["<|vision_start|>"],
            ids["<|image_pad|>"], ids["<|file_sep|>"]) == (151643, 151644, 151645, 151652, 151655, 151664)
    assert shapes.token_ids(152064) == ids  # the 7B's longer embedding pads the same tokenizer
    assert max(shapes.token_ids(2048).values()) == 2047


def test_names_and_overrides_are_checked():
    assert models.is_shape("shape:qwen2.5-1.5b-instruct") and not models.is_shape("Qwen/Qwen2.5-1.5B-Instruct")
    for bad, why in [("shape:qwen2.5-3b", "no shape"), ("shape:qwen2.5-1.5b-instruct?depth=2", "unknown override"),
                     ("shape:qwen2.5-1.5b-instruct?vision_layers=1", "unknown override"),
                     ("shape:qwen2.5-1.5b-instruct?vocab=512", "vocab must be"),
                     ("shape:qwen2.5-1.5b-instruct?layers", "key=value")]:
        with pytest.raises(ConfigError, match=f"config key 'model'.*{why}"):
            models.ModelConfig(model=bad)


def test_weights_are_seeded_per_tensor():
    a = shapes._draw("model.layers.0.mlp.up_proj.weight", torch.Size([64, 32]), 0.02, seed=0)
    assert torch.equal(a, shapes._draw("model.layers.0.mlp.up_proj.weight", torch.Size([64, 32]), 0.02, seed=0))
    assert not torch.equal(a, shapes._draw("model.layers.0.mlp.up_proj.weight", torch.Size([64, 32]), 0.02, seed=1))
    assert not torch.equal(a, shapes._draw("model.layers.1.mlp.up_proj.weight", torch.Size([64, 32]), 0.02, seed=0))
    assert a.dtype == torch.bfloat16 and 0.015 < a.float().std() < 0.025
    assert shapes._draw("model.norm.weight", torch.Size([8]), 0.02, 0).eq(1).all()
    assert shapes._draw("model.layers.0.self_attn.q_proj.bias", torch.Size([8]), 0.02, 0).eq(0).all()


@pytest.mark.parametrize("four_bit", [False, True], ids=["lora", "nf4+lora"])
def test_a_cut_shape_loads_like_a_hub_model_and_gives_logits_over_its_vocabulary(four_bit):
    with pytest.warns(UserWarning, match=shapes.SHAPE_NOTE):
        model, tok = models.load(models.ModelConfig(model=CUT, lora_r=8, load_in_4bit=four_bit,
                                                    device="cpu"))
    base = model.get_base_model()
    layer = base.model.layers[0]
    # the full shape's widths, two layers: q 1536 -> 1536, k/v 1536 -> 2 x 128, MLP 8960
    assert len(base.model.layers) == 2 and base.config.hidden_size == 1536
    assert layer.mlp.up_proj.base_layer.out_features == 8960 and layer.self_attn.k_proj.base_layer.out_features == 256
    if four_bit:
        import bitsandbytes as bnb
        assert isinstance(layer.mlp.up_proj.base_layer, bnb.nn.Linear4bit)
    # every weight was written: a key missing from the shards would load as a silently re-initialised tensor
    path = Path(models.model_path(models.ModelConfig(model=CUT)))
    written = set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"])
    assert written == set(shapes.meta_model(CUT).state_dict()) - {"lm_head.weight"}
    # the stand-in tokenizer fits the vocabulary and puts Qwen's specials where the config says
    assert len(tok) == 2048 and tok.convert_tokens_to_ids("<|im_end|>") == base.config.eos_token_id
    ids = chat_ids(tok, [{"role": "system", "content": "You play Sokoban."}, {"role": "user", "content": "Push it."}])
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    out = model(input_ids=torch.tensor([ids]))
    assert out.logits.shape == (1, len(ids), 2048) and torch.isfinite(out.logits).all()
    out.logits[0, -1].logsumexp(-1).backward()
    lora = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora and all(p.requires_grad for p in lora) and any(p.grad is not None for p in lora)
    assert isinstance(tok.decode(torch.randint(0, 2048, (16,)).tolist()), str)  # any sampled id decodes


def test_a_cut_shape_exports_to_gguf_and_llama_cpp_agrees_with_transformers(tmp_path):
    """The path bench_eval.py takes at the users' size: a shape (hub layout, stand-in tokenizer) through the
    GGUF exporter (architecture, tokenizer check) into llama.cpp, whose logits must be transformers' own."""
    pytest.importorskip("llama_cpp")
    from himac import export
    from himac.llamacpp import LlamaCppPolicy
    cfg = models.ModelConfig(model=CUT, device="cpu", load_in_4bit=False)
    config = json.loads((Path(models.model_path(cfg)) / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]  # as the hub's file says: the exporter reads it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state, hf_config, tok = export.merged_state(cfg, None)
        path = export.write_gguf(state, hf_config, tok, tmp_path / "cut.gguf", "f32", progress=False)
        model, _ = models.load(cfg)  # LoRA B starts at 0: the base model
    assert export.verify_tokenizer(path, tok) == []
    lc = LlamaCppPolicy(path, n_ctx=512)
    prompt = chat_ids(tok, [{"role": "user", "content": "Push the box left."}])
    assert lc.encode([{"role": "user", "content": "Push the box left."}], "") == prompt
    with torch.no_grad():
        ref = model.float()(input_ids=torch.tensor([prompt])).logits[0, -1].float()  # (V,)
    got = torch.from_numpy(lc.logits(prompt))
    assert got.shape == ref.shape == (2048,) and ref.std() > 0.1
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-3)


def test_a_cut_vl_shape_sees_a_sokoban_frame():
    from envs.sokoban import parse_room, render_rgb
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model, tok = models.load(models.ModelConfig(model=CUT_VL, lora_r=8, device="cpu"))
    policy = Policy(model, tok, gen_batch_size=2)
    base = model.get_base_model()
    assert base.config.vision_config.hidden_size == 1280 and base.config.get_text_config().hidden_size == 2048
    room = np.asarray(render_rgb(*parse_room("######\n#@_$.#\n#____#\n#____#\n#____#\n######")))  # 96 x 96
    ids, pixels = policy.encode_images([{"role": "system", "content": "You play Sokoban."},
                                        {"role": "user", "content": "Which way?"}], "", [room])
    assert ids.count(base.config.image_token_id) == 9  # 84 x 84 after resizing: 6 x 6 patches, 2 x 2 merged
    torch.manual_seed(0)
    (out,) = policy.generate([ids], 3, 1.0, images=[pixels])
    assert 1 <= len(out.ids) <= 3 and all(0 <= i < 2048 for i in out.ids)


def test_reports_say_a_shape_model_is_for_measurement_only(tmp_path):
    from himac import reporting
    from himac.rundir import RunDir
    run, cfg = RunDir(tmp_path), {"model": CUT, "env": "sokoban", "iterations": 1}
    assert shapes.SHAPE_NOTE in reporting.model_card(run, cfg, 0, "base")
    assert shapes.SHAPE_NOTE in reporting.run_summary(run, cfg, 1.0)
    assert shapes.SHAPE_NOTE not in reporting.model_card(run, dict(cfg, model="tiny"), 0, "base")
