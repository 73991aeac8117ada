"""Core attention for the local (CPU) layer spec.

megatron-core's local ``DotProductAttention`` needs the CUDA RNG tracker and a global CUDA
memory buffer, and has no packed-sequence support. This module has the same interface and
computes exact attention with ``torch.nn.functional.scaled_dot_product_attention``:
- causal (LLM) or bidirectional (InternViT) from ``attn_mask_type``;
- padded batches (``sbhd``) or one packed sequence (``thd`` with ``cu_seqlens``): each sample is
  attended separately, so one sample can never see another;
- grouped-query attention (fewer key/value heads than query heads).
On GPUs the Transformer Engine spec replaces it with ``TEDotProductAttention``.
"""

import math

import torch
from torch import nn
from megatron.core.transformer.enums import AttnMaskType


class CoreAttention(nn.Module):
    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        **unused,
    ):
        super().__init__()
        if config.context_parallel_size > 1:
            raise NotImplementedError(
                "context parallelism needs the Transformer Engine spec (GPU): "
                "set parallel.context_parallel=1 on CPU"
            )
        self.config = config
        self.attn_mask_type = attn_mask_type
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1 / math.sqrt(head_dim)

    def _attend(self, q, k, v, causal: bool, mask=None):
        # q: [B, H, S, D]; k, v: [B, G, S, D]
        if k.shape[1] != q.shape[1]:
            repeat = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        return nn.functional.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal and mask is None,
            scale=self.softmax_scale,
        )

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type == AttnMaskType.causal
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            # query: [T, H, D]; one segment per sample (padding is its own segment).
            cu = packed_seq_params.cu_seqlens_q.tolist()
            outs = []
            for start, end in zip(cu[:-1], cu[1:]):
                if end == start:
                    continue
                q = query[start:end].transpose(0, 1)[None]
                k = key[start:end].transpose(0, 1)[None]
                v = value[start:end].transpose(0, 1)[None]
                outs.append(self._attend(q, k, v, causal)[0].transpose(0, 1))
            out = torch.cat(outs, dim=0)
            return out.reshape(out.shape[0], -1)
        # query: [S, B, H, D]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask = None
        if attention_mask is not None and mask_type != AttnMaskType.no_mask:
            # megatron's convention: True marks positions that must NOT be attended.
            mask = ~attention_mask.bool()
            if causal:
                s = q.shape[2]
                mask = mask & torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
        out = self._attend(q, k, v, causal, mask)  # [B, H, S, D]
        out = out.permute(2, 0, 1, 3)
        return out.reshape(out.shape[0], out.shape[1], -1)
