"""InternViT (300M and 6B) from megatron-core's TransformerBlock, plus the pixel unshuffle.

A layer is megatron's ``TransformerLayer`` (pre-norm, bidirectional attention, exact GELU MLP)
with InternViT's additions:
- layer scale: ``h = h + drop_path(attn(norm1(h)) * ls1)`` and the same with the MLP and ``ls2``
  (per-channel vectors), put where megatron adds the residual (its bias-dropout-add);
- drop-path (stochastic depth per tile), rate growing linearly over depth, off in eval;
- InternViT-6B's QK-norm: ONE RMSNorm over the whole hidden (all heads jointly) of q and of k.

Tensor parallelism and InternViT-6B's 25 heads: the heads are padded to a multiple of TP
(:func:`.padding.padded_num_heads`) with dummy heads appended after the real ones. A dummy head
has zero q/k/v rows (weights and bias) and zero output-projection columns, so its q, k, v are
zero, its attention output is zero and it adds nothing. Gradients of those rows and columns are
exactly zero by construction (every product involves an exact zero), so an optimizer step leaves
them at zero (Adam's update of a zero gradient is zero; decoupled weight decay keeps zero). The
QK-norm's mean of squares is summed over the TP group and divided by the number of REAL channels
(the dummy channels are zero and add nothing to the sum). Checkpoints and canonical full tensors
hold only the real heads (see :mod:`.padding`).

No final norm: features are the last layer's output. The tower runs on tiles as a batch:
[1 + grid^2, tiles, hidden] (class token first), never pipeline-split, never sequence-parallel.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import _reduce
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from torch import nn

from .padding import trim_entries
from .pixels import normalize_pixels


class _AllReduceSum(torch.autograd.Function):
    """Sum over the TP group in forward AND backward.

    The summed statistic feeds different heads on every rank, so each rank's gradient with
    respect to it is partial and must be summed too (megatron's ``reduce_from_...`` region has an
    identity backward, which is only right when everything downstream is replicated).
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce(grad.clone(), ctx.group), None


