"""Exports a checkpoint folder: `danlu export CHECKPOINT --format gguf --out model.gguf [--quant q4_k_m]`.

`--format gguf` writes one GGUF file for llama.cpp (plus an Ollama Modelfile beside it) from any Llama, Mistral,
Qwen2 or Qwen3 checkpoint folder; `--format hf` writes a clean Hugging Face folder in the dtype asked.
"""

from __future__ import annotations

import argparse
import shlex

HELP = "export a checkpoint to GGUF (llama.cpp, Ollama; f16 … q4_k_m) or to a clean Hugging Face folder"
QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m")  # danlu.export.gguf.QUANTS, kept here to stay light


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint folder (config.json, safetensors weights, tokenizer files)")
    p.add_argument("--format", choices=("gguf", "hf"), default="gguf", help="gguf (default) or hf")
    p.add_argument("--out", required=True, help="output: a .gguf file or a folder (gguf); a folder (hf)")
    p.add_argument(
        "--quant", choices=QUANTS,
        help="GGUF tensor type (default f16); q8_0/q4_0/q4_k_m use llama.cpp's quantizer (llama-cpp-python)",
    )  # fmt: skip
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), help="weights dtype (hf; default: as is)"
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--merge", action="store_true", help="CHECKPOINT is an adapter folder (LoRA, DoRA, PiSSA, "
                   "rsLoRA): fold it into its base and export the merged model")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    import tempfile

    from danlu import DanluError
    from danlu.adapters.folder import is_adapter_folder

    if is_adapter_folder(args.checkpoint) and not args.merge:
        raise DanluError(f"{args.checkpoint}: an adapter folder (peft's format); add --merge to fold it into its "
                         "base and export the merged model")  # fmt: skip
    scratch = None
    if args.merge:
        from danlu.adapters.adapter import write_merged

        if args.format == "hf":
            print(f"wrote {write_merged(args.checkpoint, args.out, dtype=args.dtype, force=args.force)}")
            return 0
        scratch = tempfile.TemporaryDirectory(prefix="danlu-merged-")  # the GGUF writer reads a model folder
        args.checkpoint = str(write_merged(args.checkpoint, f"{scratch.name}/merged", force=True))
    if args.format == "hf":
        if args.quant is not None:
            raise DanluError("--quant applies to --format gguf; use --dtype for --format hf")
        from danlu.io import export_hf

        path = export_hf(args.checkpoint, args.out, dtype=args.dtype, force=args.force)
        print(f"wrote {path}")
        return 0
    if args.dtype is not None:
        raise DanluError("--dtype applies to --format hf; use --quant for --format gguf")
    from danlu.export import export_gguf

    report = export_gguf(args.checkpoint, args.out, args.quant or "f16", force=args.force)
    print(report.summary())
    model = shlex.quote(str(report.path))
    name = report.path.stem.lower()
    print("\nrun it with llama.cpp:")
    print(f"  llama-cli -m {model} -cnv")
    print(f"  llama-server -m {model}   (OpenAI-compatible API on http://127.0.0.1:8080)")
    if report.modelfile is not None:
        print("or with Ollama:")
        print(
            f"  cd {shlex.quote(str(report.modelfile.parent))} && "
            f"ollama create {shlex.quote(name)} -f {shlex.quote(report.modelfile.name)} && ollama run {shlex.quote(name)}"
        )
    return 0
