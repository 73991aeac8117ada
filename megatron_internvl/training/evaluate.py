"""Validation loss: forward-only passes through megatron's pipeline schedule over held-out packs.

The validation set is packed and weighted exactly like training data (the same packer, the same
`data.loss_reduction`, square averaging included), from the meta JSON in `evaluation.meta_path`,
in one global order that does not depend on the layout: the first `evaluation.iters` packs of a
single-process packer (all of them by default) are dealt round-robin to the data-parallel
replicas. Each replica's reading rank builds the packs once and keeps them, so every evaluation
sees the same packs; they reach the replica's other TP/PP ranks like training packs
(`BroadcastLoader`). The loss is `sum(CE * w) / W` over the whole set (W summed over every
replica), the per-dataset losses as in training. Skipped validation samples are counted and never
stop the run.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_attr_wrapped_model

from megatron_internvl.config import Config
from megatron_internvl.config.data import DataConfig
from megatron_internvl.data.loader import PackedDataLoader
from megatron_internvl.data.media import MediaLoader
from megatron_internvl.data.sources import JsonlFile, all_specs
from megatron_internvl.models.pixels import normalize_pixels
from megatron_internvl.parallel.data import BroadcastLoader
from megatron_internvl.parallel.distributed import compute_device

from .generate import AnswerSampler
from .loss import dataset_sums, fused_weighted_token_loss, weighted_token_loss
from .step import packed_seq_params, to_device

logger = logging.getLogger("megatron_internvl.train")


def validation_data_config(config: Config) -> DataConfig:
    """The training data settings (packing budgets, weighting, tiling, padding) on the
    validation meta JSON; skips never raise."""
    return dataclasses.replace(config.data, datasets=[], meta_path=config.evaluation.meta_path,
                               text_weight=None, max_skip_ratio=1.0, num_workers=0)


def validation_packs(cfg: DataConfig, tokenizer, limit: Optional[int], dp_rank: int, dp_size: int):
    """This replica's share of the validation packs, the dataset names and the skip counts."""
    specs = all_specs(cfg.datasets, cfg.meta_path)
    for s in specs:
        s.validate("evaluation.meta_path")
    files = [JsonlFile(s.annotation) for s in specs]
    media = MediaLoader(cfg.image_size, cfg.use_thumbnail, cfg.image_backend, cfg.num_video_frames)
    loader = PackedDataLoader(cfg, tokenizer, specs, files, 0, 1, media)
    loader.stop_after = loader.order.samples_per_epoch  # every validation sample once
    mine = []
    for i, pack in enumerate(loader):
        if limit is not None and i >= limit:
            break
        if i % dp_size == dp_rank:
            mine.append(pack)
    stats = loader.stats()
    return mine, loader.dataset_names, {"read": stats["samples_read"], "skipped": stats["samples_skipped"]}


class _Packs:
    """The cached packs as the iterator `BroadcastLoader` wraps (the reading rank only)."""

    def __init__(self, packs, names, skips):
        self.packs, self.dataset_names, self.skips = packs, names, skips
        self.it = iter(packs)

    def __next__(self):
        return next(self.it)

    def stats(self):
        return self.skips


