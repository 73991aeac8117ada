"""Rank-side code for the parallel tests (spawned by tests/harness.py)."""

from __future__ import annotations

import torch

from megatron_internvl.config import ModelConfig, ParallelConfig, build_dataclass

TINY_LLM = {
    "language": {
        "hidden_size": 64, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
        "ffn_hidden_size": 128, "vocab_size": 128, "rope_theta": 10000.0, "qkv_bias": True,
    },
    "vision": {"ffn_hidden_size": 64},
    "spec": "local",
}
SEQ = 16
GLOBAL_MICROBATCHES = 4


def tiny_model_config() -> ModelConfig:
    return build_dataclass(ModelConfig, TINY_LLM)


def global_batch(step: int):
    """Four packed-style micro-batches: ids, positions, labels and loss weights (some zero)."""
    gen = torch.Generator().manual_seed(1000 + step)
    batches = []
    for _ in range(GLOBAL_MICROBATCHES):
        ids = torch.randint(0, 128, (1, SEQ), generator=gen)
        labels = torch.randint(0, 128, (1, SEQ), generator=gen)
        weights = torch.rand(1, SEQ, generator=gen, dtype=torch.float32)
        weights[:, : SEQ // 4] = 0  # unsupervised prefix (a prompt)
        pos = torch.arange(SEQ, dtype=torch.float32)[None]
        batches.append(dict(input_ids=ids, labels=labels, loss_weights=weights, position_ids=pos))
    return batches


def build_chunk(model_cfg, parallel, vp_stage=None):
    from megatron.core import parallel_state as ps

    from megatron_internvl.models.factory import build_language_model
    from megatron_internvl.parallel.sharding import load_full_state_dict, seeded_full_tensor

    model = build_language_model(
        model_cfg, parallel, "fp32",
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        vp_stage=vp_stage,
    )
    load_full_state_dict(model, lambda name, shape: seeded_full_tensor(name, shape))
    return model


def allgather_distopt_grads(ddp) -> None:
    """After a reduce-scatter each DP rank holds only its shard of the reduced gradients; gather
    the shards so every main_grad is complete (for comparison only)."""
    from megatron.core.distributed.param_and_grad_buffer import shard_buffer

    for group in ddp.bucket_groups:
        pg = group.intra_distributed_optimizer_instance_group
        size = torch.distributed.get_world_size(pg)
        if size == 1:
            continue
        rank = torch.distributed.get_rank(pg)
        for bucket in group.buckets:
            shards = list(shard_buffer(bucket.grad_data, size))
            torch.distributed.all_gather(shards, shards[rank].clone(), group=pg)


def train_steps(tp: int, pp: int, steps: int = 3, sequence_parallel: bool = False, vpp: int = 1) -> dict:
    """Train the tiny decoder for ``steps`` optimizer steps on the same global batches in any
    layout; return losses, grad norms, gathered first-step gradients and final parameters."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_internvl.parallel import distributed
    from megatron_internvl.parallel.sharding import gather_full_state_dict
    from megatron_internvl.training.loss import backward_scale, weighted_token_loss

    parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, sequence_parallel=sequence_parallel,
                              virtual_pipeline_parallel=vpp if vpp > 1 else None)
    model_cfg = tiny_model_config()
    parallel.validate(model_cfg)
    distributed.initialize(parallel, seed=1234)
    chunks = [build_chunk(model_cfg, parallel, vp if vpp > 1 else None) for vp in range(vpp)]
    ddp = [
        DistributedDataParallel(
            c.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True),
            c, disable_bucketing=i > 0)
        for i, c in enumerate(chunks)
    ]
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=1e-3, weight_decay=0.01, clip_grad=1.0,
            use_distributed_optimizer=True, params_dtype=torch.float32,
        ),
        ddp,
    )
    for c in ddp:
        c.config.finalize_model_grads_func = finalize_model_grads
        c.config.grad_scale_func = optimizer.scale_loss
        c.config.no_sync_func = [d.no_sync for d in ddp] if vpp > 1 else ddp[0].no_sync

    dp = ps.get_data_parallel_world_size()
    dp_rank = ps.get_data_parallel_rank()
    per_rank = GLOBAL_MICROBATCHES // dp
    result = {"losses": [], "grad_norms": [], "grads": None, "params": None}
    for step in range(steps):
        batches = global_batch(step)
        total_weight = float(sum(b["loss_weights"].sum() for b in batches))
        local = batches[dp_rank * per_rank : (dp_rank + 1) * per_rank]
        scale = backward_scale(per_rank)

        def forward_step(data_iterator, chunk):
            b = next(data_iterator)
            out = chunk(b["input_ids"], b["position_ids"])

            def loss_func(logits):
                weighted = weighted_token_loss(logits, b["labels"], b["loss_weights"]).sum()
                return weighted / total_weight * scale, {"loss": (weighted / total_weight).detach()}

            return out, loss_func

        for c in ddp:
            c.zero_grad_buffer()
        optimizer.zero_grad()
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(local) for _ in ddp] if vpp > 1 else iter(local), model=ddp,
            num_microbatches=per_rank, seq_length=SEQ, micro_batch_size=1, forward_only=False,
        )
        if step == 0:
            for c in ddp:
                allgather_distopt_grads(c)
            result["grads"] = gather_full_state_dict(chunks, select=lambda p: p.main_grad)
        ok, grad_norm, _ = optimizer.step()
        assert ok
        result["grad_norms"].append(float(grad_norm))
        loss = torch.zeros((), dtype=torch.float64)
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            loss += sum(float(o["loss"]) for o in outputs)
        # Sum over DP, then make it known to every stage (only the last one computed it).
        torch.distributed.all_reduce(loss)
        result["losses"].append(float(loss) / (tp * ps.get_context_parallel_world_size()))
    result["params"] = gather_full_state_dict(chunks)
    return result


def _layout(tp, pp):
    from megatron.core import parallel_state as ps

    from megatron_internvl.parallel.distributed import seed_everything

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    seed_everything(7)
    return ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp)


def _fresh_chunk(model_cfg, parallel):
    """A chunk with random (not the reference) weights, so a successful load is visible."""
    from megatron.core import parallel_state as ps

    from megatron_internvl.models.factory import build_language_model

    model = build_language_model(
        model_cfg, parallel, "fp32",
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    return model


def reshard_roundtrips(workdir: str) -> dict:
    """On 2 ranks: save at one layout, load at another, compare every full tensor bitwise with
    the reference weights."""
    import os

    from megatron_internvl.parallel import distributed
    from megatron_internvl.parallel.sharding import gather_full_state_dict, seeded_full_tensor
    from megatron_internvl.checkpoint import load_model_checkpoint, save_model_checkpoint

    model_cfg = tiny_model_config()
    distributed.initialize(ParallelConfig(), seed=7)
    checks = {}

    def compare(model):
        full = gather_full_state_dict([model])
        return [n for n, t in full.items() if not torch.equal(t, seeded_full_tensor(n, tuple(t.shape)))]

    for src, dst, name in [
        ((2, 1), (1, 1), "TP=2 -> TP=1"),
        ((1, 1), (2, 1), "TP=1 -> TP=2"),
        ((1, 2), (1, 1), "PP=2 -> PP=1"),
        ((1, 1), (1, 2), "PP=1 -> PP=2"),
        ((2, 1), (1, 2), "TP=2 -> PP=2"),
    ]:
        ckpt = os.path.join(workdir, f"tp{src[0]}pp{src[1]}-{len(checks)}")
        saver = build_chunk(model_cfg, _layout(*src))
        save_model_checkpoint(saver, ckpt)
        loader = _fresh_chunk(model_cfg, _layout(*dst))
        assert compare(loader), "the fresh model must differ before loading"
        load_model_checkpoint(loader, ckpt)
        checks[name] = compare(loader)
    return checks
