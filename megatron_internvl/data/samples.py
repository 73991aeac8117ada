"""Sample building: one annotation line -> the packed-sample pieces it yields, or a `Skip`.

Each sample has its own RNG seeded by (seed, global index): JPEG augmentation and V2PE deltas
are a function of the index, so any sample can be rebuilt exactly. A bad line is returned as a
`Skip` record (reason, file:line) rather than raised, so that the stream and the skip counts do
not depend on which worker built it.

Truncation (the paper's "select"): a conversation longer than l_max tokens (or t_max tiles)
is cut after the last whole assistant turn that fits, dropping the images after the cut; if
not even the first answer fits, the sample is skipped ("over_budget"). Pre-training text and
text corpora are split into several pieces of at most l_max tokens, each cut placed before
an image's `<img>` rather than inside it; an image that cannot fit one piece skips the
sample.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from megatron_internvl.config.data import DataConfig, DatasetSpec

from .images import ImageDecodeError, concat_tiles
from .loss_weights import square_average_weights
from .packing import PackedSample
from .positions import image_deltas, position_ids
from .sources import JsonlFile, parse_record, resolve_media
from .templates import (
    IGNORE_INDEX,
    TemplateError,
    Tokenized,
    get_template,
    normalize_turns,
    place_image_placeholders,
    place_video_frames,
    tokenize_conversation,
    tokenize_plain,
)
from .tiling import tile_budget_per_image
from .tokenizer import Tokenizer
from .video import VideoDecodeError

SKIP_REASONS = (
    "malformed_json",       # the line is not a JSON object
    "bad_record",           # JSON, but not a sample we can read (missing fields, wrong types)
    "missing_image",        # an image file does not exist
    "corrupt_image",        # an image file exists but cannot be decoded
    "unreadable_video",     # a video is missing or cannot be decoded
    "no_assistant_turn",    # nothing to supervise
    "image_token_mismatch",  # number of <image> placeholders != number of images
    "over_budget",          # cannot be brought within max_tokens / max_tiles
)


@dataclass
class Skip:
    reason: str
    dataset: str
    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: skipped ({self.reason}) in dataset {self.dataset!r}: {self.message}"


class SkipSample(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def pixels_none(image_size: int) -> torch.Tensor:
    return torch.zeros((0, 3, image_size, image_size), dtype=torch.uint8)


def shift_labels(labels: np.ndarray) -> np.ndarray:
    out = np.full_like(labels, IGNORE_INDEX)
    out[:-1] = labels[1:]
    return out


class SampleBuilder:
    """One annotation line -> the packed-sample pieces it yields, or a Skip."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, specs: Sequence[DatasetSpec],
                 files: Sequence[JsonlFile], media: Any):
        self.cfg = cfg
        self.tok = tokenizer
        self.specs = list(specs)
        self.files = list(files)
        self.media = media
        self.templates = [get_template(s.resolved_template(cfg.template)) for s in self.specs]

    def build(self, ds: int, line_idx: int, global_index: int, local_index: int):
        try:
            line_no, raw = self.files[ds].read(line_idx)
        except Exception as e:
            return Skip("bad_record", self.specs[ds].name, self.files[ds].path, -1,
                        f"{type(e).__name__}: {str(e)[:200]}")
        return self.build_line(ds, line_no, raw, global_index, local_index)

    def build_line(self, ds: int, line_no: int, raw: bytes, global_index: int, local_index: int):
        """`build` of a line already read (the offline index reads files in byte ranges)."""
        spec = self.specs[ds]
        f = self.files[ds]
        try:
            try:
                rec = parse_record(raw)
            except (ValueError, UnicodeDecodeError) as e:
                raise SkipSample("malformed_json", f"not a JSON object ({str(e)[:200]})")
            rng = np.random.default_rng([self.cfg.seed, global_index])
            return self._build(spec, ds, rec, rng, local_index)
        except SkipSample as e:
            return Skip(e.reason, spec.name, f.path, line_no, str(e))
        except TemplateError as e:
            return Skip(e.reason, spec.name, f.path, line_no, str(e))
        except Exception as e:  # e.g. a lone UTF-16 surrogate the tokenizer rejects
            # Any other failure on one record is still that record's problem: counted, logged
            # with its type, and bounded by max_skip_ratio (a code bug shows up there at once).
            return Skip("bad_record", spec.name, f.path, line_no, f"{type(e).__name__}: {str(e)[:200]}")

    # -- per kind

    def _build(self, spec: DatasetSpec, ds: int, rec: dict, rng: np.random.Generator, j: int) -> list[PackedSample]:
        cfg = self.cfg
        template = self.templates[ds]
        if spec.kind in ("text", "pretrain"):
            text = rec.get(spec.text_field)
            if not isinstance(text, str) or not text:
                raise SkipSample("bad_record", f"no non-empty string field {spec.text_field!r}")
            if spec.kind == "text":
                # a text corpus has no images: "<image>" in it is just text
                toks = tokenize_plain(self.tok, text, [], expand_images=False)
                return self._split_plain(toks, pixels_none(cfg.image_size), [], ds, rng, j)
            paths = self._image_list(rec)
            n_ph = text.count("<image>")
            if n_ph != len(paths):
                raise SkipSample("image_token_mismatch", f"{n_ph} <image> placeholder(s) but {len(paths)} image(s)")
            pixels, tiles = self._load_images(spec, paths, rng)
            toks = tokenize_plain(self.tok, text, [t * cfg.num_image_token for t in tiles])
            return self._split_plain(toks, pixels, tiles, ds, rng, j)

        turns = normalize_turns(rec.get("conversations"))
        if rec.get("video") and rec.get("image"):
            raise SkipSample("bad_record", "a sample has either 'image' or 'video', not both")
        if "video" in rec and rec["video"]:
            path = rec["video"]
            if not isinstance(path, str):
                raise SkipSample("bad_record", "'video' must be a path string")
            pixels = self._load_video(spec, path, rng)
            tiles = [1] * int(pixels.shape[0])
            turns = place_video_frames(turns, len(tiles))
        else:
            paths = self._image_list(rec)
            turns = place_image_placeholders(turns, len(paths))
            pixels, tiles = self._load_images(spec, paths, rng)
        toks = tokenize_conversation(self.tok, template, turns, [t * cfg.num_image_token for t in tiles],
                                     cfg.system_message)
        cut, n_img = self._fit_conversation(toks, tiles)
        ids, labels = toks.input_ids[:cut], toks.labels[:cut]
        spans = toks.image_spans[:n_img]
        kept_tiles = tiles[:n_img]
        pixels = pixels[: sum(kept_tiles)]
        return [self._finish(ids, labels, spans, pixels, kept_tiles, ds, rng, (j, 0))]

    def _image_list(self, rec: dict) -> list[str]:
        img = rec.get("image")
        if img is None or img == [] or img == "":
            return []
        if isinstance(img, str):
            return [img]
        if isinstance(img, list) and all(isinstance(p, str) and p for p in img):
            return list(img)
        raise SkipSample("bad_record", "'image' must be a path or a list of paths")

    def _load_images(self, spec: DatasetSpec, paths: list[str], rng) -> tuple[torch.Tensor, list[int]]:
        if not paths:
            return pixels_none(self.cfg.image_size), []
        n_max = spec.max_dynamic_patch or self.cfg.max_dynamic_patch
        budget = tile_budget_per_image(n_max, len(paths))
        min_tiles = min(spec.min_dynamic_patch or self.cfg.min_dynamic_patch, budget)
        out, tiles = [], []
        for rel in paths:
            path = resolve_media(spec.root, rel)
            if not os.path.isfile(path):
                raise SkipSample("missing_image", f"image {path!r} does not exist")
            try:
                t = self.media.image_tiles(path, max_tiles=budget, min_tiles=min_tiles,
                                           augment=spec.data_augment, rng=rng)
            except (ImageDecodeError, OSError) as e:
                raise SkipSample("corrupt_image", f"image {path!r} cannot be decoded: {str(e)[:200]}")
            out.append(t)
            tiles.append(int(t.shape[0]))
        return concat_tiles(out), tiles

    def _load_video(self, spec: DatasetSpec, rel: str, rng) -> torch.Tensor:
        path = resolve_media(spec.root, rel)
        if not os.path.exists(path):
            raise SkipSample("unreadable_video", f"video {path!r} does not exist")
        try:
            frames = self.media.video_frames(path, rng=rng)
        except (VideoDecodeError, OSError) as e:
            raise SkipSample("unreadable_video", f"video {path!r} cannot be decoded: {str(e)[:200]}")
        if frames.shape[0] == 0:
            raise SkipSample("unreadable_video", f"video {path!r} yielded no frames")
        return frames

    def _fit_conversation(self, toks: Tokenized, tiles: list[int]) -> tuple[int, int]:
        """Token cut and number of images kept so both budgets hold; whole turns only."""
        L, T = self.cfg.max_tokens, self.cfg.max_tiles
        n = int(toks.input_ids.shape[0])
        if n <= L and sum(tiles) <= T:
            return n, len(tiles)
        for cut in reversed(toks.turn_ends):
            if cut > L:
                continue
            k = sum(1 for s, e in toks.image_spans if e < cut)
            if sum(tiles[:k]) <= T:
                return cut, k
        raise SkipSample(
            "over_budget",
            f"{n} tokens / {sum(tiles)} tiles, and not even the first answer fits "
            f"max_tokens={L} / max_tiles={T}",
        )

    def _split_plain(self, toks: Tokenized, pixels: torch.Tensor, tiles: list[int], ds: int, rng,
                     j: int) -> list[PackedSample]:
        L, T = self.cfg.max_tokens, self.cfg.max_tiles
        n = int(toks.input_ids.shape[0])
        # image k occupies [<img> .. </img>] = [s - 1, e + 1)
        blocks = [(s - 1, e + 1) for s, e in toks.image_spans]
        for k, (b0, b1) in enumerate(blocks):
            if b1 - b0 > L or tiles[k] > T:
                raise SkipSample("over_budget", f"image {k} needs {b1 - b0} tokens / {tiles[k]} tiles, "
                                                 f"over max_tokens={L} / max_tiles={T}")
        tile_start = np.concatenate(([0], np.cumsum(tiles))).astype(int) if tiles else np.zeros(1, int)
        pieces = []
        start, img = 0, 0
        while start < n:
            end = min(start + L, n)
            k, used = img, 0
            while k < len(blocks) and blocks[k][0] < end:
                if blocks[k][1] > end or used + tiles[k] > T:
                    end = blocks[k][0]
                    break
                used += tiles[k]
                k += 1
            sl = slice(start, end)
            spans = [(s - start, e - start) for s, e in toks.image_spans[img:k]]
            px = pixels[tile_start[img]:tile_start[k]]
            pieces.append(self._finish(toks.input_ids[sl], toks.labels[sl], spans, px, tiles[img:k], ds, rng,
                                       (j, len(pieces))))
            start, img = end, k
        return pieces

    def _finish(self, ids, labels, spans, pixels, tiles, ds, rng, key) -> PackedSample:
        cfg = self.cfg
        deltas = image_deltas(cfg.v2pe, len(spans), rng, cfg.v2pe_delta)
        pos = position_ids(int(ids.shape[0]), spans, deltas)
        shifted = shift_labels(labels)
        weights = square_average_weights(shifted, cfg.loss_reduction)
        return PackedSample(
            input_ids=np.ascontiguousarray(ids, dtype=np.int64),
            labels=shifted,
            loss_weights=weights,
            position_ids=pos,
            pixel_values=pixels.contiguous(),
            num_tiles=list(tiles),
            dataset_index=ds,
            key=key,
        )
