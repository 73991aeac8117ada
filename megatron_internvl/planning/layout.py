"""Check a parallel layout for a cluster and estimate its memory, FLOPs and step time.

``make_plan(config, nodes, gpus_per_node, hardware)`` runs the schema's checks at the world size
(divisibility, heads, batch arithmetic), the checks only a cluster size can answer (interleaved
micro-batch groups, fixed-length packs, the image token inside the vocabulary), then the memory
model of :mod:`.memory` per pipeline stage and the step time from the project's FLOPs counter
(``models/flops.py``) at an assumed MFU, with the pipeline bubble and stage imbalance.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from megatron_internvl.config.schema import ConfigError
from megatron_internvl.models.flops import (StepShapes, component_flops, llm_forward_flops,
                                             step_flops, vit_forward_flops)
from megatron_internvl.models.padding import padded_num_heads, padded_vocab_size
from megatron_internvl.parallel.sequence import pack_pad_multiple
from megatron_internvl.training.stages import stage_freeze_flags, trainable_components

from .memory import GiB, Hardware, StageMemory, pack_tiles, stage_memory
from .params import stage_llm_layers, stage_params


@dataclass
class Plan:
    world_size: int
    data_parallel: int
    micro_batches: int
    stages: list[StageMemory]
    flops_per_step: float
    stage_seconds: list[float]  # forward + backward of one micro-batch, per pipeline stage
    step_seconds: float
    ideal_seconds: float  # the same FLOPs perfectly spread over every GPU at the assumed MFU
    hardware: Hardware
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> float:
        return max(s.peak for s in self.stages)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.hardware.gpu_mem_gib * GiB

    @property
    def balance(self) -> float:
        """Slowest stage / mean stage time (1.0: perfectly balanced)."""
        mean = sum(self.stage_seconds) / len(self.stage_seconds)
        return max(self.stage_seconds) / mean if mean else 1.0


def pack_shape(config) -> StepShapes:
    """The pack the step-time estimate assumes: ``data.max_tokens`` tokens of samples of
    ``data.synthetic.sample_tokens`` tokens with ``data.synthetic.tiles_per_sample`` tiles each,
    within the tile budget (the synthetic pack shape; set those two fields to match your data)."""
    d = config.data
    sample = max(1, min(d.synthetic.sample_tokens, d.max_tokens))
    lengths = [sample] * (d.max_tokens // sample)
    if d.max_tokens % sample:
        lengths.append(d.max_tokens % sample)
    tiles = min(len(lengths) * d.synthetic.tiles_per_sample, pack_tiles(d, config.model.num_image_token))
    return StepShapes(lengths, tiles)


def stage_flops(config, shapes: StepShapes, forward_only: bool = False) -> list[float]:
    """Training FLOPs of one micro-batch (one pack) on each pipeline stage, all its TP x CP ranks
    together: the project's per-component counts (``flops.component_flops``), the LLM's split by
    layers (its forward count is linear in them, plus the logits on the last stage). They sum to
    ``flops.step_flops`` of that pack. ``forward_only``: a frozen model's forward, as MPO's
    reference model runs it."""
    model, p = config.model, config.parallel
    lang = model.language
    trainable = trainable_components(stage_freeze_flags(config.training))
    if forward_only:
        trainable = dict.fromkeys(trainable, False)
    parts = component_flops(model, shapes, trainable)
    per_layer = llm_forward_flops(dataclasses.replace(lang, num_layers=1, vocab_size=0),
                                  shapes.sample_lengths)
    logits = llm_forward_flops(dataclasses.replace(lang, num_layers=0), shapes.sample_lengths)
    scale = parts["language"] / (lang.num_layers * per_layer + logits)  # forward + backward factor
    out = [scale * n * per_layer for n in stage_llm_layers(p, lang.num_layers)]
    out[0] += parts["vision"] + parts["projector"]
    out[-1] += scale * logits
    return out


def recompute_flops(config, shapes: StepShapes) -> list[float]:
    """The extra forward FLOPs full recomputation runs per micro-batch on each stage: one more
    forward of every layer that keeps activations (not counted in MFU, but it takes time)."""
    model, p = config.model, config.parallel
    if model.recompute != "full":
        return [0.0] * p.pipeline_parallel
    flags = stage_freeze_flags(config.training)
    lang, vis = model.language, model.vision
    per_layer = llm_forward_flops(dataclasses.replace(lang, num_layers=1, vocab_size=0),
                                  shapes.sample_lengths)
    out = [n * per_layer for n in stage_llm_layers(p, lang.num_layers)]
    if not flags["vision"]:
        k = flags.get("vit_trainable_last_layers")
        layers = vis.num_layers if k is None else min(k, vis.num_layers)
        out[0] += layers / vis.num_layers * vit_forward_flops(vis, shapes.tiles)
    return out


def communication_seconds(config, world_size: int, gpus_per_node: int, hardware) -> tuple[list[float], float]:
    """(exposed communication per micro-batch on each stage, per step for the data-parallel
    gradient and parameter exchange). TP: with or without SP, four collectives of the layer's
    [tokens, hidden] bf16 activations in forward and four in backward, (tp-1)/tp of it over the
    wire; PP: the stage's output
    forward and its gradient backward; DP (distributed optimizer): fp32 gradients reduce-scattered
    and bf16 parameters all-gathered once per step, hidden when overlap_grad_reduce is on. Groups
    inside a node run at ``intra_node_gbps``, groups spanning nodes at ``inter_node_gbps``."""
    model, p = config.model, config.parallel
    lang = model.language
    tp, cp, pp = p.tensor_parallel, p.context_parallel, p.pipeline_parallel
    tokens = config.data.max_tokens  # context-parallel ranks each run the whole pack today
    h = lang.hidden_size
    gbps = lambda span: (hardware.intra_node_gbps if span <= gpus_per_node else hardware.inter_node_gbps) * 1e9
    layers = stage_llm_layers(p, lang.num_layers)
    tp_layer = 8 * (tp - 1) / tp * tokens * h * 2 / gbps(tp) if tp > 1 else 0.0
    p2p = 2 * tokens * h * 2 / (tp if p.sequence_parallel else 1) / gbps(tp * cp * pp) if pp > 1 else 0.0
    per_stage = [n * tp_layer + p2p for n in layers]
    dp = world_size // (tp * cp * pp)
    dp_seconds = 0.0
    if dp * cp > 1 and not p.overlap_grad_reduce:
        trainable = max(s.trainable for s in stage_params(model, p, config.training))
        shards = dp * cp
        dp_seconds = (shards - 1) / shards * trainable * (4 + 2) / gbps(world_size)
    return per_stage, dp_seconds


def check_cluster_layout(config, world_size: int, gpus_per_node: int | None = None) -> list[str]:
    """Errors (ConfigError naming the field) and warnings only a cluster size can answer."""
    model, p, t, data = config.model, config.parallel, config.training, config.data
    config.validate(world_size, require_data=False)
    warnings = []
    dp = p.data_parallel(world_size)
    m = t.global_batch_size // (t.micro_batch_size * dp)
    vpp = p.virtual_pipeline_parallel or 1
    if model.image_token_id >= model.language.vocab_size:
        warnings.append(
            f"model.image_token_id={model.image_token_id} is outside the vocabulary "
            f"(model.language.vocab_size={model.language.vocab_size}): training refuses it; set "
            f"the tokenizer's <IMG_CONTEXT> id or the real vocabulary size")
    if vpp > 1 and (m < p.pipeline_parallel or m % p.pipeline_parallel):
        raise ConfigError(
            f"training.global_batch_size={t.global_batch_size} gives {m} micro-batches per "
            f"data-parallel rank (DP={dp}); the interleaved schedule (parallel."
            f"virtual_pipeline_parallel={vpp}) needs a multiple of parallel.pipeline_parallel="
            f"{p.pipeline_parallel}: make the global batch a multiple of "
            f"{p.pipeline_parallel * dp * t.micro_batch_size}")
    pack_pad_multiple(config)  # fixed-length packs under VPP must split for SP / CP / FP8
    if p.pipeline_parallel > 1 and m < p.pipeline_parallel:
        warnings.append(
            f"{m} micro-batches per step for {p.pipeline_parallel} pipeline stages: most of the "
            f"step is pipeline bubble; raise training.global_batch_size or lower pipeline_parallel")
    if p.tensor_parallel > 1 and not p.sequence_parallel:
        warnings.append("parallel.sequence_parallel=false with tensor_parallel > 1: norms and "
                        "residuals are held whole on every TP rank (set it true)")
    if gpus_per_node and p.tensor_parallel > gpus_per_node:
        warnings.append(f"parallel.tensor_parallel={p.tensor_parallel} spans nodes of "
                        f"{gpus_per_node} GPUs: its all-reduces leave NVLink")
    if gpus_per_node and p.tensor_parallel * p.context_parallel > gpus_per_node:
        warnings.append(f"tensor_parallel x context_parallel = "
                        f"{p.tensor_parallel * p.context_parallel} spans nodes of {gpus_per_node} GPUs")
    if p.context_parallel > 1:
        warnings.append(
            f"parallel.context_parallel={p.context_parallel}: the training step does not split packs "
            f"over context-parallel ranks yet (each runs the whole pack, and only CP rank 0's loss "
            f"counts), so CP adds no memory saving and duplicates the work; planned as such. Keep it 1")
    if data.max_tokens > model.language.max_position_embeddings and data.v2pe == "off":
        warnings.append(f"data.max_tokens={data.max_tokens} exceeds model.language."
                        f"max_position_embeddings={model.language.max_position_embeddings}")
    return warnings


def make_plan(config, nodes: int, gpus_per_node: int, hardware: Hardware | None = None) -> Plan:
    """Validate ``config``'s layout on ``nodes`` x ``gpus_per_node`` GPUs and estimate it."""
    hardware = hardware or Hardware()
    world = nodes * gpus_per_node
    warnings = check_cluster_layout(config, world, gpus_per_node)
    model, p, t = config.model, config.parallel, config.training
    dp = p.data_parallel(world)
    m = t.global_batch_size // (t.micro_batch_size * dp)
    vpp = p.virtual_pipeline_parallel or 1
    stages = stage_memory(config, world, hardware)

    shapes = pack_shape(config)
    trainable = trainable_components(stage_freeze_flags(t))
    per_pack = step_flops(model, shapes, trainable)
    flops = per_pack * t.global_batch_size
    reference = t.stage == "mpo" and config.mpo.reference == "model"
    if reference:  # the reference model's forward pass, counted as training/main.py does
        flops += step_flops(model, shapes, dict.fromkeys(trainable, False)) * t.global_batch_size
    rate = hardware.peak_tflops * 1e12 * hardware.mfu
    compute = [f + r for f, r in zip(stage_flops(config, shapes), recompute_flops(config, shapes))]
    if reference:
        compute = [c + f for c, f in zip(compute, stage_flops(config, shapes, forward_only=True))]
    comm, dp_seconds = communication_seconds(config, world, gpus_per_node, hardware)
    per_stage = [f / (p.tensor_parallel * rate) + c for f, c in zip(compute, comm)]
    step = (m + (p.pipeline_parallel - 1) / vpp) * max(per_stage) + dp_seconds
    ideal = flops / (world * rate)

    notes = []
    lang, vis = model.language, model.vision
    vocab = padded_vocab_size(lang.vocab_size, p.tensor_parallel, lang.make_vocab_size_divisible_by)
    if vocab != lang.vocab_size:
        notes.append(f"vocabulary {lang.vocab_size} padded to {vocab} rows "
                     f"({vocab // p.tensor_parallel} per TP rank; padded logits are -inf)")
    heads = padded_num_heads(vis.num_heads, p.tensor_parallel)
    if heads != vis.num_heads:
        notes.append(f"ViT heads {vis.num_heads} padded to {heads} at TP={p.tensor_parallel} "
                     f"(zero heads: {100 * (heads - vis.num_heads) / heads:.0f}% of ViT attention "
                     f"compute is padding)")
    if p.pipeline_parallel > 1 and vpp == 1:
        best = balanced_first_stage_layers(config)
        if best != p.first_stage_llm_layers:
            split = "the even split" if best is None else f"parallel.first_stage_llm_layers={best}"
            notes.append(f"the stages balance best with {split} (the first stage also runs the ViT)")
    if model.recompute == "selective":
        notes.append("model.recompute=selective recomputes core attention only; flash attention "
                     "keeps no score matrix, so it saves no memory here (use full)")
    plan = Plan(world, dp, m, stages, flops, per_stage, step, ideal, hardware, notes, warnings)
    return plan


