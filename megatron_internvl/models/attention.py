"""Core attention and self-attention of the local layer spec (no Transformer Engine needed).

megatron-core's local ``DotProductAttention`` needs the CUDA RNG tracker and a global CUDA
memory buffer, and has no packed-sequence support. :class:`CoreAttention` has the same interface
and computes exact attention with PyTorch alone:
- causal (LLM) or bidirectional (InternViT) from ``attn_mask_type``;
- padded batches (``sbhd``; the ViT's tiles) or one packed sequence (``thd`` with
  ``cu_seqlens``): each sample is attended separately, so one sample can never see another;
- grouped-query attention (fewer key/value heads than query heads).

The kernel is chosen per call by :func:`select_backend` from the device and dtype:

| input | CUDA, bf16/fp16 | CUDA, fp32 / CPU |
|---|---|---|
| packed THD (LLM) | ``varlen``: one ``torch.nn.attention.varlen.varlen_attn`` call (flash) | ``per_sample``: SDPA per sample |
| padded, no mask (ViT tiles) | ``fused``: SDPA restricted to flash / cuDNN / efficient | ``sdpa`` |

Which FlashAttention implementation the flash kernels run (PyTorch's default FA2, or FA3 on
Hopper) is chosen once per process where the model is built: ``model.flash_attention``,
:mod:`.flash`.

What a packed micro-batch needs (cu_seqlens as int32 on the device, the longest segment as a
Python int, the host copy of the boundaries for ``per_sample``) is prepared once per
micro-batch by :func:`packed_segments` and kept on the ``PackedSeqParams`` object that every
layer receives: no host synchronisation per layer. ``varlen_attn``'s signature changed between
PyTorch releases (``is_causal`` in 2.10, ``window_size``/``scale`` later, ``enable_gqa`` later
still); :func:`varlen_adapter` reads it once at import and adapts the call.

:class:`PackedRotarySelfAttention` applies RoPE to packed sequences itself: megatron's THD
RoPE reads ``cu_seqlens`` back to the host (``.tolist()`` and one ``.item()`` per sample) in
every layer; with per-token angles (what :class:`.rotary.FloatRotary` gives) it is one
elementwise product, the same arithmetic as megatron's.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config,
)
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from torch import nn

# Backend names (reported by the GPU check and the build log).
VARLEN, PER_SAMPLE, FUSED, SDPA = "varlen", "per_sample", "fused", "sdpa"
_FLASH_DTYPES = (torch.bfloat16, torch.float16)


# --- varlen_attn: signature check ----------------------------------------------------------------
class VarlenUnavailable(RuntimeError):
    pass


_VARLEN_POSITIONAL = ("query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k")


@dataclass(frozen=True)
class VarlenAdapter:
    """``torch.nn.attention.varlen.varlen_attn`` behind one call shape, whatever the release."""

    fn: object
    causal_arg: str  # "window_size" or "is_causal"
    has_scale: bool
    has_gqa: bool

    def describe(self) -> str:
        extras = [self.causal_arg] + (["scale"] if self.has_scale else []) + (
            ["enable_gqa"] if self.has_gqa else ["GQA by repeating k/v"])
        return f"varlen_attn({', '.join(extras)})"

    def __call__(self, q, k, v, cu_seqlens, max_seqlen: int, causal: bool, scale: float):
        """q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens int32 [N+1] on q's device -> [T, Hq, D]."""
        kwargs = {}
        if self.causal_arg == "window_size":
            kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
        else:
            kwargs["is_causal"] = causal
        if self.has_scale:
            kwargs["scale"] = scale
        elif not math.isclose(scale, 1.0 / math.sqrt(q.shape[-1]), rel_tol=1e-12):
            # Releases without ``scale`` use 1/sqrt(D): fold the difference into q.
            q = q * (scale * math.sqrt(q.shape[-1]))
        if k.shape[1] != q.shape[1]:
            if self.has_gqa:
                kwargs["enable_gqa"] = True
            else:
                repeat = q.shape[1] // k.shape[1]
                k = k.repeat_interleave(repeat, dim=1)
                v = v.repeat_interleave(repeat, dim=1)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        return self.fn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)


