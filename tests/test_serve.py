"""Deployment: the ollama Modelfile and SERVE.md beside an exported GGUF, and an agent served by a real
llama.cpp server (llama-cpp-python's, started here on 127.0.0.1) playing the same greedy episodes as the
local llamacpp backend on the same file."""
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from himac import deploy, evaluate, export
from himac.llamacpp_server import ChatTemplate, LlamaCppServerPolicy, ServerError, gguf_chat
from test_evaluate_cli import SHORT, evaluate_cli, same_episode
from test_export import make_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(run directory, its f32 GGUF in a folder of its own) of a tiny Qwen2 (test-only) with a random adapter."""
    root = tmp_path_factory.mktemp("serve")
    run = make_run(root / "run", seed=5)  # a seed whose greedy blueprints hold words
    return run, export.export_run(run, root / "deploy" / "agent.gguf", "f32", progress=False)


@pytest.fixture(scope="module")
def server(exported):
    """The base URL of `python -m llama_cpp.server` serving the GGUF (f32 KV cache, as the local backend)."""
    pytest.importorskip("llama_cpp")
    for module in ("fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings"):
        pytest.importorskip(module, reason="llama-cpp-python's server needs pip install 'himac[serve]'")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(exported[1]), "--host",
                             "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--n_threads", "1",
                             "--type_k", "0", "--type_v", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    try:
        while True:
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=5).read()
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"the server exited: {proc.stderr.read()[-2000:]}")
                assert time.monotonic() < deadline, "the server did not start in 300 s"
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def without_bad_bytes(e: dict) -> tuple:
    """An episode with U+FFFD removed: llama-cpp-python's server drops bytes that are not UTF-8 where the local
    backends write U+FFFD (the tiny random model writes such token sequences)."""
    seed, blueprint, actions, *rest = same_episode(e)
    return seed, blueprint.replace("\ufffd", ""), [a.replace("\ufffd", "") for a in actions], *rest


# -- the files beside the GGUF ----------------------------------------------------------------
def test_modelfile_and_serve_md_beside_the_gguf(exported):
    run, gguf = exported
    modelfile, serve = (gguf.parent / "Modelfile").read_text(), (gguf.parent / "SERVE.md").read_text()
    chat = gguf_chat(gguf)
    assert deploy.chat_format(chat) == "chatml"
    assert "FROM ./agent.gguf\n" in modelfile
    assert f'TEMPLATE """{deploy.CHATML_GO}"""' in modelfile and "{{ .Content }}" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "PARAMETER temperature 0\n" in modelfile
    assert "PARAMETER repeat_penalty 1.0" in modelfile and '"stop": ["\\n"]' in modelfile  # the executor's stop
    # the ChatML that the Go template writes is what the GGUF's own template renders
    messages = [{"role": "system", "content": "Plan."}, {"role": "user", "content": "Map:\n#@$.#"}]
    assert ChatTemplate(chat["chat_template"])(messages) == deploy.render_chatml(messages)
    assert "python -m llama_cpp.server --model agent.gguf --host 127.0.0.1 --port 8080" in serve
    assert "--type_k 0 --type_v 0" in serve and "llama-server -m agent.gguf" in serve  # f32 GGUF: f32 KV cache
    assert "--backend llamacpp-server --url http://127.0.0.1:8080" in serve
    assert "### planner" in serve and "### executor" in serve and "/v1/completions" in serve
    assert "<|im_start|>assistant\n1.\n```" in serve and "<|im_start|>assistant\nDirection:\n```" in serve
    assert '"stop": ["\\n"]' in serve and "cannot prefill" in serve


def test_a_template_that_is_not_chatml_is_left_to_ollama():
    llama3 = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}"
              "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>"
              "\n\n{% endif %}")
    chat = {"chat_template": llama3, "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    assert deploy.chat_format(chat) is None
    text = deploy.modelfile("agent.gguf", chat)
    assert "TEMPLATE" not in text and 'PARAMETER stop "<|eot_id|>"' in text and "FROM ./agent.gguf" in text


# -- the served agent ---------------------------------------------------------------------------
def test_served_agent_plays_the_same_greedy_episodes_as_llamacpp(exported, server):
    from himac.llamacpp import LlamaCppPolicy
    run, gguf = exported
    cfg = evaluate.resolve_config(None, str(run), {})
    served = LlamaCppServerPolicy(server, gguf_chat(gguf))
    local = LlamaCppPolicy(gguf, n_threads=1)
    assert served.flavour == "llama-cpp-python"
    messages = [{"role": "system", "content": "You plan."}, {"role": "user", "content": "Map:\n#@$.#\nTask: go"}]
    for prefix in ("", "1.", "Direction:"):
        assert served.encode(messages, prefix) == local.encode(messages, prefix), prefix
    lc = evaluate.run_evaluation(local, cfg, 6, progress=False)
    sv = evaluate.run_evaluation(served, cfg, 6, progress=False)
    assert sum(len(e["actions"]) for e in lc["episodes"]) >= 12  # executor turns really ran
    assert len({a for e in lc["episodes"] for a in e["actions"]}) >= 2  # and said different things
    assert [without_bad_bytes(e) for e in sv["episodes"]] == [without_bad_bytes(e) for e in lc["episodes"]]
    for key in ("success_rate", "return_mean", "blueprint_valid_rate"):
        assert sv[key] == pytest.approx(lc[key]), key
    assert served.mismatched_prompts == 0 and served.requests > 12


def test_evaluate_cli_on_a_served_agent(exported, server, tmp_path):
    from himac import config as C
    from himac.llamacpp import LlamaCppPolicy
    run, gguf = exported
    out = tmp_path / "served.json"
    proc = evaluate_cli("--checkpoint", run, "--backend", "llamacpp-server", "--url", server, "--episodes", 3, *SHORT,
                        "--out", out)  # the chat template from the run directory's tokenizer this time
    assert "success_rate" in proc.stdout and server in proc.stdout
    served = json.loads(out.read_text())
    cfg = evaluate.resolve_config(None, str(run), C.parse_overrides(SHORT[1::2]))
    local = evaluate.run_evaluation(LlamaCppPolicy(gguf, n_threads=1), cfg, 3, progress=False)
    assert served["backend"] == "llamacpp-server" and served["url"] == server and len(served["episodes"]) == 3
    assert [without_bad_bytes(e) for e in served["episodes"]] == [without_bad_bytes(e) for e in local["episodes"]]


def test_server_errors_are_named(exported, tmp_path):
    run, gguf = exported
    proc = evaluate_cli("--checkpoint", run, "--backend", "llamacpp-server", check=False)
    assert proc.returncode == 2 and "--url" in proc.stderr and "Traceback" not in proc.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here now
    proc = evaluate_cli("--checkpoint", gguf, "configs/sokoban_cpu_paper.yaml", "--url", f"http://127.0.0.1:{port}",
                        check=False)
    assert proc.returncode == 2 and "is the server running?" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(ServerError, match="is the server running"):
        LlamaCppServerPolicy(f"http://127.0.0.1:{port}", gguf_chat(gguf), timeout=5)