class ViTQKNorm(MegatronModule):
    """RMSNorm of q (or k) over all heads jointly, for the ``q_layernorm``/``k_layernorm`` slots.

    Input [..., heads_per_rank, head_dim] (THD or SBHD); the weight holds this rank's channels
    (TP-split like the heads). Statistic in fp32 over ``real_heads * head_dim`` channels.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, real_heads: int | None = None, **unused):
        super().__init__(config=config)
        tp = config.tensor_model_parallel_size
        self.head_dim = hidden_size
        self.heads_per_rank = config.num_attention_heads // tp
        self.real_channels = (real_heads or config.num_attention_heads) * hidden_size
        self.eps = eps
        self.weight = nn.Parameter(
            torch.ones(self.heads_per_rank * hidden_size, dtype=config.params_dtype)
        )
        self.tp_size = tp

    def forward(self, x):
        shape = x.shape
        xf = x.float().reshape(*shape[:-2], shape[-2] * shape[-1])
        sumsq = xf.square().sum(-1, keepdim=True)
        if self.tp_size > 1:
            sumsq = _AllReduceSum.apply(sumsq, parallel_state.get_tensor_model_parallel_group())
        y = xf * torch.rsqrt(sumsq / self.real_channels + self.eps)
        y = y.to(x.dtype) * self.weight
        return y.reshape(shape)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, {"weight": 0}, sharded_offsets)


class InternViTSelfAttention(SelfAttention):
    """megatron SelfAttention whose dummy (padding) heads are zero and left out of checkpoints."""

    def __init__(self, config, submodules, layer_number, real_heads: int | None = None, **kwargs):
        super().__init__(config, submodules, layer_number, **kwargs)
        self.real_heads = real_heads or config.num_attention_heads
        self.padded = self.real_heads < config.num_attention_heads
        if self.padded:
            self.zero_dummy_heads()

    def _real_local_heads(self) -> int:
        rank = parallel_state.get_tensor_model_parallel_rank()
        per_rank = self.num_attention_heads_per_partition
        return max(0, min(per_rank, self.real_heads - rank * per_rank))

    def dummy_head_slices(self) -> list[tuple[torch.nn.Parameter, tuple]]:
        """(parameter, index) of every entry of this rank's dummy heads: q/k/v rows (and bias),
        output-projection columns, QK-norm channels. Empty when the heads are not padded."""
        if not self.padded:
            return []
        hd = self.hidden_size_per_attention_head
        real = self._real_local_heads()
        rows, cols = slice(real * 3 * hd, None), slice(real * hd, None)
        out = [(self.linear_qkv.weight, (rows,)), (self.linear_proj.weight, (slice(None), cols))]
        bias = getattr(self.linear_qkv, "bias", None)
        if isinstance(bias, torch.nn.Parameter) and bias.numel():
            out.append((bias, (rows,)))
        for norm in (self.q_layernorm, self.k_layernorm):
            if isinstance(norm, ViTQKNorm):
                out.append((norm.weight, (cols,)))
        return out

    @torch.no_grad()
    def zero_dummy_heads(self) -> None:
        for param, index in self.dummy_head_slices():
            param[index].zero_()

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        # Trimmed whether or not this TP size pads, so checkpoint keys do not depend on TP.
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        hd = self.hidden_size_per_attention_head
        trim_entries(sd, {"linear_qkv.weight": 0, "linear_qkv.bias": 0}, self.real_heads * 3 * hd)
        trim_entries(sd, {"linear_proj.weight": 1}, self.real_heads * hd)
        trim_entries(sd, {"q_layernorm.weight": 0, "k_layernorm.weight": 0}, self.real_heads * hd)
        return sd


def drop_path(x: torch.Tensor, p: float, batch_dim: int = 1) -> torch.Tensor:
    """Stochastic depth: zero a tile's whole branch with probability p, scale the rest by 1/(1-p).

    The draws come from the default generator, which every rank seeds alike (megatron's "data
    parallel" seed) and which activation recompute and checkpoints restore. Each tile draws one
    number per data-parallel replica and the replica keeps its own column: replicas drop
    different tiles, the TP ranks of one replica (same tiles, same draws) the same ones, which the
    replicated residual stream needs, and a resumed run draws what the uninterrupted one did.
    """
    replicas, replica = 1, 0
    if parallel_state.model_parallel_is_initialized():
        replicas = parallel_state.get_data_parallel_world_size()
        replica = parallel_state.get_data_parallel_rank()
    shape = [1] * x.dim()
    shape[batch_dim] = x.shape[batch_dim]
    draws = torch.rand((x.shape[batch_dim], replicas), device=x.device)[:, replica]
    keep = (draws >= p).to(x.dtype).view(shape)
    return x * keep / (1.0 - p)


class InternViTLayer(TransformerLayer):
    """TransformerLayer with per-channel layer scale (``ls1``, ``ls2``) and drop-path."""

    def __init__(self, config, submodules, layer_number: int = 1, hidden_dropout=None,
                 pg_collection=None, vp_stage=None, layer_scale_init: float = 0.1,
                 drop_path_rate: float = 0.0):
        super().__init__(config, submodules, layer_number=layer_number, hidden_dropout=hidden_dropout,
                         pg_collection=pg_collection, vp_stage=vp_stage)
        h = config.hidden_size
        self.ls1 = nn.Parameter(torch.full((h,), float(layer_scale_init), dtype=config.params_dtype))
        self.ls2 = nn.Parameter(torch.full((h,), float(layer_scale_init), dtype=config.params_dtype))
        depth = config.num_layers
        self.drop_path_rate = drop_path_rate * (self.layer_number - 1) / max(depth - 1, 1)
        # megatron calls ``bda(training, fused)(out_with_bias, residual, dropout_prob)``; the
        # spec's placeholders are modules, so they are removed before plain callables go in.
        del self.self_attn_bda, self.mlp_bda
        self.self_attn_bda = functools.partial(self._scaled_residual_fn, "ls1")
        self.mlp_bda = functools.partial(self._scaled_residual_fn, "ls2")

    def _scaled_residual_fn(self, which, training, fused):
        return functools.partial(self._scaled_residual, which)

    def _scaled_residual(self, which, out_with_bias, residual, prob):
        out, bias = out_with_bias
        if bias is not None:
            out = out + bias
        out = out * getattr(self, which)
        if self.training and self.drop_path_rate > 0:
            out = drop_path(out, self.drop_path_rate)
        return residual + out


class VisionEmbeddings(MegatronModule):
    """Patch conv (with bias), class token and learned position embedding (TP-replicated)."""

    def __init__(self, config, image_size: int, patch_size: int):
        super().__init__(config=config)
        h = config.hidden_size
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        dtype = config.params_dtype
        self.class_embedding = nn.Parameter(torch.empty(1, 1, h, dtype=dtype))
        self.patch_embedding = nn.Conv2d(3, h, patch_size, patch_size, bias=True, dtype=dtype)
        self.position_embedding = nn.Parameter(torch.empty(1, 1 + self.grid**2, h, dtype=dtype))
        with torch.no_grad():
            config.init_method(self.class_embedding)
            config.init_method(self.position_embedding)

    def position_embedding_for(self, grid_h: int, grid_w: int) -> torch.Tensor:
        pos = self.position_embedding
        if (grid_h, grid_w) == (self.grid, self.grid):
            return pos
        h = pos.shape[-1]
        patch_pos = pos[:, 1:].reshape(1, self.grid, self.grid, h).permute(0, 3, 1, 2).float()
        patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.reshape(1, h, grid_h * grid_w).transpose(1, 2).to(pos.dtype)
        return torch.cat([pos[:, :1], patch_pos], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[tiles, 3, H, W] (uint8 tiles or normalised values) -> [1 + grid^2, tiles, hidden]."""
        weight = self.patch_embedding.weight
        x = self.patch_embedding(normalize_pixels(pixel_values, weight.dtype))  # [T, h, gh, gw]
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # [T, gh*gw, h]
        cls = self.class_embedding.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.position_embedding_for(gh, gw)
        return x.transpose(0, 1).contiguous()


class InternViT(MegatronModule):
    """The vision tower. Returns the last layer's hidden states [1 + grid^2, tiles, hidden]."""

    def __init__(self, config, layer_spec, image_size: int, patch_size: int):
        super().__init__(config=config)
        self.model_type = ModelType.encoder_or_decoder
        self.embeddings = VisionEmbeddings(config, image_size, patch_size)
        # post_process=False: InternViT has no final norm.
        self.decoder = TransformerBlock(config, layer_spec, pre_process=True, post_process=False)

    def set_input_tensor(self, input_tensor):  # never pipeline-split
        pass

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixel_values)
        return self.decoder(hidden_states=x, attention_mask=None)

    def attention_modules(self):
        return [layer.self_attention for layer in self.decoder.layers]


def pixel_unshuffle(x: torch.Tensor, scale: int = 2) -> torch.Tensor:
    """InternVL's "v2" pixel shuffle with downsample ratio 1/scale (space-to-channel).

    x: [tiles, grid*grid, C] (tokens row-major) -> [tiles, (grid/scale)^2, scale^2 * C]. Output
    token (r, c) concatenates input tokens (s*r + i, s*c + j) for i, j in row-major order, i.e.
    (2r,2c), (2r,2c+1), (2r+1,2c), (2r+1,2c+1) for scale 2; output tokens are row-major.
    """
    t, n, c = x.shape
    grid = int(round(n**0.5))
    if grid * grid != n or grid % scale:
        raise ValueError(f"pixel_unshuffle: {n} tokens is not a square grid divisible by {scale}")
    g = grid // scale
    x = x.reshape(t, g, scale, g, scale, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(t, g * g, scale * scale * c)