def varlen_adapter(fn) -> VarlenAdapter:
    """Check a ``varlen_attn`` function's signature; raise :class:`VarlenUnavailable` saying why
    it cannot be used (absent, or a signature this code does not know)."""
    fix = ("install PyTorch >= 2.10 (torch.nn.attention.varlen), or Transformer Engine "
           "(model.spec=te), or train with training.precision=fp32 (slower per-sample attention)")
    if fn is None:
        raise VarlenUnavailable(
            f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn, which the "
            f"local spec uses for packed bf16/fp16 attention on CUDA: {fix}")
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError) as exc:
        raise VarlenUnavailable(f"cannot read the signature of varlen_attn ({exc}): {fix}") from exc
    names = list(params)
    if tuple(names[: len(_VARLEN_POSITIONAL)]) != _VARLEN_POSITIONAL:
        raise VarlenUnavailable(
            f"torch {torch.__version__}'s varlen_attn{inspect.signature(fn)} does not start with "
            f"{', '.join(_VARLEN_POSITIONAL)}: a signature this code does not know; {fix}")
    if "window_size" in params:
        causal_arg = "window_size"
    elif "is_causal" in params:
        causal_arg = "is_causal"
    else:
        raise VarlenUnavailable(
            f"torch {torch.__version__}'s varlen_attn{inspect.signature(fn)} has neither "
            f"window_size nor is_causal: no way to ask for causal attention; {fix}")
    return VarlenAdapter(fn, causal_arg, "scale" in params, "enable_gqa" in params)


def _installed_varlen():
    try:
        from torch.nn.attention import varlen
    except ImportError:
        return None
    return getattr(varlen, "varlen_attn", None)


def _resolve_installed() -> VarlenAdapter | VarlenUnavailable:
    try:
        return varlen_adapter(_installed_varlen())
    except VarlenUnavailable as exc:
        return exc


VARLEN_ATTN = _resolve_installed()  # checked once, at import


def require_varlen(varlen=None) -> VarlenAdapter:
    varlen = VARLEN_ATTN if varlen is None else varlen
    if isinstance(varlen, VarlenUnavailable):
        raise varlen
    return varlen


# --- backend choice ------------------------------------------------------------------------------
def select_backend(device, dtype: torch.dtype, packed: bool, masked: bool = False,
                   dropout: float = 0.0, varlen=None) -> str:
    """The kernel for one attention call: ``varlen``, ``per_sample``, ``fused`` or ``sdpa``.

    ``device`` is a ``torch.device`` or a device type string ("cuda", "cpu"); nothing is
    allocated, so every case can be asked on any machine. Packed bf16/fp16 on CUDA without
    dropout needs ``varlen_attn``: its absence raises :class:`VarlenUnavailable` here.
    """
    cuda = torch.device(device).type == "cuda"
    if packed:
        if cuda and dtype in _FLASH_DTYPES and dropout == 0.0:
            require_varlen(varlen)
            return VARLEN
        return PER_SAMPLE
    if cuda and not masked:
        return FUSED
    return SDPA


def describe_backends(varlen=None) -> str:
    """One line for logs and the GPU check: what the local spec runs on CUDA in bf16."""
    varlen = VARLEN_ATTN if varlen is None else varlen
    llm = varlen.describe() if isinstance(varlen, VarlenAdapter) else f"unavailable ({varlen})"
    return (f"packed LLM on CUDA bf16: {llm}; ViT tiles on CUDA: SDPA (flash/cuDNN/efficient); "
            "CPU and CUDA fp32 packed: SDPA per sample")


# --- packed micro-batch preparation --------------------------------------------------------------
@dataclass
class PackedSegments:
    cu_seqlens: torch.Tensor  # int32 [N+1] on the compute device
    max_seqlen: int
    _bounds: list | None = None

    _sizes: list | None = None

    def bounds(self) -> list[tuple[int, int]]:
        """(start, end) of the non-empty segments, read back to the host once."""
        if self._bounds is None:
            cu = self.cu_seqlens.tolist()
            self._bounds = [(a, b) for a, b in zip(cu[:-1], cu[1:]) if b > a]
        return self._bounds

    def sizes(self) -> list[int]:
        """The non-empty segments' lengths (they tile the packed tokens: padding is a segment)."""
        if self._sizes is None:
            self._sizes = [b - a for a, b in self.bounds()]
        return self._sizes


_CACHE_ATTR = "_internvl_packed_segments"


def prepare_segments(params, device=None) -> PackedSegments:
    """What the attention kernels need from a THD ``PackedSeqParams`` (one call per micro-batch)."""
    # Self-attention: queries and keys share one segmentation (cu_seqlens_q).
    cu = params.cu_seqlens_q.to(device=device, dtype=torch.int32).contiguous()
    if params.max_seqlen_q is not None:
        max_seqlen = int(params.max_seqlen_q)
    else:  # one read-back per micro-batch when the caller did not give it
        max_seqlen = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    return PackedSegments(cu, max_seqlen)


def packed_segments(params, device=None) -> PackedSegments:
    """:func:`prepare_segments`, computed on the first layer and kept on ``params`` for the rest
    of the micro-batch (megatron hands the same object to every layer)."""
    segments = getattr(params, _CACHE_ATTR, None)
    if segments is None or (device is not None and segments.cu_seqlens.device != device):
        segments = prepare_segments(params, device)
        setattr(params, _CACHE_ATTR, segments)
    return segments


