"""`megatron-internvl generate CHECKPOINT --image PATH --prompt TEXT [--max-new-tokens N]`: greedy
decoding with this project's model, on the training chat template and tiling.

Tensor parallelism of any size (one process per TP rank, under torchrun); pipeline parallelism is
refused. There is no KV cache: each new token runs the whole sequence again (ViT included), so
N new tokens cost N full forward passes over prompt + answer, O(N * L^2) attention. Fine for
looking at what a checkpoint answers and for parity tests; not a serving path (export the
checkpoint and use vLLM / transformers for that, docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from megatron_internvl.data.media import MediaLoader
from megatron_internvl.models.pixels import normalize_pixels
from megatron_internvl.data.templates import (get_template, place_image_placeholders, render_chat,
                                              tokenize_segments, wants_bos)
from megatron_internvl.data.tiling import tile_budget_per_image


def prompt_inputs(tok, model_cfg, images: Sequence[str], prompt: str, *, template: str = "internvl2_5",
                  max_tiles: int = 12, use_thumbnail: bool = True,
                  system_message: Optional[str] = None) -> dict:
    """input_ids [1, L] (the user turn with its images, then the assistant prefix) and
    pixel_values [tiles, 3, H, W]: what training builds for the same turn."""
    media = MediaLoader(model_cfg.vision.image_size, use_thumbnail)
    budget = tile_budget_per_image(max_tiles, len(images)) if images else max_tiles
    pixels = [media.image_tiles(str(p), max_tiles=budget, min_tiles=1, augment=False,
                                rng=np.random.default_rng(0)) for p in images]
    tiles = [int(p.shape[0]) for p in pixels]
    tpl = get_template(template)
    if len(images) > 1 and "<image>" not in prompt:  # InternVL's multi-image chat convention
        prompt = "".join(f"Image-{i}: <image>\n" for i in range(1, len(images) + 1)) + prompt
    turns = place_image_placeholders([("user", prompt)], len(images))
    segments = render_chat(tpl, turns, system_message) + [("<|im_start|>assistant\n", False)]
    toks = tokenize_segments(tok, segments, [t * model_cfg.num_image_token for t in tiles],
                             bos=wants_bos(tok, tpl))
    out = {"input_ids": torch.as_tensor(toks.input_ids).unsqueeze(0)}
    if pixels:
        out["pixel_values"] = normalize_pixels(torch.cat(pixels))
    return out


def stop_ids(tok) -> list[int]:
    ids = [tok.special_to_id.get("<|im_end|>"), tok.eos_id]
    return sorted({i for i in ids if i is not None})


def greedy(model, model_cfg, inputs: dict, max_new_tokens: int, stop: Sequence[int]) -> list[int]:
    """New token ids, greedy (argmax of the full-vocabulary logits), up to a stop id (kept)."""
    from megatron_internvl.convert.forward import check_inputs, forward_logits

    ids = inputs["input_ids"]
    new: list[int] = []
    for _ in range(max_new_tokens):
        step = check_inputs({"input_ids": ids, "pixel_values": inputs.get("pixel_values")}, model_cfg)
        if torch.cuda.is_available():
            step = {k: v.cuda() for k, v in step.items()}
        logits = forward_logits(model, step, model_cfg)  # [1, S, V] on every TP rank (PP=1)
        token = int(logits[0, -1].argmax())
        new.append(token)
        if token in stop:
            break
        ids = torch.cat([ids, torch.tensor([[token]], dtype=ids.dtype)], dim=1)
    return new


def main(argv=None) -> int:
    from megatron_internvl.checkpoint.layout import HF_SUBDIR, read_info
    from megatron_internvl.config import ParallelConfig
    from megatron_internvl.convert import ConversionError
    from megatron_internvl.convert.checkpoint import build_chunk, check_layout, load_weights, read_model_config
    from megatron_internvl.data.tokenizer import load_tokenizer
    from megatron_internvl.parallel import distributed

    parser = argparse.ArgumentParser(
        prog="megatron-internvl generate",
        description="Greedy answer of a checkpoint (a training iter_NNNNNNN or a `convert import` "
        "directory) to one prompt with images, on the training template and tiling. Tensor "
        "parallel: run under torchrun with N processes (TP=N); pipeline parallelism is not "
        "supported. No KV cache: each new token re-runs the whole sequence.")
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--image", action="append", default=[], help="an image (repeat for several)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--tokenizer", default=None, help="tokenizer file or folder (default: the "
                        "checkpoint's hf/ folder)")
    parser.add_argument("--template", default="internvl2_5")
    parser.add_argument("--max-tiles", type=int, default=12, help="tile budget (split over the images)")
    parser.add_argument("--system-message", default=None)
    parser.add_argument("--precision", default=None, help="fp32 / bf16 (default: the checkpoint's)")
    parser.add_argument("--ids", action="store_true", help="also print the new token ids (JSON)")
    args = parser.parse_args(argv)
    try:
        ckpt = args.checkpoint
        model_cfg = read_model_config(ckpt)
        tokenizer = args.tokenizer or (ckpt / HF_SUBDIR if (ckpt / HF_SUBDIR).is_dir() else None)
        if tokenizer is None:
            raise ConversionError(f"{ckpt} holds no tokenizer (no {HF_SUBDIR}/ folder): pass --tokenizer")
        for image in args.image:
            if not Path(image).is_file():
                raise ConversionError(f"--image {image}: no such file")
        launch = distributed.read_launch_env()
        parallel = ParallelConfig(tensor_parallel=launch.world_size, pipeline_parallel=1)
        check_layout(model_cfg, parallel)
        tok = load_tokenizer(str(tokenizer))
        if tok.img_context_id != model_cfg.image_token_id:
            raise ConversionError(f"the tokenizer's <IMG_CONTEXT> id is {tok.img_context_id} but the model's "
                                  f"image_token_id is {model_cfg.image_token_id}: pass the model's own tokenizer")
        inputs = prompt_inputs(tok, model_cfg, args.image, args.prompt, template=args.template,
                               max_tiles=args.max_tiles, system_message=args.system_message)
        distributed.initialize(parallel)
        precision = args.precision or read_info(ckpt).get("precision", "fp32")
        model = build_chunk(model_cfg, parallel, precision)
        if torch.cuda.is_available():
            model.cuda()
        load_weights(model, ckpt)
        new = greedy(model, model_cfg, inputs, args.max_new_tokens, stop_ids(tok))
    except (ConversionError, ValueError) as exc:
        print(f"megatron-internvl generate: {exc}", file=sys.stderr)
        return 2
    if launch.rank == 0:
        print(tok.decode([t for t in new if t not in stop_ids(tok)]))
        if args.ids:
            import json

            print(json.dumps({"prompt_ids": inputs["input_ids"][0].tolist(), "new_ids": new}))
    return 0


class AnswerSampler:
    """`evaluation.samples`: a jsonl of `{"image": PATH or [PATHS], "prompt": TEXT}`; the greedy
    answers of the model being trained, written with the step to RUN_DIR/samples.jsonl and to
    TensorBoard as text (rank 0). Every rank takes part (TP ranks share the forward passes)."""

    def __init__(self, config, tokenizer):
        import json

        e, d = config.evaluation, config.data
        self.config, self.tok = config, tokenizer
        root = Path(e.samples).parent
        self.items = []
        for n, line in enumerate(Path(e.samples).read_text().splitlines(), 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            images = rec.get("image") or []
            images = [images] if isinstance(images, str) else list(images)
            self.items.append(([str(root / p) for p in images], str(rec["prompt"])))
        self.kwargs = dict(template=d.template, max_tiles=d.max_dynamic_patch, use_thumbnail=d.use_thumbnail,
                           system_message=d.system_message)

    def __call__(self, chunks, step: int) -> list[dict]:
        out = []
        for images, prompt in self.items:
            inputs = prompt_inputs(self.tok, self.config.model, images, prompt, **self.kwargs)
            new = greedy(chunks[0], self.config.model, inputs, self.config.evaluation.max_new_tokens,
                         stop_ids(self.tok))
            answer = self.tok.decode([t for t in new if t not in stop_ids(self.tok)])
            out.append({"step": step, "images": images, "prompt": prompt, "answer": answer})
        return out
