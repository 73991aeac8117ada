"""Full-vocabulary logits of a converted checkpoint, at any TP x PP layout.

    torchrun --nproc-per-node K tools/forward.py --ckpt CKPT --tp N --pp M \
        --inputs IN.pt --out OUT.pt [--precision fp32|bf16]

IN.pt: a dict with ``input_ids`` [B, S] (each image already expanded to <img> + <IMG_CONTEXT> x
tokens-per-tile x tiles + </img>), optional ``pixel_values`` [tiles, 3, H, W] and
``position_ids`` [B, S], as transformers' InternVL takes them. OUT.pt: float32 logits [B, S, V]
(the real vocabulary, gathered over TP, from the last pipeline stage). K must be a multiple of
N x M; the checkpoint may have been saved at any layout.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint directory (from convert import)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--inputs", required=True, help="torch.save'd dict of input tensors")
    p.add_argument("--out", required=True, help="where rank 0 of the last stage saves the logits")
    p.add_argument("--precision", default=None, choices=("fp32", "bf16"),
                   help="parameter dtype (default: the checkpoint's)")
    args = p.parse_args(argv)

    from megatron_internvl.config import ConfigError
    from megatron_internvl.convert import ConversionError
    from megatron_internvl.convert.forward import run_forward

    try:
        run_forward(args.ckpt, args.tp, args.pp, args.inputs, args.out, args.precision)
    except (ConversionError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        from megatron_internvl.parallel import distributed

        distributed.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
