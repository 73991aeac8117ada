"""Preference pairs (MMPR lines) for MPO: one pair is one unit for the packer.

A line ``{"image": str | [str] | absent, "question": str, "chosen": str, "rejected": str}``
(optionally ``"conversations"``: earlier turns) listed in the InternVL meta JSON like SFT data
goes through the same tiling, template, decoding and tokenizer as an SFT sample. It becomes two
sequences, prompt + chosen and prompt + rejected, packed together as one `PairSample`: its token
count is both sequences (the prompt twice), its tile count the image tiles once. In the packed
micro-batch the tiles appear once and ``image_slots`` maps both responses' ``<IMG_CONTEXT>``
tokens to the same projected features, so the ViT encodes each image once per pair.

Only the final response is scored: earlier assistant turns of ``conversations`` are context.
The chosen response carries the SFT loss weights (``sft_reduction``: token, sample or square
averaging); both responses carry ``response_side`` (0 chosen, 1 rejected, -1 elsewhere).
A bad pair (malformed line, missing fields, empty or identical responses, missing or corrupt
image, over the packing budgets) is a `Skip` with file:line, counted like SFT data.

A pair's id is its dataset name and a hash of its JSON content: stable across files, orders
and repeats, it keys the precomputed reference log-probs (training/mpo/reference.py).

With ``data.shard_by: global`` (the default) pairs go through the step planner of SFT data
(`data/planned.py`): a pair is one `Unit` of two sequences (``lengths=(chosen, rejected)``) with
its tiles counted once, every reader plans the same global batch from the pairs' metadata and
decodes only the pairs of its own packs, and the data state resumes at any DP size.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from megatron_internvl.config import ConfigError
from megatron_internvl.config.data import DataConfig

from .loader import PackedDataLoader, PackShardedLoader
from .loss_weights import square_average_weights
from .media import HeaderOnlyMedia, MediaLoader
from .packing import PackedSample
from .planned import PlannedLoader
from .positions import image_deltas, position_ids
from .samples import SampleBuilder, SkipSample, shift_labels
from .sources import JsonlFile, all_specs
from .templates import IGNORE_INDEX, ROLES, place_image_placeholders, tokenize_conversation
from .tokenizer import Tokenizer

PAIR_SKIP_REASONS = ("bad_pair",)  # empty or identical responses (besides the SFT reasons)


@dataclass
class PairSample(PackedSample):
    """Both sequences of one pair, concatenated; the tiles once."""

    lengths: tuple          # (chosen sequence tokens, rejected sequence tokens)
    response_side: np.ndarray  # int64 [L]: 0 chosen response, 1 rejected response, -1 else
    pair_id: str

    @property
    def sample_lengths(self) -> tuple:
        """The planner's unit: both sequences (attention runs within each)."""
        return self.lengths


