"""A policy served over HTTP by a running llama.cpp server: a deployed agent, evaluated like a local one.

    python -m llama_cpp.server --model agent.gguf --port 8080 ...     # llama-cpp-python's server
    python -m himac.evaluate CONFIG.yaml --backend llamacpp-server --url http://127.0.0.1:8080 \
        --checkpoint agent.gguf

It satisfies `himac.policy.AgentPolicy` with the meaning `himac.llamacpp.LlamaCppPolicy` gives it,
so the same greedy episodes come out (tests/test_serve.py checks it on one GGUF):
- `encode(messages, prefix)`: the GGUF's chat template rendered here with jinja2 as transformers and
  LlamaCppPolicy render it (trim_blocks, lstrip_blocks), tokenised *by the server* with special
  tokens parsed, then the prefix ("1.", "Direction:") tokenised on its own. The chat template comes
  from the GGUF file (`--checkpoint agent.gguf`, read with the `gguf` package) or, for llama.cpp's
  `llama-server`, from its /props endpoint;
- `generate`: one `/v1/completions` request per prompt, temperature 0 for greedy (plain
  temperature sampling otherwise: top-k, top-p, min-p and the repeat penalty switched off, the
  distribution the other backends sample), `max_tokens`, and the stop string "\\n" for executor
  answers. The end-of-turn token stops generation on the server.

Prompts go as rendered text with the assistant turn already open and the prefix written after it:
the completion endpoint continues that text, which is how a client keeps the prefix (a chat
endpoint opens the assistant turn itself and cannot prefill it). llama.cpp's `llama-server` takes
token ids as the prompt and gets them; llama-cpp-python's server takes text only, so `encode`
checks that the server tokenises the whole text to the very ids it returns and counts any prompt
that it does not (`mismatched_prompts`, with a warning).

Differences from LlamaCppPolicy, all in what comes back, none in what is generated: a completion
cut by the newline stop has its text without the newline (the server cuts before a stop string;
every caller strips answers), and its `ids` are the server's tokenisation of the returned text.

Only the standard library speaks HTTP here (urllib); jinja2 renders the template (a transformers
dependency). Nothing is sent anywhere but `url`.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request
import warnings
from collections import OrderedDict
from datetime import datetime
from pathlib import Path

from himac.policy import Completion

FLAVOURS = ("llama-cpp-python", "llama-server")


class ServerError(RuntimeError):
    """The server could not be reached or answered with an error."""


def gguf_chat(path: str | Path) -> dict:
    """{'chat_template', 'bos_token', 'eos_token'} read from a GGUF's metadata (no llama.cpp needed)."""
    import gguf
    reader = gguf.GGUFReader(str(path))

    def field(name):
        f = reader.fields.get(name)
        return None if f is None else f.contents()

    template = field("tokenizer.chat_template")
    if not template:
        raise ValueError(f"{path} has no tokenizer.chat_template; himac prompts are chats")
    tokens = field("tokenizer.ggml.tokens") or []

    def token(name):
        i = field(name)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else ""

    return {"chat_template": template, "bos_token": token("tokenizer.ggml.bos_token_id"),
            "eos_token": token("tokenizer.ggml.eos_token_id")}


class ChatTemplate:
    """A Hugging Face chat template rendered the way transformers renders it."""

    def __init__(self, template: str, bos_token: str = "", eos_token: str = ""):
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ValueError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals.update(raise_exception=raise_exception,
                           strftime_now=lambda fmt: datetime.now().strftime(fmt))
        self.template = env.from_string(template)
        self.bos_token, self.eos_token = bos_token, eos_token

    def __call__(self, messages: list[dict]) -> str:
        return self.template.render(messages=messages, add_generation_prompt=True, bos_token=self.bos_token,
                                    eos_token=self.eos_token)