def balanced_first_stage_layers(config) -> int | None:
    """The first stage's LLM layer count with the smallest slowest-stage time (None: the even
    split is at least as good)."""
    p, layers = config.parallel, config.model.language.num_layers
    if p.pipeline_parallel == 1 or (p.virtual_pipeline_parallel or 1) > 1:
        return None
    shapes = pack_shape(config)
    best, best_time = None, None
    options = [None] if layers % p.pipeline_parallel == 0 else []
    options += [f for f in range(0, layers + 1) if (layers - f) % (p.pipeline_parallel - 1) == 0
                and (layers - f) // (p.pipeline_parallel - 1) >= 1]
    for first in options:
        trial = dataclasses.replace(config, parallel=dataclasses.replace(p, first_stage_llm_layers=first))
        slowest = max(stage_flops(trial, shapes))
        if best_time is None or slowest < best_time * (1 - 1e-9):
            best, best_time = first, slowest
    return best


def unfit_message(plan: Plan) -> str:
    worst = max(plan.stages, key=lambda s: s.peak)
    return (f"the layout does not fit: pipeline stage {worst.stage} peaks at "
            f"{worst.peak / GiB:.1f} GiB per GPU, above --gpu-mem {plan.hardware.gpu_mem_gib:g} GiB. "
            f"Raise parallel.tensor_parallel or parallel.pipeline_parallel, set model.recompute=full, "
            f"or lower data.max_tokens / data.max_tiles (megatron-internvl plan ... --search ranks "
            f"the layouts that fit)")
