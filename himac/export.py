"""Merge a trained LoRA adapter into its base model and write it as one GGUF file.

    W' = W + (lora_alpha / lora_r) * B @ A          (peft's scaling, per adapted linear layer)

The result loads in llama.cpp, llama-cpp-python and ollama with the tokenizer, the
chat template and the special tokens of the training tokenizer, so `<sub_done>` (plain
text, see models.py) tokenises the same way it did in training. Two families are
supported, the ones himac trains: Llama (SmolLM2) and Qwen2 (Qwen2.5). Anything else
fails with the architecture named.

Choices worth knowing:
- `base="trained"` (default) merges into the weights the adapter was trained against.
  For a 4-bit (NF4) run these are the *dequantised NF4* weights, so the exported model
  computes what the training policy computed; `base="original"` merges into the
  unquantised base instead (closer to the pretrained model, but the adapter never saw
  it: QLoRA's known train/merge mismatch).
- Llama's q/k rows are permuted into llama.cpp's rotary layout (HF's rotate_half
  pairs dimension i with i + d/2; llama.cpp's LLAMA rope pairs 2i with 2i + 1).
  Qwen2 runs NEOX rope in llama.cpp, which is HF's layout: no permutation.
- f32/bf16/f16/q8_0 are written with the `gguf` package (bf16 and q8_0 with its numpy
  quantisers);
  q4_0 and q4_k_m write f16 first and run llama-cpp-python's own quantiser on it (q4_0 is
  the format llama.cpp repacks at load for fast CPU matrix products). 1-D
  tensors (norms, biases) stay f32 in every mode, as llama.cpp expects.
- The vocabulary is padded with unused `[PAD{i}]` tokens up to the embedding rows
  (Qwen2.5 has more rows than tokens).
- `write_lora_gguf` writes the adapter alone (llama.cpp's LoRA adapter GGUF) for users
  who already hold the base GGUF; llama.cpp applies it as alpha / r * B @ A.
- A role_adapters run (an adapter per role) has no one merged agent: `export_run` writes
  its base and, beside it, the planner's and the executor's LoRA GGUFs (`role_lora_paths`),
  which LlamaCppPolicy(role_loras=...) applies each in its role.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm.auto import tqdm

from envs import REGISTRY
from himac import models
from himac.config import build
from himac.executor import SUB_DONE, SUB_DONE_RULE
from himac.models import ModelConfig
from himac.rundir import RunDir

QUANTS = ("f32", "bf16", "f16", "q8_0", "q4_0", "q4_k_m")
FILE_TYPE = {"f32": gguf.LlamaFileType.ALL_F32, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
             "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M}
LLAMA_FTYPE_MOSTLY_Q4_K_M = 15  # llama.h's enum value, used by llama_model_quantize
LLAMA_FTYPE_MOSTLY_Q4_0 = 2
LLAMA_CPP_QUANTS = {"q4_0": LLAMA_FTYPE_MOSTLY_Q4_0, "q4_k_m": LLAMA_FTYPE_MOSTLY_Q4_K_M}  # made by llama.cpp itself

# Pre-tokenizer regexes of known byte-level BPE tokenizers (tokenizer.json "Split" pattern)
# and the llama.cpp pre-tokenizer that implements each.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_PRE = {QWEN2_SPLIT: "qwen2", LLAMA3_SPLIT: "llama-bpe"}


class UnsupportedModel(ValueError):
    """The model's architecture, rope scaling or tokenizer has no GGUF mapping here."""


@dataclass(frozen=True)
class Family:
    arch: gguf.MODEL_ARCH
    name: str  # general.architecture
    permute_qk: bool  # HF rotate_half layout -> llama.cpp interleaved rope layout


FAMILIES = {
    "LlamaForCausalLM": Family(gguf.MODEL_ARCH.LLAMA, "llama", permute_qk=True),
    "Qwen2ForCausalLM": Family(gguf.MODEL_ARCH.QWEN2, "qwen2", permute_qk=False),
}


def family(hf_config) -> Family:
    archs = list(getattr(hf_config, "architectures", None) or [])
    for a in archs:
        if a in FAMILIES:
            return FAMILIES[a]
    raise UnsupportedModel(f"architecture {archs or hf_config.model_type!r} is not supported for GGUF export; "
                           f"supported: {sorted(FAMILIES)}")


# -- checkpoints ---------------------------------------------------------------------
def read_run(run_dir: str | Path):
    """A run directory -> (its ModelConfig, the adapter directory of its checkpoint)."""
    run = RunDir(run_dir, create=False)
    if not run.config_file.is_file():
        raise FileNotFoundError(f"--checkpoint {run_dir}: not a run directory (no config.yaml); "
                                "expected the --out directory of python -m himac.coevolve")
    if not (run.adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"--checkpoint {run_dir}: no adapter checkpoint at {run.adapter_dir}")
    return build(ModelConfig, run.read_config()), run.adapter_dir


