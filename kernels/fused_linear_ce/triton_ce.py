"""Triton kernels for one chunk's softmax work (the matmuls stay in cuBLAS).

Same contract as :class:`.chunked.TorchBackend`, with two differences that matter on GPUs:
the logits are read in their own dtype (bf16 logits are never copied to fp32), and the gradient
is written in place into the logits buffer when the dtypes agree, so a chunk costs one
``[tokens, vocab / TP]`` buffer instead of three.

- ``_row_lse_kernel``: one program per row, an online (running max, rescaled sum) pass over the
  row's real vocabulary columns, plus the target's logit.
- ``_softmax_grad_kernel``: one program per row, ``(exp(x - lse) - onehot) * scale``; padded
  vocabulary columns get exactly zero.

On CPU machines these run under ``TRITON_INTERPRET=1`` (slow, exact): that is how CI tests them.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BLOCK = 1024


def check_usable(device: torch.device) -> None:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "the Triton cross-entropy backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU "
            "tests); use backend='torch' or 'auto' on CPU"
        )


@triton.jit
def _row_lse_kernel(x_ptr, x_stride, target_ptr, in_range_ptr, lse_ptr, picked_ptr, valid,
                    BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    base = x_ptr + row.to(tl.int64) * x_stride
    m = float("-inf")
    s = 0.0
    for start in range(0, valid, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < valid, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    tl.store(lse_ptr + row, m + tl.log(s))
    target = tl.load(target_ptr + row)
    hit = tl.load(in_range_ptr + row)
    picked = tl.load(base + target).to(tl.float32)
    tl.store(picked_ptr + row, tl.where(hit != 0, picked, 0.0))


@triton.jit
def _softmax_grad_kernel(x_ptr, x_stride, out_ptr, out_stride, lse_ptr, target_ptr, in_range_ptr,
                         scale_ptr, valid, n_cols, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    base = x_ptr + row.to(tl.int64) * x_stride
    out = out_ptr + row.to(tl.int64) * out_stride
    lse = tl.load(lse_ptr + row)
    target = tl.load(target_ptr + row)
    hit = tl.load(in_range_ptr + row)
    scale = tl.load(scale_ptr + row)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        p = tl.where(cols < valid, tl.exp(x - lse), 0.0)
        p = tl.where((cols == target) & (hit != 0), p - 1.0, p)
        tl.store(out + cols, (p * scale).to(out_ptr.dtype.element_ty), mask=cols < n_cols)


class TritonBackend:
    name = "triton"

    @staticmethod
    def prepare(logits: torch.Tensor, valid: int) -> torch.Tensor:
        return logits.contiguous()  # padding is masked inside the kernels

    @staticmethod
    def row_lse(work, target, in_range, valid):
        rows = work.shape[0]
        lse = torch.empty(rows, dtype=torch.float32, device=work.device)
        picked = torch.empty_like(lse)
        if rows:
            _row_lse_kernel[(rows,)](work, work.stride(0), target.contiguous(),
                                     in_range.to(torch.int8).contiguous(), lse, picked, valid,
                                     BLOCK_V=BLOCK)
        return lse, picked

    @staticmethod
    def softmax_grad(work, lse, target, in_range, valid, scale, out_dtype):
        out = work if work.dtype == out_dtype else torch.empty(work.shape, dtype=out_dtype,
                                                               device=work.device)
        rows, cols = work.shape
        if rows:
            _softmax_grad_kernel[(rows,)](work, work.stride(0), out, out.stride(0),
                                          lse.contiguous(), target.contiguous(),
                                          in_range.to(torch.int8).contiguous(),
                                          scale.float().contiguous(), valid, cols, BLOCK_V=BLOCK)
        return out
