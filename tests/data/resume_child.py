"""Child process for test_resume: restore a saved data state and write the next batches."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.helpers import FakeMedia, batch_digest, toy_config  # noqa: E402

from megatron_internvl.data.dataset import build_data_loader  # noqa: E402


def main(meta, tok, state_path, out_path, workers, n):
    cfg = toy_config(meta, tok, num_workers=int(workers), v2pe="random", pack_buffer_size=8)
    state = torch.load(state_path, weights_only=False)
    loader = build_data_loader(cfg, media_loader=FakeMedia(cfg.image_size), state=state)
    out = [batch_digest(next(loader)) for _ in range(int(n))]
    torch.save(out, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
