"""Load an exported tiny InternVL with transformers and score a training sample with it.

    python examples/tiny/check_export.py HF_DIR DATA_DIR

Fails if transformers reports missing or unexpected weights; prints the caption loss that the
transformers model gives one image sample of the tiny dataset (it has learned the captions when
this is well below the ~6.2 of an untrained model).
"""

from __future__ import annotations

import sys

import torch


def main(hf_dir: str, data_dir: str) -> int:
    from transformers import InternVLForConditionalGeneration

    from megatron_internvl.config.data import DataConfig
    from megatron_internvl.data.build import build_data_loader

    model, info = InternVLForConditionalGeneration.from_pretrained(hf_dir, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        print(f"check_export: transformers could not load every weight: {bad}", file=sys.stderr)
        return 1
    model.eval()
    cfg = DataConfig(meta_path=f"{data_dir}/meta.json", tokenizer_path=f"{data_dir}/tokenizer.json",
                     image_size=56, num_image_token=4, max_dynamic_patch=2, max_tokens=256, max_tiles=8,
                     num_workers=0, pack_buffer_size=1)
    batch = next(build_data_loader(cfg, stop_after=1))
    n = int(batch["cu_seqlens"][1])  # the first sample of the pack
    ids = batch["input_ids"][:, :n]
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=batch["pixel_values"] if len(batch["pixel_values"]) else None,
                       attention_mask=torch.ones_like(ids)).logits.float()
    labels = batch["labels"][0, :n]
    mask = labels >= 0
    loss = torch.nn.functional.cross_entropy(logits[0][mask], labels[mask])
    print(f"check_export: loaded {hf_dir} with transformers ({sum(p.numel() for p in model.parameters())} "
          f"parameters, no missing or unexpected keys); caption loss on a training sample: {loss:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
