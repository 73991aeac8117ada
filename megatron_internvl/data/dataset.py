"""From annotation lines to packed micro-batches: sampling, sharding, building, packing, resume.

The stream, from the bottom up:

* `GlobalOrder` maps a global sample index i = 0, 1, 2, ... to (dataset, line). Each epoch
  every dataset contributes floor(r) full copies of its lines plus a seeded subset of
  round(n * frac(r)) lines (r < 1 down-samples), and the epoch is shuffled from the seed.
  With `text_weight` w, index i is a text-corpus sample iff floor((i+1)w) > floor(iw).
* Data-parallel rank r of R reads i = j * R + r for its local j = 0, 1, 2, ... (disjoint).
* DataLoader worker w of W builds the local indices j = w, w + W, ...; torch returns them in
  order j = 0, 1, 2, ... Bad samples come back as `Skip` records instead of being dropped in
  the worker, so the stream, the packs and the skip counts do not depend on W.
* Each sample has its own RNG seeded by (seed, i): JPEG augmentation and V2PE deltas are a
  function of the index, so any sample can be rebuilt exactly.
* The main process packs samples in order (`TwoBudgetPacker`). Its state is the next j, the
  keys of the samples waiting in the pack buffer and the skip counters; on restore those
  samples are rebuilt from their keys, so the stream continues bit-identically, with any
  number of workers.

Truncation (the paper's "select"): a conversation longer than l_max tokens (or t_max tiles)
is cut after the last whole assistant turn that fits, dropping the images after the cut; if
not even the first answer fits, the sample is skipped ("over_budget"). Pre-training text and
text corpora are split into several pieces of at most l_max tokens, each cut placed before
an image's `<img>` rather than inside it; an image that cannot fit one piece skips the
sample.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from .config import DataConfig, DatasetSpec
from .images import ImageDecodeError, load_image_tiles
from .loss_weights import square_average_weights
from .packing import PackedSample, TwoBudgetPacker, collate_pack
from .positions import image_deltas, position_ids
from .sources import JsonlFile, all_specs, parse_record, resolve_media
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
from .tokenizer import Tokenizer, load_tokenizer
from .video import VideoDecodeError, load_video_tiles

logger = logging.getLogger("megatron_internvl.data")

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


class DataSkipRatioError(RuntimeError):
    """Too large a share of the samples read so far were skipped."""


class DataResumeError(RuntimeError):
    """A checkpointed data state cannot be restored onto this configuration or data."""


class MediaLoader:
    """Decodes images and videos into tiles. Tests inject a fake with the same two methods."""

    def __init__(self, image_size: int, use_thumbnail: bool = True, backend: str = "pil",
                 num_video_frames: int = 8):
        self.image_size = image_size
        self.use_thumbnail = use_thumbnail
        self.backend = backend
        self.num_video_frames = num_video_frames

    def image_tiles(self, path: str, *, max_tiles: int, min_tiles: int, augment: bool,
                    rng: np.random.Generator) -> torch.Tensor:
        return load_image_tiles(path, max_tiles=max_tiles, min_tiles=min_tiles, image_size=self.image_size,
                                use_thumbnail=self.use_thumbnail, jpeg_augment=augment, rng=rng,
                                backend=self.backend)

    def video_frames(self, path: str, *, rng: np.random.Generator) -> torch.Tensor:
        # frames are the middle of equal segments: deterministic, no rng needed
        return load_video_tiles(path, num_frames=self.num_video_frames, image_size=self.image_size)


@dataclass
class Skip:
    reason: str
    dataset: str
    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: skipped ({self.reason}) in dataset {self.dataset!r}: {self.message}"


class _SkipSample(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# --------------------------------------------------------------------------- global order

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


# --------------------------------------------------------------------------- sample building

def pixels_none(image_size: int) -> torch.Tensor:
    return torch.zeros((0, 3, image_size, image_size), dtype=torch.float32)


def _shift_labels(labels: np.ndarray) -> np.ndarray:
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
        spec = self.specs[ds]
        f = self.files[ds]
        line_no = -1
        try:
            line_no, raw = f.read(line_idx)
            try:
                rec = parse_record(raw)
            except (ValueError, UnicodeDecodeError) as e:
                raise _SkipSample("malformed_json", f"not a JSON object ({str(e)[:200]})")
            rng = np.random.default_rng([self.cfg.seed, global_index])
            return self._build(spec, ds, rec, rng, local_index)
        except _SkipSample as e:
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
                raise _SkipSample("bad_record", f"no non-empty string field {spec.text_field!r}")
            if spec.kind == "text":
                # a text corpus has no images: "<image>" in it is just text
                toks = tokenize_plain(self.tok, text, [], expand_images=False)
                return self._split_plain(toks, pixels_none(cfg.image_size), [], ds, rng, j)
            paths = self._image_list(rec)
            n_ph = text.count("<image>")
            if n_ph != len(paths):
                raise _SkipSample("image_token_mismatch", f"{n_ph} <image> placeholder(s) but {len(paths)} image(s)")
            pixels, tiles = self._load_images(spec, paths, rng)
            toks = tokenize_plain(self.tok, text, [t * cfg.num_image_token for t in tiles])
            return self._split_plain(toks, pixels, tiles, ds, rng, j)

        turns = normalize_turns(rec.get("conversations"))
        if rec.get("video") and rec.get("image"):
            raise _SkipSample("bad_record", "a sample has either 'image' or 'video', not both")
        if "video" in rec and rec["video"]:
            path = rec["video"]
            if not isinstance(path, str):
                raise _SkipSample("bad_record", "'video' must be a path string")
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
        raise _SkipSample("bad_record", "'image' must be a path or a list of paths")

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
                raise _SkipSample("missing_image", f"image {path!r} does not exist")
            try:
                t = self.media.image_tiles(path, max_tiles=budget, min_tiles=min_tiles,
                                           augment=spec.data_augment, rng=rng)
            except (ImageDecodeError, OSError) as e:
                raise _SkipSample("corrupt_image", f"image {path!r} cannot be decoded: {str(e)[:200]}")
            out.append(t)
            tiles.append(int(t.shape[0]))
        return torch.cat(out, dim=0), tiles

    def _load_video(self, spec: DatasetSpec, rel: str, rng) -> torch.Tensor:
        path = resolve_media(spec.root, rel)
        if not os.path.exists(path):
            raise _SkipSample("unreadable_video", f"video {path!r} does not exist")
        try:
            frames = self.media.video_frames(path, rng=rng)
        except (VideoDecodeError, OSError) as e:
            raise _SkipSample("unreadable_video", f"video {path!r} cannot be decoded: {str(e)[:200]}")
        if frames.shape[0] == 0:
            raise _SkipSample("unreadable_video", f"video {path!r} yielded no frames")
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
        raise _SkipSample(
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
                raise _SkipSample("over_budget", f"image {k} needs {b1 - b0} tokens / {tiles[k]} tiles, "
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
        shifted = _shift_labels(labels)
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


# --------------------------------------------------------------------------- streaming

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


def _identity(item):
    return item


@dataclass
class SkipStats:
    """Skips counted per (dataset, reason), with the last file:line seen for each."""

    seen: int = 0
    skipped: int = 0
    counts: dict = field(default_factory=dict)     # "dataset/reason" -> n
    last: dict = field(default_factory=dict)       # "dataset/reason" -> "file:line"

    def by_reason(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for k, n in self.counts.items():
            r = k.rsplit("/", 1)[1]
            out[r] = out.get(r, 0) + n
        return out

    def state_dict(self) -> dict:
        return {"seen": self.seen, "skipped": self.skipped, "counts": dict(self.counts), "last": dict(self.last)}

    def load_state_dict(self, d: dict) -> None:
        self.seen, self.skipped = int(d["seen"]), int(d["skipped"])
        self.counts, self.last = dict(d["counts"]), dict(d["last"])


class PackedDataLoader:
    """Iterator of packed micro-batches (see `collate_pack` for the dict) with exact resume."""

    STATE_VERSION = 1

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, specs: Sequence[DatasetSpec],
                 files: Sequence[JsonlFile], dp_rank: int, dp_size: int, media: Any,
                 stop_after: Optional[int] = None):
        if not (0 <= dp_rank < dp_size):
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size}).")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.specs = list(specs)
        self.dataset_names = [s.name for s in self.specs]
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.order = GlobalOrder(self.specs, [len(f) for f in files], cfg.seed, cfg.text_weight)
        self.builder = SampleBuilder(cfg, tokenizer, self.specs, files, media)
        self.stop_after = stop_after
        self.packer = TwoBudgetPacker(cfg.max_tokens, cfg.max_tiles, cfg.pack_buffer_size)
        self.skips = SkipStats()
        self._live: dict[tuple, PackedSample] = {}
        self._pending: list[PackedSample] = []
        self._next_j = 0
        self._stream: Optional[Iterator] = None
        self._loader = None
        self._exhausted = False
        self._drain: Optional[list] = None
        self.packs = 0
        self.real_tokens = 0
        self.tiles = 0
        self.samples_packed = 0

    # -- iteration

    def __iter__(self) -> "PackedDataLoader":
        return self

    def _open_stream(self) -> Iterator:
        stream = SampleStream(self.builder, self.order, self.dp_rank, self.dp_size, self._next_j, self.stop_after)
        W = self.cfg.num_workers
        if W == 0:
            return iter(stream)
        if self.cfg.num_workers and "TOKENIZERS_PARALLELISM" not in os.environ:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        self._loader = torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=W, collate_fn=_identity,
            prefetch_factor=self.cfg.prefetch_factor, persistent_workers=False,
        )
        return iter(self._loader)

    def _emit(self, keys: list) -> dict[str, Any]:
        samples = [self._live.pop(k) for k in keys]
        self.packs += 1
        n = sum(s.num_tokens for s in samples)
        self.real_tokens += n
        self.tiles += sum(s.tiles for s in samples)
        self.samples_packed += len(samples)
        return collate_pack(samples, image_size=self.cfg.image_size, pad_to_multiple=self.cfg.pad_to_multiple,
                            pad_id=self.tokenizer.pad_id, dataset_names=self.dataset_names)

    def _add(self, s: PackedSample) -> Optional[list]:
        self._live[s.key] = s
        return self.packer.add(s.key, s.num_tokens, s.tiles)

    def __next__(self) -> dict[str, Any]:
        while True:
            while self._pending:
                keys = self._add(self._pending.pop(0))
                if keys is not None:
                    return self._emit(keys)
            if self._exhausted:
                if self._drain is None:
                    self._drain = self.packer.flush()
                if not self._drain:
                    raise StopIteration
                return self._emit(self._drain.pop(0))
            if self._stream is None:
                self._stream = self._open_stream()
            try:
                j, res = next(self._stream)
            except StopIteration:
                self._exhausted = True
                continue
            if j != self._next_j:
                raise RuntimeError(f"data stream out of order: got sample {j}, expected {self._next_j}")
            self._next_j += 1
            self.skips.seen += 1
            if isinstance(res, Skip):
                self._record_skip(res)
                continue
            self._pending = list(res)

    def _record_skip(self, s: Skip) -> None:
        st = self.skips
        st.skipped += 1
        k = f"{s.dataset}/{s.reason}"
        st.counts[k] = st.counts.get(k, 0) + 1
        st.last[k] = f"{s.file}:{s.line}"
        n = st.counts[k]
        if n <= self.cfg.skip_warnings:
            logger.warning("%s", s)
        elif n & (n - 1) == 0:
            logger.warning("%s (%d %r skips so far in %r; logging every power of two from now on)",
                           s, n, s.reason, s.dataset)
        if st.seen >= self.cfg.skip_ratio_warmup and st.skipped > self.cfg.max_skip_ratio * st.seen:
            detail = ", ".join(f"{key}: {c} (last {st.last[key]})" for key, c in sorted(st.counts.items()))
            raise DataSkipRatioError(
                f"{st.skipped} of {st.seen} samples read on DP rank {self.dp_rank} were skipped "
                f"({st.skipped / st.seen:.1%} > data.max_skip_ratio={self.cfg.max_skip_ratio}). "
                f"By dataset/reason: {detail}. Fix or remove the bad data, or raise data.max_skip_ratio."
            )

    # -- statistics

    @property
    def fill_ratio(self) -> float:
        return self.real_tokens / (self.packs * self.cfg.max_tokens) if self.packs else 0.0

    def stats(self) -> dict[str, Any]:
        return {
            "samples_read": self.skips.seen,
            "samples_skipped": self.skips.skipped,
            "skips_by_reason": self.skips.by_reason(),
            "skips": dict(self.skips.counts),
            "packs": self.packs,
            "packed_samples": self.samples_packed,
            "real_tokens": self.real_tokens,
            "tiles": self.tiles,
            "fill_ratio": self.fill_ratio,
        }

    # -- resume

    def state_dict(self) -> dict[str, Any]:
        if self._drain is not None:
            raise DataResumeError("cannot checkpoint a finite stream while it is being drained")
        return {
            "version": self.STATE_VERSION,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "seed": self.cfg.seed,
            "datasets": list(self.dataset_names),
            "next_index": self._next_j,
            "pending": [list(s.key) for s in self._pending],
            "packer": self.packer.state_dict(),
            "skips": self.skips.state_dict(),
            "counters": [self.packs, self.real_tokens, self.tiles, self.samples_packed],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore before the first `next()`; rebuilds the buffered samples from their keys."""
        if self._stream is not None:
            raise DataResumeError("load_state_dict must be called before iterating the loader")
        if state.get("version") != self.STATE_VERSION:
            raise DataResumeError(f"data state version {state.get('version')} != {self.STATE_VERSION}")
        for k, mine in (("dp_rank", self.dp_rank), ("dp_size", self.dp_size), ("seed", self.cfg.seed),
                        ("datasets", self.dataset_names)):
            if state[k] != mine:
                raise DataResumeError(
                    f"data state was saved with {k}={state[k]!r} but this run has {mine!r}; "
                    "exact resume needs the same data-parallel layout, seed and datasets."
                )
        self._next_j = int(state["next_index"])
        self.packer.load_state_dict(state["packer"])
        self.skips.load_state_dict(state["skips"])
        self.packs, self.real_tokens, self.tiles, self.samples_packed = (int(x) for x in state["counters"])
        pending = [tuple(k) for k in state["pending"]]
        wanted = {tuple(k) for k in self.packer.buffered_items()} | set(pending)
        built: dict[tuple, PackedSample] = {}
        stream = SampleStream(self.builder, self.order, self.dp_rank, self.dp_size, 0)
        for j in sorted({k[0] for k in wanted}):
            res = stream.build(j)
            if isinstance(res, Skip):
                raise DataResumeError(f"sample {j} in the checkpointed pack buffer now fails to build: {res}")
            for s in res:
                built[tuple(s.key)] = s
        missing = wanted - set(built)
        if missing:
            raise DataResumeError(f"samples {sorted(missing)[:5]} of the checkpointed buffer no longer exist; "
                                  "did the data change since the checkpoint?")
        self._live = {k: built[k] for k in wanted - set(pending)}
        self._pending = [built[k] for k in pending]


