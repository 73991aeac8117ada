"""The data entry points: the tokenizer and the loader a run uses, chosen by `data.shard_by`."""

from __future__ import annotations

import logging
from typing import Any, Optional

from megatron_internvl.config import Config, ConfigError
from megatron_internvl.config.data import DataConfig

from .loader import PackedDataLoader, PackShardedLoader
from .media import HeaderOnlyMedia, MediaLoader
from .index import SampleIndex
from .planned import PlannedLoader
from .sources import JsonlFile, all_specs
from .tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger("megatron_internvl.data")


def build_tokenizer(cfg: DataConfig) -> Tokenizer:
    return load_tokenizer(cfg.tokenizer_path)


def check_data_matches_model(config: Config, tokenizer: Tokenizer) -> None:
    """The data settings and the tokenizer agree with the model they feed."""
    m, d = config.model, config.data
    if d.image_size != m.vision.image_size:
        raise ConfigError(f"data.image_size={d.image_size} differs from model.vision.image_size="
                          f"{m.vision.image_size}: set them equal")
    if d.num_image_token != m.num_image_token:
        raise ConfigError(f"data.num_image_token={d.num_image_token} but the model makes "
                          f"{m.num_image_token} tokens per tile: set data.num_image_token="
                          f"{m.num_image_token}")
    if tokenizer.img_context_id != m.image_token_id:
        raise ConfigError(f"the tokenizer's <IMG_CONTEXT> id is {tokenizer.img_context_id} but "
                          f"model.image_token_id={m.image_token_id}: set model.image_token_id="
                          f"{tokenizer.img_context_id}")
    if tokenizer.vocab_size > m.language.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but "
                          f"model.language.vocab_size={m.language.vocab_size}: raise the vocab size")


def build_data_loader(cfg: DataConfig, tokenizer: Optional[Tokenizer] = None, dp_rank: int = 0, dp_size: int = 1,
                      *, media_loader: Any = None, header_media: Any = None, packs_per_step: Optional[int] = None,
                      cost: Any = None, stop_after: Optional[int] = None, state: Optional[dict] = None):
    """An iterator of packed micro-batches for one data-parallel rank.

    `data.shard_by=global` (default): the `PlannedLoader`; each step's `packs_per_step` packs
    (training.global_batch_size; default `dp_size`, one per rank) are planned from metadata read
    with `header_media` (default: the header-only reader, or `media_loader.header_only()`), balanced
    with `cost` (a `balance.CostModel`, default from the schema's default model) and this rank
    decodes its own. `data.shard_by=sample`: the per-rank `PackedDataLoader`.
    `stop_after` ends the stream after that many samples (global ones for the planned loader,
    local ones otherwise); otherwise it runs forever over repeated epochs. `state` is a previous
    `state_dict()`.
    """
    cfg.validate()
    if tokenizer is None:
        tokenizer = build_tokenizer(cfg)
    specs = all_specs(cfg.datasets, cfg.meta_path)
    for s in specs:
        s.validate()
    index = None
    if cfg.index_path:   # offsets and metadata from the index: no annotation file is scanned
        index = SampleIndex.open(cfg.index_path, cfg, specs, tokenizer.path)
        files = index.jsonl_files(specs)
    else:
        files = [JsonlFile(s.annotation) for s in specs]
    for s, f in zip(specs, files):
        if s.length is not None and int(s.length) != len(f):
            logger.warning("dataset %r: meta says length=%s but %s has %d non-empty lines; using %d",
                           s.name, s.length, f.path, len(f), len(f))
    media = media_loader or MediaLoader.for_training(cfg)
    if cfg.shard_by == "sample":
        loader = PackedDataLoader(cfg, tokenizer, specs, files, dp_rank, dp_size, media, stop_after=stop_after)
    elif cfg.shard_by == "pack":
        inner = PackedDataLoader(cfg, tokenizer, specs, files, 0, 1, media, stop_after=stop_after)
        loader = PackShardedLoader(inner, dp_rank, dp_size)
    else:
        if header_media is None:
            if media_loader is None:
                header_media = HeaderOnlyMedia(cfg.image_size, cfg.use_thumbnail, cfg.image_backend,
                                               cfg.num_video_frames)
            else:
                header_only = getattr(media_loader, "header_only", None)
                header_media = header_only() if header_only is not None else media_loader
        loader = PlannedLoader(cfg, tokenizer, specs, files, dp_rank, dp_size, media, header_media,
                               packs_per_step or dp_size, cost=cost, stop_after=stop_after, index=index)
    if state is not None:
        loader.load_state_dict(state)
    return loader
