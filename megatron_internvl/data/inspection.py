"""Inspection: a dry run over a data mixture (tile counts from headers, counts of everything).

`megatron-internvl inspect-data --meta META.json --tokenizer PATH --max-tokens 16384 --max-tiles 48
[--num-samples K] [--json]` (or `python tools/inspect_data.py ...`). fill_ratio = real tokens /
(packs x max_tokens). Tile counts come from image headers unless --decode is given (then every
image is decoded, as in training).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from megatron_internvl.config.data import DataConfig

from .build import build_data_loader
from .loader import PackedDataLoader
from .media import HeaderOnlyMedia, MediaLoader


def inspect_stream(loader: PackedDataLoader) -> dict[str, Any]:
    """Run a finite loader to the end; counts of samples, tiles, tokens, packs, skips, fill."""
    tokens = image_tokens = 0
    for b in loader:
        tokens += b["num_tokens"]
        image_tokens += int(b["num_tiles"].sum()) * loader.cfg.num_image_token
    st = loader.stats()
    return {
        "samples": st["samples_read"],
        "samples_packed": st["packed_samples"],
        "samples_skipped": st["samples_skipped"],
        "skips_by_reason": st["skips_by_reason"],
        "skips": st["skips"],
        "tiles": st["tiles"],
        "tokens": tokens,
        "image_tokens": image_tokens,
        "packs": st["packs"],
        "max_tokens": loader.cfg.max_tokens,
        "max_tiles": loader.cfg.max_tiles,
        "fill_ratio": st["fill_ratio"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Dry-run the data pipeline over a meta file: samples, tiles, tokens, packs, skips, fill.")
    p.add_argument("--meta", required=True, help="InternVL meta JSON")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json, sentencepiece .model, or a folder")
    p.add_argument("--max-tokens", type=int, required=True, help="l_max, LLM tokens per packed sequence")
    p.add_argument("--max-tiles", type=int, required=True, help="t_max, ViT tiles per packed sequence")
    p.add_argument("--num-samples", type=int, default=None, help="samples to read (default: one epoch)")
    p.add_argument("--template", default="internvl2_5")
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--num-image-token", type=int, default=256, help="LLM tokens per tile")
    p.add_argument("--max-dynamic-patch", type=int, default=12)
    p.add_argument("--pad-to-multiple", type=int, default=1)
    p.add_argument("--pack-buffer-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--decode", action="store_true", help="decode every image instead of reading headers")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)

    logging.basicConfig(level=logging.ERROR if args.json else logging.WARNING, format="%(levelname)s %(message)s")
    cfg = DataConfig(meta_path=args.meta, tokenizer_path=args.tokenizer, template=args.template,
                     image_size=args.image_size, num_image_token=args.num_image_token,
                     max_dynamic_patch=args.max_dynamic_patch, max_tokens=args.max_tokens,
                     max_tiles=args.max_tiles, pad_to_multiple=args.pad_to_multiple,
                     pack_buffer_size=args.pack_buffer_size, seed=args.seed, num_workers=args.workers,
                     max_skip_ratio=1.0)
    try:
        cfg.validate()
        media = (MediaLoader if args.decode else HeaderOnlyMedia)(cfg.image_size, cfg.use_thumbnail,
                                                                  cfg.image_backend, cfg.num_video_frames)
        loader = build_data_loader(cfg, media_loader=media, stop_after=1)
        n = args.num_samples if args.num_samples is not None else loader.order.samples_per_epoch
        loader = build_data_loader(cfg, loader.tokenizer, media_loader=media, stop_after=n)
        report = inspect_stream(loader)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        width = max(len(k) for k in report)
        for k, v in report.items():
            if isinstance(v, float):
                v = f"{v:.4f}"
            print(f"{k:<{width}}  {v}")
    return 0