def pair_id(dataset: str, record: dict) -> str:
    digest = hashlib.sha1(json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    return f"{dataset}:{digest.hexdigest()[:20]}"


def _history(rec: dict) -> list[tuple[str, str]]:
    conv = rec.get("conversations")
    if conv is None:
        return []
    if not isinstance(conv, list):
        raise SkipSample("bad_record", "'conversations' (earlier turns) must be a list")
    out = []
    for k, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in ROLES:
            raise SkipSample("bad_record", f"earlier turn {k} needs 'from' (human/gpt/system) and a string 'value'")
        out.append((ROLES[turn["from"]], turn["value"]))
    return out


class PairBuilder(SampleBuilder):
    """One preference line -> [PairSample] or a Skip (the SFT builder's reading and errors)."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, specs, files, media, sft_reduction: str = "token"):
        super().__init__(cfg, tokenizer, specs, files, media)
        self.sft_reduction = sft_reduction

    def _build(self, spec, ds, rec, rng, j) -> list[PairSample]:
        cfg = self.cfg
        texts = {}
        for name in ("question", "chosen", "rejected"):
            value = rec.get(name)
            if not isinstance(value, str):
                raise SkipSample("bad_record", f"a preference line needs a string {name!r}")
            texts[name] = value
        if not texts["chosen"].strip() or not texts["rejected"].strip():
            raise SkipSample("bad_pair", "a response is empty")
        if texts["chosen"] == texts["rejected"]:
            raise SkipSample("bad_pair", "the chosen and rejected responses are identical")
        paths = self._image_list(rec)
        prompt = place_image_placeholders(_history(rec) + [("user", texts["question"])], len(paths))
        pixels, tiles = self._load_images(spec, paths, rng)
        image_tokens = [t * cfg.num_image_token for t in tiles]
        seqs = []
        for side in ("chosen", "rejected"):
            toks = tokenize_conversation(self.tok, self.templates[ds], prompt + [("assistant", texts[side])],
                                         image_tokens, cfg.system_message)
            labels = toks.labels.copy()
            if len(toks.turn_ends) > 1:  # earlier answers are context, not the scored response
                labels[: toks.turn_ends[-2]] = IGNORE_INDEX
            seqs.append((toks, shift_labels(labels)))
        total = sum(int(t.input_ids.shape[0]) for t, _ in seqs)
        if total > cfg.max_tokens or sum(tiles) > cfg.max_tiles:
            raise SkipSample("over_budget", f"the pair needs {total} tokens (prompt twice) / {sum(tiles)} tiles, "
                                             f"over max_tokens={cfg.max_tokens} / max_tiles={cfg.max_tiles}")
        # One V2PE draw per pair: both sequences place the image identically.
        deltas = image_deltas(cfg.v2pe, len(tiles), rng, cfg.v2pe_delta)
        (tc, lc), (tr, lr) = seqs
        pos = [position_ids(int(t.input_ids.shape[0]), t.image_spans, deltas) for t in (tc, tr)]
        weights = np.concatenate([square_average_weights(lc, self.sft_reduction), np.zeros(lr.shape, np.float32)])
        side = np.concatenate([np.where(lc != IGNORE_INDEX, 0, -1), np.where(lr != IGNORE_INDEX, 1, -1)])
        return [PairSample(
            input_ids=np.concatenate([tc.input_ids, tr.input_ids]).astype(np.int64),
            labels=np.concatenate([lc, lr]).astype(np.int64),
            loss_weights=weights.astype(np.float32),
            position_ids=np.concatenate(pos).astype(np.float32),
            pixel_values=pixels.contiguous(),
            num_tiles=list(tiles),
            dataset_index=ds,
            key=(j, 0),
            lengths=(int(tc.input_ids.shape[0]), int(tr.input_ids.shape[0])),
            response_side=side.astype(np.int64),
            pair_id=pair_id(spec.name, rec),
        )]


def finish_pair_batch(batch: dict[str, Any], pairs: list[PairSample], num_image_token: int) -> dict[str, Any]:
    """A `collate_pack` micro-batch of pairs -> one sequence per response, and the pair fields:
    ``cu_seqlens`` (two segments per pair), ``image_slots``, ``response_side``, ``response_pair``,
    ``pair_ids``, ``num_pairs``."""
    lens = [n for p in pairs for n in p.lengths]
    total = int(batch["input_ids"].shape[1])
    real = sum(lens)
    cu = np.concatenate(([0], np.cumsum(lens), [total] if total > real else [])).astype(np.int32)
    slots, side, pair_of = [], [], []
    offset = 0
    for k, p in enumerate(pairs):
        n = p.tiles * num_image_token
        own = np.arange(offset, offset + n, dtype=np.int64)
        slots += [own, own]  # chosen and rejected read the same features
        offset += n
        side.append(p.response_side)
        pair_of.append(np.where(p.response_side >= 0, k, -1))
    pad = np.full(total - real, -1, dtype=np.int64)
    batch.update(
        cu_seqlens=torch.from_numpy(cu),
        max_seqlen=int(np.diff(cu).max()),
        image_slots=torch.from_numpy(np.concatenate(slots) if slots else np.zeros(0, np.int64)),
        response_side=torch.from_numpy(np.concatenate(side + [pad])).unsqueeze(0),
        response_pair=torch.from_numpy(np.concatenate(pair_of + [pad])).unsqueeze(0),
        pair_ids=[p.pair_id for p in pairs],
        num_pairs=len(pairs),
    )
    return batch


class PreferenceLoader(PackedDataLoader):
    """The packed loader over preference pairs (the packer, order, resume and skip counting of
    `PackedDataLoader`, with `PairBuilder` and the pair fields added to each micro-batch)."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, specs, files, dp_rank: int, dp_size: int, media,
                 stop_after: Optional[int] = None, sft_reduction: str = "token"):
        super().__init__(cfg, tokenizer, specs, files, dp_rank, dp_size, media, stop_after=stop_after)
        self.builder = PairBuilder(cfg, tokenizer, specs, files, media, sft_reduction)

    def _emit(self, keys: list) -> dict[str, Any]:
        pairs = [self._live[k] for k in keys]
        return finish_pair_batch(super()._emit(keys), pairs, self.cfg.num_image_token)


def open_preference_sources(cfg: DataConfig):
    cfg.validate()
    specs = all_specs(cfg.datasets, cfg.meta_path)
    for s in specs:
        s.validate()
    return specs, [JsonlFile(s.annotation) for s in specs]


def build_preference_loader(cfg: DataConfig, tokenizer: Tokenizer, dp_rank: int = 0, dp_size: int = 1, *,
                            sft_reduction: str = "token", media_loader: Any = None,
                            stop_after: Optional[int] = None, state: Optional[dict] = None,
                            packs_per_step: Optional[int] = None, cost=None):
    """`build_data_loader` for preference data: an iterator of packed pair micro-batches.

    ``data.shard_by``: ``global`` (the planned loader of SFT data: `packs_per_step` packs per
    step, balanced with `cost`, each rank decodes its own), ``sample`` (each rank packs its own
    share) or ``pack`` (every rank packs the global stream and keeps every dp-th pack)."""
    specs, files = open_preference_sources(cfg)
    media = media_loader or MediaLoader(cfg.image_size, cfg.use_thumbnail, cfg.image_backend, cfg.num_video_frames)
    if cfg.shard_by == "global":
        if getattr(cfg, "index_path", None):
            raise ConfigError(f"data.index_path={cfg.index_path}: the sample index holds SFT samples; preference "
                            "pairs are planned from their own metadata pass: unset data.index_path for MPO")
        if media_loader is None:
            header_media = HeaderOnlyMedia(cfg.image_size, cfg.use_thumbnail, cfg.image_backend,
                                           cfg.num_video_frames)
        else:
            header_media = getattr(media_loader, "header_only", lambda: media_loader)()
        loader = PlannedLoader(
            cfg, tokenizer, specs, files, dp_rank, dp_size, media, header_media, packs_per_step or dp_size,
            cost=cost, stop_after=stop_after,
            builder_factory=lambda m: PairBuilder(cfg, tokenizer, specs, files, m, sft_reduction),
            finish=functools.partial(finish_pair_batch, num_image_token=cfg.num_image_token))
    elif cfg.shard_by == "pack":
        inner = PreferenceLoader(cfg, tokenizer, specs, files, 0, 1, media, stop_after, sft_reduction)
        loader = PackShardedLoader(inner, dp_rank, dp_size)
    else:
        loader = PreferenceLoader(cfg, tokenizer, specs, files, dp_rank, dp_size, media, stop_after, sft_reduction)
    if state is not None:
        loader.load_state_dict(state)
    return loader
