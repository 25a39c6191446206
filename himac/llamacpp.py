"""A policy backed by llama.cpp (llama-cpp-python): the CPU inference path for GGUF agents.

It satisfies `himac.policy.AgentPolicy`, what evaluation needs from `policy.Policy`, with the same
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

A role_adapters run (one LoRA per role) exports as its base GGUF plus each role's LoRA GGUF;
`role_loras` loads both and `role(name)` applies one, dropping the cached prefixes, which
were computed under the other adapter.

How it runs (llama.cpp's low-level API, one context with `n_seq` KV sequences, each in
its own stream of cells):
- each prompt of a batch gets a sequence ("slot") whose cached tokens share the
  longest prefix with it, and only the rest is evaluated. A prompt may also borrow a
  longer prefix from another slot (llama_memory_seq_cp copies that slot's stream, the
  tail past the prefix is dropped): an episode's next executor prompt starts where its
  previous one did (system prompt, task, sub-goal), and a fresh episode borrows the
  common system prompt;
- a stream holds 512 tokens at first and doubles, up to `n_ctx`, when a batch needs
  more (the context is rebuilt and the cache starts empty): memory follows the prompts;
- prompts are prefilled one after another, then decoded together: one llama_decode
  per step holds the next token of every unfinished sequence, so the weights are
  read once per step for the whole batch, as HF's batched generate does.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import numpy as np

from himac import choices as choice_mask
from himac.policy import Completion


class LlamaCppPolicy:
    """A GGUF agent through llama.cpp: satisfies himac.policy.AgentPolicy (text observations)."""

    def __init__(self, model_path: str | Path, n_ctx: int = 4096, n_threads: int | None = None,
                 seed: int = 0, lora_path: str | Path | None = None, n_seq: int = 16,
                 role_loras: dict[str, str | Path] | None = None):
        """`n_ctx`: the longest prompt + completion; each of the `n_seq` sequences (prompts per decode
        batch) has a KV stream of 512 cells, grown up to n_ctx when a batch needs it.
        `lora_path`: a LoRA adapter GGUF (export.write_lora_gguf) applied on top of the model.
        `role_loras`: {'planner': GGUF, 'executor': GGUF}, a role_adapters run's adapters
        (export.role_lora_paths): `role(name)` applies that role's, the executor's otherwise."""
        if role_loras is not None and (lora_path is not None or set(role_loras) != {"planner", "executor"}):
            raise ValueError(f"role_loras {sorted(role_loras)}: give exactly 'planner' and 'executor', "
                             "and no lora_path beside them")
        try:
            from llama_cpp import Llama
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        except ImportError as e:
            raise ImportError("the llamacpp backend needs llama-cpp-python: pip install 'himac[llamacpp]'") from e
        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"GGUF file {model_path} does not exist")
        self.path = model_path
        threads = n_threads or max(1, min(os.cpu_count() or 1, 16))
        # The Llama object gives the vocabulary, metadata and the LoRA adapter; its own context
        # stays small and unused: generation runs in the multi-sequence context below.
        self.llm = Llama(model_path=str(model_path), n_ctx=256, n_batch=256, n_threads=threads, seed=seed,
                         verbose=False, lora_path=str(lora_path) if lora_path else None)
        self.n_ctx, self.n_seq = n_ctx, n_seq
        self._slots = _Slots(self.llm, n_seq, threads, min(n_ctx, 512))
        meta = self.llm.metadata
        template = meta.get("tokenizer.chat_template")
        if not template:
            raise ValueError(f"{model_path} has no tokenizer.chat_template; himac prompts are chats")
        self.eos_ids = sorted({self.llm.token_eos(), *self._eog_ids()})
        bos = self.llm.token_bos()
        self._chat = Jinja2ChatFormatter(template, eos_token=self._piece(self.llm.token_eos()),
                                         bos_token=self._piece(bos) if bos >= 0 else "", add_generation_prompt=True)
        self._rng = np.random.default_rng(seed)
        self._roles: dict[str, object] = {}
        self._role: str | None = None
        for role, path in (role_loras or {}).items():
            if not Path(path).is_file():
                raise FileNotFoundError(f"role_loras[{role!r}]: LoRA GGUF {path} does not exist")
            import llama_cpp as L
            adapter = L.llama_adapter_lora_init(self.llm._model.model, str(path).encode("utf-8"))
            if adapter is None:  # freed with the model
                raise RuntimeError(f"llama.cpp could not load the {role}'s LoRA adapter {path}")
            self._roles[role] = adapter
        if self._roles:
            self._use_role("executor")
        self._newline_ids: list[int] | None = None
        self.generated_tokens = 0  # running totals, for throughput reports
        self.evaluated_tokens = 0  # prompt + generated tokens pushed through the model

    # -- roles (role_adapters runs) ----------------------------------------------------
    @contextlib.contextmanager
    def role(self, name: str):
        """Within it, `name`'s LoRA adapter is applied (role_loras; a no-op without them)."""
        if not self._roles:
            yield
            return
        previous = self._role
        self._use_role(name)
        try:
            yield
        finally:
            self._use_role(previous)

    def _use_role(self, name: str) -> None:
        if name == self._role:
            return
        self._slots.set_lora(self._roles[name], self.llm.lora_scale)
        self._slots.clear()  # cached prefixes were computed under the other role's adapter
        self._role = name

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
            n = self.llm.n_vocab()
            self._newline_ids = [i for i in range(n) if b"\n" in self.llm.detokenize([i], special=True)]
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

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    # -- the engine, for benchmarks and tests -----------------------------------------
    def logits(self, prompt: list[int]) -> np.ndarray:
        """float32 next-token logits after `prompt`, (V,)."""
        return self.prefill([prompt])[0]

    def clear_cache(self) -> None:
        """Forget every cached prefix: the next prompts are evaluated from scratch."""
        self._slots.clear()

    def prefill(self, prompts: list[list[int]], room: int = 0) -> list[np.ndarray]:
        """Evaluate a batch of prompts (reusing cached prefixes); each prompt's last logits, (V,).
        `room`: how many tokens decode_step will still add to each."""
        self._fit(max(len(p) for p in prompts) + room)
        return self._slots.prefill(prompts)

    def decode_step(self, tokens: list[tuple[int, int]]) -> list[np.ndarray]:
        """One decode of (batch index of the last prefill, token) pairs together; their logits, (V,) each."""
        return self._slots.step(tokens)

    # -- generation ----------------------------------------------------------------
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                 stop_at_newline: bool = False, images: list | None = None,
                 choices: list | None = None) -> list[Completion]:
        if images and any(px is not None for px in images):
            raise ValueError("the llamacpp backend is text-only: evaluate image observations with --backend hf")
        stop = set(self.eos_ids) | (set(self.newline_ids()) if stop_at_newline else set())
        out: list[Completion] = []
        for start in range(0, len(prompts), self.n_seq):
            chunk = prompts[start:start + self.n_seq]
            cands = (choices or [None] * len(prompts))[start:start + self.n_seq]
            logits = self.prefill(chunk, room=max_new_tokens)  # [(V,)] per prompt
            ids: list[list[int]] = [[] for _ in chunk]
            live = list(range(len(chunk)))
            while live:
                feed = []
                for i in live:
                    ok = choice_mask.allowed(cands[i], ids[i], self.eos_ids) if cands[i] else []
                    token = self._pick(logits[i], temperature, ok)
                    ids[i].append(token)
                    if token not in stop and len(ids[i]) < max_new_tokens:
                        feed.append(i)
                live = feed
                if live:  # one decode step for every unfinished sequence together
                    for i, row in zip(live, self._slots.step([(i, ids[i][-1]) for i in live])):
                        logits[i] = row
            self.generated_tokens += sum(len(x) for x in ids)
            out += [Completion(x, self.decode(x)) for x in ids]
        self.evaluated_tokens = self._slots.evaluated
        return out

    def _fit(self, n: int) -> None:
        """Make each sequence's stream hold n tokens (doubling it up to n_ctx; that empties the cache)."""
        if n > self.n_ctx:
            raise ValueError(f"a prompt + its new tokens need {n} tokens, more than n_ctx={self.n_ctx}")
        size = self._slots.size
        while size < n:
            size *= 2
        if size > self._slots.size:
            self._slots.rebuild(min(size, self.n_ctx))

    def _pick(self, logits: np.ndarray, temperature: float, allowed: list[int] | None = None) -> int:
        if allowed:  # answers picked from choices: the softmax over what may follow (himac/choices.py)
            keep = np.full(logits.shape, -np.inf, dtype=np.float64)
            keep[allowed] = logits[allowed]
            logits = keep
        if temperature <= 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / temperature
        p = np.exp(z - z.max())
        return int(self._rng.choice(len(p), p=p / p.sum()))


