"""The shared policy pi_theta: chat encoding, batched generation and the training forward.

Planner and executor are the same model (paper §3.2, Fig. 1b); they differ only in
the prompts they build. This wrapper hides the tokenizer/padding details:
- generation left-pads a batch of prompts and samples with plain temperature
  sampling (top-k, top-p and repetition penalty off, whatever the hub's
  generation config says), so the sampling distribution is the pi whose log-probs
  the update computes; greedy when temperature is 0;
- `logprobs` lays each training row out as [left pad | prompt | completion |
  right pad], passes explicit position ids (left padding would otherwise shift
  RoPE positions relative to generation) and asks the model for logits only at
  completion positions (`logits_to_keep`), which skips the LM head over prompts
  (on SmolLM2 the head is 28M of 135M parameters), and takes log pi of the sampled
  tokens through `himac.token_logp`, which keeps no float32 copy of the logits.
Vision-language models (Qwen2.5-VL) take images through `encode_images`, and
`generate` / `logprobs` take the resulting pixels per prompt (himac/vision.py).
Rows with images get Qwen's 3-D (time, height, width) rotary positions, which
the model computes from the attention mask and `mm_token_type_ids`, so they are
padding-invariant like the 1-D positions of text rows.

Sampling draws from the process's torch random stream, so which sample a prompt gets
depends on the batch it was generated in. `Policy.sampling = KeyedSampling(key)` instead
seeds each draw by (key, the prompt, how many times the prompt came before, the token
position), which makes samples independent of batching and of how tasks are spread over
data-parallel ranks (an inverse-CDF draw from the same softmax, so the distribution is
unchanged; himac/distributed.py).

`AgentPolicy` declares what the planner, the executor and evaluation call on a
policy; `Policy` (transformers) and `himac.llamacpp.LlamaCppPolicy` (a GGUF through
llama.cpp) both satisfy it, so the same episodes run on either. `TrainablePolicy`
adds what the update needs (log-probs with gradients, the reference policy).
"""
from __future__ import annotations

import contextlib
import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, ContextManager, Protocol, runtime_checkable

import numpy as np
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from himac import choices as choice_mask
from himac import models, vision
from himac.token_logp import token_logprobs


@dataclass
class Completion:
    ids: list[int]  # generated token ids, up to and including the stop token if one came
    text: str  # decoded, special tokens removed


@runtime_checkable
class AgentPolicy(Protocol):
    """What planner.generate, executor.generate and evaluation need from a policy."""
    eos_ids: list[int]  # the tokens that end a completion

    def encode(self, messages: list[dict], prefix: str = "") -> list[int]:
        """Chat messages -> prompt ids ending with the assistant header (+ a prefilled prefix)."""

    def encode_images(self, messages: list[dict], prefix: str, images: list) -> tuple[list[int], Any]:
        """`encode` with (H, W, 3) frames shown in the last user turn -> (ids, pixels or None)."""

    def decode(self, ids: list[int]) -> str:
        """Token ids -> text, special tokens removed."""

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                 stop_at_newline: bool = False, images: list | None = None,
                 choices: list | None = None) -> list[Completion]:
        """One completion per prompt: sampled at `temperature` > 0 (the full softmax), greedy at 0.
        `choices[i]`: candidate answers (token ids) prompt i's completion is restricted to (himac/choices.py)."""

    def tokenize(self, text: str) -> list[int]:
        """Plain text -> token ids, no special tokens added."""


@runtime_checkable
class TrainablePolicy(AgentPolicy, Protocol):
    """An AgentPolicy the update can train (himac.update.policy_update)."""
    model: Any  # the torch module (with its LoRA adapter)

    def logprobs(self, prompts: list[list[int]], completions: list[list[int]],
                 temperatures: Any = None, images: list | None = None,
                 allowed: list | None = None) -> tuple[Any, Any]:
        """(logp, mask), both (R, C): log pi of each completion token, with gradients; `allowed[i]`: the token
        ids row i could choose among at each completion position (None: the whole vocabulary)."""

    def reference(self) -> ContextManager:
        """Within it, the policy computes pi_ref (the adapter switched off)."""


ROLES = tuple(models.ROLE_ADAPTERS)  # ("planner", "executor")


def as_role(policy: AgentPolicy, name: str) -> ContextManager:
    """`policy.role(name)` where the policy has roles (Policy with role adapters), else nothing to switch."""
    if name not in ROLES:
        raise ValueError(f"role {name!r}: must be one of {ROLES}")
    role = getattr(policy, "role", None)
    return role(name) if role is not None else contextlib.nullcontext()


