"""Hugging Face ``config.json`` <-> the project's :class:`ModelConfig`.

Two formats are read and written:
- ``transformers``: ``InternVLForConditionalGeneration`` (model_type "internvl"), a Qwen2 or Llama
  ``text_config``;
- ``remote-code``: OpenGVLab's ``InternVLChatModel`` (model_type "internvl_chat"), an
  ``llm_config`` of Qwen2, InternLM2, InternLM3 or Llama.
InternLM3 (InternVL3-9B) is Llama-shaped: separate q/k/v/o projections without biases, head_dim
128, and a dynamic NTK rope scaling that is recorded (``rope_dynamic_factor``) and written back.
Anything the project's model would compute differently (another activation, a rope scaling,
biases it has no place for, v1 pixel shuffle, another feature layer) is refused with the field
named, rather than converted into a model that silently disagrees.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

from megatron_internvl.config import ConfigError, LanguageConfig, ModelConfig, VisionConfig

from . import ConversionError

TRANSFORMERS = "transformers"
REMOTE_CODE = "remote-code"
FORMATS = (TRANSFORMERS, REMOTE_CODE)

_REMOTE_ARCHS = {
    "Qwen2ForCausalLM": "qwen2",
    "InternLM2ForCausalLM": "internlm2",
    "LlamaForCausalLM": "llama",
    "InternLM3ForCausalLM": "internlm3",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
_TEXT_MODEL_TYPES = ("qwen2", "llama", "internlm3", "qwen3", "qwen3_moe")
_NORMS = {"layer_norm": "layernorm", "rms_norm": "rmsnorm"}

GPT_OSS_REFUSAL = (
    "{field}={value!r}: InternVL3.5-GPT-OSS (gpt-oss-20b LLM) is not supported. It needs what the "
    "project's model does not have: one learnable attention-sink logit per head, a 128-token "
    "sliding window on every other layer, YaRN rope, q/k/v/o and expert biases, a router with "
    "bias (top-k of the logits, then softmax), clamped SwiGLU on interleaved gate/up columns, "
    "and the Harmony chat template (assistant turns ending in <|return|> on the last turn, "
    "<|end|> otherwise). Use a Qwen3 or Qwen3-MoE InternVL3.5 instead"
)


def _refuse_gpt_oss(field: str, value) -> None:
    if value is not None and "gpt_oss" in str(value).lower().replace("-", "_").replace("gptoss", "gpt_oss"):
        raise ConversionError("config.json: " + GPT_OSS_REFUSAL.format(field=field, value=value))


@dataclass
class HFModel:
    """What a HF checkpoint directory is: its format, the model, and facts the export needs."""

    fmt: str
    model: ModelConfig
    tied: bool  # config.json ties lm_head to the input embedding
    config: dict  # the original config.json


def read_config(hf_dir) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{path} not found: --hf-dir must be a Hugging Face model directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{path} is not valid JSON: {exc}") from exc


def _get(cfg: dict, key: str, where: str, default=None, required=False):
    if key not in cfg or cfg[key] is None:
        if required:
            raise ConversionError(f"config.json: field {where}.{key} is missing")
        return default
    return cfg[key]


def _require(cond: bool, field: str, value, expected: str):
    if not cond:
        raise ConversionError(
            f"config.json: {field}={value!r} is not supported (expected {expected}); the project's "
            f"model would compute something else"
        )


def _square(value, field):
    if isinstance(value, (list, tuple)):
        _require(len(value) == 2 and value[0] == value[1], field, value, "a square size")
        return int(value[0])
    return int(value)


def _rope(cfg: dict, where: str) -> tuple[float, float]:
    """(rope theta, dynamic NTK factor or 0) from either spelling: transformers 5's
    ``rope_parameters`` or the older ``rope_theta`` + ``rope_scaling``."""
    params = cfg.get("rope_parameters") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type == "dynamic":
        factor = float(params.get("factor", scaling.get("factor", 1.0)))
        _require(factor >= 1.0, f"{where}.rope_scaling.factor", factor, "a factor >= 1")
        # Dynamic NTK only changes positions beyond max_position_embeddings.
        warnings.warn(
            f"{where}.rope_scaling is dynamic NTK (factor {factor:g}): positions beyond "
            f"max_position_embeddings are not rescaled by the project's model", stacklevel=2,
        )
        return float(theta), factor
    _require(rope_type == "default", f"{where}.rope_scaling", rope_type, "no rope scaling or dynamic")
    return float(theta), 0.0


def _language(cfg: dict, arch: str, where: str) -> LanguageConfig:
    hidden = _get(cfg, "hidden_size", where, required=True)
    heads = _get(cfg, "num_attention_heads", where, required=True)
    act = _get(cfg, "hidden_act", where, "silu")
    _require(act == "silu", f"{where}.hidden_act", act, "'silu'")
    head_dim = cfg.get("head_dim")
    if arch in ("qwen3", "qwen3_moe"):
        # Qwen3 sets the head width on its own (128; Qwen3Config's default when absent).
        head_dim = int(head_dim or 128)
    elif head_dim is not None:
        _require(head_dim * heads == hidden, f"{where}.head_dim", head_dim,
                 f"hidden_size / num_attention_heads = {hidden // heads}")
        head_dim = 0
    if cfg.get("use_sliding_window", False):
        _require(False, f"{where}.use_sliding_window", True, "false (full attention in every layer)")
    if arch == "qwen2":
        qkv_bias = True
    elif arch in ("llama", "internlm3", "qwen3", "qwen3_moe"):
        # InternLM3's own config spells the biases qkv_bias / bias, transformers' attention_bias /
        # mlp_bias; either must be false.
        for key, what in (("attention_bias", "false (the output projection has no bias here)"),
                          ("qkv_bias", "false"), ("mlp_bias", "false"), ("bias", "false")):
            _require(not cfg.get(key, False), f"{where}.{key}", cfg.get(key), what)
        qkv_bias = False
    else:  # internlm2
        _require(not cfg.get("bias", False), f"{where}.bias", cfg.get("bias"), "false")
        qkv_bias = False
    theta, dynamic = _rope(cfg, where)
    moe = _moe(cfg, where) if arch == "qwen3_moe" else {}
    return LanguageConfig(
        **moe,
        arch=arch,
        hidden_size=hidden,
        num_layers=_get(cfg, "num_hidden_layers", where, required=True),
        num_heads=heads,
        num_kv_heads=_get(cfg, "num_key_value_heads", where, heads),
        ffn_hidden_size=_get(cfg, "intermediate_size", where, required=True),
        vocab_size=_get(cfg, "vocab_size", where, required=True),
        rope_theta=theta,
        rope_dynamic_factor=dynamic,
        norm_eps=float(_get(cfg, "rms_norm_eps", where, 1e-6)),
        qkv_bias=qkv_bias,
        head_dim=head_dim or 0,
        qk_norm=arch in ("qwen3", "qwen3_moe"),
        max_position_embeddings=_get(cfg, "max_position_embeddings", where, 32768),
    )


def _moe(cfg: dict, where: str) -> dict:
    """Qwen3-MoE's experts. transformers 5 writes ``num_local_experts``, the remote code
    ``num_experts``; ``norm_topk_prob`` defaults to false in transformers (the releases set true)."""
    experts = cfg.get("num_experts") or cfg.get("num_local_experts")
    _require(bool(experts), f"{where}.num_experts", experts, "a number of experts")
    _require(cfg.get("decoder_sparse_step", 1) == 1, f"{where}.decoder_sparse_step",
             cfg.get("decoder_sparse_step"), "1 (every layer MoE)")
    _require(not cfg.get("mlp_only_layers"), f"{where}.mlp_only_layers", cfg.get("mlp_only_layers"),
             "[] (every layer MoE)")
    _require(not cfg.get("shared_expert_intermediate_size"), f"{where}.shared_expert_intermediate_size",
             cfg.get("shared_expert_intermediate_size"), "0 (Qwen3-MoE has no shared expert)")
    return dict(
        num_experts=int(experts),
        moe_top_k=int(_get(cfg, "num_experts_per_tok", where, required=True)),
        moe_ffn_hidden_size=int(_get(cfg, "moe_intermediate_size", where, required=True)),
        moe_norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
    )


def _vision(vc: dict, where: str, remote: bool, image_size) -> VisionConfig:
    act = vc.get("hidden_act", "gelu")
    _require(act == "gelu", f"{where}.hidden_act", act, "'gelu'")
    norm_type = vc.get("norm_type", "rms_norm" if remote else "layer_norm")
    _require(norm_type in _NORMS, f"{where}.norm_type", norm_type, "layer_norm or rms_norm")
    if remote:
        qkv_bias = vc.get("qkv_bias", False)
        qk_norm = vc.get("qk_normalization", True)
        ls_init = vc.get("initializer_factor", 0.1)
    else:
        qkv_bias = vc.get("attention_bias", False)
        qk_norm = vc.get("use_qk_norm", False)
        ls_init = vc.get("layer_scale_init_value", 0.1)
        _require(vc.get("use_mean_pooling", True), f"{where}.use_mean_pooling",
                 vc.get("use_mean_pooling"), "true (InternViT has no final norm)")
        _require(vc.get("use_absolute_position_embeddings", True),
                 f"{where}.use_absolute_position_embeddings",
                 vc.get("use_absolute_position_embeddings"), "true")
        _require(not vc.get("use_mask_token", False), f"{where}.use_mask_token",
                 vc.get("use_mask_token"), "false")
    default_hidden = 3200 if remote else 1024
    return VisionConfig(
        hidden_size=vc.get("hidden_size", default_hidden),
        num_layers=vc.get("num_hidden_layers", 48 if remote else 24),
        num_heads=vc.get("num_attention_heads", 25 if remote else 16),
        ffn_hidden_size=vc.get("intermediate_size", 12800 if remote else 4096),
        image_size=image_size,
        patch_size=_square(vc.get("patch_size", 14), f"{where}.patch_size"),
        norm=_NORMS[norm_type],
        norm_eps=float(vc.get("layer_norm_eps", 1e-6)),
        qkv_bias=bool(qkv_bias),
        qk_norm=bool(qk_norm),
        layer_scale_init=float(ls_init),
        drop_path_rate=float(vc.get("drop_path_rate", 0.0)),
    )


def _image_token_id_from_tokenizer(hf_dir) -> int | None:
    """``<IMG_CONTEXT>``'s id from the tokenizer files (remote-code configs do not store it)."""
    hf_dir = Path(hf_dir)
    added = hf_dir / "added_tokens.json"
    if added.is_file():
        ids = json.loads(added.read_text())
        if "<IMG_CONTEXT>" in ids:
            return int(ids["<IMG_CONTEXT>"])
    for name, key in (("tokenizer.json", "added_tokens"), ("tokenizer_config.json", "added_tokens_decoder")):
        path = hf_dir / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text()).get(key) or []
        items = data.items() if isinstance(data, dict) else ((t.get("id"), t) for t in data)
        for tid, tok in items:
            if isinstance(tok, dict) and tok.get("content") == "<IMG_CONTEXT>":
                return int(tid)
    return None