class _Slots:
    """`n_seq` KV-cache sequences in one llama.cpp context, each in its own stream of `size` cells and
    remembering the tokens it holds.

    prefill(prompts) puts prompt i of a batch in batch slot i's sequence (chosen per call
    by longest shared prefix) and returns each prompt's last logits; step(tokens) then
    appends one token to each named batch slot in a single decode.

    Why a stream per sequence, not one pool of cells all sequences share (llama.cpp's kv_unified,
    where a borrowed prefix costs no copy): in a shared pool every token attends over the pool's
    cells up to the last in use, the other sequences' masked out, so a prefill slows as a batch's
    other sequences fill it (1.5B q4_0, 227 new tokens: 200 tok/s alone, 122 beside 15 cached
    sequences of 250). Flash attention skips masked cells (191 tok/s) but rounds to f16 (SmolLM2's
    f32 logits 1e-2 off transformers' instead of 3e-5). A stream per sequence attends over its own
    cells only and stays exact; a borrowed prefix then costs a copy of the donor's stream
    (a few MB, milliseconds).
    """

    def __init__(self, llm, n_seq: int, threads: int, size: int):
        import llama_cpp as L
        self.L, self.llm, self.n_seq, self.threads = L, llm, n_seq, threads
        self.ctx = None
        adapter = getattr(llm, "_lora_adapter", None)  # the Llama object loaded it; apply it here as well
        self.adapter = (adapter, llm.lora_scale) if adapter is not None else None
        self.batch = L.llama_batch_init(512, 0, 1)
        self.n_vocab = llm.n_vocab()
        self.evaluated = 0
        self.rebuild(size)

    def rebuild(self, size: int) -> None:
        """A fresh context whose streams hold `size` tokens each (every cached sequence is dropped)."""
        L = self.L
        if self.ctx is not None:
            L.llama_free(self.ctx)
            self.ctx = None
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = size * self.n_seq, 512, 512, self.n_seq
        cp.n_threads = cp.n_threads_batch = self.threads
        cp.kv_unified = False  # a stream per sequence (see the class docstring)
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED  # exact; no faster with a stream each
        if self.llm.metadata.get("general.file_type") == "0":  # an f32 model keeps an f32 KV cache (f16 by default)
            cp.type_k = cp.type_v = 0  # GGML_TYPE_F32
        self.ctx = L.llama_init_from_model(self.llm._model.model, cp)
        if self.ctx is None:
            raise RuntimeError(f"llama.cpp could not create a context of {self.n_seq} sequences x {size} tokens")
        if self.adapter is not None:
            self.set_lora(*self.adapter)
        self.mem = L.llama_get_memory(self.ctx)
        self.size = L.llama_n_ctx_seq(self.ctx)  # llama.cpp may round it up
        self.cached: list[list[int]] = [[] for _ in range(self.n_seq)]  # tokens held by each sequence
        self.last_used = [0] * self.n_seq
        self.clock = 0
        self.current: list[int] = []  # batch slot -> sequence id, for step()

    def __del__(self, _finalizing=sys.is_finalizing):
        L = getattr(self, "L", None)
        if _finalizing():  # the interpreter is tearing llama_cpp's bindings down; the OS frees the rest
            return
        if L is not None and getattr(self, "ctx", None) is not None:
            L.llama_batch_free(self.batch)
            L.llama_free(self.ctx)
            self.ctx = None

    def set_lora(self, adapter, scale: float) -> None:
        """Apply this one LoRA adapter (in place of any other) to the context, and to any rebuilt one."""
        import ctypes
        self.adapter = (adapter, scale)
        adapters = (self.L.llama_adapter_lora_p_ctypes * 1)(adapter)
        if self.L.llama_set_adapters_lora(self.ctx, adapters, 1, (ctypes.c_float * 1)(scale)):
            raise RuntimeError("llama.cpp could not apply the LoRA adapter")

    def clear(self) -> None:
        """Forget every cached sequence (the next prompts are evaluated from scratch)."""
        self.L.llama_memory_clear(self.mem, True)
        self.cached = [[] for _ in self.cached]

    def prefill(self, prompts: list[list[int]]) -> list[np.ndarray]:
        free = set(range(len(self.cached)))
        self.current, out = [], []
        for prompt in prompts:
            self.clock += 1
            # the slot sharing most with the prompt; among equals the least recently used (empty ones first),
            # whose cached tail is the least likely to be wanted again
            shared = [_shared(cached, prompt) for cached in self.cached]
            seq = max(free, key=lambda s: (shared[s], -self.last_used[s]))
            free.discard(seq)
            donor = max(range(len(shared)), key=shared.__getitem__)
            keep, borrow = shared[seq], shared[donor]
            if borrow > keep:  # the donor's longer prefix: its stream is copied whole (llama.cpp copies no part)
                self.L.llama_memory_seq_cp(self.mem, donor, seq, -1, -1)
                keep = borrow
            self.L.llama_memory_seq_rm(self.mem, seq, keep, -1)
            self.cached[seq] = list(prompt[:keep])
            self.last_used[seq] = self.clock
            self.current.append(seq)
            out.append(self._extend(seq, prompt[keep:]))
        return out

    def step(self, tokens: list[tuple[int, int]]) -> list[np.ndarray]:
        """Append tokens[j] = (batch slot, token) to their sequences in one decode; (V,) logits each."""
        b = self.batch
        for j, (slot, token) in enumerate(tokens):
            seq = self.current[slot]
            b.token[j], b.pos[j], b.n_seq_id[j], b.logits[j] = token, len(self.cached[seq]), 1, 1
            b.seq_id[j][0] = seq
            self.cached[seq].append(token)
        b.n_tokens = len(tokens)
        self._decode(len(tokens))
        return [self._logits(j) for j in range(len(tokens))]

    def _extend(self, seq: int, tokens: list[int]) -> np.ndarray:
        """Evaluate `tokens` at the end of sequence `seq` (n_batch at a time); the last one's logits."""
        b = self.batch
        for start in range(0, len(tokens), 512):
            part = tokens[start:start + 512]
            for j, token in enumerate(part):
                b.token[j], b.pos[j], b.n_seq_id[j], b.logits[j] = token, len(self.cached[seq]) + j, 1, 0
                b.seq_id[j][0] = seq
            b.logits[len(part) - 1] = 1
            b.n_tokens = len(part)
            self._decode(len(part))
            self.cached[seq] += part
        return self._logits(-1)

    def _decode(self, n: int) -> None:
        rc = self.L.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}"
                               + (f": a sequence outgrew its stream of {self.size} tokens" if rc == 1 else ""))
        self.evaluated += n

    def _logits(self, i: int) -> np.ndarray:
        ptr = self.L.llama_get_logits_ith(self.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float32, copy=True)  # (V,)


def _shared(cached: list[int], prompt: list[int]) -> int:
    """Length of the common prefix, leaving at least the prompt's last token to evaluate (its logits)."""
    n = 0
    for a, b in zip(cached, prompt[:-1]):
        if a != b:
            break
        n += 1
    return n
