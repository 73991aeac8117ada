"""Fused output layer + weighted vocab-parallel cross-entropy that never holds the logits.

``weighted_linear_cross_entropy`` is the training loss (``sum_t w_t CE_t`` with the per-token
CE for statistics); ``linear_log_probs`` gives differentiable per-token log-probabilities of the
labels (what preference losses such as MPO sum per response). Both take this TP rank's rows of
the output weight and every token's full hidden state, reduce over ``tp_group`` exactly as
megatron's ``vocab_parallel_cross_entropy``, and ignore vocabulary rows at or beyond
``vocab_size`` (padding). See :mod:`.chunked` for the design, :mod:`.triton_ce` for the GPU
kernels; ``backend='auto'`` takes Triton for CUDA tensors and torch otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .chunked import DEFAULT_CHUNK_BYTES, LinearLogProbs, TorchBackend, WeightedLinearCE, chunk_tokens_for

__all__ = ["FusedCE", "weighted_linear_cross_entropy", "linear_log_probs", "chunk_tokens_for",
           "DEFAULT_CHUNK_BYTES", "TorchBackend"]


@dataclass
class FusedCE:
    loss: torch.Tensor  # scalar fp32, sum_t w_t CE_t (differentiable)
    ce: torch.Tensor  # [T] fp32 per-token CE, 0 where w_t == 0 (detached)

    @property
    def log_probs(self) -> torch.Tensor:
        """[T] log p(label), detached (0 where w_t == 0)."""
        return -self.ce


def weighted_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                  token_weights: torch.Tensor, tp_group=None, *,
                                  vocab_size: int | None = None, chunk_tokens: int | None = None,
                                  backend: str = "auto") -> FusedCE:
    """hidden [T, H]; weight [V/TP, H] (this rank's rows); labels [T] global ids; token_weights
    [T] (0 = not supervised: its label is not read). ``vocab_size``: the real vocabulary (rows
    beyond it are padding); default: all rows are real."""
    loss, ce = WeightedLinearCE.apply(hidden, weight, labels, token_weights, tp_group, vocab_size,
                                      chunk_tokens, backend)
    return FusedCE(loss=loss, ce=ce)


def linear_log_probs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                     mask: torch.Tensor | None = None, tp_group=None, *,
                     vocab_size: int | None = None, chunk_tokens: int | None = None,
                     backend: str = "auto") -> torch.Tensor:
    """Per-token log p(label) [T] fp32, differentiable w.r.t. hidden and weight; tokens outside
    ``mask`` (bool [T]) are 0 and not computed."""
    if mask is None:
        mask = torch.ones(labels.shape, dtype=torch.bool, device=labels.device)
    return LinearLogProbs.apply(hidden, weight, labels, mask.bool(), tp_group, vocab_size,
                                chunk_tokens, backend)
