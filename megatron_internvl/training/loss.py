"""Weighted next-token loss that is the exact global mean whatever the parallel layout.

Each token carries a weight from the data pipeline (token / sample / square averaging: 1/x^p).
The step's loss is ``sum(CE * w) / W`` where ``W`` sums the weights of the whole global batch
(all micro-batches, all data-parallel ranks). megatron's schedule divides each micro-batch loss
by the number of micro-batches and DDP averages gradients over the DP x CP group; the factor
``num_microbatches * dp_cp`` below cancels both, so the gradients are exactly those of the global
weighted mean.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel


def weighted_token_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor):
    """Vocab-parallel CE. logits [S, B, V/TP]; labels, weights [B, S]. Returns CE*w as [B, S]."""
    targets = torch.where(weights > 0, labels, torch.zeros_like(labels)).clamp(min=0)
    ce = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), targets.t().contiguous())
    return ce.t() * weights


def global_weight_sum(local_sum: torch.Tensor) -> torch.Tensor:
    """Sum of the loss weights over the DP x CP group (each rank passes its micro-batches' sum)."""
    total = local_sum.detach().clone().to(torch.float64)
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    torch.distributed.all_reduce(total, group=group)
    return total


def backward_scale(num_microbatches: int) -> int:
    return num_microbatches * parallel_state.get_data_parallel_world_size(with_context_parallel=True)