def parse(hf_dir, cfg: dict | None = None, image_token_id: int | None = None) -> HFModel:
    """Detect the format of ``hf_dir`` and describe its model."""
    cfg = read_config(hf_dir) if cfg is None else cfg
    model_type = cfg.get("model_type")
    if model_type == "internvl":
        model, tied = _parse_transformers(cfg)
        fmt = TRANSFORMERS
    elif model_type == "internvl_chat":
        model, tied = _parse_remote(cfg, hf_dir, image_token_id)
        fmt = REMOTE_CODE
    else:
        raise ConversionError(
            f"config.json: model_type={model_type!r} is not supported: expected 'internvl' "
            f"(transformers InternVLForConditionalGeneration) or 'internvl_chat' (OpenGVLab "
            f"remote code)"
        )
    if image_token_id is not None:
        model.image_token_id = image_token_id
    try:
        model.validate()
    except ConfigError as exc:
        raise ConversionError(f"config.json describes a model the project cannot build: {exc}") from exc
    return HFModel(fmt=fmt, model=model, tied=tied, config=cfg)


def _parse_transformers(cfg):
    tc = _get(cfg, "text_config", "config", required=True)
    vc = _get(cfg, "vision_config", "config", required=True)
    text_type = tc.get("model_type", "qwen2")
    _refuse_gpt_oss("text_config.model_type", text_type)
    _require(text_type in _TEXT_MODEL_TYPES, "text_config.model_type", text_type, " or ".join(_TEXT_MODEL_TYPES))
    for field, want in (("vision_feature_layer", -1), ("vision_feature_select_strategy", "default"),
                        ("projector_hidden_act", "gelu")):
        _require(cfg.get(field, want) == want, field, cfg.get(field), repr(want))
    language = _language(tc, text_type, "text_config")
    image_size = _square(vc.get("image_size", 448), "vision_config.image_size")
    vision = _vision(vc, "vision_config", remote=False, image_size=image_size)
    model = ModelConfig(
        vision=vision, language=language,
        downsample_ratio=float(cfg.get("downsample_ratio", 0.5)),
        image_token_id=int(cfg.get("image_token_id", 151667)),
    )
    # transformers ties lm_head to the embedding by the top-level flag (default true).
    tied = bool(cfg.get("tie_word_embeddings", True))
    return model, tied


