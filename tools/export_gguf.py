"""Merge a run's LoRA adapter into its base model and write one GGUF file.

    python tools/export_gguf.py --checkpoint runs/sokoban_cpu-XXXX --out agent.gguf [--quant f16|f32|bf16|q8_0|q4_0|q4_k_m]
        [--base trained|original] [--lora-out agent-lora.gguf] [--no-verify]

The file loads in llama.cpp, llama-cpp-python and ollama (see docs/export.md). Beside it go an
ollama `Modelfile` and `SERVE.md` (server command lines, how the planner's and executor's prompts
are sent; docs/deploy.md); --no-deploy-files leaves them out.
With llama-cpp-python installed, the exported tokenizer is checked against the
training tokenizer on chat prompts holding `<sub_done>` before the command succeeds.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from himac import export, quiet


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="run directory written by python -m himac.coevolve")
    ap.add_argument("--out", required=True, help="GGUF file to write")
    ap.add_argument("--quant", default="f16", help=f"one of {', '.join(export.QUANTS)} (default f16)")
    ap.add_argument("--base", default="trained", choices=["trained", "original"],
                    help="merge into the weights the adapter was trained on (NF4-dequantised for a 4-bit run) "
                         "or into the unquantised base")
    ap.add_argument("--lora-out", help="also write the adapter alone as a llama.cpp LoRA GGUF")
    ap.add_argument("--no-verify", action="store_true", help="skip the llama.cpp tokenizer check")
    ap.add_argument("--no-deploy-files", action="store_true", help="write no Modelfile and SERVE.md beside the GGUF")
    ap.add_argument("--verbose", action="store_true", help="show third-party warnings and progress bars")
    args = ap.parse_args(argv)
    if not args.verbose:
        quiet.quiet()
    try:
        out = export.export_run(args.checkpoint, args.out, args.quant, args.base, args.lora_out,
                                deploy_files=not args.no_deploy_files)
    except (export.UnsupportedModel, FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)" + (f" and {args.lora_out}" if args.lora_out else ""))
    if export.read_run(args.checkpoint)[0].role_adapters:  # the base plus each role's adapter, no merged agent
        print(f"wrote {' and '.join(map(str, export.role_lora_paths(out).values()))}: the planner's and the "
              f"executor's LoRA on that base "
              f"(python -m himac.evaluate --checkpoint {args.checkpoint} --backend llamacpp applies each in its role)")
    elif not args.no_deploy_files:
        print(f"wrote {out.parent / 'Modelfile'} (ollama create himac-agent -f {out.parent / 'Modelfile'}) and "
              f"{out.parent / 'SERVE.md'} (server commands and prompts)")
    if not args.no_verify:
        try:
            bad = export.verify_tokenizer(out, args.checkpoint)
        except ImportError:
            print("note: llama-cpp-python is not installed; tokenizer not verified", file=sys.stderr)
            return 0
        if bad:
            print(f"error: llama.cpp tokenises {len(bad)} check prompts differently, first: {bad[0]!r}",
                  file=sys.stderr)
            return 1
        print("tokenizer verified: llama.cpp and the training tokenizer agree on the check prompts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