# --------------------------------------------------------------------------- entry points

def build_tokenizer(cfg: DataConfig) -> Tokenizer:
    return load_tokenizer(cfg.tokenizer_path)


def build_data_loader(cfg: DataConfig, tokenizer: Optional[Tokenizer] = None, dp_rank: int = 0, dp_size: int = 1,
                      *, media_loader: Any = None, stop_after: Optional[int] = None,
                      state: Optional[dict] = None) -> PackedDataLoader:
    """An iterator of packed micro-batches for one data-parallel rank.

    `stop_after` ends the stream after that many local samples (finite passes, tools);
    otherwise it runs forever over repeated epochs. `state` is a previous `state_dict()`.
    """
    cfg.validate()
    if tokenizer is None:
        tokenizer = build_tokenizer(cfg)
    specs = all_specs(cfg.datasets, cfg.meta_path)
    for s in specs:
        s.validate()
    files = [JsonlFile(s.annotation) for s in specs]
    for s, f in zip(specs, files):
        if s.length is not None and int(s.length) != len(f):
            logger.warning("dataset %r: meta says length=%s but %s has %d non-empty lines; using %d",
                           s.name, s.length, f.path, len(f), len(f))
    media = media_loader or MediaLoader(cfg.image_size, cfg.use_thumbnail, cfg.image_backend, cfg.num_video_frames)
    if cfg.shard_by == "pack":
        inner = PackedDataLoader(cfg, tokenizer, specs, files, 0, 1, media, stop_after=stop_after)
        loader = PackShardedLoader(inner, dp_rank, dp_size)
    else:
        loader = PackedDataLoader(cfg, tokenizer, specs, files, dp_rank, dp_size, media, stop_after=stop_after)
    if state is not None:
        loader.load_state_dict(state)
    return loader


