"""Packing samples into sequences under two budgets: LLM tokens (l_max) and ViT tiles (t_max).

The steps of the InternVL2.5 paper (section 4.2):
  select   -- the caller hands in items already within both budgets (dataset.py splits or
              drops longer ones);
  search   -- find the buffered partial pack with the most tokens (then most tiles) that
              still fits the new item under both budgets: the buffer is kept sorted by
              (tokens, tiles) and searched with `bisect`;
  pack     -- append the item to that pack (or start a new one); samples keep their own
              positions and attend only within themselves (cu_seqlens, see collate_pack);
  maintain -- a pack that reached l_max is emitted at once; otherwise it goes back into the
              buffer, and when the buffer is over capacity its largest pack is emitted.

`TwoBudgetPacker` only sees (item, tokens, tiles); `collate_pack` turns the samples of one
pack into the THD micro-batch dict the model consumes.
"""

from __future__ import annotations

from bisect import bisect_right, insort
from dataclasses import dataclass
from typing import Any, Hashable, Optional, Sequence

import numpy as np
import torch

from .images import concat_tiles

_BIG = 1 << 62


class TwoBudgetPacker:
    def __init__(self, max_tokens: int, max_tiles: int, buffer_size: int = 64, full_slack: int = 0):
        if max_tokens < 1 or max_tiles < 0 or buffer_size < 1:
            raise ValueError("max_tokens >= 1, max_tiles >= 0 and buffer_size >= 1 are required")
        self.max_tokens = max_tokens
        self.max_tiles = max_tiles
        self.buffer_size = buffer_size
        # A pack with at most this many free tokens counts as full and is emitted at once.
        self.full_slack = full_slack
        self._keys: list[tuple[int, int, int]] = []   # (tokens, tiles, uid), ascending
        self._items: dict[int, list] = {}
        self._next_uid = 0

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, item: Hashable, tokens: int, tiles: int) -> Optional[list]:
        """Add one item; returns the items of a finished pack, or None."""
        if tokens > self.max_tokens or tiles > self.max_tiles or tokens < 1 or tiles < 0:
            raise ValueError(
                f"item {item!r} with {tokens} tokens / {tiles} tiles is outside the budgets "
                f"({self.max_tokens} tokens, {self.max_tiles} tiles); select must split or drop it"
            )
        room_tokens = self.max_tokens - tokens
        room_tiles = self.max_tiles - tiles
        keys = self._keys
        # search: the largest key <= (room_tokens, room_tiles), then walk down past packs
        # that fit the tokens but not the tiles.
        i = bisect_right(keys, (room_tokens, room_tiles, _BIG)) - 1
        while i >= 0 and keys[i][1] > room_tiles:
            i -= 1
        if i >= 0:
            tok0, til0, uid = keys.pop(i)
            items = self._items.pop(uid)
            items.append(item)
            tokens += tok0
            tiles += til0
        else:
            items = [item]
        # maintain
        if tokens >= self.max_tokens - self.full_slack:
            return items
        uid = self._next_uid
        self._next_uid += 1
        insort(keys, (tokens, tiles, uid))
        self._items[uid] = items
        if len(keys) > self.buffer_size:
            _, _, uid = keys.pop()
            return self._items.pop(uid)
        return None

    def flush(self) -> list[list]:
        """Emit every buffered pack, largest first (end of a finite stream)."""
        out = [self._items.pop(uid) for _, _, uid in reversed(self._keys)]
        self._keys.clear()
        return out

    def buffered_items(self) -> list:
        return [it for _, _, uid in self._keys for it in self._items[uid]]

    def state_dict(self) -> dict:
        return {
            "packs": [[t, n, uid, list(self._items[uid])] for t, n, uid in self._keys],
            "next_uid": self._next_uid,
        }

    def load_state_dict(self, state: dict) -> None:
        self._keys = []
        self._items = {}
        for t, n, uid, items in state["packs"]:
            self._keys.append((int(t), int(n), int(uid)))
            self._items[int(uid)] = [tuple(x) if isinstance(x, list) else x for x in items]
        self._keys.sort()
        self._next_uid = int(state["next_uid"])