def _parse_remote(cfg, hf_dir, image_token_id):
    lc = _get(cfg, "llm_config", "config", required=True)
    vc = _get(cfg, "vision_config", "config", required=True)
    archs = lc.get("architectures") or [None]
    _refuse_gpt_oss("llm_config.architectures[0]", archs[0])
    _require(archs[0] in _REMOTE_ARCHS, "llm_config.architectures[0]", archs[0], " or ".join(_REMOTE_ARCHS))
    _require(cfg.get("select_layer", -1) == -1, "select_layer", cfg.get("select_layer"), "-1")
    ps = cfg.get("ps_version", "v1")
    _require(ps == "v2", "ps_version", ps, "'v2' (row-major pixel unshuffle)")
    language = _language(lc, _REMOTE_ARCHS[archs[0]], "llm_config")
    image_size = _square(cfg.get("force_image_size") or vc.get("image_size", 224), "force_image_size")
    vision = _vision(vc, "vision_config", remote=True, image_size=image_size)
    if image_token_id is None:
        image_token_id = _image_token_id_from_tokenizer(hf_dir)
    if image_token_id is None:
        image_token_id = ModelConfig().image_token_id
        warnings.warn(
            f"no <IMG_CONTEXT> token in the tokenizer files of {hf_dir}: using image token id "
            f"{image_token_id} (pass --image-token-id to set it)", stacklevel=2,
        )
    model = ModelConfig(
        vision=vision, language=language,
        downsample_ratio=float(cfg.get("downsample_ratio", 0.5)),
        image_token_id=int(image_token_id),
    )
    tied = bool(lc.get("tie_word_embeddings", False))
    return model, tied


