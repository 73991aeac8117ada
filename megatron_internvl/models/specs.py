"""Layer specs: Transformer Engine modules, or local megatron-core modules with PyTorch attention.

Everything above the spec (models, training) is the same code on both. The choice is automatic
(:func:`use_transformer_engine`): TE when CUDA and Transformer Engine are present, unless the
config forces one. The local spec runs on CPUs and on GPUs without TE: its attention
(:mod:`.attention`) takes PyTorch's flash kernels on CUDA (``varlen_attn`` for packed LLM
sequences, fused SDPA for the ViT's tiles).
"""

from __future__ import annotations

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from .attention import CoreAttention, PackedRotarySelfAttention, describe_backends
from .norms import Norm
from .vision import InternViTLayer, InternViTSelfAttention, ViTQKNorm

# One checkpoint layout for both specs: TE fuses the pre-attention / pre-MLP norms into the next
# linear, so the local spec stores its separate norms under TE's names.
_FUSED_NORM_KEYS = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


class ColumnParallelLinearNoBias(ColumnParallelLinear):
    """InternViT-6B's qkv has no bias while its other linears do (megatron has one flag for all)."""

    def __init__(self, *args, bias=True, **kwargs):
        super().__init__(*args, bias=False, **kwargs)


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def use_transformer_engine(preference: str = "auto") -> bool:
    """preference: 'auto' (TE iff CUDA and TE are available), 'te' or 'local'."""
    if preference == "local":
        return False
    available = torch.cuda.is_available() and transformer_engine_available()
    if preference == "te":
        if not available:
            raise RuntimeError(
                "model.spec='te' needs a CUDA device and transformer-engine "
                "(pip install 'megatron-internvl[gpu]'); use model.spec=auto or local"
            )
        return True
    if preference != "auto":
        raise ValueError(f"model.spec={preference!r}: choose auto, te or local")
    return available


def describe_spec(preference: str = "auto") -> str:
    """Which spec ``model.spec=preference`` builds here, and its attention kernels (for logs)."""
    if use_transformer_engine(preference):
        import transformer_engine

        return f"te (Transformer Engine {getattr(transformer_engine, '__version__', '?')})"
    why = "forced" if preference == "local" else (
        "no Transformer Engine" if torch.cuda.is_available() else "no CUDA")
    return f"local ({why}): {describe_backends()}"


def local_decoder_layer_spec(attn_mask_type=AttnMaskType.causal, qk_norm: bool = False,
                             num_experts: int = 0) -> ModuleSpec:
    """Pre-norm transformer layer from local megatron-core linears and the project's attention.

    ``qk_norm`` (Qwen3): megatron builds q/k norms of size head_dim, applies them per head after
    the qkv projection and before RoPE, and sums their gradients over the TP group.
    ``num_experts`` > 0 (Qwen3-MoE): megatron's ``MoELayer`` (router, all-to-all dispatcher,
    experts as a ``SequentialMLP`` of local MLPs); its pre-MLP norm keeps its own name, as in
    megatron's TE MoE spec (the norm is not fused into a linear there)."""
    keys = dict(_FUSED_NORM_KEYS)
    mlp = ModuleSpec(
        module=MLP,
        submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
    )
    if num_experts:
        from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

        mlp = get_moe_module_spec(use_te=False, num_experts=num_experts, moe_grouped_gemm=False)
        del keys["pre_mlp_layernorm."]
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=Norm,
            self_attention=ModuleSpec(
                module=PackedRotarySelfAttention,
                params={"attn_mask_type": attn_mask_type},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=CoreAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=Norm if qk_norm else IdentityOp,
                    k_layernorm=Norm if qk_norm else IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=Norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
            # Same checkpoint keys as the TE spec, whose norms are fused into the linears.
            sharded_state_dict_keys_map=keys,
        ),
    )


