"""Tiny random models, for tests only: they know nothing until trained.

- `tiny` (`tiny?hidden=128` for a wider one): a randomly initialised 2-layer Qwen2 with a byte-level BPE tokenizer
  (600 tokens) trained in-process on the environments' prompt text, ChatML template;
- `tiny-vl`: the same for a vision-language model, a random tiny Qwen2.5-VL with a
  1-block vision tower, Qwen's vision special tokens, a ChatML template that
  understands image parts, and a saved image processor: the whole image path
  (himac/vision.py) runs on a CPU without a download.

Each is written once into the cache under a digest of everything that shapes it
(the corpus, width, seed), and loaded by models.load through the same
`from_pretrained` call as a hub model, so 4-bit and LoRA take one code path. The
production loading path (models.py) only asks `parse` and `materialise` by name.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from envs import REGISTRY
from envs.base import ConfigError
from envs.cache import atomic_dir, cache_dir
from himac.vision import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


VL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


TINY_ENVS = ("sokoban", "alfworld")  # fixed: a new env must not change the test model under every other test


def tiny_corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: these envs' prompts plus typical answers (byte-level BPE:
    any other text still tokenises, only less compactly)."""
    texts = []
    for name in TINY_ENVS:
        p = REGISTRY[name].prompts
        texts += [p.planner_system, p.planner_user, p.executor_system, p.executor_user, p.flat_system, p.flat_user,
                  p.planner_prefix, p.executor_prefix, p.flat_prefix]
    texts += ["up", "down", "left", "right", "<sub_done>", "1. ", "2. ", "3. ", "4. ",
              "Push the box onto the target.", "Move next to the box.", "Push the box up.",
              "#####\n#_.$#\n#@__#\n#####", "You moved up.", "You pushed a box left.",
              "Invalid action; nothing happened.", "Deadlock: a box is stuck in a corner."]
    return texts * 4


def tiny_tokenizer(specials: list[str], chat_template: str):
    """A byte-level BPE (600 tokens) trained on `tiny_corpus()`, with ChatML specials: tests only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(tiny_corpus(), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token=None, unk_token=None)
    tok.chat_template = chat_template
    return tok


def build_tiny(path: Path, hidden: int, seed: int) -> None:
    """Write a random tiny Qwen2 + a ChatML BPE tokenizer trained on `tiny_corpus()`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    tok = tiny_tokenizer(TINY_SPECIALS, CHATML_TEMPLATE)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=4096, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)


def materialise_tiny(hidden: int, seed: int) -> Path:
    key = json.dumps({"corpus": tiny_corpus(), "hidden": hidden, "seed": seed, "v": 1})
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return atomic_dir(cache_dir() / f"tiny-{digest}", lambda tmp: build_tiny(tmp, hidden, seed),
                      marker="config.json")


def build_tiny_vl(path: Path, hidden: int, seed: int) -> None:
    """Write a random tiny Qwen2.5-VL, its tokenizer (tiny BPE + vision specials) and image processor."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    specials = TINY_SPECIALS + [VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]
    tok = tiny_tokenizer(specials, VL_CHAT_TEMPLATE)
    ids = {s: tok.convert_tokens_to_ids(s) for s in specials}
    heads = 4
    half = hidden // heads // 2  # rotary half-dim, split over (time, height, width) as Qwen's 16/24/24 of 64
    mrope = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope},
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[0]),
        image_token_id=ids[IMAGE_PAD], video_token_id=ids[VIDEO_PAD], vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END], tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    from transformers import Qwen2VLImageProcessorPil
    Qwen2VLImageProcessorPil(patch_size=14, temporal_patch_size=2, merge_size=2,
                             min_pixels=56 * 56, max_pixels=28 * 28 * 256).save_pretrained(path)


def materialise_tiny_vl(hidden: int, seed: int) -> Path:
    key = json.dumps({"corpus": tiny_corpus(), "hidden": hidden, "seed": seed, "vl": 1})
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return atomic_dir(cache_dir() / f"tiny-vl-{digest}", lambda tmp: build_tiny_vl(tmp, hidden, seed),
                      marker="config.json")


TINY = {"tiny": materialise_tiny, "tiny-vl": materialise_tiny_vl}  # name -> (hidden, seed) -> model directory
TINY_HIDDEN = 64


def parse(name: str) -> tuple[str, int] | None:
    """'tiny' -> ('tiny', 64), 'tiny?hidden=128' -> ('tiny', 128), 'tiny-vl' likewise; None for any other model
    name. A bad width is a ConfigError naming the key."""
    base, _, query = name.partition("?")
    if base not in TINY:
        return None
    if not query:
        return base, TINY_HIDDEN
    key, _, value = query.partition("=")
    if key != "hidden" or not value.isdigit() or int(value) % 16 or not int(value):
        raise ConfigError(f"config key 'model' = {name!r}: a tiny model takes '?hidden=N', N a positive "
                          "multiple of 16")
    return base, int(value)


def materialise(name: str) -> Path:
    """The cached directory of tiny model `name` (built on first use; weights seeded by 0)."""
    base, hidden = parse(name)
    return TINY[base](hidden, 0)
