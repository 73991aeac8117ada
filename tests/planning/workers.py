"""Rank-side code for the planner tests (spawned by tests/harness.py): the bytes the real model,
DDP gradient buffers and distributed optimizer allocate on this rank for a few layouts."""

from __future__ import annotations

# A tiny InternVL whose shapes exercise every counting rule: GQA with QKV bias, an odd number of
# ViT heads (padded at TP=2), a vocabulary that needs padding, three LLM layers (uneven PP split).
TINY = {
    "model": {
        "vision": {"hidden_size": 48, "num_layers": 2, "num_heads": 3, "ffn_hidden_size": 96,
                   "image_size": 56, "patch_size": 14},
        "language": {"hidden_size": 64, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2,
                     "ffn_hidden_size": 128, "vocab_size": 500, "max_position_embeddings": 512},
        "image_token_id": 5, "spec": "local",
    },
    "data": {"synthetic": {"enabled": True, "sample_tokens": 64, "tiles_per_sample": 1},
             "image_size": 56, "num_image_token": 4, "max_tokens": 128, "max_tiles": 4},
    "training": {"precision": "bf16", "global_batch_size": 2, "train_steps": 2},
}

# (name, overrides) of the layouts checked on 2 ranks.
LAYOUTS = [
    ("dp2_full", ["training.stage=full"]),
    ("tp2_vit6b_style", ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true",
                         "model.vision.norm=rmsnorm", "model.vision.qk_norm=true",
                         "model.vision.qkv_bias=false"]),
    ("pp2_first1_mlp_warmup", ["parallel.pipeline_parallel=2", "parallel.first_stage_llm_layers=1",
                               "training.stage=mlp_warmup"]),
    ("dp2_vit_last_layer_plain_adam", ["training.stage=vit_incremental",
                                       "training.vit_trainable_last_layers=1",
                                       "parallel.distributed_optimizer=false"]),
]


def tiny_config(overrides):
    from megatron_internvl.config.loader import apply_overrides, build_dataclass
    from megatron_internvl.config.schema import Config

    config = build_dataclass(Config, apply_overrides(TINY, overrides))
    config.validate(world_size=2, require_data=False)
    return config


def _bytes(t) -> int:
    return t.numel() * t.element_size()


def allocated_bytes() -> dict:
    """Per layout, what this rank holds after one optimizer step (Adam state exists)."""
    import torch
    from megatron.core import parallel_state as ps

    from megatron_internvl.parallel import distributed
    from megatron_internvl.models.factory import build_model_chunks as build_chunks
    from megatron_internvl.training.setup import build_optimizer
    from megatron_internvl.training.stages import apply_stage

    out = {}
    for name, overrides in LAYOUTS:

        config = tiny_config(overrides)
        distributed.initialize(config.parallel, seed=config.training.seed)
        chunks = build_chunks(config)
        apply_stage(chunks, config.training)
        ddp, optimizer, _ = build_optimizer(config, chunks)
        for chunk in ddp:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        optimizer.step()
        params = [p for chunk in chunks for p in chunk.parameters()]
        trainable = [p for p in params if p.requires_grad]
        grad_bytes, buffer_params, buckets = 0, 0, 0
        for chunk in ddp:
            for buf in chunk.buffers + chunk.expert_parallel_buffers:
                grad_bytes += _bytes(buf.grad_data)
                buffer_params += buf.param_data.numel() if buf.param_data is not None else 0
                buckets += len(buf.buckets)
        state_bytes, master_bytes = 0, 0
        for opt in optimizer.chained_optimizers:
            for state in opt.optimizer.state.values():
                state_bytes += sum(_bytes(v) for v in state.values()
                                   if torch.is_tensor(v) and v.dim() > 0)
            if config.training.precision != "fp32":
                # fp32 master weights: the inner optimizer's parameters (shards or full copies)
                master_bytes += sum(_bytes(p) for g in opt.optimizer.param_groups for p in g["params"])
        out[name] = {
            "pp_rank": ps.get_pipeline_model_parallel_rank(),
            "dp_rank": ps.get_data_parallel_rank(with_context_parallel=True),
            "params": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in trainable),
            "trainable_tensors": len(trainable),
            "weight_bytes": sum(_bytes(p) for p in params),
            "grad_bytes": grad_bytes,
            "buckets": buckets,
            "optimizer_bytes": state_bytes + master_bytes,
        }
        del ddp, optimizer, chunks
    return out
