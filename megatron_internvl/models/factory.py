"""From the project's config to megatron-core objects (TransformerConfig, layer specs, modules).

``build_internvl_model`` is the one entry point the trainer and tools use; the LLM and the ViT
get their own TransformerConfig (the ViT: never pipeline-split, never sequence-parallel, heads
padded to a multiple of TP, BF16 even under FP8 -- see docs/model.md).
"""

from __future__ import annotations

import importlib.util
import logging

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from .flash import apply_flash_attention
from .internvl import InternVLModel
from .init import init_rng_scope, redraw_column_parallel_weight
from .language import LanguageModel
from .padding import padded_num_heads, padded_vocab_size
from .projector import Projector
from .specs import decoder_layer_spec, describe_spec, use_transformer_engine, vision_layer_spec
from .vision import InternViT

logger = logging.getLogger(__name__)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}


def _leave_uninitialised(tensor: torch.Tensor) -> None:
    pass


def _init_methods(initialize: bool) -> dict:
    """No drawing when a checkpoint will overwrite every weight. Not megatron's
    ``perform_initialization=False``: that also skips tagging TP-split weights as such
    (``tensor_model_parallel``), and the gradient norm then drops their shards on TP rank > 0
    (found as a TP=2 resume that was no longer exact)."""
    if initialize:
        return {}
    return {"init_method": _leave_uninitialised, "output_layer_init_method": _leave_uninitialised}


def gradient_accumulation_fusion() -> bool:
    """Whether each linear's weight-gradient GEMM can accumulate straight into megatron DDP's fp32
    ``main_grad`` (no separate gradient tensor and add); used for chunks trained under DDP. TE's linears do it natively; megatron's
    local linears (every linear of the local spec, the output layer and projector of both) need
    apex's ``fused_weight_gradient_mlp_cuda`` extension, which NGC PyTorch containers ship, and
    megatron refuses the flag without it. So: on CUDA, where that extension is importable."""
    return torch.cuda.is_available() and importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None


def language_transformer_config(model, parallel, precision: str = "fp32",
                                initialize: bool = True, under_ddp: bool = False) -> TransformerConfig:
    lang = model.language
    dtype = _DTYPES[precision]
    te = use_transformer_engine(model.spec)
    kwargs = {}
    first = parallel.first_stage_llm_layers
    if parallel.pipeline_parallel > 1 and first == 0:
        # The first stage holds only the embedding (and the ViT + projector): megatron's
        # num_layers_in_first_pipeline_stage must be > 0, an explicit layout may say 0.
        rest = (lang.num_layers) // (parallel.pipeline_parallel - 1)
        layout = [["embedding"]] + [["decoder"] * rest for _ in range(parallel.pipeline_parallel - 1)]
        layout[-1].append("loss")
        kwargs["pipeline_model_parallel_layout"] = layout
    elif parallel.pipeline_parallel > 1 and first is not None:
        kwargs["num_layers_in_first_pipeline_stage"] = first
    if model.recompute != "none":
        kwargs["recompute_granularity"] = model.recompute
        if model.recompute == "full":
            kwargs.update(recompute_method="uniform", recompute_num_layers=1)
    if precision == "fp8":
        kwargs.update(fp8="hybrid", fp8_recipe="delayed")
    if lang.num_experts:
        kwargs.update(moe_kwargs(lang, parallel, te))
    return TransformerConfig(
        num_layers=lang.num_layers,
        hidden_size=lang.hidden_size,
        num_attention_heads=lang.num_heads,
        num_query_groups=lang.num_kv_heads,
        ffn_hidden_size=lang.ffn_hidden_size,
        kv_channels=lang.kv_channels,
        qk_layernorm=lang.qk_norm,
        normalization="RMSNorm",
        layernorm_epsilon=lang.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=lang.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_parallel,
        context_parallel_size=parallel.context_parallel,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # Identical initial weights for every TP layout: the full matrix is drawn, then split.
        use_cpu_initialization=True,
        perform_initialization=True,
        **_init_methods(initialize),
        bias_activation_fusion=te,
        bias_dropout_fusion=te,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,  # float (V2PE) positions: megatron's unfused per-token path
        gradient_accumulation_fusion=under_ddp and gradient_accumulation_fusion(),
        persist_layer_norm=False,
        **kwargs,
    )


def moe_kwargs(lang, parallel, te: bool) -> dict:
    """megatron's MoE settings for Qwen3-MoE. Softmax router: with renormalised top-k
    probabilities (HF ``norm_topk_prob``) that is megatron's top-k of the logits then a softmax
    over the k (``moe_router_pre_softmax=False``), the same function; without, a softmax over all
    experts then top-k. The router runs in fp32 like HF's."""
    aux = lang.moe_aux_loss_coeff
    return dict(
        num_moe_experts=lang.num_experts,
        moe_router_topk=lang.moe_top_k,
        moe_ffn_hidden_size=lang.moe_ffn_hidden_size,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not lang.moe_norm_topk_prob,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss" if aux else "none",
        moe_aux_loss_coeff=aux,
        moe_z_loss_coeff=lang.moe_z_loss_coeff or None,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=te,
        expert_model_parallel_size=getattr(parallel, "expert_parallel", 1),
        expert_tensor_parallel_size=1,
    )