def first_fit_pack(lengths: Sequence[int], tiles: Sequence[int], max_tokens: int, max_tiles: int,
                   open_packs: int = 64) -> list[list[int]]:
    """Baseline: streaming first fit with at most `open_packs` open packs (oldest closed first)."""
    packs: list[list] = []  # [tokens, tiles, [idx...]]
    done: list[list[int]] = []
    for k, (l, t) in enumerate(zip(lengths, tiles)):
        for p in packs:
            if p[0] + l <= max_tokens and p[1] + t <= max_tiles:
                p[0] += l
                p[1] += t
                p[2].append(k)
                break
        else:
            packs.append([l, t, [k]])
            if len(packs) > open_packs:
                done.append(packs.pop(0)[2])
    done.extend(p[2] for p in packs)
    return done


@dataclass
class PackedSample:
    """One sample ready for packing. `labels` are already shifted (see collate_pack)."""

    input_ids: np.ndarray       # int64 [L]
    labels: np.ndarray          # int64 [L]
    loss_weights: np.ndarray    # float32 [L]
    position_ids: np.ndarray    # float32 [L]
    pixel_values: torch.Tensor  # uint8 [T, 3, S, S] (normalised on the rank's device), or images.EncodedTiles
    num_tiles: list             # tiles per image, in order
    dataset_index: int
    key: tuple                  # (rank-local sample index, piece)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def tiles(self) -> int:
        return int(self.pixel_values.shape[0])

    @property
    def sample_lengths(self) -> tuple:
        """LLM sequences in this unit (attention runs within each): one for a sample."""
        return (self.num_tokens,)


def padded_length(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def collate_pack(samples: Sequence[PackedSample], *, image_size: int, pad_to_multiple: int = 1,
                 pad_id: int = 0, dataset_names: Sequence[str] = ()) -> dict[str, Any]:
    """Concatenate samples into one THD micro-batch.

    labels[0, t] is the target for the prediction made at token t (shifted left by one within
    each sample; a sample's last token and all padding get -100). cu_seqlens are the sample
    boundaries after image-token expansion, with the trailing padding as its own segment.
    """
    lens = [s.num_tokens for s in samples]
    n_real = sum(lens)
    total = padded_length(max(n_real, 1), pad_to_multiple)
    pad = total - n_real
    cu = np.zeros(len(samples) + 1 + (1 if pad else 0), dtype=np.int64)
    np.cumsum(lens, out=cu[1:len(samples) + 1])
    ids = [s.input_ids for s in samples]
    labels = [s.labels for s in samples]
    weights = [s.loss_weights for s in samples]
    pos = [s.position_ids for s in samples]
    if pad:
        cu[-1] = total
        ids.append(np.full(pad, pad_id, dtype=np.int64))
        labels.append(np.full(pad, -100, dtype=np.int64))
        weights.append(np.zeros(pad, dtype=np.float32))
        pos.append(np.arange(pad, dtype=np.float32))
    tok_ds = np.repeat(np.array([s.dataset_index for s in samples] + [-1], dtype=np.int64), lens + [pad])
    seg = np.diff(cu)
    pix = [s.pixel_values for s in samples if s.tiles]
    if pix:
        pixel_values = concat_tiles(pix)
    else:
        pixel_values = torch.zeros((0, 3, image_size, image_size), dtype=torch.uint8)
    num_tiles = [n for s in samples for n in s.num_tiles]
    return {
        "input_ids": torch.from_numpy(np.concatenate(ids).astype(np.int64, copy=False)).unsqueeze(0),
        "labels": torch.from_numpy(np.concatenate(labels).astype(np.int64, copy=False)).unsqueeze(0),
        "loss_weights": torch.from_numpy(np.concatenate(weights).astype(np.float32, copy=False)).unsqueeze(0),
        "position_ids": torch.from_numpy(np.concatenate(pos).astype(np.float32, copy=False)).unsqueeze(0),
        "cu_seqlens": torch.from_numpy(cu.astype(np.int32)),
        "max_seqlen": int(seg.max()) if len(seg) else 0,
        "pixel_values": pixel_values,
        "image_flags": torch.ones(pixel_values.shape[0], dtype=torch.long),
        "num_tiles": torch.tensor(num_tiles, dtype=torch.long),
        "token_dataset": torch.from_numpy(tok_ds).unsqueeze(0),
        "dataset_names": list(dataset_names),
        "num_samples": len(samples),
        "num_tokens": n_real,
        "sample_keys": [tuple(s.key) for s in samples],
    }
