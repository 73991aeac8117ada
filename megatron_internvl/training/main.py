"""The training loop: config -> model chunks, DDP, optimizer, data -> steps, metrics, checkpoints."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path

import torch

from megatron_internvl.config import Config, ConfigError, save_config
from megatron_internvl.config.loader import config_to_dict

from megatron_internvl import checkpoint as ckpt
from .flops import device_peak_tflops, step_flops
from .metrics import MetricsLogger
from .signals import EXIT_REQUEUE, StopRequest
from .stages import apply_stage, trainable_components
from .step import train_step

logger = logging.getLogger("megatron_internvl.train")

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}


class TrainingAborted(RuntimeError):
    pass


def build_chunks(config: Config, initialize: bool = True):
    """This rank's model chunks (one, or one per virtual stage) on the compute device.
    ``initialize=False`` when a checkpoint will overwrite every weight."""
    from megatron.core import parallel_state as ps

    from megatron_internvl.models.factory import build_internvl_model
    from megatron_internvl.parallel.distributed import compute_device

    vpp = config.parallel.virtual_pipeline_parallel or 1
    chunks = []
    for vp in range(vpp):
        vp_stage = vp if vpp > 1 else None
        chunks.append(build_internvl_model(
            config.model, config.parallel, config.training.precision,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            vp_stage=vp_stage, initialize=initialize,
        ).to(compute_device()))
    return chunks


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
    source = ckpt.CheckpointManager(load_dir).latest_valid() if load_dir.exists() else None
    if source is None and (load_dir / "metadata.json").is_file():
        source = load_dir
    if source is None:
        raise ckpt.CheckpointError(f"checkpoint.load={load_dir}: no usable checkpoint there")
    return source, False


def build_optimizer(config: Config, chunks):
    """megatron DDP around each chunk, the (distributed) Adam optimizer with per-component LR
    multipliers and no weight decay on norms and biases, and the LR schedule."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
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
        clip_grad=t.clip_grad, bf16=t.precision != "fp32", params_dtype=_DTYPES[t.precision],
        use_distributed_optimizer=p.distributed_optimizer,
    )
    overrides = get_standard_config_overrides(opt_config)  # no weight decay on norms and biases
    for component, pattern in (("vision", "*vision_model.*"), ("projector", "*projector.*"),
                               ("language", "*language_model.*")):
        mult = getattr(o.lr_mult, component)
        if mult != 1.0:
            overrides[ParamKey(name=pattern)] = {"max_lr": o.lr * mult, "min_lr": o.min_lr * mult}
    optimizer = get_megatron_optimizer(opt_config, ddp, config_overrides=overrides)
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
        # (_pad_multiple); the packer fills packs to ~99.9%, so the padding costs little.
        cfg.variable_seq_lengths = p.pipeline_parallel > 1 and len(ddp) == 1
        cfg.finalize_model_grads_func = finalize_model_grads
        cfg.grad_scale_func = optimizer.scale_loss
        cfg.no_sync_func = [c.no_sync for c in ddp] if len(ddp) > 1 else ddp[0].no_sync
        if p.overlap_grad_reduce:
            cfg.grad_sync_func = [c.start_grad_sync for c in ddp] if len(ddp) > 1 else ddp[0].start_grad_sync
    return ddp, optimizer, scheduler


def check_data_matches_model(config: Config, tokenizer) -> None:
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


def _pad_multiple(config: Config) -> int:
    p = config.parallel
    need = 1
    if p.sequence_parallel:
        need = p.tensor_parallel
    if p.context_parallel > 1:
        need = math.lcm(need, 2 * p.context_parallel * p.tensor_parallel)
    if config.training.precision == "fp8":
        need = math.lcm(need, 16)
    if (p.virtual_pipeline_parallel or 1) > 1:
        # The interleaved schedule runs on fixed-length packs (see build_optimizer).
        if config.data.max_tokens % need:
            raise ConfigError(
                f"interleaved pipeline parallelism pads every pack to data.max_tokens="
                f"{config.data.max_tokens}, which must be a multiple of {need} (sequence/context "
                f"parallel, FP8): set data.max_tokens={config.data.max_tokens // need * need}")
        return config.data.max_tokens
    return math.lcm(need, config.data.pad_to_multiple)


def _plan_stats(loader) -> dict:
    """The planned loader's balance of this step (rank 0 reads data, so it has it)."""
    stats = getattr(loader.inner, "step_stats", None)
    return {f"plan_{k}": v for k, v in stats().items()} if stats is not None else {}