class PackShardedLoader:
    """Every rank packs the global stream and keeps packs ``dp_rank, dp_rank + dp, ...``.

    The inner loader advances by ``dp_size`` packs per pack returned, so between micro-batches
    its state is the same on every rank, and a step's global batch does not depend on the DP size.
    """

    def __init__(self, inner: PackedDataLoader, dp_rank: int, dp_size: int):
        if not (0 <= dp_rank < dp_size):
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size}).")
        self.inner, self.dp_rank, self.dp_size = inner, dp_rank, dp_size
        self.cfg, self.tokenizer, self.dataset_names = inner.cfg, inner.tokenizer, inner.dataset_names

    def __iter__(self) -> "PackShardedLoader":
        return self

    def __next__(self) -> dict[str, Any]:
        mine = None
        for i in range(self.dp_size):
            pack = next(self.inner)
            if i == self.dp_rank:
                mine = pack
        return mine

    def state_dict(self) -> dict[str, Any]:
        return {"shard_by": "pack", "inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("shard_by") != "pack":
            raise DataResumeError("the data state was saved with data.shard_by=sample; resume with the same setting")
        self.inner.load_state_dict(state["inner"])

    @property
    def fill_ratio(self) -> float:
        return self.inner.fill_ratio

    def stats(self) -> dict[str, Any]:
        return self.inner.stats()


class HeaderOnlyMedia(MediaLoader):
    """Tile counts from image headers, no pixels: for dry runs over whole datasets.

    Returns [T, 3, 0, 0] tensors; T is what the decoder would produce (the same grid rule).
    Files PIL cannot even open are reported as corrupt; truncated bodies go unnoticed.
    Videos are decoded for real (their frame count needs the container).
    """

    def image_tiles(self, path, *, max_tiles, min_tiles, augment, rng):
        from PIL import Image

        from .tiling import tiles_for_image

        with Image.open(path) as im:
            w, h = im.size
        n = tiles_for_image(w, h, min_tiles, max_tiles, self.image_size, self.use_thumbnail)
        return torch.empty((n, 3, 0, 0))

    def video_frames(self, path, *, rng):
        n = int(super().video_frames(path, rng=rng).shape[0])
        return torch.empty((n, 3, 0, 0))


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
