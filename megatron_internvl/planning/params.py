"""What one rank of a layout holds: parameter counts per component, per pipeline stage.

Counted from the shapes megatron-core builds (``models/factory.py``), per tensor-parallel rank:
column-parallel weights (QKV, FC1, the vocabulary rows) and row-parallel weights (attention
projection, FC2) are split over TP; norms, row-parallel biases, layer scales and the ViT's
embeddings are replicated. The vocabulary is padded (``models/padding.py``) and InternViT-6B's 25
heads are padded to a multiple of TP with zero heads: both are real allocated rows and are
counted. ``tests/planning`` checks these counts against the modules the factory builds.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_internvl.models.padding import padded_num_heads, padded_vocab_size
from megatron_internvl.training.stages import stage_freeze_flags


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def llm_layer_expert_params(lang, ep: int = 1) -> int:
    """One MoE layer's experts on one rank: num_experts / EP SwiGLU MLPs (expert tensor
    parallelism 1: not split over TP). 0 for a dense LLM."""
    if not getattr(lang, "num_experts", 0):
        return 0
    return (lang.num_experts // ep) * 3 * lang.hidden_size * lang.moe_ffn_hidden_size


def llm_layer_params(lang, tp: int, ep: int | None = None) -> int:
    """One decoder layer on one TP rank: two RMSNorms, QKV (+bias), q/k norms (Qwen3),
    projection, SwiGLU MLP (MoE: the router, plus the experts when ``ep`` is given)."""
    if getattr(lang, "num_experts", 0):
        h = lang.hidden_size
        head_dim = lang.kv_channels
        qkv_rows = (lang.num_heads + 2 * lang.num_kv_heads) * head_dim // tp
        n = 2 * h + (2 * head_dim if lang.qk_norm else 0)
        n += qkv_rows * h + (qkv_rows if lang.qkv_bias else 0) + h * (lang.num_heads * head_dim // tp)
        n += lang.num_experts * h  # the router, replicated
        return n + (llm_layer_expert_params(lang, ep) if ep else 0)
    h, f = lang.hidden_size, lang.ffn_hidden_size
    head_dim = lang.kv_channels
    qkv_rows = (lang.num_heads + 2 * lang.num_kv_heads) * head_dim // tp
    n = 2 * h  # input_layernorm + pre_mlp_layernorm weights
    n += 2 * head_dim if lang.qk_norm else 0
    n += qkv_rows * h + (qkv_rows if lang.qkv_bias else 0)
    n += h * (lang.num_heads * head_dim // tp)  # linear_proj, no bias
    n += (2 * f // tp) * h + h * (f // tp)  # linear_fc1 (gate + up), linear_fc2
    return n


def vocab_rows(model, tp: int) -> int:
    lang = model.language
    return padded_vocab_size(lang.vocab_size, tp, lang.make_vocab_size_divisible_by) // tp


def vit_layer_params(vis, tp: int) -> int:
    h, f = vis.hidden_size, vis.ffn_hidden_size
    head_dim = h // vis.num_heads
    heads = padded_num_heads(vis.num_heads, tp) // tp
    norm = h if vis.norm == "rmsnorm" else 2 * h
    n = 2 * norm  # norm1, norm2
    n += 3 * heads * head_dim * h + (3 * heads * head_dim if vis.qkv_bias else 0)
    if vis.qk_norm:
        n += 2 * heads * head_dim  # q and k norm weights, this rank's channels
    n += h * heads * head_dim + h  # proj (row-parallel) + replicated bias
    n += (f // tp) * h + f // tp + h * (f // tp) + h  # fc1 (+bias), fc2 (+replicated bias)
    n += 2 * h  # ls1, ls2
    return n


def vit_embedding_params(vis) -> int:
    h, grid = vis.hidden_size, vis.image_size // vis.patch_size
    return h + (3 * vis.patch_size**2 * h + h) + (1 + grid * grid) * h


def projector_params(model, tp: int) -> int:
    scale = round(1 / model.downsample_ratio)
    d_in = model.vision.hidden_size * scale * scale
    h = model.language.hidden_size
    return 2 * d_in + (h // tp) * d_in + h // tp + h * (h // tp) + h


def stage_llm_layers(parallel, num_layers: int) -> list[int]:
    """LLM decoder layers held by each pipeline rank (all its virtual chunks together)."""
    pp, first = parallel.pipeline_parallel, parallel.first_stage_llm_layers
    if pp == 1:
        return [num_layers]
    if first is None:
        return [num_layers // pp] * pp
    return [first] + [(num_layers - first) // (pp - 1)] * (pp - 1)


@dataclass
class StageParams:
    """Parameters on one rank of pipeline stage ``stage``, split into trainable and frozen."""

    stage: int
    llm_layers: int
    trainable: int
    frozen: int
    by_component: dict  # name -> (trainable, frozen)
    # Of ``trainable``: MoE expert parameters (optimizer state sharded over expert-data-parallel).
    expert_trainable: int = 0

    @property
    def total(self) -> int:
        return self.trainable + self.frozen


def stage_params(model, parallel, training) -> list[StageParams]:
    """Per pipeline stage, what one of its ranks holds (TP-split, padding included)."""
    tp = parallel.tensor_parallel
    lang, vis = model.language, model.vision
    flags = stage_freeze_flags(training)
    layers = stage_llm_layers(parallel, lang.num_layers)
    last = len(layers) - 1
    out = []
    for stage, n_layers in enumerate(layers):
        parts: dict[str, tuple[int, bool]] = {}
        parts["llm_layers"] = (n_layers * llm_layer_params(lang, tp), flags["language"])
        if getattr(lang, "num_experts", 0):
            ep = getattr(parallel, "expert_parallel", 1)
            parts["llm_experts"] = (n_layers * llm_layer_expert_params(lang, ep), flags["language"])
        if stage == 0:
            parts["embedding"] = (vocab_rows(model, tp) * lang.hidden_size, flags["language"])
            parts["projector"] = (projector_params(model, tp), flags["projector"])
            k = flags.get("vit_trainable_last_layers")
            vit_layer = vit_layer_params(vis, tp)
            if k is None:
                parts["vision"] = (vit_embedding_params(vis) + vis.num_layers * vit_layer,
                                   flags["vision"])
            else:
                k = min(k, vis.num_layers)
                parts["vision_frozen"] = (vit_embedding_params(vis) + (vis.num_layers - k) * vit_layer, True)
                parts["vision"] = (k * vit_layer, False)
        if stage == last:
            parts["final_norm"] = (lang.hidden_size, flags["language"])
            parts["output_layer"] = (vocab_rows(model, tp) * lang.hidden_size, flags["language"])
        trainable = sum(n for n, frozen in parts.values() if not frozen)
        frozen = sum(n for n, frozen in parts.values() if frozen)
        by_component = {name: ((0, n) if fr else (n, 0)) for name, (n, fr) in parts.items()}
        experts, experts_frozen = parts.get("llm_experts", (0, True))
        out.append(StageParams(stage, n_layers, trainable, frozen, by_component,
                               expert_trainable=0 if experts_frozen else experts))
    return out


def total_params(model) -> int:
    """The whole model's real parameters (TP=1, no padding): what the model card counts."""
    lang, vis = model.language, model.vision
    h = lang.hidden_size
    return (
        lang.num_layers * llm_layer_params(lang, 1, ep=1) + h + 2 * lang.vocab_size * h
        + vit_embedding_params(vis) + vis.num_layers * vit_layer_params(vis, 1)
        + projector_params(model, 1)
    )


def active_params(model) -> int:
    """Parameters one token goes through (MoE: top-k of the experts); = total_params if dense."""
    lang = model.language
    if not getattr(lang, "num_experts", 0):
        return total_params(model)
    inactive = (lang.num_experts - lang.moe_top_k) * 3 * lang.hidden_size * lang.moe_ffn_hidden_size
    return total_params(model) - lang.num_layers * inactive

