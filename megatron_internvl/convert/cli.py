"""``megatron-internvl convert`` / ``tools/convert_hf.py``: import and export commands.

    import --hf-dir DIR --out DIR --tp N --pp M [--first-stage-layers K] [--dtype auto|fp32|bf16]
    export --ckpt DIR --out DIR --format transformers|remote-code [--max-shard-size 5GB]

User errors (bad checkpoint, layout, paths) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

from . import ConversionError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-internvl convert",
        description="Convert InternVL checkpoints between Hugging Face and Megatron-Core.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    imp = sub.add_parser("import", help="Hugging Face directory -> megatron distributed checkpoint")
    imp.add_argument("--hf-dir", required=True, help="HF model directory (config.json + safetensors)")
    imp.add_argument("--out", required=True, help="output checkpoint directory (must not exist)")
    imp.add_argument("--tp", type=int, default=1, help="tensor-parallel size to save at")
    imp.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to save at")
    imp.add_argument("--ep", type=int, default=1, help="expert-parallel size to save at (MoE LLMs)")
    imp.add_argument("--first-stage-layers", type=int, default=None,
                     help="LLM layers on the first pipeline stage (which also holds the ViT)")
    imp.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"),
                     help="parameter dtype of the checkpoint (auto: the HF tensors' dtype)")
    imp.add_argument("--image-token-id", type=int, default=None,
                     help="<IMG_CONTEXT> id when the tokenizer files do not say (remote-code)")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    exp = sub.add_parser("export", help="megatron checkpoint -> Hugging Face directory")
    exp.add_argument("--ckpt", required=True, help="checkpoint directory written by import")
    exp.add_argument("--out", required=True, help="output HF directory (must not exist)")
    exp.add_argument("--format", required=True, choices=("transformers", "remote-code"))
    exp.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "import":
            from .importer import run_import

            if args.tp < 1 or args.pp < 1 or args.ep < 1:
                raise ConversionError("--tp, --pp and --ep must be >= 1")
            run_import(args.hf_dir, args.out, tp=args.tp, pp=args.pp,
                       first_stage_layers=args.first_stage_layers, precision=args.dtype,
                       overwrite=args.overwrite, image_token_id=args.image_token_id, ep=args.ep)
        else:
            from .exporter import run_export

            run_export(args.ckpt, args.out, args.format, overwrite=args.overwrite,
                       max_shard_size=args.max_shard_size, in_process=True)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
