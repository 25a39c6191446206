"""Beside an exported GGUF, what a deployment needs: an ollama `Modelfile` and `SERVE.md`.

    agent.gguf      the merged agent (export.py)
    Modelfile       ollama: FROM ./agent.gguf, the chat template in ollama's Go template syntax, the
                    end-of-turn stop string, greedy parameters (temperature 0, no repeat penalty)
    SERVE.md        the llama.cpp server command lines (llama-cpp-python's and llama.cpp's llama-server),
                    how to evaluate the served agent, and how a client sends the planner's and the
                    executor's prompts (rendered chat + prefilled prefix, through the completion endpoint)

The Go template is written for ChatML (SmolLM2 and Qwen2.5, the families himac exports), after
checking that the GGUF's own chat template renders system/user/assistant turns exactly as ChatML
(`chat_format`). A template that does not is left to ollama (no TEMPLATE line; ollama reads the GGUF's
chat template itself), and SERVE.md says so.
"""
from __future__ import annotations

from pathlib import Path

from himac.llamacpp_server import ChatTemplate, gguf_chat

IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# ollama's Go template for ChatML turns. The last message, when it is the assistant's, is left open:
# ollama then continues it, which is how a prefilled prefix ("1.", "Direction:") reaches the model.
CHATML_GO = ('{{- range $i, $_ := .Messages }}\n'
             '{{- $last := eq (len (slice $.Messages $i)) 1 -}}\n'
             '<|im_start|>{{ .Role }}\n'
             '{{ .Content }}\n'
             '{{- if or (ne .Role "assistant") (not $last) }}<|im_end|>\n'
             '{{ end }}\n'
             '{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant\n'
             '{{ end }}\n'
             '{{- end }}')


def render_chatml(messages: list[dict], generation_prompt: bool = True) -> str:
    """What CHATML_GO renders for `messages` ending with a user turn (plus the opened assistant turn)."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if generation_prompt else "")


def default_system(chat: ChatTemplate) -> str | None:
    """The system prompt a ChatML template adds when a chat has none (SmolLM2's, Qwen's), or None."""
    text = chat([{"role": "user", "content": "\x00"}])
    head = f"{IM_START}system\n"
    if text.startswith(head) and IM_END in text:
        return text[len(head):text.index(IM_END)]
    return None


def chat_format(chat: dict) -> str | None:
    """'chatml' if the chat template renders system/user/assistant turns exactly as ChatML, else None."""
    template = ChatTemplate(chat["chat_template"], chat.get("bos_token") or "", chat.get("eos_token") or "")
    messages = [{"role": "system", "content": "S\x01"}, {"role": "user", "content": "U\x02"},
                {"role": "assistant", "content": "A\x03"}, {"role": "user", "content": "V\x04"}]
    try:
        return "chatml" if template(messages) == render_chatml(messages) else None
    except Exception:  # noqa: BLE001 - a template that fails on plain turns is not ChatML
        return None


def modelfile(gguf_name: str, chat: dict, n_ctx: int = 4096) -> str:
    fmt = chat_format(chat)
    eos = chat.get("eos_token") or IM_END
    lines = [f"# ollama create himac-agent -f Modelfile    (then: ollama run himac-agent)",
             f"# The himac agent exported to {gguf_name}; see SERVE.md for how its two roles are prompted.",
             f"FROM ./{gguf_name}", ""]
    if fmt == "chatml":
        lines += ["# ChatML turns (the GGUF's chat template renders the same). A last assistant message is left",
                  "# open and continued: that is how the planner's '1.' and the executor's prefix are prefilled.",
                  f'TEMPLATE """{CHATML_GO}"""', ""]
        system = default_system(ChatTemplate(chat["chat_template"], chat.get("bos_token") or "", eos))
        if system:
            lines += ["# the template's own system prompt for chats without one (himac always sends its own)",
                      f'SYSTEM """{system}"""', ""]
    else:
        lines += ["# The chat template is not ChatML: ollama uses the GGUF's own tokenizer.chat_template.", ""]
    lines += ["# End of turn. The executor answers one line: its requests add the stop \"\\n\"",
              "# (options: {\"stop\": [\"\\n\"]}); the planner's multi-line blueprint must not stop there.",
              f'PARAMETER stop "{eos}"',
              "# greedy, as himac evaluates: no sampling, no repeat penalty",
              "PARAMETER temperature 0",
              "PARAMETER top_k 1",
              "PARAMETER repeat_penalty 1.0",
              f"PARAMETER num_ctx {n_ctx}", ""]
    return "\n".join(lines)


def _roles(config: dict) -> list[tuple[str, str, str, str, int, bool]]:
    """(role, system template, user template, prefix, max tokens, stops at a newline) of the run's env."""
    from envs import get_spec
    p = get_spec(config.get("env", "sokoban")).prompts
    if config.get("hierarchy", True):
        return [("planner", p.planner_system, p.planner_user, p.planner_prefix,
                 int(config.get("blueprint_max_tokens", 64)), False),
                ("executor", p.executor_system, p.executor_user, p.executor_prefix,
                 int(config.get("action_max_tokens", 8)), True)]
    return [("flat agent", p.flat_system, p.flat_user, p.flat_prefix, int(config.get("action_max_tokens", 8)), True)]