# --- writing configs on export ----------------------------------------------------------------------
def export_config(fmt: str, model: ModelConfig, source: HFModel | None, tied: bool, dtype: str) -> dict:
    """config.json for ``fmt``: the original one when it was in that format (so fields the
    project does not model survive), otherwise built from ``model``."""
    if source is not None and source.fmt == fmt:
        cfg = copy.deepcopy(source.config)
    elif fmt == TRANSFORMERS:
        cfg = _transformers_config(model, dtype)
    else:
        cfg = _remote_config(model, dtype, source)
    key = "text_config" if fmt == TRANSFORMERS else "llm_config"
    cfg[key]["tie_word_embeddings"] = tied
    if fmt == TRANSFORMERS:
        cfg["tie_word_embeddings"] = tied
    return cfg


_ARCH_OF_TEXT = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM",
                 "internlm2": "InternLM2ForCausalLM", "internlm3": "InternLM3ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


def _text_config(lang: LanguageConfig, dtype: str, remote: bool) -> dict:
    out = {
        "architectures": [_ARCH_OF_TEXT[lang.arch]],
        "hidden_act": "silu",
        "hidden_size": lang.hidden_size,
        "intermediate_size": lang.ffn_hidden_size,
        "max_position_embeddings": lang.max_position_embeddings,
        "num_attention_heads": lang.num_heads,
        "num_hidden_layers": lang.num_layers,
        "num_key_value_heads": lang.num_kv_heads,
        "rms_norm_eps": lang.norm_eps,
        "rope_theta": lang.rope_theta,
        "vocab_size": lang.vocab_size,
        "torch_dtype": dtype,
    }
    if lang.arch == "internlm2":
        out.update(model_type="internlm2", bias=False, attn_implementation="eager")
    else:
        out["model_type"] = lang.arch
    if lang.arch in ("qwen3", "qwen3_moe"):
        out.update(head_dim=lang.kv_channels, attention_bias=False, use_sliding_window=False)
    if lang.arch == "qwen3_moe":
        out.update(num_experts=lang.num_experts, num_experts_per_tok=lang.moe_top_k,
                   moe_intermediate_size=lang.moe_ffn_hidden_size,
                   norm_topk_prob=lang.moe_norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=[],
                   router_aux_loss_coef=lang.moe_aux_loss_coeff)
    if lang.arch == "internlm3":
        out["head_dim"] = lang.kv_channels
        # transformers' InternLM3Config maps qkv_bias / bias onto these two.
        if remote:
            out.update(qkv_bias=False, bias=False)
        else:
            out.update(attention_bias=False, mlp_bias=False)
    if not remote:
        out.pop("architectures")
        out["rope_parameters"] = {"rope_theta": out.pop("rope_theta"), "rope_type": "default"}
        if lang.rope_dynamic_factor:
            out["rope_parameters"].update(rope_type="dynamic", factor=lang.rope_dynamic_factor)
    elif lang.rope_dynamic_factor:
        out["rope_scaling"] = {"rope_type": "dynamic", "factor": lang.rope_dynamic_factor}
    return out


