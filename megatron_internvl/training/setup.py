"""A run's setup: config -> model chunks, DDP, optimizer and schedule, the MPO objective, the
checkpoint manager, the resumed state and the data loader: everything `loop.train` needs.

The order matters for bitwise reproducibility: the process groups seed the RNGs, the chunks draw
their weights (or skip drawing when a checkpoint overwrites them), and the loader is built last
from the restored data state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from megatron_internvl import checkpoint as ckpt
from megatron_internvl.checkpoint.optimizer_compat import adam_class_name
from megatron_internvl.config import Config, save_config
from megatron_internvl.config.loader import config_to_dict
from megatron_internvl.data.balance import CostModel
from megatron_internvl.data.build import build_data_loader, build_tokenizer, check_data_matches_model
from megatron_internvl.data.preference import build_preference_loader, open_preference_sources
from megatron_internvl.data.synthetic import SyntheticPackLoader
from megatron_internvl.models.factory import build_model_chunks
from megatron_internvl.parallel import distributed
from megatron_internvl.parallel.data import BroadcastLoader
from megatron_internvl.parallel.sequence import pack_pad_multiple

from .evaluate import Evaluator
from .grads import finalize_model_grads
from .mpo import MpoObjective, build_reference
from .stages import apply_stage, trainable_components

logger = logging.getLogger("megatron_internvl.train")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}


@dataclass
class TrainingRun:
    """What the loop works on. ``data_global``: the data state is the same on every rank (planned
    and synthetic loaders), so a checkpoint resumes at any DP size."""

    config: Config
    ddp: list
    optimizer: Any
    scheduler: Any
    manager: ckpt.CheckpointManager
    loader: BroadcastLoader
    mpo: Optional[MpoObjective]
    trainable: dict
    start_step: int
    data_global: bool
    world_size: int
    rank0: bool
    run_dir: Path
    save_dir: Path
    evaluator: Optional[Evaluator] = None

    def save(self, step: int) -> None:
        common = {"config": config_to_dict(self.config),
                  **({"mpo": self.mpo.state_dict()} if self.mpo is not None else {})}
        self.manager.save(step, self.ddp, self.optimizer, self.scheduler, data_state=self.loader.state_dict(),
                          common=common, data_global=self.data_global)


def find_checkpoint(config: Config, save_dir: Path) -> tuple[Path | None, bool]:
    """What this run starts from, and whether that is its own save (a resume).

    The run's own newest good checkpoint in the save directory always wins: a requeued or
    restarted job continues where it stopped, whatever checkpoint.load says. Only a run with no
    checkpoint of its own starts from checkpoint.load (the newest good checkpoint there, or a
    single checkpoint directory such as the converter's output)."""
    own = ckpt.CheckpointManager(save_dir).latest_valid() if save_dir.exists() else None
    if own is not None or not config.checkpoint.load:
        return own, own is not None
    load_dir = Path(config.checkpoint.load)
    # Given explicitly: a damaged checkpoint there stops the run (naming the file), no fallback.
    source = ckpt.CheckpointManager(load_dir).latest_valid(strict=True) if load_dir.exists() else None
    if source is None and (load_dir / "metadata.json").is_file():
        if (load_dir / ckpt.COMPLETE).is_file():
            problem = ckpt.verify_everywhere(load_dir)
            if problem is not None:
                raise ckpt.CheckpointDamagedError(f"checkpoint.load={load_dir} is unusable: {problem}")
        source = load_dir
    if source is None:
        raise ckpt.CheckpointError(f"checkpoint.load={load_dir}: no usable checkpoint there")
    return source, False


def build_optimizer(config: Config, chunks):
    """megatron DDP around each chunk, the (distributed) Adam optimizer with per-component LR
    multipliers and no weight decay on norms and biases, and the LR schedule."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, ParamKey, get_megatron_optimizer
    from megatron.core.optimizer import get_standard_config_overrides
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    p, o, t = config.parallel, config.optimizer, config.training
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        use_distributed_optimizer=p.distributed_optimizer,
    )
    ddp = [
        DistributedDataParallel(chunk.config, ddp_config, chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    opt_config = OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
        clip_grad=t.clip_grad, bf16=t.precision != "fp32", params_dtype=DTYPES[t.precision],
        use_distributed_optimizer=p.distributed_optimizer,
    )
    overrides = get_standard_config_overrides(opt_config)  # no weight decay on norms and biases
    for component, pattern in (("vision", "*vision_model.*"), ("projector", "*projector.*"),
                               ("language", "*language_model.*")):
        mult = getattr(o.lr_mult, component)
        if mult != 1.0:
            overrides[ParamKey(name=pattern)] = {"max_lr": o.lr * mult, "min_lr": o.min_lr * mult}
    optimizer = get_megatron_optimizer(opt_config, ddp, config_overrides=overrides)
    if torch.distributed.get_rank() == 0:
        logger.info("optimizer: %s", adam_class_name())  # TE's / apex's FusedAdam, else torch's
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if o.warmup_steps else o.lr, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps, lr_decay_steps=t.train_steps,
        lr_decay_style=o.decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=t.train_steps, wd_incr_style="constant",
    )
    for chunk in ddp:
        cfg = chunk.config
        # Packed micro-batches differ in length: pipeline stages exchange shapes first. Not under
        # the interleaved schedule: megatron's shape exchange is a blocking step inside each p2p
        # call, and the interleaved schedule's staggered calls then wait on each other forever
        # (seen with PP=2 x VPP=2). There every pack is padded to data.max_tokens instead
        # (parallel/sequence.py); the packer fills packs to ~99.9%, so the padding costs little.
        cfg.variable_seq_lengths = p.pipeline_parallel > 1 and len(ddp) == 1
        cfg.finalize_model_grads_func = finalize_model_grads
        cfg.grad_scale_func = optimizer.scale_loss
        cfg.no_sync_func = [c.no_sync for c in ddp] if len(ddp) > 1 else ddp[0].no_sync
        if p.overlap_grad_reduce:
            cfg.grad_sync_func = [c.start_grad_sync for c in ddp] if len(ddp) > 1 else ddp[0].start_grad_sync
    return ddp, optimizer, scheduler


def init_components(config: Config, chunks) -> None:
    """InternVL's progressive scaling: the LLM and/or ViT + projector from other checkpoints."""
    for prefixes, path in ((("language_model.",), config.checkpoint.init_language),
                           (("vision_model.", "projector."), config.checkpoint.init_vision)):
        if path:
            n = ckpt.load_component(chunks, path, prefixes)
            logger.info("initialised %s from %s (%d tensors)", "/".join(prefixes), path, n)


def restore(config: Config, source: Path, resuming: bool, ddp, optimizer, scheduler, mpo,
            data_global: bool) -> tuple[int, Optional[dict]]:
    """Load ``source``; the step to continue from and the saved data state (None for weights only).

    Weights only when starting from checkpoint.load with checkpoint.finetune, or when the
    checkpoint holds nothing else (converter output); the run's own save: everything."""
    finetune = not resuming and (config.checkpoint.finetune or not ckpt.is_training_checkpoint(source))
    saved_model = ckpt.saved_model_config(source)
    if saved_model is not None:
        ckpt.check_model_config_matches(saved_model, config_to_dict(config)["model"], source)
    state = ckpt.CheckpointManager.load(source, ddp, optimizer, scheduler, data_state_wanted=not finetune,
                                        finetune=finetune, data_global=data_global)
    if mpo is not None and not finetune and "mpo" in state:
        mpo.load_state_dict(state["mpo"])
    if torch.distributed.get_rank() == 0:
        logger.info("resumed from %s at step %d%s", source, state["step"], " (weights only)" if finetune else "")
    return state["step"], state.get("data_state")


def data_reader(config: Config, tokenizer, mpo, trainable: dict, data_state: Optional[dict]):
    """The loader of this data-parallel replica (built on the replica's reading rank only)."""
    from megatron.core import parallel_state as ps

    d, t = config.data, config.training
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    if d.synthetic.enabled:
        loader = SyntheticPackLoader(d, config.model.language.vocab_size, config.model.image_token_id, dp_rank, dp)
        if data_state is not None:
            loader.load_state_dict(data_state)
        return loader
    planned = dict(packs_per_step=t.global_batch_size // t.micro_batch_size,
                   cost=CostModel.for_model(config.model, trainable))
    if mpo is not None:
        return build_preference_loader(d, tokenizer, dp_rank, dp, state=data_state,
                                       sft_reduction=config.mpo.sft_reduction, **planned)
    return build_data_loader(d, tokenizer, dp_rank, dp, state=data_state, **planned)


def setup(config: Config) -> TrainingRun:
    t = config.training
    launch = distributed.initialize(config.parallel, seed=t.seed)
    config.validate(world_size=launch.world_size)
    rank0 = launch.rank == 0
    run_dir = Path(config.logging.run_dir)
    save_dir = Path(config.checkpoint.save or run_dir / "checkpoints")
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")

    synthetic = config.data.synthetic.enabled
    tokenizer = None if synthetic else build_tokenizer(config.data)
    if not synthetic:
        check_data_matches_model(config, tokenizer)
    config.data.pad_to_multiple = pack_pad_multiple(config)

    source, resuming = find_checkpoint(config, save_dir)
    chunks = build_model_chunks(config, initialize=source is None, under_ddp=True)
    trainable = trainable_components(apply_stage(chunks, t))
    if source is None:
        init_components(config, chunks)
    ddp, optimizer, scheduler = build_optimizer(config, chunks)
    mpo = None
    if t.stage == "mpo":
        specs, _ = open_preference_sources(config.data)
        mpo = MpoObjective(config.mpo, build_reference(config, specs, ddp[0].config.variable_seq_lengths))

    manager = ckpt.CheckpointManager(save_dir, config.checkpoint.keep_last, config.checkpoint.async_save,
                                     hf_files=None if source is None else source / ckpt.HF_SUBDIR)
    data_global = synthetic or config.data.shard_by == "global"
    start_step, data_state = 0, None
    if source is not None:
        start_step, data_state = restore(config, source, resuming, ddp, optimizer, scheduler, mpo, data_global)
    # Read (decode, tile, pack) once per model replica; the other TP/PP ranks receive the packs.
    loader = BroadcastLoader(lambda: data_reader(config, tokenizer, mpo, trainable, data_state))
    from megatron.core import parallel_state as ps

    n_micro = t.global_batch_size // (t.micro_batch_size * ps.get_data_parallel_world_size())
    evaluator = Evaluator.build(config, tokenizer, n_micro)
    return TrainingRun(config, ddp, optimizer, scheduler, manager, loader, mpo, trainable, start_step,
                       data_global, launch.world_size, rank0, run_dir, save_dir, evaluator)