def is_f32(gguf_path: str | Path) -> bool:
    """Whether a GGUF's weights are all f32 (general.file_type 0): its KV cache should be f32 too."""
    import gguf
    field = gguf.GGUFReader(str(gguf_path)).fields.get("general.file_type")
    return field is not None and int(field.contents()) == 0


def serve_md(gguf_name: str, chat: dict, config: dict, n_ctx: int = 4096, f32: bool = False) -> str:
    from himac.executor import SUB_DONE_RULE
    template = ChatTemplate(chat["chat_template"], chat.get("bos_token") or "", chat.get("eos_token") or "")
    kv_py = " --type_k 0 --type_v 0" if f32 else ""
    kv_cpp = " -ctk f32 -ctv f32" if f32 else ""
    env = config.get("env", "sokoban")
    out = [f"# Serving {gguf_name}",
           "",
           f"A HiMAC agent for `{env}`: one model, two roles. The **planner** gets the task and writes a numbered "
           "blueprint of sub-goals; the **executor** gets one sub-goal at a time and answers one action per turn "
           "(or `<sub_done>`). Both are greedy (temperature 0) and both have the start of their answer "
           "*prefilled*.",
           "",
           "## Start a server",
           "",
           "```bash",
           "pip install 'himac[serve]'     # llama-cpp-python's server (fastapi, uvicorn, ...)",
           f"python -m llama_cpp.server --model {gguf_name} --host 127.0.0.1 --port 8080 --n_ctx {n_ctx}{kv_py}",
           "# or llama.cpp's own server:",
           f"llama-server -m {gguf_name} --host 127.0.0.1 --port 8080 -c {n_ctx}{kv_cpp}",
           "# or ollama, with the Modelfile beside this file:",
           "ollama create himac-agent -f Modelfile",
           "```",
           "",
           ("An f32 GGUF keeps an f32 KV cache (`--type_k 0 --type_v 0`, `-ctk f32 -ctv f32`), as himac's local "
            "llamacpp backend does, so the server plays the same greedy episodes.") if f32 else
           "The KV cache stays at the server's default (f16).",
           "",
           "## Evaluate the served agent",
           "",
           "```bash",
           "python -m himac.evaluate CONFIG.yaml --backend llamacpp-server --url http://127.0.0.1:8080 "
           f"--checkpoint {gguf_name}",
           "```",
           "",
           "The same held-out episodes as `--backend llamacpp` on this file (the chat template is read from "
           f"`{gguf_name}`; llama-server also tells it at /props).",
           "",
           "## Prompting it yourself",
           "",
           "Each turn is a chat of a system and a user message, rendered with the model's chat template, with "
           "the assistant turn opened and the role's prefix written after it. Send that text to the "
           "**completion** endpoint (`POST /v1/completions`), which continues it: the chat endpoint opens the "
           "assistant turn itself and cannot prefill it, and an agent without its prefix answers far worse. "
           "In ollama, `/api/generate` with `\"raw\": true` does the same; `/api/chat` with a last assistant "
           "message holding the prefix continues it (the Modelfile's template leaves it open).",
           ""]
    for role, system, user, prefix, max_tokens, newline in _roles(config):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        prompt = template(messages) + prefix
        stop = '["\\n"]' if newline else "[]"
        out += [f"### {role}",
                "",
                f"- system message: `{system}`" if "\n" not in system else "- system message:\n\n```\n"
                + system + "\n```",
                "- user message (fields in braces are filled per turn):",
                "",
                "```",
                user,
                "```",
                "",
                *([f"- `{{sub_done_rule}}` is `{SUB_DONE_RULE}`" + (" (config sub_done: true; empty with false)")]
                  if "{sub_done_rule}" in system + user else []),
                f"- prefilled prefix: `{prefix}`; greedy; at most {max_tokens} tokens; stop at the end-of-turn token"
                + (" and at the first newline (one action per line)" if newline else ""),
                "- the whole prompt, as the model sees it:",
                "",
                "```",
                prompt,
                "```",
                "",
                "```bash",
                "curl -s http://127.0.0.1:8080/v1/completions -H 'Content-Type: application/json' -d '{",
                f'  "prompt": "<the rendered prompt above, ending with {prefix}>",',
                f'  "max_tokens": {max_tokens}, "temperature": 0, "repeat_penalty": 1.0, "stop": {stop}}}\'',
                "```",
                "",
                f"The answer is the prefix plus the returned text (`{prefix}` + completion).",
                ""]
    return "\n".join(out)


def write_deploy_files(gguf_path: str | Path, config: dict, n_ctx: int = 4096) -> list[Path]:
    """Write Modelfile and SERVE.md beside `gguf_path` (replacing earlier ones there); returns their paths."""
    gguf_path = Path(gguf_path)
    chat = gguf_chat(gguf_path)
    written = []
    for name, text in (("Modelfile", modelfile(gguf_path.name, chat, n_ctx)),
                       ("SERVE.md", serve_md(gguf_path.name, chat, config, n_ctx, f32=is_f32(gguf_path)))):
        path = gguf_path.parent / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
