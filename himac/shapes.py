"""Shape models: the exact architectures users train (Qwen2.5-1.5B/7B-Instruct, Qwen2.5-VL-3B/7B-Instruct),
with seeded random weights, for measuring memory and speed where the hub weights cannot be fetched.

`model: shape:qwen2.5-1.5b-instruct` builds the published architecture from the config values
below (copied from each hub repo's config.json; the source of each value is on its line), writes
it once into the cache as an ordinary model directory (config.json, sharded bf16 safetensors as
the hub stores them, a tokenizer, a generation config, for VL an image processor) and is then
loaded by `models.load` through the same `from_pretrained` call as a hub model: NF4, LoRA,
gradient checkpointing and image inputs take the hub's code path. Memory and speed depend on
shapes, not on weight values, so a shape model measures what the real one would; it knows
nothing, and every report that uses one says SHAPE_NOTE.

A scaled-down variant keeps every width and cuts depth or vocabulary:
`shape:qwen2.5-1.5b-instruct?layers=2&vocab=2048`, `shape:qwen2.5-vl-3b-instruct?layers=1&vision_layers=1`.

Weights: every tensor of two or more dimensions is N(0, initializer_range) (0.02, the models' own
init), 1-D weights (the RMSNorms) are ones and biases zeros; each tensor is drawn from its own
generator seeded by (seed, name), so the result does not depend on the order or the thread that
draws it. They are drawn in parallel threads, shard by shard (at most SHARD_BYTES held at once).
Cost: the 1.54B shape takes a minute or two to draw once and 3.1 GB of disk; VL-3B takes
7.5 GB, 7B 15.2 GB (docs/shapes.md). Loading in float32 on the CPU then holds 4 bytes a parameter (6.2 GB for
1.5B), as a hub model would.

Stand-in tokenizer: a byte-level BPE of 600 tokens trained on the envs' prompt text (himac/tiny.py's
corpus), padded with decode-only filler tokens (letter strings that no merge produces) to the real
tokenizer's 151,665 entries, then Qwen2.5's 22 special tokens at their real ids (151643 <|endoftext|>,
151645 <|im_end|>, 151655 <|image_pad|>, ...). Ids the random weights sample therefore decode to
pseudo-words, and the 271 ids between the tokenizer and the padded embedding (151,665..151,935)
decode to nothing, as in Qwen's own tokenizer. It writes ~3.3 characters a token on a Sokoban
prompt, a little more tokens than Qwen's ~4 on English text: prompts are, if anything, longer
than the real ones.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import string
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import parse_qsl

import torch

from envs.cache import atomic_dir, cache_dir
from himac.config import ConfigError
from himac.tiny import CHATML_TEMPLATE, VL_CHAT_TEMPLATE, tiny_corpus

SHAPE_NOTE = "shape model: random weights, for measurement only"
PREFIX = "shape:"
SHARD_BYTES = 2 ** 30

# Qwen2.5's special tokens in id order from 151643 (tokenizer_config.json "added_tokens_decoder" of every
# Qwen2.5 and Qwen2.5-VL repo); 151,643 ordinary BPE tokens come before them, 151,665 entries in all.
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
                 "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                 "<|repo_name|>", "<|file_sep|>"]
QWEN_TOKENS = 151_665
MIN_VOCAB = 1024  # the stand-in's 600 BPE tokens and 22 specials, with room to spare

# Published config.json values, text models. "1.5B:" = Qwen/Qwen2.5-1.5B-Instruct/config.json,
# "7B:" = Qwen/Qwen2.5-7B-Instruct/config.json. Parameter counts: the model cards ("Number of
# Parameters: 1.54B", "7.61B"); tests/test_shapes.py recounts them on the meta device.
QWEN25_1P5B = dict(
    hidden_size=1536,  # 1.5B: "hidden_size": 1536
    intermediate_size=8960,  # 1.5B: "intermediate_size": 8960
    num_hidden_layers=28,  # 1.5B: "num_hidden_layers": 28
    num_attention_heads=12,  # 1.5B: "num_attention_heads": 12
    num_key_value_heads=2,  # 1.5B: "num_key_value_heads": 2
    vocab_size=151936,  # 1.5B: "vocab_size": 151936 (the 151,665-token tokenizer, padded)
    tie_word_embeddings=True,  # 1.5B: "tie_word_embeddings": true
    max_position_embeddings=32768,  # 1.5B: "max_position_embeddings": 32768
    rms_norm_eps=1e-6,  # 1.5B: "rms_norm_eps": 1e-06
    rope_parameters={"rope_type": "default", "rope_theta": 1e6},  # 1.5B: "rope_theta": 1000000.0
    sliding_window=32768, max_window_layers=21, use_sliding_window=False,  # 1.5B: the same three keys
    hidden_act="silu", initializer_range=0.02, attention_dropout=0.0,  # 1.5B: the same three keys
)
QWEN25_7B = dict(
    hidden_size=3584,  # 7B: "hidden_size": 3584
    intermediate_size=18944,  # 7B: "intermediate_size": 18944
    num_hidden_layers=28,  # 7B: "num_hidden_layers": 28
    num_attention_heads=28,  # 7B: "num_attention_heads": 28
    num_key_value_heads=4,  # 7B: "num_key_value_heads": 4
    vocab_size=152064,  # 7B: "vocab_size": 152064 (not 151936: the 7B's embedding is padded further)
    tie_word_embeddings=False,  # 7B: "tie_word_embeddings": false
    max_position_embeddings=32768,  # 7B: "max_position_embeddings": 32768
    rms_norm_eps=1e-6,  # 7B: "rms_norm_eps": 1e-06
    rope_parameters={"rope_type": "default", "rope_theta": 1e6},  # 7B: "rope_theta": 1000000.0
    sliding_window=131072, max_window_layers=28, use_sliding_window=False,  # 7B: the same three keys
    hidden_act="silu", initializer_range=0.02, attention_dropout=0.0,  # 7B: the same three keys
)

# Vision-language models: "VL-3B:" = Qwen/Qwen2.5-VL-3B-Instruct/config.json, "VL-7B:" =
# Qwen/Qwen2.5-VL-7B-Instruct/config.json (the hub files keep the text keys at the top level;
# transformers >= 4.53 nests them under text_config, as here). Counts: the hub pages' 3.75B and 8.29B.
QWEN25_VL_VISION = dict(  # VL-3B and VL-7B: the same "vision_config" but for out_hidden_size
    depth=32,  # "depth": 32
    hidden_size=1280,  # "hidden_size": 1280
    intermediate_size=3420,  # "intermediate_size": 3420
    num_heads=16,  # "num_heads": 16
    patch_size=14, temporal_patch_size=2, spatial_merge_size=2,  # "patch_size": 14, ... 2, ... 2
    window_size=112,  # "window_size": 112
    fullatt_block_indexes=[7, 15, 23, 31],  # "fullatt_block_indexes": [7, 15, 23, 31]
    tokens_per_second=2, in_channels=3, hidden_act="silu", initializer_range=0.02,
)
QWEN25_VL_3B_TEXT = dict(
    hidden_size=2048,  # VL-3B: "hidden_size": 2048
    intermediate_size=11008,  # VL-3B: "intermediate_size": 11008
    num_hidden_layers=36,  # VL-3B: "num_hidden_layers": 36
    num_attention_heads=16,  # VL-3B: "num_attention_heads": 16
    num_key_value_heads=2,  # VL-3B: "num_key_value_heads": 2
    vocab_size=151936,  # VL-3B: "vocab_size": 151936
    tie_word_embeddings=True,  # VL-3B: "tie_word_embeddings": true (a top-level key of the VL config)
    max_position_embeddings=128000,  # VL-3B: "max_position_embeddings": 128000
    rms_norm_eps=1e-6,  # VL-3B: "rms_norm_eps": 1e-06
    rope_parameters={"rope_type": "default", "rope_theta": 1e6,  # VL-3B: "rope_theta": 1000000.0,
                     "mrope_section": [16, 24, 24]},  # "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}
    sliding_window=32768, max_window_layers=70, use_sliding_window=False,  # VL-3B: the same three keys
    hidden_act="silu", initializer_range=0.02, attention_dropout=0.0,
)
QWEN25_VL_7B_TEXT = dict(
    QWEN25_VL_3B_TEXT,
    hidden_size=3584, intermediate_size=18944,  # VL-7B: "hidden_size": 3584, "intermediate_size": 18944
    num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,  # VL-7B: 28, 28, 4
    vocab_size=152064, max_window_layers=28,  # VL-7B: "vocab_size": 152064, "max_window_layers": 28
    tie_word_embeddings=False,  # VL-7B: "tie_word_embeddings": false
)

# name -> (architecture, text config values, vision config or None, published parameter count)
SHAPES = {
    "qwen2.5-1.5b-instruct": ("qwen2", QWEN25_1P5B, None, 1.54e9),
    "qwen2.5-7b-instruct": ("qwen2", QWEN25_7B, None, 7.61e9),
    "qwen2.5-vl-3b-instruct": ("qwen2_5_vl", QWEN25_VL_3B_TEXT,
                               dict(QWEN25_VL_VISION, out_hidden_size=2048), 3.75e9),  # VL-3B: "out_hidden_size": 2048
    "qwen2.5-vl-7b-instruct": ("qwen2_5_vl", QWEN25_VL_7B_TEXT,
                               dict(QWEN25_VL_VISION, out_hidden_size=3584), 8.29e9),  # VL-7B: "out_hidden_size": 3584
}
OVERRIDES = {"layers": "num_hidden_layers", "vision_layers": "depth", "vocab": "vocab_size"}
# preprocessor_config.json of both VL repos: the pixel bounds; patch, temporal patch and merge as in vision_config
IMAGE_PROCESSOR = dict(min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2, merge_size=2)


def is_shape(name: str) -> bool:
    return name.startswith(PREFIX)


def parse(name: str) -> tuple[str, dict[str, int]]:
    """'shape:NAME?layers=2&vocab=2048' -> ('NAME', {'layers': 2, 'vocab': 2048}); a bad name is a ConfigError."""
    base, _, query = name[len(PREFIX):].partition("?")
    if base not in SHAPES:
        raise ConfigError(f"config key 'model' = {name!r}: no shape {base!r}; shapes: {', '.join(SHAPES)}")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ConfigError(f"config key 'model' = {name!r}: write overrides as ?key=value&key=value") from None
    overrides = {}
    for key, value in pairs:
        if key not in OVERRIDES or (key == "vision_layers" and SHAPES[base][2] is None):
            allowed = [k for k in OVERRIDES if k != "vision_layers" or SHAPES[base][2] is not None]
            raise ConfigError(f"config key 'model' = {name!r}: unknown override {key!r}; allowed: {', '.join(allowed)}")
        if not value.isdigit() or int(value) < (MIN_VOCAB if key == "vocab" else 1):
            raise ConfigError(f"config key 'model' = {name!r}: {key} must be an integer >= "
                              f"{MIN_VOCAB if key == 'vocab' else 1}")
        overrides[key] = int(value)
    return base, overrides


def token_ids(vocab_size: int) -> dict[str, int]:
    """Special token -> id in the stand-in tokenizer of a model with `vocab_size` embedding rows: Qwen's
    own ids at the full vocabulary, the last ids of the tokenizer in a cut one."""
    n = min(vocab_size, QWEN_TOKENS)
    return {s: n - len(QWEN_SPECIALS) + i for i, s in enumerate(QWEN_SPECIALS)}


def hf_config(name: str):
    """The transformers config of shape `name`, overrides applied, with the stand-in tokenizer's ids."""
    from transformers import Qwen2_5_VLConfig, Qwen2Config
    base, over = parse(name)
    arch, text, vision, _ = SHAPES[base]
    text = dict(text, **{OVERRIDES[k]: v for k, v in over.items() if k != "vision_layers"})
    ids = token_ids(text["vocab_size"])
    marks = dict(himac_shape=name, himac_note=SHAPE_NOTE)  # kept in config.json: anything reading it can tell
    eos, pad, bos = ids["<|im_end|>"], ids["<|endoftext|>"], ids["<|endoftext|>"]
    if arch == "qwen2":
        return Qwen2Config(**text, bos_token_id=bos, eos_token_id=eos, **marks)
    vision, tied = dict(vision), text.pop("tie_word_embeddings")
    if "vision_layers" in over:
        vision["depth"] = over["vision_layers"]
        vision["fullatt_block_indexes"] = [i for i in vision["fullatt_block_indexes"] if i < vision["depth"]]
    return Qwen2_5_VLConfig(
        text_config=dict(text, bos_token_id=bos, eos_token_id=eos), vision_config=vision, tie_word_embeddings=tied,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|vision_pad|>"], bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, **marks)


def _model_class(config):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2ForCausalLM
    return Qwen2_5_VLForConditionalGeneration if getattr(config, "vision_config", None) else Qwen2ForCausalLM


def meta_model(name: str):
    """The shape's model on the meta device: every parameter's name and shape, no memory."""
    config = hf_config(name)
    with torch.device("meta"):
        return _model_class(config)(config)


def count_params(name: str) -> int:
    """Parameters of shape `name` (tied embeddings once), counted on the meta device."""
    return sum(p.numel() for p in meta_model(name).parameters())


# -- the stand-in tokenizer -----------------------------------------------------
def _fillers():
    """Letter strings, bare and space-led ("ab", "Ġab", ...): decode-only tokens, since no merge makes them."""
    for length in itertools.count(2):
        for letters in itertools.product(string.ascii_lowercase, repeat=length):
            yield "".join(letters)
            yield "Ġ" + "".join(letters)


def stand_in_tokenizer(vocab_size: int, vision: bool):
    """A BPE trained on `tiny_corpus()` padded to min(vocab_size, 151,665) tokens, Qwen's specials last."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=[], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(tiny_corpus(), trainer)
    spec = json.loads(bpe.to_str())
    vocab = spec["model"]["vocab"]
    n_plain = min(vocab_size, QWEN_TOKENS) - len(QWEN_SPECIALS)
    fillers = _fillers()
    while len(vocab) < n_plain:
        s = next(fillers)
        if s not in vocab:
            vocab[s] = len(vocab)
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_special_tokens(QWEN_SPECIALS)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token=None, unk_token=None)
    out.chat_template = VL_CHAT_TEMPLATE if vision else CHATML_TEMPLATE
    return out


# -- weights --------------------------------------------------------------------
def _draw(name: str, shape: torch.Size, std: float, seed: int) -> torch.Tensor:
    """One bf16 tensor, from a generator of its own seeded by (seed, name)."""
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=torch.bfloat16)
    if len(shape) == 1:  # RMSNorm weights (the only 1-D weights in these models)
        return torch.ones(shape, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha1(f"{seed}:{name}".encode()).digest()[:8], "little"))
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, std, generator=g)


def write_weights(path: Path, model, seed: int, threads: int | None = None) -> int:
    """Write `model`'s (a meta-device model's) state as seeded random bf16 safetensors shards; returns bytes."""
    from safetensors.torch import save_file
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})  # written once, under the embedding's name
    entries = [(k, v.shape) for k, v in model.state_dict().items() if k not in tied]
    std = model.config.get_text_config().initializer_range
    shards, size = [[]], 0
    for key, shape in entries:
        nbytes = shape.numel() * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((key, shape))
        size += nbytes
    weight_map, total = {}, 0
    with ThreadPoolExecutor(max_workers=threads or torch.get_num_threads()) as pool:
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = dict(zip([k for k, _ in shard], pool.map(lambda e: _draw(*e, std, seed), shard)))
            save_file(tensors, str(path / file), metadata={"format": "pt"})
            total += sum(t.numel() * 2 for t in tensors.values())
            weight_map.update({k: file for k in tensors})
            del tensors
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


def build(path: Path, name: str, seed: int) -> None:
    """Write shape `name` as a model directory: weights, config, tokenizer, generation config, image processor."""
    from transformers import GenerationConfig
    model = meta_model(name)
    config = model.config
    vision = getattr(config, "vision_config", None) is not None
    text = config.get_text_config()
    tok = stand_in_tokenizer(text.vocab_size, vision)
    write_weights(path, model, seed)
    tok.save_pretrained(path)
    ids = token_ids(text.vocab_size)
    # generation_config.json as the instruct repos ship it (eos: <|im_end|> and <|endoftext|>, pad <|endoftext|>,
    # a repetition penalty of 1.05-1.1): the policy sets its own sampling and a penalty of 1.0 over it.
    GenerationConfig(bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
                     eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], do_sample=True,
                     repetition_penalty=1.05).save_pretrained(path)
    if vision:
        _image_processor().save_pretrained(path)
    config.dtype = torch.bfloat16  # "torch_dtype": "bfloat16" in every one of these repos, as the shards are
    config.architectures = [type(model).__name__]  # as the hub's config.json names it (the GGUF exporter reads it)
    config.save_pretrained(path)  # last: config.json is the marker of a finished directory


def _image_processor():
    try:
        from transformers import Qwen2VLImageProcessorPil as Processor
    except ImportError:  # transformers < 5.x names the PIL one Qwen2VLImageProcessor
        from transformers import Qwen2VLImageProcessor as Processor
    return Processor(**IMAGE_PROCESSOR)


def materialise(name: str, seed: int) -> Path:
    """The cached model directory of shape `name` with weights seeded by `seed` (built on first use)."""
    base, over = parse(name)
    key = json.dumps({"name": base, "over": sorted(over.items()), "seed": seed, "corpus": tiny_corpus(),
                      "shape": SHAPES[base][:3], "v": 2}, sort_keys=True, default=str)
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    tag = "".join(f"-{k}{v}" for k, v in sorted(over.items()))
    return atomic_dir(cache_dir() / f"shape-{base}{tag}-{digest}", lambda tmp: build(tmp, name, seed),
                      marker="config.json")