def run(config: Config, recipe=None, overrides=()) -> int:
    from megatron.core import parallel_state as ps

    from megatron_internvl.data.loader import build_data_loader, build_tokenizer
    from megatron_internvl.data.synthetic import SyntheticPackLoader
    from megatron_internvl.parallel import distributed
    from megatron_internvl.parallel.data import BroadcastLoader

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    t = config.training
    launch = distributed.initialize(config.parallel, seed=t.seed)
    world = launch.world_size
    config.validate(world_size=world)
    rank0 = launch.rank == 0
    run_dir = Path(config.logging.run_dir)
    save_dir = Path(config.checkpoint.save or run_dir / "checkpoints")
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    dtype = _DTYPES[t.precision]

    synthetic = config.data.synthetic.enabled
    tokenizer = None if synthetic else build_tokenizer(config.data)
    if not synthetic:
        check_data_matches_model(config, tokenizer)
    config.data.pad_to_multiple = _pad_multiple(config)

    source, resuming = find_checkpoint(config, save_dir)
    chunks = build_chunks(config, initialize=source is None)
    flags = apply_stage(chunks, t)
    trainable = trainable_components(flags)
    for prefixes, path in ((("language_model.",), config.checkpoint.init_language),
                           (("vision_model.", "projector."), config.checkpoint.init_vision)):
        if path and source is None:
            n = ckpt.load_component(chunks, path, prefixes)
            logger.info("initialised %s from %s (%d tensors)", "/".join(prefixes), path, n)
    ddp, optimizer, scheduler = build_optimizer(config, chunks)
    mpo = None
    if t.stage == "mpo":
        from megatron_internvl.data.preference import open_preference_sources

        from .mpo import MpoObjective
        from .mpo_reference import build_reference

        specs, _ = open_preference_sources(config.data)
        mpo = MpoObjective(config.mpo, build_reference(config, specs, ddp[0].config.variable_seq_lengths))

    manager = ckpt.CheckpointManager(save_dir, config.checkpoint.keep_last, config.checkpoint.async_save,
                                     hf_files=None if source is None else source / ckpt.HF_SUBDIR)
    start_step, data_state = 0, None
    # The planned loader's (and the synthetic one's) state is global: resumable at any DP size.
    data_global = synthetic or (mpo is None and config.data.shard_by == "global")
    if source is not None:
        # Weights only when starting from checkpoint.load with checkpoint.finetune, or when the
        # checkpoint holds nothing else (converter output); the run's own save: everything.
        finetune = not resuming and (config.checkpoint.finetune or not ckpt.is_training_checkpoint(source))
        saved_model = ckpt.saved_model_config(source)
        if saved_model is not None:
            ckpt.check_model_config_matches(saved_model, config_to_dict(config)["model"], source)
        state = ckpt.CheckpointManager.load(source, ddp, optimizer, scheduler,
                                            data_state_wanted=not finetune, finetune=finetune,
                                            data_global=data_global)
        start_step = state["step"]
        data_state = state.get("data_state")
        if mpo is not None and not finetune and "mpo" in state:
            mpo.load_state_dict(state["mpo"])
        if rank0:
            logger.info("resumed from %s at step %d%s", source, start_step, " (weights only)" if finetune else "")

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    # Read (decode, tile, pack) once per model replica; the other TP/PP ranks receive the packs.
    def read():
        if synthetic:
            loader = SyntheticPackLoader(config.data, config.model.language.vocab_size,
                                         config.model.image_token_id, dp_rank, dp)
            if data_state is not None:
                loader.load_state_dict(data_state)
            return loader
        if mpo is not None:
            from megatron_internvl.data.preference import build_preference_loader

            return build_preference_loader(config.data, tokenizer, dp_rank, dp, state=data_state,
                                           sft_reduction=config.mpo.sft_reduction)
        from megatron_internvl.data.balance import CostModel

        return build_data_loader(config.data, tokenizer, dp_rank, dp, state=data_state,
                                 packs_per_step=t.global_batch_size // t.micro_batch_size,
                                 cost=CostModel.for_model(config.model, trainable))

    loader = BroadcastLoader(read)
    n_micro = t.global_batch_size // (t.micro_batch_size * dp)
    num_datasets = len(loader.dataset_names)
    peak = device_peak_tflops(t.peak_tflops)
    metrics = MetricsLogger(run_dir, t.train_steps, enabled=rank0, tensorboard=config.logging.tensorboard,
                            progress=config.logging.progress)
    stop = StopRequest(t.time_limit_minutes)
    nonfinite_in_row, loss_avg = 0, None
    save_every = config.checkpoint.save_interval

    def saved_common():
        return {"config": config_to_dict(config), **({"mpo": mpo.state_dict()} if mpo is not None else {})}
    step = start_step
    exit_code = 0
    finished = False
    try:
        while step < t.train_steps:
            manager.poll()
            t0 = time.monotonic()
            lr = optimizer.param_groups[0]["lr"]  # the rate this step's update uses
            batches = [next(loader) for _ in range(n_micro)]
            result = train_step(ddp, optimizer, scheduler, batches, dtype=dtype,
                                num_datasets=num_datasets, inject_nan=(step + 1) in t.inject_nan_steps,
                                fused_loss=config.model.fused_loss, mpo=mpo)
            step += 1
            elapsed = time.monotonic() - t0
            if not result.updated:
                nonfinite_in_row += 1
                metrics.event(step, skipped_update="non-finite loss or gradients",
                              loss=result.loss, in_a_row=nonfinite_in_row)
                if nonfinite_in_row >= t.max_nonfinite_in_row:
                    raise TrainingAborted(
                        f"{nonfinite_in_row} non-finite steps in a row (training.max_nonfinite_in_row="
                        f"{t.max_nonfinite_in_row}): lower the learning rate or check the data; "
                        f"the last good checkpoint is in {save_dir}")
            else:
                nonfinite_in_row = 0
                if loss_avg is not None and result.loss > t.loss_spike_factor * loss_avg:
                    metrics.event(step, loss_spike=result.loss, running_mean=loss_avg)
                loss_avg = result.loss if loss_avg is None else 0.9 * loss_avg + 0.1 * result.loss
            flops = step_flops(config.model, result.shapes, trainable)
            if mpo is not None and config.mpo.reference == "model":  # + the reference's forward pass
                flops += step_flops(config.model, result.shapes, dict.fromkeys(trainable, False))
            flops = torch.tensor([flops], dtype=torch.float64, device=distributed.compute_device())
            dp_group = ps.get_data_parallel_group(with_context_parallel=True)
            slowest = flops.clone()
            torch.distributed.all_reduce(flops, group=dp_group)
            # max / mean of the ranks' FLOPs: how long the others wait for the dearest rank
            torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX, group=dp_group)
            data_imbalance = (float(slowest) * torch.distributed.get_world_size(dp_group) / float(flops)
                              if float(flops) > 0 else 1.0)
            tflops_per_gpu = float(flops) / elapsed / world / 1e12
            if step % t.log_interval == 0 or step == t.train_steps:
                metrics.log({
                    "step": step, "loss": result.loss, "grad_norm": result.grad_norm,
                    "lr": lr, "tokens_per_s": result.tokens / elapsed,
                    "tiles_per_s": result.tiles / elapsed, "tflops_per_gpu": tflops_per_gpu,
                    "mfu": tflops_per_gpu / peak if peak else None, "step_time_s": elapsed,
                    "tokens": result.tokens, "tiles": result.tiles,
                    "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30,
                    "dataset_loss": {loader.dataset_names[i]: v for i, v in result.dataset_loss.items()},
                    "data_imbalance": data_imbalance,
                    **_plan_stats(loader),
                    **({"mpo": result.mpo} if mpo is not None else {}),
                })
            reason = stop.should_stop()
            if not reason and t.exit_interval and step % t.exit_interval == 0 and step < t.train_steps:
                reason = f"training.exit_interval={t.exit_interval}"
            if reason:
                manager.save(step, ddp, optimizer, scheduler, data_state=loader.state_dict(),
                             common=saved_common(), data_global=data_global)
                metrics.event(step, stopped=reason, exit_code=EXIT_REQUEUE)
                exit_code = EXIT_REQUEUE
                break
            if (save_every and step % save_every == 0) or step == t.train_steps:
                manager.save(step, ddp, optimizer, scheduler, data_state=loader.state_dict(),
                             common=saved_common(), data_global=data_global)
        finished = True
    finally:
        # Every rank reaches here together after a normal end, a stop request or TrainingAborted
        # (agreed over ranks): publish the background save. After any other error, collectives
        # could hang: kill the writer; the previous checkpoint stays `latest`.
        if finished or isinstance(sys.exc_info()[1], TrainingAborted):
            manager.wait()
        else:
            manager.abort()
        metrics.close()
    return exit_code


def main(argv=None) -> int:
    from megatron_internvl.config import load_config

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m megatron_internvl.train RECIPE.yaml [section.key=value ...]")
        return 0
    try:
        config = load_config(argv[0], argv[1:])
        return run(config, argv[0], argv[1:])
    except (ConfigError, ckpt.CheckpointError, TrainingAborted) as exc:
        print(f"megatron-internvl train: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
