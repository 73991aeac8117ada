"""Rank-side code for the MoE training tests (spawned by tests/harness.py).

The tiny decoder of tests/parallel with Qwen3-MoE layers (4 experts, top-2, q/k norms, head_dim
apart from hidden / heads), trained 3 steps on the same global batches in any TP x PP x EP x DP
layout; the router's load-balancing and z-losses are on, so their gradients are compared too.
"""

from __future__ import annotations

import torch

from megatron_internvl.config import ModelConfig, ParallelConfig, build_dataclass
from parallel.workers import GLOBAL_MICROBATCHES, SEQ, build_chunk, global_batch

TINY_MOE = {
    "language": {
        "arch": "qwen3_moe", "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
        "head_dim": 32, "qk_norm": True, "qkv_bias": False, "ffn_hidden_size": 128, "vocab_size": 128,
        "rope_theta": 10000.0, "num_experts": 4, "moe_top_k": 2, "moe_ffn_hidden_size": 48,
        "moe_aux_loss_coeff": 1e-2, "moe_z_loss_coeff": 1e-3,
    },
    "vision": {"ffn_hidden_size": 64},
    "spec": "local",
}


def tiny_moe_config() -> ModelConfig:
    return build_dataclass(ModelConfig, TINY_MOE)


def _allgather_distopt_grads(ddp) -> None:
    """Complete every main_grad after the distributed optimizer's reduce-scatter (dense and expert
    buckets), for comparison only."""
    from megatron.core.distributed.param_and_grad_buffer import shard_buffer

    for group in list(ddp.bucket_groups) + list(ddp.expert_parallel_bucket_groups):
        pg = group.intra_distributed_optimizer_instance_group
        size = torch.distributed.get_world_size(pg)
        if size == 1:
            continue
        rank = torch.distributed.get_rank(pg)
        for bucket in group.buckets:
            shards = list(shard_buffer(bucket.grad_data, size))
            torch.distributed.all_gather(shards, shards[rank].clone(), group=pg)


def train_moe(tp: int, pp: int, ep: int, steps: int = 3) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_internvl.parallel import distributed
    from megatron_internvl.parallel.sharding import gather_full_state_dict
    from megatron_internvl.training.loss import backward_scale, weighted_token_loss
    from megatron_internvl.training.moe_metrics import MoeMonitor

    parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep,
                              sequence_parallel=tp > 1)
    model_cfg = tiny_moe_config()
    parallel.validate(model_cfg)
    distributed.initialize(parallel, seed=1234)
    chunk = build_chunk(model_cfg, parallel)
    monitor = MoeMonitor([chunk], model_cfg.language)
    ddp = DistributedDataParallel(
        chunk.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True),
        chunk)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.01, clip_grad=1.0,
                        use_distributed_optimizer=True, params_dtype=torch.float32),
        [ddp],
    )
    ddp.config.finalize_model_grads_func = finalize_model_grads
    ddp.config.grad_scale_func = optimizer.scale_loss
    ddp.config.no_sync_func = ddp.no_sync

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per_rank = GLOBAL_MICROBATCHES // dp
    result = {"losses": [], "grad_norms": [], "grads": None, "params": None, "moe": []}
    for step in range(steps):
        batches = global_batch(step)
        total_weight = float(sum(b["loss_weights"].sum() for b in batches))
        local = batches[dp_rank * per_rank : (dp_rank + 1) * per_rank]
        scale = backward_scale(per_rank)

        def forward_step(data_iterator, model):
            b = next(data_iterator)
            out = model(b["input_ids"], b["position_ids"])

            def loss_func(logits):
                weighted = weighted_token_loss(logits, b["labels"], b["loss_weights"]).sum()
                return weighted / total_weight * scale, {"loss": (weighted / total_weight).detach()}

            return out, loss_func

        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(local), model=[ddp],
            num_microbatches=per_rank, seq_length=SEQ, micro_batch_size=1, forward_only=False,
        )
        if step == 0:
            _allgather_distopt_grads(ddp)
            result["grads"] = gather_full_state_dict([chunk], select=lambda p: p.main_grad)
        ok, grad_norm, _ = optimizer.step()
        assert ok
        result["grad_norms"].append(float(grad_norm))
        loss = torch.zeros((), dtype=torch.float64)
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            loss += sum(float(o["loss"]) for o in outputs)
        torch.distributed.all_reduce(loss)
        result["losses"].append(float(loss) / tp)
        if step == 0:  # the step's tokens, each routed top_k times in every layer (TP = 1 here)
            routed = monitor.counts.clone()
            torch.distributed.all_reduce(routed)
            lang = model_cfg.language
            result["routed"] = (float(routed.sum()), GLOBAL_MICROBATCHES * SEQ * lang.moe_top_k * lang.num_layers)
        result["moe"].append(monitor.read())
    result["params"] = gather_full_state_dict([chunk])
    return result
