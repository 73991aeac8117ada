"""Weighted next-token loss that is the exact global mean whatever the parallel layout.

Each token carries a weight from the data pipeline (token / sample / square averaging: 1/x^p).
The step's loss is ``sum(CE * w) / W`` where ``W`` sums the weights of the whole global batch
(all micro-batches, all data-parallel ranks). megatron's schedule divides each micro-batch loss
by the number of micro-batches and DDP averages gradients over the DP x CP group; the factor
``num_microbatches * dp_cp`` below cancels both, so the gradients are exactly those of the global
weighted mean.

Two implementations of the same per-token loss (``model.fused_loss``):
- fused (default): the last stage returns its final hidden states and
  :func:`fused_weighted_token_loss` applies the output layer chunk by chunk
  (``megatron_internvl.kernels.fused_linear_ce``), so the ``[tokens, vocab / TP]`` logits, their
  fp32 copy and their gradient are never held;
- :func:`weighted_token_loss` over the model's logits with megatron's
  ``vocab_parallel_cross_entropy``: the fallback, and the oracle of the fused path's tests.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel


def weighted_token_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor):
    """Vocab-parallel CE. logits [S, B, V/TP]; labels, weights [B, S]. Returns CE*w as [B, S]."""
    targets = torch.where(weights > 0, labels, torch.zeros_like(labels)).clamp(min=0)
    ce = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), targets.t().contiguous())
    return ce.t() * weights


def _output_layer_input(language_model, hidden: torch.Tensor) -> torch.Tensor:
    """[S(/TP), B, H] last-stage hidden -> [B*S, H] complete on every TP rank, with the backward
    reduction ``ColumnParallelLinear`` would do (all-reduce, or reduce-scatter under SP)."""
    if language_model.config.sequence_parallel:
        hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
    else:
        hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden)
    weight = language_model.output_layer.weight
    return hidden.transpose(0, 1).reshape(-1, hidden.shape[-1]).to(weight.dtype)


def fused_weighted_token_loss(language_model, hidden: torch.Tensor, labels: torch.Tensor,
                              weights: torch.Tensor):
    """The loss of :func:`weighted_token_loss` from the last stage's hidden states [S, B, H]
    without the logits. Returns (sum of CE*w: differentiable scalar, CE*w as [B, S] detached)."""
    from megatron_internvl.kernels.fused_linear_ce import weighted_linear_cross_entropy

    flat = _output_layer_input(language_model, hidden)
    out = weighted_linear_cross_entropy(
        flat, language_model.output_layer.weight, labels.reshape(-1), weights.reshape(-1),
        parallel_state.get_tensor_model_parallel_group(), vocab_size=language_model.vocab_size)
    return out.loss, (out.ce * weights.reshape(-1).float()).reshape(labels.shape)


def token_log_probs(language_model, hidden: torch.Tensor, labels: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
    """Differentiable log p(label) [B, S] fp32 (0 outside ``mask``) from the last stage's hidden
    states, exact at any TP: what preference losses sum per response."""
    from megatron_internvl.kernels.fused_linear_ce import linear_log_probs

    flat = _output_layer_input(language_model, hidden)
    targets = torch.where(mask, labels, torch.zeros_like(labels)).reshape(-1)
    logp = linear_log_probs(flat, language_model.output_layer.weight, targets, mask.reshape(-1),
                            parallel_state.get_tensor_model_parallel_group(),
                            vocab_size=language_model.vocab_size)
    return logp.reshape(labels.shape)


def dataset_sums(per_token: torch.Tensor, weights: torch.Tensor, token_dataset: torch.Tensor,
                 num_datasets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dataset sums of CE*w and of w over one pack (fp64): the parts of the per-dataset
    losses (``token_dataset`` -1: padding)."""
    ds = token_dataset[0]
    valid = ds >= 0
    # Padding adds 0 to dataset 0 (a boolean selection would read its size back to the host).
    slot = torch.where(valid, ds, torch.zeros_like(ds))
    zero = torch.zeros((), dtype=torch.float64, device=per_token.device)
    by_ds = torch.zeros(num_datasets, dtype=torch.float64, device=per_token.device)
    by_ds.index_add_(0, slot, torch.where(valid, per_token[0].detach().double(), zero))
    ds_w = torch.zeros(num_datasets, dtype=torch.float64, device=per_token.device)
    ds_w.index_add_(0, slot, torch.where(valid, weights[0].double(), zero))
    return by_ds, ds_w


def global_weight_sum(local_sum: torch.Tensor) -> torch.Tensor:
    """Sum of the loss weights over the DP x CP group (each rank passes its micro-batches' sum)."""
    total = local_sum.detach().clone().to(torch.float64)
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    torch.distributed.all_reduce(total, group=group)
    return total


def backward_scale(num_microbatches: int) -> int:
    return num_microbatches * parallel_state.get_data_parallel_world_size(with_context_parallel=True)