class Validator:
    """Computes the validation loss of the current weights; built once per run."""

    def __init__(self, config: Config, tokenizer, micro_batches: int):
        self.config = config
        self.tokenizer = tokenizer
        self.micro_batches = micro_batches  # packs per schedule call: the training step's memory
        self.cache: Optional[_Packs] = None

    def _reader(self):
        if self.cache is None:
            cfg = validation_data_config(self.config)
            self.cache = _Packs(*validation_packs(cfg, self.tokenizer, self.config.evaluation.iters,
                                                  ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()))
        self.cache.it = iter(self.cache.packs)
        return self.cache

    def __call__(self, chunks, step: int) -> dict:
        t0 = time.monotonic()
        loader = BroadcastLoader(self._reader)
        names = loader.dataset_names
        n = len(names)
        device = compute_device()
        # [sum CE*w, W, per dataset: sum CE*w, W, packs]: summed over the last stages of every replica
        stats = torch.zeros(2 + 2 * n + 1, dtype=torch.float64, device=device)
        for chunk in chunks:
            chunk.eval()
        try:
            with torch.no_grad():
                while True:
                    batches = []
                    for _ in range(self.micro_batches):
                        try:
                            batches.append(next(loader))
                        except StopIteration:
                            break
                    if batches:
                        stats += self._forward(chunks, batches, n)
                    if len(batches) < self.micro_batches:
                        break
        finally:
            for chunk in chunks:
                chunk.train()
        if not (ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
                and ps.get_context_parallel_rank() == 0):
            stats.zero_()
        torch.distributed.all_reduce(stats)
        skips = torch.tensor([0.0, 0.0], dtype=torch.float64, device=device)
        if loader.is_source and ps.get_data_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0:
            s = loader.stats()
            skips += torch.tensor([s["read"], s["skipped"]], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(skips)
        total, weight = float(stats[0]), float(stats[1])
        by_ds = {names[i]: float(stats[2 + i]) / float(stats[2 + n + i])
                 for i in range(n) if float(stats[2 + n + i]) > 0}
        return {"step": step, "val_loss": total / weight if weight > 0 else float("nan"),
                "val_dataset_loss": by_ds, "val_packs": int(stats[-1]), "val_samples": int(skips[0]),
                "val_skipped": int(skips[1]), "val_time_s": time.monotonic() - t0}

    def _forward(self, chunks, batches, n: int) -> torch.Tensor:
        """One forward-only schedule call over ``batches``; this rank's share of the sums."""
        config = self.config
        device = compute_device()
        batches = [to_device(b, device) for b in batches]
        dtype = torch.float32 if config.training.precision == "fp32" else torch.bfloat16
        fused = config.model.fused_loss

        def forward_step(data_iterator, model):
            b = next(data_iterator)
            pixels = normalize_pixels(b["pixel_values"], dtype)
            out = model(b["input_ids"], b["position_ids"], pixel_values=pixels,
                        packed_seq_params=packed_seq_params(b), output_hidden=fused,
                        image_slots=b.get("image_slots"))

            def loss_func(output):
                if fused:
                    language_model = get_attr_wrapped_model(model, "language_model")
                    weighted, per_token = fused_weighted_token_loss(language_model, output, b["labels"],
                                                                    b["loss_weights"])
                else:
                    per_token = weighted_token_loss(output, b["labels"], b["loss_weights"])
                    weighted = per_token.sum()
                by_ds, ds_w = dataset_sums(per_token, b["loss_weights"], b["token_dataset"], n)
                w = b["loss_weights"].double().sum()
                return weighted, {"sums": torch.cat([weighted.detach().double().reshape(1), w.reshape(1),
                                                     by_ds, ds_w, torch.ones(1, dtype=torch.float64,
                                                                             device=device)])}

            return out, loss_func

        seq_len = max(int(b["input_ids"].shape[1]) for b in batches)
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(batches) if len(chunks) == 1 else [iter(batches) for _ in chunks],
            model=chunks, num_microbatches=len(batches), seq_length=seq_len, micro_batch_size=1,
            forward_only=True,
        )
        sums = torch.zeros(2 + 2 * n + 1, dtype=torch.float64, device=device)
        for o in outputs or []:
            sums += o["sums"]
        return sums


