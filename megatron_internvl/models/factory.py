"""From the project's config to megatron-core objects (TransformerConfig, layer specs, modules)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from .language import LanguageModel
from .specs import decoder_layer_spec, use_transformer_engine

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}


def language_transformer_config(model, parallel, precision: str = "fp32") -> TransformerConfig:
    lang = model.language
    dtype = _DTYPES[precision]
    te = use_transformer_engine(model.spec)
    kwargs = {}
    if parallel.pipeline_parallel > 1 and parallel.first_stage_llm_layers is not None:
        kwargs["num_layers_in_first_pipeline_stage"] = parallel.first_stage_llm_layers
    if model.recompute != "none":
        kwargs["recompute_granularity"] = model.recompute
        if model.recompute == "full":
            kwargs.update(recompute_method="uniform", recompute_num_layers=1)
    if precision == "fp8":
        kwargs.update(fp8="hybrid", fp8_recipe="delayed")
    return TransformerConfig(
        num_layers=lang.num_layers,
        hidden_size=lang.hidden_size,
        num_attention_heads=lang.num_heads,
        num_query_groups=lang.num_kv_heads,
        ffn_hidden_size=lang.ffn_hidden_size,
        kv_channels=lang.hidden_size // lang.num_heads,
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
        bias_activation_fusion=te,
        bias_dropout_fusion=te,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,  # float (V2PE) positions: megatron's unfused per-token path
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        **kwargs,
    )


def build_language_model(model, parallel, precision="fp32", pre_process=True, post_process=True,
                         vp_stage=None) -> LanguageModel:
    config = language_transformer_config(model, parallel, precision)
    return LanguageModel(
        config,
        decoder_layer_spec(model.spec),
        vocab_size=model.language.vocab_size,
        rope_theta=model.language.rope_theta,
        max_sequence_length=model.language.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
    )
