"""Data settings: one plain dataclass, embedded by the global config as its `data` section."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

DATASET_KINDS = ("chat", "pretrain", "text")
LOSS_REDUCTIONS = ("token", "sample", "square")
V2PE_MODES = ("off", "random", "fixed")
TEMPLATE_NAMES = ("internvl2_5", "internlm2-chat", "Hermes-2", "plain")
DECODE_SITES = ("worker", "rank", "auto")


@dataclass
class DatasetSpec:
    """One annotation file and how to read it (one entry of InternVL's meta JSON).

    kind: "chat" (conversations, rendered with a chat template), "pretrain" (interleaved
    text with `<image>` placeholders, no template, every text token supervised) or "text"
    (a plain text corpus, jsonl with a `text` field).
    """

    name: str
    annotation: str
    root: str = ""
    kind: str = "chat"
    # None: DataConfig.template for chat data, "plain" for pretrain/text data.
    template: Optional[str] = None
    # n_max: tile budget per sample (split over the images of a multi-image sample).
    max_dynamic_patch: Optional[int] = None
    min_dynamic_patch: int = 1
    data_augment: bool = False
    repeat_time: float = 1.0
    # Line count from the meta file; informative only (the file is indexed on load).
    length: Optional[int] = None
    text_field: str = "text"

    def resolved_template(self, default: str) -> str:
        if self.template is not None:
            return self.template
        return default if self.kind == "chat" else "plain"

    def validate(self, where: str = "data.datasets") -> None:
        at = f"{where}[{self.name!r}]"
        if not self.name:
            raise ValueError(f"{where}: a dataset has an empty `name`; give each dataset a unique name.")
        if not self.annotation:
            raise ValueError(f"{at}.annotation is empty; set it to the dataset's .jsonl file.")
        if self.kind not in DATASET_KINDS:
            raise ValueError(f"{at}.kind={self.kind!r} is not one of {DATASET_KINDS}.")
        if self.template is not None and self.template not in TEMPLATE_NAMES:
            raise ValueError(f"{at}.template={self.template!r} is not one of {TEMPLATE_NAMES}.")
        if self.kind != "chat" and self.template not in (None, "plain"):
            raise ValueError(f"{at}: kind={self.kind!r} data has no conversations; drop template={self.template!r}.")
        r = self.repeat_time
        if not (isinstance(r, (int, float)) and math.isfinite(r) and 0 < r <= 4):
            raise ValueError(
                f"{at}.repeat_time={r!r} must be in (0, 4] (r < 1 down-samples, r > 1 repeats)."
            )
        if self.max_dynamic_patch is not None and self.max_dynamic_patch < 1:
            raise ValueError(f"{at}.max_dynamic_patch={self.max_dynamic_patch} must be >= 1.")
        if self.min_dynamic_patch < 1:
            raise ValueError(f"{at}.min_dynamic_patch={self.min_dynamic_patch} must be >= 1.")
        if self.max_dynamic_patch is not None and self.min_dynamic_patch > self.max_dynamic_patch:
            raise ValueError(
                f"{at}.min_dynamic_patch={self.min_dynamic_patch} exceeds "
                f"max_dynamic_patch={self.max_dynamic_patch}; lower min_dynamic_patch."
            )


@dataclass
class SyntheticConfig:
    """Random packs of a fixed shape instead of datasets (throughput runs; see data/synthetic.py)."""

    enabled: bool = False
    sample_tokens: int = 2048
    tiles_per_sample: int = 6


@dataclass
class DataConfig:
    """Everything the multimodal data pipeline needs.

    Sizes are never assumed: `image_size` and `num_image_token` (tokens per tile after
    pixel unshuffle; 256 for 448 px / patch 14 / downsample 0.5) come from the model.
    """

    # Sources: explicit specs and/or an InternVL meta JSON (entries are appended to `datasets`).
    datasets: list[DatasetSpec] = field(default_factory=list)
    meta_path: Optional[str] = None
    # The offline sample index of these datasets (`megatron-internvl index-data`, docs/data.md):
    # the planner reads its rows instead of templating and tokenizing the global stream.
    index_path: Optional[str] = None
    # Fraction of samples drawn from kind="text" corpora. None: text corpora are pooled with
    # the other datasets by size x repeat_time like any dataset.
    text_weight: Optional[float] = None

    tokenizer_path: str = ""
    template: str = "internvl2_5"
    # None: the template's built-in system message (a sample's own system turn always wins).
    system_message: Optional[str] = None

    image_size: int = 448
    num_image_token: int = 256
    use_thumbnail: bool = True
    max_dynamic_patch: int = 12
    min_dynamic_patch: int = 1
    image_backend: str = "pil"
    # Where training decodes images: "worker" (data-loader workers), "rank" (workers read the
    # JPEG bytes and their tile grid; the training process decodes them on its device: DALI's
    # nvJPEG decoder on a GPU), "auto" (rank where image_backend is dali and CUDA is available).
    decode_on: str = "worker"
    num_video_frames: int = 8

    # Packing budgets: l_max LLM tokens and t_max ViT tiles per packed sequence.
    max_tokens: int = 16384
    max_tiles: int = 48
    pack_buffer_size: int = 64
    pad_to_multiple: int = 16
    # How data-parallel ranks split the stream. "global": each step's packs are planned from
    # metadata over the global stream (the same at any DP size, so resume works at any DP size)
    # and each rank decodes only its own (data/planned.py). "sample": each rank reads, decodes
    # and packs its own share of the samples. "pack" (former, kept for old configs): every rank
    # packs the global stream and keeps every dp-th pack, decoding dp times; "global" with
    # balance=none gives the same packs. With "sample" and "pack" a DP change on resume is refused.
    shard_by: str = "global"
    # What the plan of a step equalises across DP ranks and micro-batches (shard_by=global):
    # "compute" (estimated FLOPs of the configured model: tokens, squared sample lengths, tiles),
    # "tokens", or "none" (the streaming packer, packs dealt round-robin).
    balance: str = "compute"

    loss_reduction: str = "square"
    v2pe: str = "off"
    v2pe_delta: float = 0.25

    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    seed: int = 1234
    num_workers: int = 2
    prefetch_factor: int = 4
    max_skip_ratio: float = 0.05
    # The skip ratio is only enforced after this many samples were read.
    skip_ratio_warmup: int = 200
    # Per dataset and reason, the first N skips each log a warning; later ones are summarised.
    skip_warnings: int = 20

    def _validate_synthetic(self) -> None:
        s = self.synthetic
        for name in ("max_tokens", "max_tiles", "pad_to_multiple", "image_size", "num_image_token"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name}={getattr(self, name)} must be >= 1.")
        if s.tiles_per_sample < 0 or s.tiles_per_sample > self.max_tiles:
            raise ValueError(f"data.synthetic.tiles_per_sample={s.tiles_per_sample} must be in "
                             f"[0, data.max_tiles={self.max_tiles}].")
        need = s.tiles_per_sample * self.num_image_token + 4
        if not (need <= s.sample_tokens <= self.max_tokens):
            raise ValueError(
                f"data.synthetic.sample_tokens={s.sample_tokens} must hold the image "
                f"({s.tiles_per_sample} tiles x {self.num_image_token} tokens) plus a few text tokens "
                f"(>= {need}) and fit data.max_tokens={self.max_tokens}.")
        if self.max_tokens % self.pad_to_multiple:
            raise ValueError(f"data.max_tokens={self.max_tokens} is not a multiple of data.pad_to_multiple="
                             f"{self.pad_to_multiple}.")
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"data.loss_reduction={self.loss_reduction!r} is not one of {LOSS_REDUCTIONS}.")

    def validate(self) -> None:
        """Raise ValueError naming the field and the fix; call before building the loader."""
        if self.synthetic.enabled:
            self._validate_synthetic()
            return
        if not self.datasets and not self.meta_path:
            raise ValueError("data.datasets is empty and data.meta_path is unset; give at least one source.")
        names = [d.name for d in self.datasets]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"data.datasets has duplicate names {sorted(dup)}; names must be unique.")
        for d in self.datasets:
            d.validate()
        if not self.tokenizer_path:
            raise ValueError("data.tokenizer_path is empty; set it to a tokenizer.json, a sentencepiece .model, or a folder with one.")
        if self.template not in TEMPLATE_NAMES:
            raise ValueError(f"data.template={self.template!r} is not one of {TEMPLATE_NAMES}.")
        for name in ("image_size", "num_image_token", "max_dynamic_patch", "min_dynamic_patch",
                     "num_video_frames", "max_tokens", "max_tiles", "pack_buffer_size",
                     "pad_to_multiple", "prefetch_factor"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"data.{name}={v!r} must be a positive integer.")
        if self.min_dynamic_patch > self.max_dynamic_patch:
            raise ValueError(
                f"data.min_dynamic_patch={self.min_dynamic_patch} exceeds data.max_dynamic_patch="
                f"{self.max_dynamic_patch}; lower min_dynamic_patch."
            )
        if self.max_tokens % self.pad_to_multiple:
            raise ValueError(
                f"data.max_tokens={self.max_tokens} is not a multiple of data.pad_to_multiple="
                f"{self.pad_to_multiple}; padded packs would exceed max_tokens. Round max_tokens "
                f"down to {self.max_tokens // self.pad_to_multiple * self.pad_to_multiple}."
            )
        if self.num_image_token + 2 > self.max_tokens:
            raise ValueError(
                f"data.max_tokens={self.max_tokens} cannot hold even one tile "
                f"({self.num_image_token} tokens + <img></img>); raise max_tokens."
            )
        if self.shard_by not in ("global", "sample", "pack"):
            raise ValueError(f"data.shard_by={self.shard_by!r} must be 'global', 'sample' or 'pack'.")
        if self.balance not in ("none", "tokens", "compute"):
            raise ValueError(f"data.balance={self.balance!r} must be 'none', 'tokens' or 'compute'.")
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"data.loss_reduction={self.loss_reduction!r} is not one of {LOSS_REDUCTIONS}.")
        if self.v2pe not in V2PE_MODES:
            raise ValueError(f"data.v2pe={self.v2pe!r} is not one of {V2PE_MODES}.")
        if self.v2pe == "fixed" and not (0 < self.v2pe_delta <= 1):
            raise ValueError(f"data.v2pe_delta={self.v2pe_delta!r} must be in (0, 1] (V2PE uses 1/4 for evaluation).")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"data.num_workers={self.num_workers!r} must be an integer >= 0.")
        if not (0 <= self.max_skip_ratio <= 1):
            raise ValueError(f"data.max_skip_ratio={self.max_skip_ratio!r} must be in [0, 1].")
        if self.skip_ratio_warmup < 0 or self.skip_warnings < 0:
            raise ValueError("data.skip_ratio_warmup and data.skip_warnings must be >= 0.")
        if self.image_backend not in ("pil", "dali"):
            raise ValueError(f"data.image_backend={self.image_backend!r} must be 'pil' or 'dali'.")
        if self.decode_on not in DECODE_SITES:
            raise ValueError(f"data.decode_on={self.decode_on!r} must be one of {DECODE_SITES}: where images "
                             "are decoded (data-loader workers, or the training process on its device).")
        if self.text_weight is not None:
            if not (0 <= self.text_weight <= 1):
                raise ValueError(f"data.text_weight={self.text_weight!r} must be in [0, 1] or None.")
            kinds = {d.kind for d in self.datasets}
            if self.text_weight > 0 and "text" not in kinds and not self.meta_path:
                raise ValueError("data.text_weight > 0 but no dataset has kind='text'; add a text corpus or unset text_weight.")
            if self.text_weight < 1 and kinds == {"text"} and not self.meta_path:
                raise ValueError("data.text_weight < 1 but every dataset is a text corpus; set text_weight=1 or None.")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataConfig":
        d = dict(d)
        specs = [s if isinstance(s, DatasetSpec) else DatasetSpec(**s) for s in d.pop("datasets", [])]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"data: unknown field(s) {sorted(unknown)}; known fields: {sorted(known)}.")
        return cls(datasets=specs, **d)