class Evaluator:
    """What runs every `evaluation.interval` steps (and before the first with
    `evaluation.initial`): the validation loss and the sample answers, each when configured."""

    def __init__(self, config: Config, validator: Optional[Validator], sampler: Optional[AnswerSampler]):
        self.config, self.validator, self.sampler = config, validator, sampler

    @classmethod
    def build(cls, config: Config, tokenizer, micro_batches: int) -> Optional["Evaluator"]:
        from megatron_internvl.config import ConfigError
        from megatron_internvl.data.build import build_tokenizer

        e = config.evaluation
        if not e.meta_path and not e.samples:
            return None
        tokenizer = tokenizer or build_tokenizer(config.data)
        if e.samples and config.parallel.pipeline_parallel > 1:
            raise ConfigError("evaluation.samples needs parallel.pipeline_parallel=1 (greedy decoding is "
                              "not pipelined): drop evaluation.samples or the pipeline split")
        return cls(config, Validator(config, tokenizer, micro_batches) if e.meta_path else None,
                   AnswerSampler(config, tokenizer) if e.samples else None)

    def maybe_run(self, step: int, start_step: int, chunks, metrics) -> None:
        e = self.config.evaluation
        if not ((e.interval and step % e.interval == 0) or (e.initial and step == start_step)):
            return
        if self.validator is not None:
            metrics.log_validation(self.validator(chunks, step))
        if self.sampler is not None:
            metrics.log_samples(self.sampler(chunks, step))


def evaluate_checkpoint(config: Config) -> dict:
    """`megatron-internvl evaluate`: the validation loss of `checkpoint.load` (the newest good
    checkpoint there, or that checkpoint) at this run's layout; written to RUN_DIR/eval.jsonl."""
    import json
    from pathlib import Path

    from megatron_internvl import checkpoint as ckpt
    from megatron_internvl.config import ConfigError
    from megatron_internvl.config.loader import config_to_dict
    from megatron_internvl.data.build import build_tokenizer, check_data_matches_model
    from megatron_internvl.models.factory import build_model_chunks
    from megatron_internvl.parallel import distributed
    from megatron_internvl.parallel.sequence import pack_pad_multiple

    if not config.checkpoint.load:
        raise ConfigError("megatron-internvl evaluate needs checkpoint.load=DIR (a run's checkpoint "
                          "directory or one iter_NNNNNNN)")
    if not config.evaluation.meta_path:
        raise ConfigError("megatron-internvl evaluate needs evaluation.meta_path (the validation meta JSON)")
    launch = distributed.initialize(config.parallel, seed=config.training.seed)
    config.validate(world_size=launch.world_size)
    load_dir = Path(config.checkpoint.load)
    source = ckpt.CheckpointManager(load_dir).latest_valid() if load_dir.exists() else None
    if source is None and (load_dir / "metadata.json").is_file():
        source = load_dir
    if source is None:
        raise ckpt.CheckpointError(f"checkpoint.load={load_dir}: no usable checkpoint there")
    saved_model = ckpt.saved_model_config(source)
    if saved_model is not None:
        ckpt.check_model_config_matches(saved_model, config_to_dict(config)["model"], source)
    tokenizer = build_tokenizer(config.data)
    check_data_matches_model(config, tokenizer)
    config.data.pad_to_multiple = pack_pad_multiple(config)
    chunks = build_model_chunks(config, initialize=False)
    ckpt.load_model_checkpoint(chunks, source)
    for chunk in chunks:  # as build_optimizer sets it for training (setup.py)
        chunk.config.variable_seq_lengths = config.parallel.pipeline_parallel > 1 and len(chunks) == 1
    t = config.training
    n_micro = t.global_batch_size // (t.micro_batch_size * ps.get_data_parallel_world_size())
    record = Validator(config, tokenizer, n_micro)(chunks, step=_checkpoint_step(source))
    record["checkpoint"] = str(source)
    if launch.rank == 0:
        run_dir = Path(config.logging.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "eval.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)
    return record


def _checkpoint_step(source) -> int:
    name = source.name
    return int(name[len("iter_"):]) if name.startswith("iter_") and name[5:].isdigit() else 0


def main(argv=None) -> int:
    import sys

    from megatron_internvl import checkpoint as ckpt
    from megatron_internvl.config import ConfigError, load_config

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: megatron-internvl evaluate RECIPE.yaml checkpoint.load=DIR [section.key=value ...]\n"
              "(torchrun / srun for several processes; the validation set is evaluation.meta_path)")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    try:
        evaluate_checkpoint(load_config(argv[0], argv[1:]))
    except (ConfigError, ckpt.CheckpointError) as exc:
        print(f"megatron-internvl evaluate: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