def build_language_model(model, parallel, precision="fp32", pre_process=True, post_process=True,
                         vp_stage=None, initialize: bool = True, under_ddp: bool = False) -> LanguageModel:
    config = language_transformer_config(model, parallel, precision, initialize, under_ddp)
    return LanguageModel(
        config,
        decoder_layer_spec(model.spec, qk_norm=model.language.qk_norm,
                           num_experts=model.language.num_experts),
        vocab_size=model.language.vocab_size,
        rope_theta=model.language.rope_theta,
        max_sequence_length=model.language.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
        padded_vocab_size=model_padded_vocab_size(model, parallel),
    )


def model_padded_vocab_size(model, parallel) -> int:
    """Rows of the LLM embedding / output layer inside the model for this TP size."""
    lang = model.language
    return padded_vocab_size(lang.vocab_size, parallel.tensor_parallel,
                             getattr(lang, "make_vocab_size_divisible_by", 128))


def vision_transformer_config(model, parallel, precision: str = "fp32",
                              initialize: bool = True, under_ddp: bool = False) -> TransformerConfig:
    vis = model.vision
    dtype = _DTYPES[precision]
    tp = parallel.tensor_parallel
    heads = padded_num_heads(vis.num_heads, tp)
    if vis.hidden_size % vis.num_heads:
        raise ValueError(
            f"model.vision.hidden_size={vis.hidden_size} is not divisible by "
            f"model.vision.num_heads={vis.num_heads}"
        )
    kwargs = {}
    if model.recompute != "none":
        kwargs["recompute_granularity"] = model.recompute
        if model.recompute == "full":
            kwargs.update(recompute_method="uniform", recompute_num_layers=1)
    return TransformerConfig(
        num_layers=vis.num_layers,
        hidden_size=vis.hidden_size,
        num_attention_heads=heads,
        num_query_groups=heads,
        kv_channels=vis.hidden_size // vis.num_heads,
        ffn_hidden_size=vis.ffn_hidden_size,
        normalization="RMSNorm" if vis.norm == "rmsnorm" else "LayerNorm",
        layernorm_epsilon=vis.norm_eps,
        gated_linear_unit=False,
        activation_func=F.gelu,  # exact GELU; megatron's fused bias-GELU is the tanh approximation
        add_bias_linear=True,
        add_qkv_bias=vis.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=1,  # the whole tower sits on the first stage
        context_parallel_size=1,
        sequence_parallel=False,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # fp8 stays off: a 448 tile is 1025 tokens, not a multiple of 16 (FP8 GEMM shapes).
        use_cpu_initialization=True,
        perform_initialization=True,
        **_init_methods(initialize),
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=under_ddp and gradient_accumulation_fusion(),
        persist_layer_norm=False,
        **kwargs,
    )


def build_vision_model(model, parallel, precision="fp32", initialize: bool = True,
                       under_ddp: bool = False) -> InternViT:
    config = vision_transformer_config(model, parallel, precision, initialize, under_ddp)
    return InternViT(config, vision_layer_spec(model.spec, model.vision),
                     model.vision.image_size, model.vision.patch_size)


def build_internvl_model(model, parallel, precision="fp32", pre_process=True, post_process=True,
                         vp_stage=None, initialize: bool = True, under_ddp: bool = False) -> InternVLModel:
    """The model chunk of this pipeline stage (vision tower + projector on the first one).

    ``initialize=False`` skips drawing the initial weights when every tensor is about to be
    loaded: minutes per rank for the largest models. ``under_ddp``: trained inside megatron's
    DDP, whose ``main_grad`` buffers gradient-accumulation fusion writes into."""
    model.validate()
    logger.info("model.spec=%s: %s", model.spec, describe_spec(model.spec))
    apply_flash_attention(model.flash_attention, use_transformer_engine(model.spec))
    # Each independently placed piece in its own RNG scope: same weights in every layout.
    with init_rng_scope("language_model"):
        language = build_language_model(model, parallel, precision, pre_process, post_process, vp_stage,
                                        initialize, under_ddp)
    if post_process and initialize:
        redraw_column_parallel_weight(language.output_layer, "language_model.output_layer",
                                      language.config.init_method_std, rows=model.language.vocab_size)
    vision = projector = None
    if pre_process:
        with init_rng_scope("vision_model"):
            vision = build_vision_model(model, parallel, precision, initialize, under_ddp)
        scale = round(1 / model.downsample_ratio)
        with init_rng_scope("projector"):
            projector = Projector(language.config, model.vision.hidden_size * scale * scale,
                                  model.language.hidden_size, model.projector_norm_eps)
    return InternVLModel(language, vision, projector, model.image_token_id, model.num_image_token,
                         model.downsample_ratio)


def build_model_chunks(config, initialize: bool = True, under_ddp: bool = False) -> list:
    """This rank's model chunks (one, or one per virtual pipeline stage) on the compute device,
    for the whole run's config. ``initialize=False`` when a checkpoint will overwrite every weight;
    ``under_ddp`` for chunks that megatron's DDP will wrap for training."""
    from megatron.core import parallel_state as ps

    from megatron_internvl.parallel.distributed import compute_device

    vpp = config.parallel.virtual_pipeline_parallel or 1
    chunks = []
    for vp in range(vpp):
        vp_stage = vp if vpp > 1 else None
        chunks.append(build_internvl_model(
            config.model, config.parallel, config.training.precision,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            vp_stage=vp_stage, initialize=initialize, under_ddp=under_ddp,
        ).to(compute_device()))
    return chunks