class LlamaCppServerPolicy:
    """An agent served by llama.cpp's server (llama-cpp-python's or llama-server): an AgentPolicy over HTTP."""

    def __init__(self, url: str, chat: dict | None = None, timeout: float = 300.0, seed: int = 0,
                 model: str | None = None):
        """`url`: the server's base address (http://host:port). `chat`: {'chat_template', 'bos_token',
        'eos_token'} (`gguf_chat(agent.gguf)`); None asks the server (llama-server's /props has it).
        `model`: the model name to send (a multi-model server); None: the server's default."""
        self.url, self.timeout, self.seed, self.model = url.rstrip("/"), timeout, seed, model
        props = self._props()
        self.flavour = "llama-server" if props is not None else "llama-cpp-python"
        if chat is None:
            if not (props or {}).get("chat_template"):
                raise ValueError(f"{self.url} does not tell its chat template (llama-cpp-python's server has no "
                                 "/props): give the GGUF it serves, e.g. --checkpoint agent.gguf")
            chat = {"chat_template": props["chat_template"], "bos_token": props.get("bos_token", ""),
                    "eos_token": props.get("eos_token", "")}
        self._chat = ChatTemplate(chat["chat_template"], chat.get("bos_token") or "", chat.get("eos_token") or "")
        self._texts: OrderedDict[tuple, str] = OrderedDict()  # prompt ids -> the text that tokenises to them
        self.mismatched_prompts = 0
        self.generated_tokens = 0
        self.requests = 0

    # -- HTTP ------------------------------------------------------------------------
    def _request(self, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(self.url + path, data=data, method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", errors="replace")[:500]
            raise ServerError(f"{self.url}{path}: HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            raise ServerError(f"{self.url}{path}: {getattr(e, 'reason', e)} (is the server running?)") from None

    def _props(self) -> dict | None:
        """llama-server's /props (None from llama-cpp-python's server, which has no such endpoint)."""
        try:
            return self._request("/props")
        except ServerError as e:
            if "HTTP 404" in str(e):
                self._request("/v1/models")  # reachable at all? (raises with the reason if not)
                return None
            raise

    def tokenize(self, text: str) -> list[int]:
        """The server's tokenisation of `text`, special tokens parsed, no BOS added."""
        if self.flavour == "llama-server":
            return list(self._request("/tokenize", {"content": text, "add_special": False,
                                                    "parse_special": True})["tokens"])
        return list(self._request("/extras/tokenize", {"input": text, **self._model()})["tokens"])

    def _model(self) -> dict:
        return {"model": self.model} if self.model else {}

    # -- AgentPolicy ----------------------------------------------------------------
    def encode(self, messages: list[dict], prefix: str = "") -> list[int]:
        text = self._chat(messages)
        ids = self.tokenize(text) + (self.tokenize(prefix) if prefix else [])
        if self.flavour == "llama-cpp-python" and self.tokenize(text + prefix) != ids:
            self.mismatched_prompts += 1  # this server takes text: it will see other tokens than `ids`
            if self.mismatched_prompts == 1:
                warnings.warn(f"{self.url} tokenises a prompt as a whole differently from template + prefix; "
                              "its episodes may differ from the llamacpp backend's", stacklevel=2)
        self._texts[tuple(ids)] = text + prefix
        if len(self._texts) > 4096:
            self._texts.popitem(last=False)
        return ids

    def encode_images(self, messages: list[dict], prefix: str, images: list) -> tuple[list[int], None]:
        if images:
            raise ValueError("the llamacpp-server backend is text-only: evaluate image observations with --backend hf")
        return self.encode(messages, prefix), None

    def decode(self, ids: list[int]) -> str:
        if self.flavour == "llama-server":
            return self._request("/detokenize", {"tokens": list(ids)})["content"]
        return self._request("/extras/detokenize", {"tokens": list(ids), **self._model()})["text"]

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                 stop_at_newline: bool = False, images: list | None = None,
                 choices: list | None = None) -> list[Completion]:
        if images and any(px is not None for px in images):
            raise ValueError("the llamacpp-server backend is text-only: evaluate image observations with --backend hf")
        if choices and any(choices):
            raise ValueError("the llamacpp-server backend cannot restrict answers to choices (action_choices or "
                             "blueprint_choices: true): evaluate with --backend llamacpp or hf")
        out = []
        for ids in prompts:
            body = {"prompt": self._prompt(ids), "max_tokens": max_new_tokens, "temperature": max(temperature, 0.0),
                    "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0, "frequency_penalty": 0.0,
                    "presence_penalty": 0.0, "seed": self.seed, "stop": ["\n"] if stop_at_newline else [],
                    **self._model()}
            choice = self._request("/v1/completions", body)["choices"][0]
            text = choice["text"]
            self.requests += 1
            ids_out = self.tokenize(text) if text else []
            self.generated_tokens += len(ids_out)
            out.append(Completion(ids_out, text))
        return out

    def _prompt(self, ids: list[int]):
        if self.flavour == "llama-server":
            return list(ids)
        try:
            return self._texts[tuple(ids)]
        except KeyError:
            raise ValueError("llama-cpp-python's server takes text prompts: give generate() prompts made by this "
                             "policy's encode()") from None
