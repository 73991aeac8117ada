"""Transform kinds: how one canonical megatron tensor is made of its Hugging Face tensors.

Every kind is a pair of exact inverses on *full* (unsharded) tensors:
``to_megatron(hf_tensors, shape, dims)`` builds the megatron tensor of full ``shape`` from the
HF tensors listed in the table row, and ``to_hf(tensor, dims)`` splits it back. Only slicing,
concatenation and reshapes are used, so a round trip is bitwise.

Padding that tensor parallelism needs (the vocabulary rows, InternViT-6B's dummy heads) never
reaches these functions: the model leaves it out of its checkpoint metadata
(:mod:`megatron_internvl.models.padding`), so canonical full tensors have the HF sizes. ``to_hf`` also
runs on ``meta`` tensors: that is how the expected HF shapes are derived for the error messages,
without a second table of shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dims:
    """The sizes the transforms need (from the HF config)."""

    lm_heads: int
    lm_groups: int
    lm_head_dim: int
    vit_heads: int
    vit_head_dim: int

    def attention(self, tower: str) -> tuple[int, int, int]:
        """(heads, key/value groups, head_dim) of the language model or of the ViT."""
        if tower == "language":
            return self.lm_heads, self.lm_groups, self.lm_head_dim
        return self.vit_heads, self.vit_heads, self.vit_head_dim


class Transform:
    name = "transform"
    num_hf = 1

    def to_megatron(self, hf: list[torch.Tensor], shape: tuple, dims: Dims) -> torch.Tensor:
        raise NotImplementedError

    def to_hf(self, t: torch.Tensor, dims: Dims) -> list[torch.Tensor]:
        raise NotImplementedError

    def __repr__(self):
        return self.name


class Identity(Transform):
    name = "identity"

    def to_megatron(self, hf, shape, dims):
        return hf[0]

    def to_hf(self, t, dims):
        return [t]


class GateUp(Transform):
    """SwiGLU: megatron's ``linear_fc1`` is [gate; up] stacked along the output dimension."""

    name = "gate_up"
    num_hf = 2

    def to_megatron(self, hf, shape, dims):
        return torch.cat(hf, dim=0)

    def to_hf(self, t, dims):
        return list(t.chunk(2, dim=0))


class GroupedQKV(Transform):
    """Separate q, k, v projections <-> megatron's fused grouped layout.

    Megatron stores, for each key/value group, the q heads of the group followed by that group's
    k and v head: ``[groups, heads/groups + 2, head_dim, ...]`` flattened. Works for weights
    ``[out, in]`` and biases ``[out]``. The ViT is the case groups == heads: [q_h, k_h, v_h] per
    head.
    """

    name = "grouped_qkv"
    num_hf = 3

    def __init__(self, tower: str):
        self.tower = tower

    def to_megatron(self, hf, shape, dims):
        heads, groups, d = dims.attention(self.tower)
        q, k, v = hf
        rest = q.shape[1:]
        per_group = heads // groups
        fused = torch.cat(
            [
                q.reshape(groups, per_group * d, *rest),
                k.reshape(groups, d, *rest),
                v.reshape(groups, d, *rest),
            ],
            dim=1,
        )
        return fused.reshape(shape)

    def to_hf(self, t, dims):
        heads, groups, d = dims.attention(self.tower)
        per_group = heads // groups
        rest = t.shape[1:]
        grouped = t.reshape(groups, (per_group + 2) * d, *rest)
        q, k, v = grouped.split([per_group * d, d, d], dim=1)
        return [
            q.reshape(heads * d, *rest),
            k.reshape(groups * d, *rest),
            v.reshape(groups * d, *rest),
        ]

    def __repr__(self):
        return f"{self.name}({self.tower})"


class ConcatQKV(Transform):
    """One HF tensor holding [q; k; v] (InternViT's remote-code ``attn.qkv``) <-> grouped."""

    name = "concat_qkv"

    def __init__(self, tower: str):
        self.grouped = GroupedQKV(tower)

    def to_megatron(self, hf, shape, dims):
        return self.grouped.to_megatron(list(hf[0].chunk(3, dim=0)), shape, dims)

    def to_hf(self, t, dims):
        return [torch.cat(self.grouped.to_hf(t, dims), dim=0)]

    def __repr__(self):
        return f"{self.name}({self.grouped.tower})"


IDENTITY = Identity()
GATE_UP = GateUp()
LM_QKV = GroupedQKV("language")
VIT_QKV = GroupedQKV("vision")
VIT_QKV_CONCAT = ConcatQKV("vision")


def expected_hf_shapes(kind: Transform, megatron_shape: tuple, dims: Dims) -> list[tuple]:
    """The HF shapes ``kind`` maps to a megatron tensor of ``megatron_shape``."""
    meta = torch.empty(megatron_shape, device="meta")
    return [tuple(t.shape) for t in kind.to_hf(meta, dims)]