def _transformers_config(model: ModelConfig, dtype: str) -> dict:
    if model.language.arch not in _TEXT_MODEL_TYPES:
        raise ConversionError(
            f"the transformers format has no {model.language.arch} language model: export "
            f"--format remote-code (transformers' InternVL takes Qwen2, Qwen3, Llama or InternLM3)"
        )
    vis = model.vision
    return {
        "architectures": ["InternVLForConditionalGeneration"],
        "model_type": "internvl",
        "downsample_ratio": model.downsample_ratio,
        "image_token_id": model.image_token_id,
        "image_seq_length": model.num_image_token,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
        "dtype": dtype,
        "text_config": _text_config(model.language, dtype, remote=False),
        "vision_config": {
            "model_type": "internvl_vision",
            "hidden_size": vis.hidden_size,
            "num_hidden_layers": vis.num_layers,
            "num_attention_heads": vis.num_heads,
            "intermediate_size": vis.ffn_hidden_size,
            "image_size": [vis.image_size, vis.image_size],
            "patch_size": [vis.patch_size, vis.patch_size],
            "norm_type": "layer_norm" if vis.norm == "layernorm" else "rms_norm",
            "layer_norm_eps": vis.norm_eps,
            "attention_bias": vis.qkv_bias,
            "use_qk_norm": vis.qk_norm,
            "layer_scale_init_value": vis.layer_scale_init,
            "hidden_act": "gelu",
            "use_mean_pooling": True,
        },
    }


def _remote_config(model: ModelConfig, dtype: str, source: HFModel | None) -> dict:
    vis = model.vision
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
            "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
        },
        "downsample_ratio": model.downsample_ratio,
        "force_image_size": vis.image_size,
        "ps_version": "v2",
        "select_layer": -1,
        "template": "internvl2_5",
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": 12,
        "torch_dtype": dtype,
        "llm_config": _text_config(model.language, dtype, remote=True),
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "hidden_size": vis.hidden_size,
            "num_hidden_layers": vis.num_layers,
            "num_attention_heads": vis.num_heads,
            "intermediate_size": vis.ffn_hidden_size,
            "image_size": vis.image_size,
            "patch_size": vis.patch_size,
            "norm_type": "layer_norm" if vis.norm == "layernorm" else "rms_norm",
            "layer_norm_eps": vis.norm_eps,
            "qkv_bias": vis.qkv_bias,
            "qk_normalization": vis.qk_norm,
            "initializer_factor": vis.layer_scale_init,
            "drop_path_rate": vis.drop_path_rate,
            "hidden_act": "gelu",
            "num_channels": 3,
            "torch_dtype": dtype,
        },
    }
