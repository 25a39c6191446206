"""Command line: evaluate a trained agent on held-out episodes, on transformers, llama.cpp or a llama.cpp server.

    python -m himac.evaluate --checkpoint RUN_DIR [--backend hf|llamacpp] [--episodes N] [--out report.json]
    python -m himac.evaluate CONFIG.yaml --checkpoint agent.gguf          # an exported agent
    python -m himac.evaluate CONFIG.yaml --checkpoint smollm2-135m        # the untrained base
    python -m himac.evaluate CONFIG.yaml --backend llamacpp-server --url http://127.0.0.1:8080 \
        --checkpoint agent.gguf                                          # an agent a server is serving

Every backend runs the same `himac.evaluation.run_evaluation` on the same seeds;
only the policy differs (`himac.policy.Policy` over transformers,
`himac.llamacpp.LlamaCppPolicy` over a GGUF, or `himac.llamacpp_server.LlamaCppServerPolicy`
over HTTP, with the chat template read from --checkpoint: the GGUF the server serves, or a
run directory). A run directory evaluated with
llamacpp is exported first (`RunDir.export_file`), and the export is reused while
the checkpoint is unchanged. This module sits above export.py for that reason;
the evaluation itself (himac/evaluation.py) is below it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from himac import config as C
from himac import export, models, quiet
from himac.evaluation import report_table, run_evaluation
from himac.experiment import load_config
from himac.llamacpp_server import ServerError
from himac.rundir import RunDir

BACKENDS = ("hf", "llamacpp")  # the local ones, over a checkpoint
SERVER = "llamacpp-server"  # an agent served over HTTP (--url)


def resolve_config(config: str | None, checkpoint: str | None, overrides: dict):
    """CONFIG's env/planner/executor keys, the checkpoint's model keys, then --set overrides."""
    flat: dict = {}
    run = RunDir(checkpoint, create=False) if checkpoint and Path(checkpoint).is_dir() else None
    if run is not None:
        if not run.config_file.is_file():
            raise C.ConfigError(f"--checkpoint {checkpoint}: a directory without config.yaml is not a run directory")
        flat.update(run.read_config())
    elif config is None:
        raise C.ConfigError(f"--checkpoint {checkpoint} is not a run directory: give a CONFIG for the env and agent")
    if config is not None:
        flat.update(C.load_yaml(config))
    if run is not None:  # the checkpoint decides the model its adapter belongs to
        saved = run.read_config()
        flat.update({k: saved[k] for k in C.field_names(models.ModelConfig) if k in saved})
    flat.update(overrides)
    return load_config(None, base=flat)


def server_chat(checkpoint: str | None, cfg) -> dict | None:
    """The chat template of a served agent, from --checkpoint: a .gguf file's metadata or a run directory's
    tokenizer (None: ask the server, which llama-server can answer)."""
    from himac.llamacpp_server import gguf_chat
    if checkpoint is None:
        return None
    path = Path(checkpoint)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"--checkpoint {checkpoint}: no such GGUF file")
        return gguf_chat(path)
    if not path.is_dir() and checkpoint not in models.EMBEDDED:
        raise FileNotFoundError(f"--checkpoint {checkpoint}: expected the served .gguf file or a run directory")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(models.model_path(cfg.model))
    return {"chat_template": tok.chat_template, "bos_token": tok.bos_token or "", "eos_token": tok.eos_token or ""}


def load_backend(backend: str, checkpoint: str | None, cfg, quant: str = "f32", threads: int | None = None,
                 n_ctx: int = 4096, url: str | None = None):
    """The policy for `backend` over `checkpoint` (run dir, .gguf file or embedded model name), or for
    llamacpp-server the agent served at `url` (`checkpoint` then only gives the chat template)."""
    if backend == SERVER:
        from himac.llamacpp_server import LlamaCppServerPolicy
        if not url:
            raise C.ConfigError("--backend llamacpp-server needs --url http://HOST:PORT of a running server")
        return LlamaCppServerPolicy(url, server_chat(checkpoint, cfg), seed=cfg.run.seed)
    if checkpoint is None:
        raise C.ConfigError(f"--backend {backend} needs --checkpoint")
    path = Path(checkpoint)
    is_gguf, is_run = path.suffix == ".gguf", path.is_dir()
    is_shape = models.is_shape(checkpoint)
    if not (is_gguf or is_run or checkpoint in models.EMBEDDED or is_shape):
        raise FileNotFoundError(f"--checkpoint {checkpoint}: expected a run directory, a .gguf file, a shape model "
                                f"(shape:NAME) or one of {sorted(models.EMBEDDED)}")
    if is_gguf and not path.is_file():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such GGUF file")
    run = RunDir(path, create=False) if is_run else None
    if run is not None:  # the checkpoint decides what its weights are, whatever config the caller built
        saved = run.read_config() if run.config_file.is_file() else {}
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, **{k: saved[k] for k in models.ADAPTER_KEYS if k in saved}))
    if backend == "llamacpp":
        from himac.llamacpp import LlamaCppPolicy
        role_loras = None
        if run is not None:  # merge and export once; reused while the checkpoint is unchanged
            gguf_path = run.export_file(quant)
            roles = cfg.model.role_adapters  # the base GGUF plus each role's LoRA GGUF (export.role_lora_paths)
            role_loras = export.role_lora_paths(gguf_path) if roles else None
            written = [gguf_path, *(role_loras or {}).values()]
            if not all(p.is_file() and p.stat().st_mtime >= run.adapter_weights.stat().st_mtime for p in written):
                print(f"himac: exporting {path} to {gguf_path} ({quant})", file=sys.stderr)
                export.export_run(path, gguf_path, quant)
            path = gguf_path
        elif is_shape:  # random weights have no GGUF of their own: tools/bench_eval.py exports one
            raise C.ConfigError(f"--checkpoint {checkpoint}: a shape model runs under --backend hf; for llama.cpp "
                                f"export it first (tools/bench_eval.py --checkpoint {checkpoint} does)")
        elif not is_gguf:
            path = models.embedded_gguf(checkpoint)
        return LlamaCppPolicy(path, n_ctx=n_ctx, n_threads=threads, seed=cfg.run.seed, role_loras=role_loras)
    from himac.policy import Policy
    if is_gguf:
        # transformers can dequantise a GGUF, but its GGUF tokenizer conversion renumbers tokens
        # (measured on an exported tiny model), so it would not be the agent that was trained.
        raise C.ConfigError(f"--checkpoint {checkpoint}: the hf backend runs a run directory or an embedded model; "
                            "run a .gguf with --backend llamacpp")
    if threads:
        import torch
        torch.set_num_threads(threads)
    mcfg = cfg.model if is_run else dataclasses.replace(cfg.model, model=checkpoint)
    model, tok = models.load(mcfg, adapter_dir=run.adapter_dir if run is not None else None)
    return Policy(model, tok, gen_batch_size=cfg.run.gen_batch_size)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m himac.evaluate",
                                 description="Greedy hierarchical evaluation on held-out seeds (HF or llama.cpp).")
    ap.add_argument("config", nargs="?", help="flat YAML config (env, planner, executor keys); "
                    "default with a run directory: its config.yaml")
    ap.add_argument("--checkpoint",
                    help="run directory (python -m himac.coevolve --out), a .gguf file, or an embedded model name "
                         "(smollm2-135m: the untrained base); with llamacpp-server, the GGUF the server serves "
                         "(for its chat template)")
    ap.add_argument("--backend", choices=(*BACKENDS, SERVER),
                    help="hf (transformers), llamacpp, or llamacpp-server (an agent served at --url by llama.cpp's "
                         "server: python -m llama_cpp.server or llama-server); default: llamacpp for a .gguf file, "
                         "hf otherwise")
    ap.add_argument("--url", help="llamacpp-server: the server's address, e.g. http://127.0.0.1:8080")
    ap.add_argument("--verbose", action="store_true", help="show third-party warnings and progress bars")
    ap.add_argument("--episodes", type=int, help="held-out episodes (default: the config's eval_episodes, or 16)")
    ap.add_argument("--seed-offset", type=int, default=0, help="start of the held-out seed stream")
    ap.add_argument("--quant", default="f32", help="llamacpp on a run directory: precision of the GGUF it is "
                    f"exported to first ({', '.join(export.QUANTS)})")
    ap.add_argument("--threads", type=int, help="CPU threads of either backend (default: all cores)")
    ap.add_argument("--n-ctx", type=int, default=4096,
                    help="llama.cpp: the longest prompt + answer (each sequence's KV stream grows up to it as needed)")
    ap.add_argument("--out", help="write the report (metrics and every episode) as JSON here")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key (repeatable)")
    args = ap.parse_args(argv)
    if not args.verbose:
        quiet.quiet()
    backend = args.backend or ("llamacpp-server" if args.url else
                               "llamacpp" if (args.checkpoint or "").endswith(".gguf") else "hf")
    try:
        if args.checkpoint is None and backend != SERVER:
            raise C.ConfigError(f"--backend {backend} needs --checkpoint (a run directory, a .gguf file or "
                                f"{', '.join(sorted(models.EMBEDDED))})")
        if args.quant not in export.QUANTS:
            raise C.ConfigError(f"--quant {args.quant!r}: must be one of {', '.join(export.QUANTS)}")
        cfg = resolve_config(args.config, args.checkpoint, C.parse_overrides(args.overrides))
        episodes = args.episodes if args.episodes is not None else (cfg.run.eval_episodes or 16)
        if episodes < 1:
            raise C.ConfigError(f"--episodes {episodes}: must be >= 1")
        policy = load_backend(backend, args.checkpoint, cfg, args.quant, args.threads, args.n_ctx, args.url)
    except (C.ConfigError, FileNotFoundError, export.UnsupportedModel, ImportError, ServerError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = run_evaluation(policy, cfg, episodes, args.seed_offset)
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    report = {"backend": backend, "checkpoint": args.checkpoint, "env": cfg.run.env, "seed_offset": args.seed_offset,
              **({"url": args.url} if backend == SERVER else {}), **result}
    where = args.url if backend == SERVER else args.checkpoint
    print(f"himac evaluate: {cfg.run.env}, {episodes} held-out episodes, backend {backend}, {where}")
    print(report_table(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"himac: report written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
