"""megatron's gradient finalisation, without its name-based TP sum of the ViT's split QK norms.

With ``qk_layernorm`` in the chunk's (language) config, megatron-core 0.16.1 sums over the
tensor-parallel group the gradient of every parameter whose name holds ``q_layernorm`` or
``k_layernorm``. That is right for a Qwen3 LLM (one head_dim-sized norm, replicated on every TP
rank) and wrong for InternViT-6B's QK norms (:class:`~megatron_internvl.models.vision.ViTQKNorm`:
one weight over all heads, split over TP like the heads), whose slices would be added together:
InternViT-6B + Qwen3 is InternVL3.5-38B's pair. So the sum is taken here, over the LLM's norms only.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed.finalize_model_grads import finalize_model_grads as megatron_finalize
from megatron.core.utils import get_attr_wrapped_model, get_model_config
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megatron_internvl.models.vision import ViTQKNorm


def replicated_qk_norm_params(model, config) -> list[torch.nn.Parameter]:
    """The trainable q/k norms that megatron's name rule means (the LLM's), not the TP-split ViT
    ones, and not those its sequence-parallel rule already sums."""
    split = {id(m.weight) for chunk in model for m in chunk.modules() if isinstance(m, ViTQKNorm)}
    out = []
    for chunk in model:
        for name, param in get_attr_wrapped_model(chunk, "named_parameters")():
            if not param.requires_grad or id(param) in split:
                continue
            if "q_layernorm" not in name and "k_layernorm" not in name:
                continue
            if config.sequence_parallel and getattr(param, "sequence_parallel", False):
                continue
            out.append(param)
    return out


def finalize_model_grads(model, *args, **kwargs):
    """``config.finalize_model_grads_func``: megatron's, with the QK-norm TP sum done right."""
    config = get_model_config(model[0])
    pg = kwargs.get("pg_collection")
    tp_group = pg.tp if pg is not None else ps.get_tensor_model_parallel_group()
    if not config.qk_layernorm or tp_group.size() == 1:
        return megatron_finalize(model, *args, **kwargs)
    config.qk_layernorm = False
    try:
        megatron_finalize(model, *args, **kwargs)
    finally:
        config.qk_layernorm = True
    grads = [p.main_grad for p in replicated_qk_norm_params(model, config)]
    if grads:
        summed = _flatten_dense_tensors(grads)
        torch.distributed.all_reduce(summed, group=tp_group)
        for grad, synced in zip(grads, _unflatten_dense_tensors(summed, grads)):
            grad.copy_(synced)
