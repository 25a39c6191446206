"""A policy backed by llama.cpp (llama-cpp-python): the CPU inference path for GGUF agents.

It offers what `evaluate.evaluate_agent` needs from `policy.Policy`, with the same
meaning, so an exported agent runs the very same episodes (text observations only:
`encode_images` and `generate(images=...)` refuse images):
- `encode(messages, prefix)`: the GGUF's own chat template rendered with jinja2 the
  way transformers renders it (trim_blocks, lstrip_blocks), tokenised with special
  tokens parsed and no BOS added (the template writes its own), then the prefix
  tokenised on its own, exactly as Policy does;
- `generate(prompts, max_new_tokens, temperature, stop_at_newline)`: greedy (argmax)
  at temperature 0, otherwise plain temperature sampling over the full softmax (no
  top-k, top-p or min-p, the distribution Policy samples), stopping after an EOS
  token or, with stop_at_newline, after any token whose text holds a newline.

Prompts run one at a time (llama.cpp's high-level API decodes one sequence), but the
KV cache keeps the longest prefix shared with the previous prompt, so a batch of
executor prompts re-evaluates only what follows their common system prompt.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from himac.policy import Completion


class LlamaCppPolicy:
    def __init__(self, model_path: str | Path, n_ctx: int = 4096, n_threads: int | None = None,
                 seed: int = 0, lora_path: str | Path | None = None):
        try:
            from llama_cpp import Llama
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        except ImportError as e:
            raise ImportError("the llamacpp backend needs llama-cpp-python: pip install 'himac[llamacpp]'") from e
        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"GGUF file {model_path} does not exist")
        self.path = model_path
        self.llm = Llama(model_path=str(model_path), n_ctx=n_ctx, n_batch=512,
                         n_threads=n_threads or max(1, min(os.cpu_count() or 1, 16)), seed=seed, verbose=False,
                         lora_path=str(lora_path) if lora_path else None)
        meta = self.llm.metadata
        template = meta.get("tokenizer.chat_template")
        if not template:
            raise ValueError(f"{model_path} has no tokenizer.chat_template; himac prompts are chats")
        self.eos_ids = sorted({self.llm.token_eos(), *self._eog_ids()})
        bos = self.llm.token_bos()
        self._chat = Jinja2ChatFormatter(template, eos_token=self._piece(self.llm.token_eos()),
                                         bos_token=self._piece(bos) if bos >= 0 else "", add_generation_prompt=True)
        self._rng = np.random.default_rng(seed)
        self._newline_ids: list[int] | None = None
        self.generated_tokens = 0  # running totals, for throughput reports
        self.evaluated_tokens = 0  # prompt + generated tokens pushed through the model

    # -- vocabulary ----------------------------------------------------------------
    def _piece(self, token: int) -> str:
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def _eog_ids(self) -> list[int]:
        """End-of-generation tokens llama.cpp knows (e.g. <|im_end|>, <|endoftext|>)."""
        import llama_cpp
        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        return [i for i in range(self.llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i)]

    def newline_ids(self) -> list[int]:
        if self._newline_ids is None:
            self._newline_ids = [i for i in range(self.llm.n_vocab()) if b"\n" in self.llm.detokenize([i], special=True)]
        return self._newline_ids

    # -- prompts -------------------------------------------------------------------
    def encode(self, messages: list[dict], prefix: str = "") -> list[int]:
        text = self._chat(messages=messages).prompt
        ids = self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if prefix:
            ids += self.llm.tokenize(prefix.encode("utf-8"), add_bos=False, special=False)
        return ids

    def encode_images(self, messages: list[dict], prefix: str, images: list) -> tuple[list[int], None]:
        """Policy.encode_images for text-only observations; images need the hf backend."""
        if images:
            raise ValueError("the llamacpp backend is text-only: evaluate image observations with --backend hf")
        return self.encode(messages, prefix), None

    def decode(self, ids: list[int]) -> str:
        """Text without special tokens, like Policy.decode (skip_special_tokens)."""
        return self.llm.detokenize(ids, special=False).decode("utf-8", errors="replace")

    # -- generation ----------------------------------------------------------------
    def logits(self, prompt: list[int]) -> np.ndarray:
        """float32 next-token logits after `prompt`, (V,)."""
        self._feed(prompt)
        return self._last_logits()

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                 stop_at_newline: bool = False, images: list | None = None) -> list[Completion]:
        if images and any(px is not None for px in images):
            raise ValueError("the llamacpp backend is text-only: evaluate image observations with --backend hf")
        stop = set(self.eos_ids) | (set(self.newline_ids()) if stop_at_newline else set())
        out = []
        for prompt in prompts:
            self._feed(prompt)
            ids: list[int] = []
            for _ in range(max_new_tokens):
                token = self._pick(self._last_logits(), temperature)
                ids.append(token)
                if token in stop or len(ids) == max_new_tokens:
                    break
                self._feed_more([token])
            self.generated_tokens += len(ids)
            out.append(Completion(ids, self.decode(ids)))
        return out

    def _pick(self, logits: np.ndarray, temperature: float) -> int:
        if temperature <= 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / temperature
        p = np.exp(z - z.max())
        return int(self._rng.choice(len(p), p=p / p.sum()))

    def _feed(self, prompt: list[int]) -> None:
        """Evaluate `prompt`, reusing the cached prefix it shares with what was evaluated last."""
        if len(prompt) >= self.llm.n_ctx():
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit n_ctx={self.llm.n_ctx()}")
        cached = self.llm.input_ids[:self.llm.n_tokens]
        keep = 0
        for a, b in zip(cached, prompt[:-1]):  # at least the last prompt token is evaluated: its logits are needed
            if a != b:
                break
            keep += 1
        self.llm.n_tokens = keep  # eval() drops the KV cache from n_tokens on
        self._feed_more(prompt[keep:])

    def _feed_more(self, tokens: list[int]) -> None:
        if self.llm.n_tokens + len(tokens) >= self.llm.n_ctx():
            raise ValueError(f"sequence of {self.llm.n_tokens + len(tokens)} tokens exceeds n_ctx={self.llm.n_ctx()}")
        self.evaluated_tokens += len(tokens)
        self.llm.eval(tokens)

    def _last_logits(self) -> np.ndarray:
        """Logits of the last evaluated position, (V,); read from the context, so logits_all is not needed."""
        ptr = self.llm._ctx.get_logits_ith(-1)
        return np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),)).astype(np.float32, copy=True)