def te_decoder_layer_spec(attn_mask_type=AttnMaskType.causal, qk_norm: bool = False,
                          num_experts: int = 0) -> ModuleSpec:
    """megatron's Transformer Engine layer with the project's packed-RoPE self-attention.

    Only the attention class changes: its submodules stay TE's (fused norm + qkv linear, TE core
    attention, row-parallel output linear), which :class:`PackedRotarySelfAttention` calls through
    megatron's ``SelfAttention`` as they are; megatron's own class would read ``cu_seqlens`` back
    to the host in every layer to rotate a packed micro-batch."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    spec = get_gpt_layer_with_transformer_engine_spec(
        num_experts=num_experts or None, moe_grouped_gemm=bool(num_experts), qk_layernorm=qk_norm)
    attention = spec.submodules.self_attention
    if attention.module is not SelfAttention:
        raise RuntimeError(f"megatron-core's TE layer spec builds {attention.module.__name__}, not "
                           "SelfAttention: this project's packed-RoPE attention cannot replace it "
                           "(use megatron-core 0.16.x or model.spec=local)")
    attention.module = PackedRotarySelfAttention
    attention.params["attn_mask_type"] = attn_mask_type
    return spec


def block_spec(config, layer_spec: ModuleSpec, vp_stage=None) -> TransformerBlockSubmodules:
    """This pipeline stage's layers plus the final norm matching the layer spec's backend.

    megatron's default final norm for a bare layer spec is ``WrappedTorchNorm``, which refuses
    sequence parallelism; the local spec uses the project's :class:`Norm` instead.
    """
    from .init import seeded_layer_spec

    num_layers = get_num_layers_to_build(config, vp_stage)
    layer_spec = seeded_layer_spec(layer_spec)
    norm = layer_spec.submodules.pre_mlp_layernorm
    if norm is IdentityOp:  # TE fuses the layer norms into the linears; final norm is TENorm
        from megatron.core.extensions.transformer_engine import TENorm

        norm = TENorm
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * num_layers, layer_norm=norm)


def decoder_layer_spec(preference: str = "auto", attn_mask_type=AttnMaskType.causal,
                       qk_norm: bool = False, num_experts: int = 0) -> ModuleSpec:
    if use_transformer_engine(preference):
        return te_decoder_layer_spec(attn_mask_type, qk_norm, num_experts)
    return local_decoder_layer_spec(attn_mask_type, qk_norm, num_experts)


def _vision_attention_params(vision) -> dict:
    return {"attn_mask_type": AttnMaskType.no_mask, "real_heads": vision.num_heads}


def _vision_layer_params(vision) -> dict:
    return {"layer_scale_init": vision.layer_scale_init, "drop_path_rate": vision.drop_path_rate}


def local_vision_layer_spec(vision) -> ModuleSpec:
    """InternViT layer from local megatron-core linears and the project's attention."""
    qk_norm = ModuleSpec(module=ViTQKNorm, params={"real_heads": vision.num_heads})
    return ModuleSpec(
        module=InternViTLayer,
        params=_vision_layer_params(vision),
        submodules=TransformerLayerSubmodules(
            input_layernorm=Norm,
            self_attention=ModuleSpec(
                module=InternViTSelfAttention,
                params=_vision_attention_params(vision),
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear if vision.qkv_bias else ColumnParallelLinearNoBias,
                    core_attention=CoreAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=qk_norm if vision.qk_norm else IdentityOp,
                    k_layernorm=qk_norm if vision.qk_norm else IdentityOp,
                ),
            ),
            pre_mlp_layernorm=Norm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            ),
            sharded_state_dict_keys_map=dict(_FUSED_NORM_KEYS),
        ),
    )


def te_vision_layer_spec(vision) -> ModuleSpec:
    """InternViT layer from Transformer Engine modules (GPU). Untested here: no GPU, no TE."""
    from megatron.core.extensions.transformer_engine import (
        TEDotProductAttention,
        TELayerNormColumnParallelLinear,
        TERowParallelLinear,
    )

    qkv = TELayerNormColumnParallelLinear
    if not vision.qkv_bias:

        class TELayerNormColumnParallelLinearNoBias(TELayerNormColumnParallelLinear):
            def __init__(self, *args, bias=True, **kwargs):
                super().__init__(*args, bias=False, **kwargs)

        qkv = TELayerNormColumnParallelLinearNoBias
    qk_norm = ModuleSpec(module=ViTQKNorm, params={"real_heads": vision.num_heads})
    return ModuleSpec(
        module=InternViTLayer,
        params=_vision_layer_params(vision),
        submodules=TransformerLayerSubmodules(
            self_attention=ModuleSpec(
                module=InternViTSelfAttention,
                params=_vision_attention_params(vision),
                submodules=SelfAttentionSubmodules(
                    linear_qkv=qkv,
                    core_attention=TEDotProductAttention,
                    linear_proj=TERowParallelLinear,
                    q_layernorm=qk_norm if vision.qk_norm else IdentityOp,
                    k_layernorm=qk_norm if vision.qk_norm else IdentityOp,
                ),
            ),
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=TELayerNormColumnParallelLinear, linear_fc2=TERowParallelLinear
                ),
            ),
        ),
    )


def vision_layer_spec(preference: str, vision) -> ModuleSpec:
    if use_transformer_engine(preference):
        return te_vision_layer_spec(vision)
    return local_vision_layer_spec(vision)