def merged_state(cfg, adapter_dir: str | Path | None, base: str = "trained"):
    """Load base + adapter on the CPU in f32 and merge: returns (HF state dict, HF config, tokenizer).

    The state dict has the base model's own parameter names (no peft prefixes, no
    LoRA tensors); each adapted linear weight is W + scale * B @ A.
    """
    from peft.tuners.lora import LoraLayer
    if base not in ("trained", "original"):
        raise ValueError(f"base={base!r}: must be 'trained' or 'original'")
    cfg = dataclasses.replace(cfg, device="cpu", dtype="float32", gradient_checkpointing=False,
                              load_in_4bit=cfg.load_in_4bit and base == "trained")
    model, tokenizer = models.load(cfg, adapter_dir=adapter_dir)
    inner = model.get_base_model()
    state: dict[str, torch.Tensor] = {}
    lora_prefixes: list[str] = []
    with torch.no_grad():
        for name, module in inner.named_modules():
            if any(name.startswith(p) for p in lora_prefixes):
                continue  # inside a LoRA layer: handled with it
            if isinstance(module, LoraLayer):
                lora_prefixes.append(name + ".")
                layer = module.get_base_layer()
                weight = _dense_weight(layer)
                for adapter in module.active_adapters:
                    if module.use_dora.get(adapter, False):
                        raise UnsupportedModel(f"{name}: DoRA adapters are not supported for export")
                    if adapter in module.lora_A:
                        weight = weight + module.get_delta_weight(adapter).float()  # W + scale * B @ A
                state[f"{name}.weight"] = weight
                if getattr(layer, "bias", None) is not None:
                    state[f"{name}.bias"] = layer.bias.detach().float()
                continue
            if _is_4bit(module):
                state[f"{name}.weight"] = _dense_weight(module)
                if module.bias is not None:
                    state[f"{name}.bias"] = module.bias.detach().float()
                continue
            for pname, p in module.named_parameters(recurse=False):
                state[f"{name}.{pname}" if name else pname] = p.detach().float()
    return state, inner.config, tokenizer


def _is_4bit(module) -> bool:
    return type(module).__name__ == "Linear4bit" and hasattr(module.weight, "quant_state")


def _dense_weight(layer) -> torch.Tensor:
    """The f32 weight a linear layer computes with (NF4 dequantised for a 4-bit layer)."""
    if _is_4bit(layer):
        import bitsandbytes.functional as F
        return F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    return layer.weight.detach().float()


