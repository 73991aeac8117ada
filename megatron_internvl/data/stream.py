"""The worker stream: local sample indices of one data-parallel rank, built in order.

Data-parallel rank r of R reads global indices i = j * R + r for its local j = 0, 1, 2, ...
(disjoint, complete). DataLoader worker w of W builds the local indices j = w, w + W, ...;
torch returns them in order j = 0, 1, 2, ..., so the stream does not depend on W.
"""

from __future__ import annotations

from typing import Optional

import torch

from .order import GlobalOrder
from .samples import SampleBuilder


class SampleStream(torch.utils.data.IterableDataset):
    """Yields (j, pieces | Skip) for local indices j = start, start + 1, ... (before `stop`)."""

    def __init__(self, builder: SampleBuilder, order: GlobalOrder, dp_rank: int, dp_size: int,
                 start: int, stop: Optional[int] = None):
        self.builder = builder
        self.order = order
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.start = start
        self.stop = stop

    def build(self, j: int):
        i = j * self.dp_size + self.dp_rank
        ds, line, _ = self.order.locate(i)
        return self.builder.build(ds, line, i, j)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, W = (info.id, info.num_workers) if info is not None else (0, 1)
        j = self.start + w
        while self.stop is None or j < self.stop:
            yield j, self.build(j)
            j += W