# --- modules -------------------------------------------------------------------------------------
_FUSED_SDPA_BACKENDS = None


def _fused_sdpa_backends():
    global _FUSED_SDPA_BACKENDS
    if _FUSED_SDPA_BACKENDS is None:
        from torch.nn.attention import SDPBackend

        _FUSED_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                                SDPBackend.EFFICIENT_ATTENTION]
    return _FUSED_SDPA_BACKENDS


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
                "set parallel.context_parallel=1 with model.spec=local"
            )
        self.config = config
        self.attn_mask_type = attn_mask_type
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1 / math.sqrt(head_dim)

    def _dropout_p(self) -> float:
        return self.dropout if self.training else 0.0

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
            dropout_p=self._dropout_p(),
            is_causal=causal and mask is None,
            scale=self.softmax_scale,
        )

    def _packed(self, query, key, value, params, causal: bool):
        # query: [T, H, D]; one segment per sample (padding is its own segment).
        segments = packed_segments(params, query.device)
        backend = select_backend(query.device, query.dtype, packed=True, dropout=self._dropout_p())
        if backend == VARLEN:
            out = require_varlen()(query, key, value, segments.cu_seqlens, segments.max_seqlen,
                                   causal, self.softmax_scale)
            return out.reshape(out.shape[0], -1)
        # One split per tensor, not a slice per sample: a slice's backward writes its gradient into
        # a zeroed tensor of the whole pack (samples x tokens of memory traffic per layer), the
        # split's backward is one concatenation. The same values, bit for bit.
        sizes = segments.sizes()
        outs = [self._attend(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                             causal)[0].transpose(0, 1)
                for q, k, v in zip(query.split(sizes), key.split(sizes), value.split(sizes))]
        out = torch.cat(outs, dim=0)
        return out.reshape(out.shape[0], -1)

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
            return self._packed(query, key, value, packed_seq_params, causal)
        # query: [S, B, H, D]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask = None
        if attention_mask is not None and mask_type != AttnMaskType.no_mask:
            # megatron's convention: True marks positions that must NOT be attended.
            mask = ~attention_mask.bool()
            if causal:
                s = q.shape[2]
                mask = mask & torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
        if select_backend(q.device, q.dtype, packed=False, masked=mask is not None) == FUSED:
            from torch.nn.attention import sdpa_kernel

            # No silent fall-back to the math kernel (an S x S matrix per head in memory).
            with sdpa_kernel(_fused_sdpa_backends()):
                out = self._attend(q, k, v, causal, mask)
        else:
            out = self._attend(q, k, v, causal, mask)  # [B, H, S, D]
        out = out.permute(2, 0, 1, 3)
        return out.reshape(out.shape[0], out.shape[1], -1)


class PackedRotarySelfAttention(SelfAttention):
    """megatron ``SelfAttention`` that applies per-token RoPE angles to packed sequences itself.

    For a THD micro-batch whose rotary tensor holds one angle row per token (``[T, 1, 1, D]``),
    q and k are rotated right after the qkv projection (and q/k norms) with megatron's own
    elementwise formula; megatron's THD path would compute the same values after reading
    ``cu_seqlens`` back to the host in every layer. Other inputs go through megatron unchanged.
    """

    _token_rotary = None

    def forward(self, hidden_states, attention_mask, *args, rotary_pos_emb=None,
                packed_seq_params=None, **kwargs):
        per_token = (
            packed_seq_params is not None
            and packed_seq_params.qkv_format == "thd"
            and isinstance(rotary_pos_emb, torch.Tensor)
            and self.config.context_parallel_size == 1
            and not self.config.apply_rope_fusion
        )
        if not per_token:
            return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=rotary_pos_emb,
                                   packed_seq_params=packed_seq_params, **kwargs)
        self._token_rotary = rotary_pos_emb
        try:
            return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=None,
                                   packed_seq_params=packed_seq_params, **kwargs)
        finally:
            self._token_rotary = None

    def get_query_key_value_tensors(self, *args, **kwargs):
        out = super().get_query_key_value_tensors(*args, **kwargs)
        freqs = self._token_rotary
        if freqs is None:
            return out
        query, key = out[0], out[1]  # [T, 1, heads, D]
        if freqs.shape[0] != query.shape[0]:
            raise ValueError(f"packed rotary angles have {freqs.shape[0]} rows for a pack of "
                             f"{query.shape[0]} tokens: one row per token is needed")
        mscale = _yarn_get_concentration_factor_from_config(self.config)
        rotate = dict(rotary_interleaved=self.config.rotary_interleaved,
                      multi_latent_attention=self.config.multi_latent_attention, mscale=mscale)
        query = _apply_rotary_pos_emb_bshd(query, freqs, **rotate)
        key = _apply_rotary_pos_emb_bshd(key, freqs, **rotate)
        return (query, key) + tuple(out[2:])
