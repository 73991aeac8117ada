"""Global sample order: which (dataset, line) the global sample index i stands for.

Each epoch every dataset contributes floor(r) full copies of its lines plus a seeded subset of
round(n * frac(r)) lines (r < 1 down-samples), and the epoch is shuffled from the seed. With
`text_weight` w, index i is a text-corpus sample iff floor((i+1)w) > floor(iw), so exactly a
fraction w of every prefix comes from the text corpora. Everything is a function of the seed
and i, so any sample can be found again on resume.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Optional, Sequence

import numpy as np

from megatron_internvl.config.data import DatasetSpec


class _Pool:
    """Datasets sampled together; epoch e is a seeded shuffle of their repeated lines."""

    def __init__(self, datasets: list[int], sizes: Sequence[int], repeats: Sequence[float], seed: int, tag: int):
        self.datasets = datasets
        self.sizes = [int(sizes[d]) for d in datasets]
        self.repeats = [float(repeats[d]) for d in datasets]
        self.seed = seed
        self.tag = tag
        self.per_epoch = sum(self._count(n, r) for n, r in zip(self.sizes, self.repeats))
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @staticmethod
    def _count(n: int, r: float) -> int:
        full = int(math.floor(r))
        return full * n + int(math.floor(n * (r - full) + 0.5))

    def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        if e not in self._cache:
            ds_parts, line_parts = [], []
            for k, (d, n, r) in enumerate(zip(self.datasets, self.sizes, self.repeats)):
                full = int(math.floor(r))
                extra = self._count(n, r) - full * n
                lines = [np.arange(n, dtype=np.int64)] * full
                if extra:
                    sub = np.random.default_rng([self.seed, self.tag, d, e, 1]).permutation(n)[:extra]
                    lines.append(np.sort(sub).astype(np.int64))
                if lines:
                    ln = np.concatenate(lines)
                    line_parts.append(ln)
                    ds_parts.append(np.full(ln.size, d, dtype=np.int32))
            ds = np.concatenate(ds_parts) if ds_parts else np.zeros(0, np.int32)
            ln = np.concatenate(line_parts) if line_parts else np.zeros(0, np.int64)
            perm = np.random.default_rng([self.seed, self.tag, e, 2]).permutation(ds.size)
            if len(self._cache) >= 2:
                self._cache.pop(min(self._cache))
            self._cache[e] = (ds[perm], ln[perm])
        return self._cache[e]

    def locate(self, p: int) -> tuple[int, int, int]:
        e, k = divmod(p, self.per_epoch)
        ds, ln = self.epoch(e)
        return int(ds[k]), int(ln[k]), e

    def locate_many(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ds, ln = np.empty(p.size, np.int32), np.empty(p.size, np.int64)
        e, k = np.divmod(p, self.per_epoch)
        for epoch in np.unique(e):
            sel = e == epoch
            eds, eln = self.epoch(int(epoch))
            ds[sel], ln[sel] = eds[k[sel]], eln[k[sel]]
        return ds, ln


class GlobalOrder:
    """Global sample index -> (dataset index, line index, epoch); deterministic from the seed."""

    def __init__(self, specs: Sequence[DatasetSpec], sizes: Sequence[int], seed: int,
                 text_weight: Optional[float] = None):
        repeats = [s.repeat_time for s in specs]
        self.w = Fraction(text_weight).limit_denominator(1 << 20) if text_weight is not None else None
        if self.w is None:
            self.pools = [_Pool(list(range(len(specs))), sizes, repeats, seed, 0)]
        else:
            mm = [k for k, s in enumerate(specs) if s.kind != "text"]
            tx = [k for k, s in enumerate(specs) if s.kind == "text"]
            self.pools = [_Pool(mm, sizes, repeats, seed, 0), _Pool(tx, sizes, repeats, seed, 1)]
            if self.w > 0 and self.pools[1].per_epoch == 0:
                raise ValueError("data.text_weight > 0 but the text corpora (kind='text') hold no lines.")
            if self.w < 1 and self.pools[0].per_epoch == 0:
                raise ValueError("data.text_weight < 1 but the non-text datasets hold no lines; set text_weight=1.")
        if self.w is None and self.pools[0].per_epoch == 0:
            raise ValueError("the datasets hold no lines after repeat_time (are the annotation files empty?).")

    @property
    def samples_per_epoch(self) -> int:
        if self.w is None:
            return self.pools[0].per_epoch
        return self.pools[0].per_epoch + self.pools[1].per_epoch

    def locate(self, i: int) -> tuple[int, int, int]:
        if self.w is None:
            return self.pools[0].locate(i)
        a, b = self.w.numerator, self.w.denominator
        before = (i * a) // b
        if ((i + 1) * a) // b > before:
            return self.pools[1].locate(before)
        return self.pools[0].locate(i - before)

    def locate_many(self, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dataset indices, line indices) of the global indices `i` (int64), as `locate` each."""
        i = np.asarray(i, dtype=np.int64)
        if self.w is None:
            return self.pools[0].locate_many(i)
        a, b = self.w.numerator, self.w.denominator
        before = (i * a) // b
        text = ((i + 1) * a) // b > before
        ds, ln = np.empty(i.size, np.int32), np.empty(i.size, np.int64)
        ds[text], ln[text] = self.pools[1].locate_many(before[text])
        ds[~text], ln[~text] = self.pools[0].locate_many((i - before)[~text])
        return ds, ln