def chat_ids(tokenizer, messages: list[dict], prefix: str = "") -> list[int]:
    """Chat messages -> prompt token ids ending with the assistant turn header, plus `prefix`'s ids."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in transformers 5
        ids = ids["input_ids"]
    ids = list(ids)
    if prefix:
        ids += tokenizer.encode(prefix, add_special_tokens=False)
    return ids


class KeyedSampling:
    """Per-prompt random streams: row i of a batch draws from (key, hash(prompt), n, position), n counting the
    earlier occurrences of the same prompt since this object was made (G copies of one planner prompt get
    n = 0..G-1). Make a fresh one per iteration, with the iteration in `key`."""

    def __init__(self, key: tuple[int, ...]):
        self.key, self.seen = tuple(key), Counter()

    def row_keys(self, prompts: list[list[int]]) -> list[tuple[int, ...]]:
        out = []
        for p in prompts:
            h = int.from_bytes(hashlib.blake2b(np.asarray(p, dtype=np.int64).tobytes(), digest_size=8).digest(),
                               "little")
            out.append((*self.key, h, self.seen[h]))
            self.seen[h] += 1
        return out


class _KeyedDraw(LogitsProcessor):
    """Turns greedy decoding into sampling at `temperature` with each row's own stream: the drawn token keeps
    its score, every other is -inf (inverse CDF of softmax(scores / temperature) at one keyed uniform)."""

    def __init__(self, keys: list[tuple[int, ...]], temperature: float, prompt_width: int):
        self.keys, self.temperature, self.width = keys, temperature, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        pos = input_ids.shape[1] - self.width  # tokens generated so far
        cdf = torch.softmax(scores.double() / self.temperature, -1).cumsum(-1)  # (b, V)
        u = torch.tensor([np.random.default_rng([*k, pos]).random() for k in self.keys], dtype=torch.float64,
                         device=scores.device)  # (b,)
        tok = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp(max=scores.shape[1] - 1)  # (b, 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, tok, 0.0)


class Policy:
    """The transformers-backed policy: satisfies TrainablePolicy."""

    def __init__(self, model, tokenizer, gen_batch_size: int = 16, image_processor=None):
        self.model = model
        self._image_processor = image_processor  # loaded from the model's directory on first use
        self.tokenizer = tokenizer
        self.gen_batch_size = gen_batch_size
        self.pad_id = tokenizer.pad_token_id
        self.eos_ids = sorted({tokenizer.eos_token_id, *self._config_eos()})
        self._newline_ids: list[int] | None = None
        # pi is the model restricted to the tokens it may write: never an image/video marker (VL models)
        self.banned_ids = vision.placeholder_ids(model)
        self.sampling: KeyedSampling | None = None  # None: the process's random stream

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _config_eos(self) -> list[int]:
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))

    def newline_ids(self) -> list[int]:
        """Every token whose text contains a newline (merged tokens like '.\\n' included)."""
        if self._newline_ids is None:
            vocab = len(self.tokenizer)
            self._newline_ids = [i for i in range(vocab) if "\n" in self.tokenizer.decode([i])]
        return self._newline_ids

    # -- prompts -------------------------------------------------------------------
    def encode(self, messages: list[dict], prefix: str = "") -> list[int]:
        """Chat messages -> prompt token ids ending with the assistant turn header (+ a prefilled prefix)."""
        return chat_ids(self.tokenizer, messages, prefix)

    def encode_images(self, messages: list[dict], prefix: str, images: list[np.ndarray]
                      ) -> tuple[list[int], vision.Pixels | None]:
        """`encode`, with `images` ((H, W, 3) uint8 frames) shown at the start of the last user turn.

        Returns (ids, pixels); with no images, (encode(messages, prefix), None).
        """
        if not images:
            return self.encode(messages, prefix), None
        if not vision.is_vision_model(self.model):
            raise ValueError(f"observation images need a vision-language model; "
                             f"'{self.model.config.model_type}' has no vision tower (use observation: text)")
        pixels = vision.process(self.image_processor, images)
        ids = self.encode(vision.with_images(messages, len(images)), prefix)
        cfg = self.model.config
        return vision.expand_pads(ids, cfg.image_token_id, pixels.tokens(cfg.vision_config.spatial_merge_size)), pixels

    @property
    def image_processor(self):
        if self._image_processor is None:
            self._image_processor = vision.load_image_processor(self.model.config._name_or_path)
        return self._image_processor

    def _image_inputs(self, ids: torch.Tensor, pixels: list | None) -> dict:
        """Model kwargs for the images of a batch (rows in order); {} for a text-only batch."""
        kwargs = vision.collate(pixels or [])
        if not kwargs:
            return {}
        kwargs = {k: v.to(self.device) for k, v in kwargs.items()}
        kwargs["mm_token_type_ids"] = (ids == self.model.config.image_token_id).int()  # (b, T) 1 on image tokens
        return kwargs

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    # -- generation ----------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                 stop_at_newline: bool = False, images: list | None = None,
                 choices: list | None = None) -> list[Completion]:
        """Sample (temperature > 0) or greedily decode one completion per prompt.

        `images[i]` is the `vision.Pixels` of prompt i (None for a text-only prompt); `choices[i]` the
        candidate answers (token ids) its completion must be one of, then a stop token (None: free text).
        """
        stop = set(self.eos_ids) | (set(self.newline_ids()) if stop_at_newline else set())
        gen_cfg = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None, top_k=0 if temperature > 0 else None,
            top_p=1.0 if temperature > 0 else None, eos_token_id=sorted(stop), pad_token_id=self.pad_id,
            # generate() fills every unset field from the model's hub generation config, which for
            # Qwen2.5(-VL) instruct models holds repetition_penalty 1.05-1.1: pi must stay pi.
            repetition_penalty=1.0, suppress_tokens=self.banned_ids or None)
        keys = self.sampling.row_keys(prompts) if temperature > 0 and self.sampling is not None else None
        if keys is not None:  # greedy over the one token each row's own stream drew
            gen_cfg.do_sample, gen_cfg.temperature, gen_cfg.top_k, gen_cfg.top_p = False, None, None, None
        was_training = self.model.training
        self.model.eval()
        out: list[Completion] = []
        try:
            for start in range(0, len(prompts), self.gen_batch_size):
                chunk = prompts[start:start + self.gen_batch_size]
                ids, mask = self._left_pad(chunk)  # (b, P)
                extra = self._image_inputs(ids, images[start:start + self.gen_batch_size] if images else None)
                hooks = []  # the restriction to the choices comes before any draw
                if choices and any(choices[start:start + self.gen_batch_size]):
                    hooks.append(choice_mask.ChoiceLogits(choices[start:start + self.gen_batch_size],
                                                          self.eos_ids, ids.shape[1]))
                if keys is not None:
                    hooks.append(_KeyedDraw(keys[start:start + self.gen_batch_size], temperature, ids.shape[1]))
                if hooks:
                    extra["logits_processor"] = LogitsProcessorList(hooks)
                seqs = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg, **extra)
                for row in seqs[:, ids.shape[1]:].tolist():  # (b, <=max_new_tokens)
                    cut = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
                    out.append(Completion(row[:cut], self.decode(row[:cut])))
        finally:
            self.model.train(was_training)
        return out

    def _left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
        return ids.to(self.device), mask.to(self.device)

    # -- training forward ----------------------------------------------------------
    def logprobs(self, prompts: list[list[int]], completions: list[list[int]],
                 temperatures: torch.Tensor | None = None,
                 images: list | None = None, allowed: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """log pi(completion token | prompt, earlier completion tokens) for a batch of rows.

        Returns (logp, mask), both (R, C) with C the longest completion; mask is 1 on
        real completion tokens. Gradients flow when called outside no_grad.
        `images[i]` is the `vision.Pixels` of row i's prompt (None for a text-only row); `allowed[i]` the
        token ids row i was restricted to at each completion position (answers picked from choices), so
        each softmax is renormalised over the same set generate() drew from.
        """
        R = len(prompts)
        P = max(len(p) for p in prompts)
        C = max(max(len(c) for c in completions), 1)
        ids = torch.full((R, P + C), self.pad_id, dtype=torch.long)
        attn = torch.zeros((R, P + C), dtype=torch.long)
        mask = torch.zeros((R, C), dtype=torch.float32)
        for i, (p, c) in enumerate(zip(prompts, completions)):
            ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
            ids[i, P:P + len(c)] = torch.tensor(c, dtype=torch.long)
            attn[i, P - len(p):P + len(c)] = 1
            mask[i, :len(c)] = 1
        ids, attn, mask = ids.to(self.device), attn.to(self.device), mask.to(self.device)
        positions = (attn.cumsum(-1) - 1).clamp(min=0)  # (R, P+C)
        # Inputs drop the last position: logits at position t score token t+1, and we
        # need scores for completion tokens P..P+C-1, i.e. logits at P-1..P+C-2.
        extra = self._image_inputs(ids[:, :-1], images)
        if not extra:  # with images the model derives its 3-D positions from the mask
            extra = {"position_ids": positions[:, :-1]}
        logits = self.model(input_ids=ids[:, :-1], attention_mask=attn[:, :-1], logits_to_keep=C, use_cache=False,
                            **extra).logits
        # (R, C, V) in the model's dtype; the log-softmax works through it a few rows at a time in float32
        keep = choice_mask.keep_mask(tuple(logits.shape), allowed, logits.device)
        logp = token_logprobs(logits, ids[:, P:], temperatures, self.banned_ids, keep)  # (R, C)
        return logp, mask

    @contextlib.contextmanager
    def role(self, name: str):
        """Within it, the forward uses `name`'s adapter ('planner' or 'executor') when the model has one
        per role (ModelConfig.role_adapters); a no-op for the paper's single shared adapter."""
        if not models.has_role_adapters(self.model):
            yield
            return
        previous = self.model.active_adapter
        models.activate(self.model, models.ROLE_ADAPTERS[name])
        try:
            yield
        finally:
            models.activate(self.model, previous)

    @contextlib.contextmanager
    def reference(self):
        """pi_ref: the same weights with the LoRA adapter switched off (no second copy)."""
        with self.model.disable_adapter():
            yield