# -- GGUF ----------------------------------------------------------------------------
def permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder each head's rows from HF's half-split rope layout to llama.cpp's interleaved one."""
    rows = w.shape[0]  # n_head * head_dim
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(state: dict[str, torch.Tensor], hf_config, tokenizer, out: str | Path, quant: str = "f16",
               name: str = "himac-agent", pre: str | None = None, progress: bool = True) -> Path:
    """Write one GGUF (weights, hyperparameters, tokenizer, chat template) at `out`."""
    if quant not in QUANTS:
        raise ValueError(f"quant={quant!r}: must be one of {', '.join(QUANTS)}")
    fam = family(hf_config)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if quant in LLAMA_CPP_QUANTS:
        tmp = out.with_name(out.name + ".f16.tmp")
        try:
            write_gguf(state, hf_config, tokenizer, tmp, "f16", name, pre, progress)
            quantize_with_llama_cpp(tmp, out, LLAMA_CPP_QUANTS[quant])
        finally:
            tmp.unlink(missing_ok=True)
        return out

    c = hf_config
    n_vocab = state["model.embed_tokens.weight"].shape[0]
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    n_kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    writer = gguf.GGUFWriter(str(out), fam.name)
    writer.add_name(name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_file_type(FILE_TYPE[quant])
    writer.add_vocab_size(n_vocab)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != c.hidden_size // c.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    _write_rope(writer, c)
    write_tokenizer(writer, tokenizer, n_vocab, pre)

    names = gguf.get_tensor_name_map(fam.arch, c.num_hidden_layers)
    tied = bool(getattr(c, "tie_word_embeddings", False))
    for hf_name, tensor in state.items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise UnsupportedModel(f"tensor {hf_name!r} has no GGUF name for architecture {fam.name}")
        if fam.permute_qk and ".self_attn.q_proj." in hf_name:
            tensor = permute_rope(tensor, c.num_attention_heads)
        elif fam.permute_qk and ".self_attn.k_proj." in hf_name:
            tensor = permute_rope(tensor, n_kv)
        data, raw = _encode(tensor.float().contiguous().numpy(), quant)
        writer.add_tensor(gname, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=progress)
    writer.close()
    return out


def _encode(a: np.ndarray, quant: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    if a.ndim == 1 or quant == "f32":
        return a.astype(np.float32), None
    if quant == "bf16":  # f32's exponent range at half the bytes; llama.cpp's fastest CPU prompt path here
        return gguf.quants.quantize(a, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    if quant == "q8_0" and a.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return a.astype(np.float16), None  # f16, or q8_0 rows that do not fill whole blocks


def _write_rope(writer: gguf.GGUFWriter, c) -> None:
    params = dict(getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(c, "rope_theta", 10000.0))
    writer.add_rope_freq_base(float(theta))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    elif kind != "default":
        raise UnsupportedModel(f"rope scaling {kind!r} is not supported for GGUF export (default and linear are)")
    if getattr(c, "use_sliding_window", False):
        raise UnsupportedModel("sliding-window attention (use_sliding_window: true) is not supported for export")


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """The llama.cpp pre-tokenizer equal to a byte-level BPE tokenizer.json's pre_tokenizer."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True) and not parts[0].get("add_prefix_space"):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        pattern = parts[0].get("pattern", {}).get("Regex")
        if pattern in SPLIT_PRE:
            return SPLIT_PRE[pattern]
    raise UnsupportedModel(f"pre-tokenizer {json.dumps(pre)[:300]} has no known llama.cpp equivalent; "
                           "pass pre= (tokenizer.ggml.pre) explicitly")


def write_tokenizer(writer: gguf.GGUFWriter, tokenizer, n_vocab: int, pre: str | None = None) -> None:
    """Byte-level BPE vocabulary, merges, token types, special ids and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedModel(f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer")
    tj = json.loads(backend.to_str())
    model = tj["model"]
    if model.get("type") != "BPE" or (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise UnsupportedModel(f"tokenizer model {model.get('type')!r} with decoder "
                               f"{(tj.get('decoder') or {}).get('type')!r}: only byte-level BPE (gpt2) is supported")
    if (tj.get("normalizer") or {}).get("type") not in (None, "NFC"):
        raise UnsupportedModel(f"tokenizer normalizer {tj['normalizer']['type']!r} has no llama.cpp equivalent")
    by_id = {i: t for t, i in model["vocab"].items()}
    types = {i: gguf.TokenType.NORMAL for i in by_id}
    for added in tj.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    if max(by_id) >= n_vocab:
        raise UnsupportedModel(f"token id {max(by_id)} is beyond the model's {n_vocab} embedding rows")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    token_types = [types.get(i, gguf.TokenType.UNUSED) for i in range(n_vocab)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or pre_tokenizer_name(tj))
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        tid = getattr(tokenizer, attr, None)
        if tid is not None:
            add(int(tid))
    # HF's chat templates write every special token themselves: llama.cpp must add none.
    writer.add_add_bos_token(False)
    writer.add_add_space_prefix(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def quantize_with_llama_cpp(src: Path, dst: Path, ftype: int) -> None:
    try:
        import llama_cpp
    except ImportError as e:
        raise ImportError("q4_0 and q4_k_m need llama-cpp-python's quantiser: pip install 'himac[llamacpp]'") from e
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}, ftype {ftype}) failed with code {rc}")


# -- the LoRA adapter alone ----------------------------------------------------------
def write_lora_gguf(adapter_dir: str | Path, hf_config, out: str | Path) -> Path:
    """The adapter as a llama.cpp LoRA GGUF (lora_a = A, lora_b = B per adapted weight)."""
    from safetensors.torch import load_file
    adapter_dir = Path(adapter_dir)
    acfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if acfg.get("use_dora"):
        raise UnsupportedModel("DoRA adapters are not supported for export")
    if acfg.get("rank_pattern") or acfg.get("alpha_pattern"):
        raise UnsupportedModel("adapters with per-layer rank_pattern/alpha_pattern are not supported")
    r, alpha = int(acfg["r"]), float(acfg["lora_alpha"])
    if acfg.get("use_rslora"):
        alpha = alpha * math.sqrt(r)  # llama.cpp scales by alpha / r; rsLoRA means alpha / sqrt(r)
    fam = family(hf_config)
    n_kv = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    names = gguf.get_tensor_name_map(fam.arch, hf_config.num_hidden_layers)
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    writer = gguf.GGUFWriter(str(out), fam.name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    pattern = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight$")
    for key in sorted(weights):
        m = pattern.match(key)
        if m is None:
            raise UnsupportedModel(f"adapter tensor {key!r} is not a LoRA A/B weight")
        hf_name, which = m.group(1) + ".weight", m.group(2)
        gname = names.get_name(hf_name, try_suffixes=(".weight",))
        if gname is None:
            raise UnsupportedModel(f"adapted tensor {hf_name!r} has no GGUF name for architecture {fam.name}")
        t = weights[key].float()
        if which == "B" and fam.permute_qk and ".self_attn.q_proj." in hf_name:
            t = permute_rope(t, hf_config.num_attention_heads)  # W's rows are B's rows
        elif which == "B" and fam.permute_qk and ".self_attn.k_proj." in hf_name:
            t = permute_rope(t, n_kv)
        writer.add_tensor(f"{gname}.lora_{which.lower()}", t.contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(out)


# -- checks --------------------------------------------------------------------------
def check_texts(tokenizer) -> list[str]:
    """Prompts as the agent sends them (chat template, prefixes, `<sub_done>`), plus awkward strings."""
    texts = []
    for spec in REGISTRY.values():
        p = spec.prompts
        for system, user, prefix in ((p.planner_system, p.planner_user, p.planner_prefix),
                                     (p.executor_system, p.executor_user, p.executor_prefix)):
            messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
            texts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + prefix)
    texts += [f"{SUB_DONE_RULE} Answer: {SUB_DONE}\n", f"1. Push the box up.\n2. {SUB_DONE}", "#####\n#_.$#\n#@__#",
              "Sub-goal 12/345: don't  stop   here\t\n\n", "caf\u00e9 \u00fcber na\u00efve \u2014 \u4f60\u597d"]
    return texts


def verify_tokenizer(gguf_path: str | Path, checkpoint) -> list[str]:
    """Texts that llama.cpp tokenises differently from the training tokenizer (empty: all agree).

    `checkpoint` is a run directory or an HF tokenizer.
    """
    from llama_cpp import Llama
    if isinstance(checkpoint, (str, Path)):
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(models.model_path(read_run(checkpoint)[0]))
    else:
        tokenizer = checkpoint
    llm = Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    bad = []
    for text in check_texts(tokenizer):
        if llm.tokenize(text.encode(), add_bos=False, special=True) != tokenizer.encode(text, add_special_tokens=False):
            bad.append(text)
    return bad


# -- one call ------------------------------------------------------------------------
def export_run(run_dir: str | Path, out: str | Path, quant: str = "f16", base: str = "trained",
               lora_out: str | Path | None = None, progress: bool = True, deploy_files: bool = True) -> Path:
    """Merge the run's adapter into its base and write `out`; optionally also the adapter alone.

    `deploy_files`: also write an ollama Modelfile and SERVE.md beside `out` (himac/deploy.py)."""
    if quant not in QUANTS:
        raise ValueError(f"--quant {quant!r}: must be one of {', '.join(QUANTS)}")
    cfg, adapter = read_run(run_dir)
    if cfg.role_adapters:  # no deploy files: the Modelfile and SERVE.md describe one merged agent
        return _export_roles(run_dir, cfg, adapter, out, quant, base, lora_out, progress)
    state, hf_config, tokenizer = merged_state(cfg, adapter, base)
    family(hf_config)  # fail before writing anything
    path = write_gguf(state, hf_config, tokenizer, out, quant, name=f"himac-{Path(run_dir).name}", progress=progress)
    if lora_out is not None:
        write_lora_gguf(adapter, hf_config, lora_out)
    if deploy_files:
        from himac.deploy import write_deploy_files
        write_deploy_files(path, RunDir(run_dir, create=False).read_config())
    return path


def role_lora_paths(out: str | Path) -> dict[str, Path]:
    """Beside a role-adapter run's base GGUF `out`: each role's LoRA GGUF (agent.gguf -> agent.planner-lora.gguf)."""
    out = Path(out)
    return {role: out.with_name(f"{out.stem}.{role}-lora.gguf") for role in models.ROLE_ADAPTERS}


def _export_roles(run_dir, cfg, adapter: Path, out, quant: str, base: str, lora_out, progress: bool) -> Path:
    """role_adapters: one merged GGUF cannot hold two policies, so `out` is the base (the weights both adapters
    were trained against) and each role's adapter is a LoRA GGUF beside it (role_lora_paths); LlamaCppPolicy's
    role_loras applies the planner's while it writes blueprints and the executor's while it acts."""
    if lora_out is not None:
        raise ValueError(f"--lora-out {lora_out}: a role_adapters run writes both roles' LoRA GGUFs beside --out "
                         f"({', '.join(str(p) for p in role_lora_paths(out).values())})")
    state, hf_config, tokenizer = merged_state(cfg, None, base)  # fresh adapters have B = 0: the base itself
    family(hf_config)
    path = write_gguf(state, hf_config, tokenizer, out, quant, name=f"himac-{Path(run_dir).name}-base",
                      progress=progress)
    loras = role_lora_paths(path)
    write_lora_gguf(Path(adapter) / models.PLANNER_ADAPTER, hf_config, loras["planner"])
    write_lora_gguf(adapter, hf_config, loras["executor"])
    return path
