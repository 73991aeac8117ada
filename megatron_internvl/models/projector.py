"""InternVL's MLP projector ("mlp1"): LayerNorm(4*vit_hidden) -> Linear -> GELU -> Linear(llm_hidden).

Tensor parallel as a megatron MLP: the first linear is column-parallel, the second
row-parallel, so the output is complete (replicated) on every TP rank, ready to be spliced into
the LLM's embeddings before they are scattered for sequence parallelism. It never runs
sequence-parallel itself (its config is a copy with ``sequence_parallel=False``).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from torch import nn


class Projector(MegatronModule):
    def __init__(self, config, input_size: int, output_size: int, norm_eps: float = 1e-5):
        config = dataclasses.replace(config, sequence_parallel=False)
        super().__init__(config=config)
        dtype = config.params_dtype
        self.layer_norm = nn.LayerNorm(input_size, eps=norm_eps, dtype=dtype)
        self.linear_fc1 = ColumnParallelLinear(
            input_size, output_size, config=config, init_method=config.init_method, bias=True,
            gather_output=False, skip_bias_add=False,
        )
        self.linear_fc2 = RowParallelLinear(
            output_size, output_size, config=config, init_method=config.output_layer_init_method,
            bias=True, input_is_parallel=True, skip_bias_add=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, input_size] -> [N, output_size] (complete on every TP rank)."""
        x = self.layer_norm(x)[:, None]  # megatron linears expect [s, b, h]
        x, _ = self.linear_fc1(x)
        x = F.gelu(x)
        x, _ = self.linear_fc2(x)
        return x[:, 0]
