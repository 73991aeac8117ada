"""LayerNorm / RMSNorm for the local (non-Transformer-Engine) layer specs.

megatron-core's ``WrappedTorchNorm`` refuses sequence parallelism. Under sequence parallelism
every TP rank holds a different slice of the sequence, so norm weights get different gradients
on each rank; marking them ``sequence_parallel`` makes megatron's DDP all-reduce those gradients
over the TP group (TE's norms do the same on GPU).
"""

import torch
from torch import nn


class Norm(nn.Module):
    """LayerNorm or RMSNorm chosen by ``config.normalization``; signature of megatron norms."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__()
        self.kind = config.normalization
        if self.kind not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"normalization={self.kind!r}: use 'LayerNorm' or 'RMSNorm'")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = (
            nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
            if self.kind == "LayerNorm"
            else None
        )
        for p in self.parameters():
            setattr(p, "sequence_parallel", config.sequence_parallel)

    def forward(self, x):
        if self.kind == "LayerNorm":
            return nn.functional.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        return nn.functional.rms_norm(x, x.shape[-1:], self.weight, self.eps)
