"""One declarative table per checkpoint format: HF tensor name(s) <-> canonical megatron name.

A row says which HF tensors make one canonical megatron tensor (the *full* tensor, as a TP=1
megatron model holds it) and with which transform kind. ``{i}`` is a layer index, expanded over
the language model's or the ViT's layers (``layers=``); ``{e}`` a global expert index. ``when=`` names a feature of the model
(see :func:`megatron_internvl.convert.mapping.features`) without which the row does not exist.

How a full tensor is split over TP ranks and placed on PP stages is not written here: megatron's
own sharding metadata does that (:mod:`megatron_internvl.parallel.sharding`).

HF names are those ``save_pretrained`` writes (``language_model.model.*``,
``language_model.lm_head.weight``, ``vision_tower.*``, ``multi_modal_projector.*``); the in-memory
names of transformers 5 (``model.language_model.*``, ``lm_head.weight``, ...) are accepted on
import as aliases (:data:`HF_ALIASES`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .transforms import GATE_UP, IDENTITY, LM_QKV, VIT_QKV, VIT_QKV_CONCAT, Transform


@dataclass(frozen=True)
class Rule:
    megatron: str
    hf: tuple[str, ...]
    kind: Transform = IDENTITY
    layers: str | None = None  # "language" | "vision": expand {i} over that tower's layers
    when: str | None = None  # a feature that must be present


def _lm(megatron, hf, kind=IDENTITY, when=None, per_layer=True):
    hf = (hf,) if isinstance(hf, str) else tuple(hf)
    return Rule(megatron, hf, kind, "language" if per_layer else None, when)


# --- language models -----------------------------------------------------------------------------
# Megatron names inside the LLM module (LanguageModel); LM_PREFIX places it in the VLM.
LM_PREFIX = "language_model."
_L = "decoder.layers.{i}."

# Qwen2 / Qwen3 / Llama key layout: identical in the transformers-native and the remote-code
# formats.
LLAMA_STYLE_LLM = (
    _lm("embedding.word_embeddings.weight", "language_model.model.embed_tokens.weight",
        per_layer=False),
    _lm(_L + "self_attention.linear_qkv.layer_norm_weight",
        "language_model.model.layers.{i}.input_layernorm.weight"),
    _lm(_L + "self_attention.linear_qkv.weight",
        [f"language_model.model.layers.{{i}}.self_attn.{p}_proj.weight" for p in "qkv"], LM_QKV),
    _lm(_L + "self_attention.linear_qkv.bias",
        [f"language_model.model.layers.{{i}}.self_attn.{p}_proj.bias" for p in "qkv"], LM_QKV,
        when="qkv_bias"),
    # Qwen3: one RMSNorm of size head_dim per projection, shared by the heads.
    _lm(_L + "self_attention.q_layernorm.weight",
        "language_model.model.layers.{i}.self_attn.q_norm.weight", when="qk_norm"),
    _lm(_L + "self_attention.k_layernorm.weight",
        "language_model.model.layers.{i}.self_attn.k_norm.weight", when="qk_norm"),
    _lm(_L + "self_attention.linear_proj.weight",
        "language_model.model.layers.{i}.self_attn.o_proj.weight"),
    _lm(_L + "mlp.linear_fc1.layer_norm_weight",
        "language_model.model.layers.{i}.post_attention_layernorm.weight"),
    _lm(_L + "mlp.linear_fc1.weight",
        ["language_model.model.layers.{i}.mlp.gate_proj.weight",
         "language_model.model.layers.{i}.mlp.up_proj.weight"], GATE_UP),
    _lm(_L + "mlp.linear_fc2.weight", "language_model.model.layers.{i}.mlp.down_proj.weight"),
    _lm("decoder.final_layernorm.weight", "language_model.model.norm.weight", per_layer=False),
    _lm("output_layer.weight", "language_model.lm_head.weight", per_layer=False),
)

# Qwen3-MoE: Qwen3's rows with every MLP an MoE layer (router + per-expert SwiGLU MLPs; the
# pre-MLP norm keeps megatron's own name there, it is not fused into a linear). Both formats
# store experts one by one (transformers 5 fuses them only in memory).
_X = "language_model.model.layers.{i}.mlp."
QWEN3_MOE_LLM = tuple(r for r in LLAMA_STYLE_LLM if ".mlp." not in r.megatron) + (
    _lm(_L + "pre_mlp_layernorm.weight", "language_model.model.layers.{i}.post_attention_layernorm.weight"),
    _lm(_L + "mlp.router.weight", _X + "gate.weight"),
    _lm(_L + "mlp.experts.local_experts.{e}.linear_fc1.weight",
        [_X + "experts.{e}.gate_proj.weight", _X + "experts.{e}.up_proj.weight"], GATE_UP),
    _lm(_L + "mlp.experts.local_experts.{e}.linear_fc2.weight", _X + "experts.{e}.down_proj.weight"),
)

# InternLM2 (remote code). Its packed ``wqkv`` is (kv_heads, [q x group, k, v], head_dim): the
# same order as megatron's grouped QKV, so it maps as is.
INTERNLM2_LLM = (
    _lm("embedding.word_embeddings.weight", "language_model.model.tok_embeddings.weight",
        per_layer=False),
    _lm(_L + "self_attention.linear_qkv.layer_norm_weight",
        "language_model.model.layers.{i}.attention_norm.weight"),
    _lm(_L + "self_attention.linear_qkv.weight",
        "language_model.model.layers.{i}.attention.wqkv.weight"),
    _lm(_L + "self_attention.linear_qkv.bias",
        "language_model.model.layers.{i}.attention.wqkv.bias", when="qkv_bias"),
    _lm(_L + "self_attention.linear_proj.weight",
        "language_model.model.layers.{i}.attention.wo.weight"),
    _lm(_L + "mlp.linear_fc1.layer_norm_weight", "language_model.model.layers.{i}.ffn_norm.weight"),
    _lm(_L + "mlp.linear_fc1.weight",
        ["language_model.model.layers.{i}.feed_forward.w1.weight",
         "language_model.model.layers.{i}.feed_forward.w3.weight"], GATE_UP),
    _lm(_L + "mlp.linear_fc2.weight", "language_model.model.layers.{i}.feed_forward.w2.weight"),
    _lm("decoder.final_layernorm.weight", "language_model.model.norm.weight", per_layer=False),
    _lm("output_layer.weight", "language_model.output.weight", per_layer=False),
)

# The HF tensor that an untied output layer reads from when the checkpoint ties it to the
# embedding (``tie_word_embeddings``) and has no lm_head of its own.
TIED_OUTPUT = {"output_layer.weight": "embedding.word_embeddings.weight"}


def _prefixed(rules, prefix):
    return tuple(
        Rule(prefix + r.megatron, r.hf, r.kind, r.layers, r.when) for r in rules
    )


# --- vision tower and projector ------------------------------------------------------------------
_V = "vision_model.decoder.layers.{i}."


def _vit(megatron, hf, kind=IDENTITY, when=None, per_layer=True):
    hf = (hf,) if isinstance(hf, str) else tuple(hf)
    return Rule(megatron, hf, kind, "vision" if per_layer else None, when)


def _vision_rows(embeddings: dict, layer: dict, projector: dict, qkv_kind) -> tuple:
    """The ViT + projector rows of one format, from its names for each megatron part."""
    rows = [_vit(f"vision_model.embeddings.{m}", h, per_layer=False) for m, h in embeddings.items()]
    for m, (h, when) in layer.items():
        kind = qkv_kind if m.startswith("self_attention.linear_qkv.") and "norm" not in m else IDENTITY
        rows.append(_vit(_V + m, h, kind, when))
    rows += [_vit(f"projector.{m}", h, per_layer=False) for m, h in projector.items()]
    return tuple(rows)


_T = "vision_tower.encoder.layer.{i}."
TRANSFORMERS_VISION = _vision_rows(
    embeddings={
        "class_embedding": "vision_tower.embeddings.cls_token",
        "position_embedding": "vision_tower.embeddings.position_embeddings",
        "patch_embedding.weight": "vision_tower.embeddings.patch_embeddings.projection.weight",
        "patch_embedding.bias": "vision_tower.embeddings.patch_embeddings.projection.bias",
    },
    layer={
        "self_attention.linear_qkv.layer_norm_weight": (_T + "layernorm_before.weight", None),
        "self_attention.linear_qkv.layer_norm_bias": (_T + "layernorm_before.bias", "vit_norm_bias"),
        "self_attention.linear_qkv.weight": ([_T + f"attention.{p}_proj.weight" for p in "qkv"], None),
        "self_attention.linear_qkv.bias": ([_T + f"attention.{p}_proj.bias" for p in "qkv"], "vit_qkv_bias"),
        # InternViT-6B's QK-norm: one RMSNorm over all heads jointly, renamed like the rest.
        "self_attention.q_layernorm.weight": (_T + "attention.q_norm.weight", "vit_qk_norm"),
        "self_attention.k_layernorm.weight": (_T + "attention.k_norm.weight", "vit_qk_norm"),
        "self_attention.linear_proj.weight": (_T + "attention.projection_layer.weight", None),
        "self_attention.linear_proj.bias": (_T + "attention.projection_layer.bias", None),
        "ls1": (_T + "lambda_1", None),
        "ls2": (_T + "lambda_2", None),
        "mlp.linear_fc1.layer_norm_weight": (_T + "layernorm_after.weight", None),
        "mlp.linear_fc1.layer_norm_bias": (_T + "layernorm_after.bias", "vit_norm_bias"),
        "mlp.linear_fc1.weight": (_T + "mlp.fc1.weight", None),
        "mlp.linear_fc1.bias": (_T + "mlp.fc1.bias", None),
        "mlp.linear_fc2.weight": (_T + "mlp.fc2.weight", None),
        "mlp.linear_fc2.bias": (_T + "mlp.fc2.bias", None),
    },
    projector={
        "layer_norm.weight": "multi_modal_projector.layer_norm.weight",
        "layer_norm.bias": "multi_modal_projector.layer_norm.bias",
        "linear_fc1.weight": "multi_modal_projector.linear_1.weight",
        "linear_fc1.bias": "multi_modal_projector.linear_1.bias",
        "linear_fc2.weight": "multi_modal_projector.linear_2.weight",
        "linear_fc2.bias": "multi_modal_projector.linear_2.bias",
    },
    qkv_kind=VIT_QKV,
)

_R = "vision_model.encoder.layers.{i}."
REMOTE_CODE_VISION = _vision_rows(
    embeddings={
        "class_embedding": "vision_model.embeddings.class_embedding",
        "position_embedding": "vision_model.embeddings.position_embedding",
        "patch_embedding.weight": "vision_model.embeddings.patch_embedding.weight",
        "patch_embedding.bias": "vision_model.embeddings.patch_embedding.bias",
    },
    layer={
        "self_attention.linear_qkv.layer_norm_weight": (_R + "norm1.weight", None),
        "self_attention.linear_qkv.layer_norm_bias": (_R + "norm1.bias", "vit_norm_bias"),
        # One [q; k; v] tensor.
        "self_attention.linear_qkv.weight": (_R + "attn.qkv.weight", None),
        "self_attention.linear_qkv.bias": (_R + "attn.qkv.bias", "vit_qkv_bias"),
        "self_attention.q_layernorm.weight": (_R + "attn.q_norm.weight", "vit_qk_norm"),
        "self_attention.k_layernorm.weight": (_R + "attn.k_norm.weight", "vit_qk_norm"),
        "self_attention.linear_proj.weight": (_R + "attn.proj.weight", None),
        "self_attention.linear_proj.bias": (_R + "attn.proj.bias", None),
        "ls1": (_R + "ls1", None),
        "ls2": (_R + "ls2", None),
        "mlp.linear_fc1.layer_norm_weight": (_R + "norm2.weight", None),
        "mlp.linear_fc1.layer_norm_bias": (_R + "norm2.bias", "vit_norm_bias"),
        "mlp.linear_fc1.weight": (_R + "mlp.fc1.weight", None),
        "mlp.linear_fc1.bias": (_R + "mlp.fc1.bias", None),
        "mlp.linear_fc2.weight": (_R + "mlp.fc2.weight", None),
        "mlp.linear_fc2.bias": (_R + "mlp.fc2.bias", None),
    },
    # mlp1 = Sequential(LayerNorm, Linear, GELU, Linear)
    projector={
        "layer_norm.weight": "mlp1.0.weight",
        "layer_norm.bias": "mlp1.0.bias",
        "linear_fc1.weight": "mlp1.1.weight",
        "linear_fc1.bias": "mlp1.1.bias",
        "linear_fc2.weight": "mlp1.3.weight",
        "linear_fc2.bias": "mlp1.3.bias",
    },
    qkv_kind=VIT_QKV_CONCAT,
)


# --- the formats ---------------------------------------------------------------------------------
# InternLM3 names its weights as Llama does (q/k/v/o_proj, gate/up/down_proj) in both formats.
TRANSFORMERS_LLM = {"qwen2": LLAMA_STYLE_LLM, "llama": LLAMA_STYLE_LLM, "internlm3": LLAMA_STYLE_LLM,
                    "qwen3": LLAMA_STYLE_LLM, "qwen3_moe": QWEN3_MOE_LLM}
REMOTE_CODE_LLM = {"qwen2": LLAMA_STYLE_LLM, "llama": LLAMA_STYLE_LLM, "internlm2": INTERNLM2_LLM,
                   "internlm3": LLAMA_STYLE_LLM, "qwen3": LLAMA_STYLE_LLM, "qwen3_moe": QWEN3_MOE_LLM}

FORMATS = {
    "transformers": (TRANSFORMERS_VISION, TRANSFORMERS_LLM),
    "remote-code": (REMOTE_CODE_VISION, REMOTE_CODE_LLM),
}

# Stored by some exporters but recomputed by every model: not weights.
IGNORED_HF_SUFFIXES = (".rotary_emb.inv_freq",)

# transformers 5 in-memory names -> the names save_pretrained writes.
HF_ALIASES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


def table(fmt: str, arch: str) -> tuple[Rule, ...]:
    """The rows of format ``fmt`` ("transformers" | "remote-code") for LLM ``arch``."""
    vision, llms = FORMATS[fmt]
    if arch not in llms:
        raise KeyError(f"{fmt} format has no {arch} language model layout")
    llm = _prefixed(llms[arch], LM_PREFIX)
    return tuple(vision) + llm


def output_tied_to() -> tuple[str, str]:
    """(megatron output layer name, megatron embedding name): the pair a tied checkpoint shares."""
    (out, emb), = TIED_OUTPUT.items()
    return LM_PREFIX + out, LM_PREFIX + emb
