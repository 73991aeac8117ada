"""Rotary embeddings computed from per-token float positions.

InternVL3's V2PE gives visual tokens fractional positions (delta < 1 per token), and packed
sequences restart positions per sample. Both are handled by one code path: the angles are
``outer(position_fp32, inv_freq)`` for whatever positions the data pipeline emits, so integer
positions are simply the special case delta = 1.
"""

import torch
from torch import nn


class FloatRotary(nn.Module):
    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary head_dim must be even, got {head_dim}")
        exponent = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
        inv_freq = (1.0 / (theta**exponent)).to(torch.float32)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor, packed: bool) -> torch.Tensor:
        """Angles in megatron's layout.

        position_ids: [B, S] float. Returns [S, B, 1, D] for padded batches (bshd), or
        [B*S, 1, 1, D] for a packed THD sequence (B must be 1): megatron's THD rotary uses exact
        per-token angles when their count equals ``cu_seqlens[-1]``.
        """
        pos = position_ids.to(torch.float32)
        angles = pos.unsqueeze(-1) * self.inv_freq.to(pos.device)  # [B, S, D/2]
        emb = torch.cat((angles, angles), dim=-1)  # [B, S, D] (rotate-half convention)
        if packed:
            if pos.shape[0] != 1:
                raise ValueError("a packed (THD) micro-batch holds one packed row: batch size 1")
            return emb[0][:, None, None, :]
        return emb.transpose(0, 1)[:, :, None, :].contiguous()
