"""Per-GPU memory of a training layout, term by term (docs/cluster.md, "Plan a layout").

Static terms follow megatron-core's mixed precision as the trainer builds it
(``training/main.py``): weights in the training dtype, gradients in an fp32 buffer
(``grad_reduce_in_fp32``) for trainable parameters only, Adam's two moments plus an fp32 master
copy (when the weights are not fp32) sharded over the data-parallel x context-parallel group by
the distributed optimizer. Activation terms count the tensors autograd keeps for backward with the
Transformer Engine spec on GPUs (fused norm + linear, flash attention without a score matrix,
fused SwiGLU), in BF16, for one full pack (``data.max_tokens`` tokens, the tile budget), times
the micro-batches the pipeline schedule keeps in flight on that stage. The data on the device is
its own term (:func:`data_bytes`): the step's token tensors and the uint8 tiles fetched ahead.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_internvl.models.padding import padded_num_heads
from megatron_internvl.training.stages import stage_freeze_flags

from .params import StageParams, stage_params, vocab_rows

GiB = 2**30
ACT_BYTES = 2  # BF16 activations (the trainer's bf16 and fp8 runs; fp32 runs use 4)
# One chunk of fp32 logits in the fused output layer + CE (kernels/fused_linear_ce, its default).
FUSED_CE_CHUNK_BYTES = 256 * 2**20
# Bytes per logit without the fused loss: bf16 logits, the fp32 copy megatron's vocab-parallel
# cross-entropy makes, its saved fp32 softmax, the bf16 gradient (docs/model.md).
LOGITS_BYTES_PER_ENTRY = 2 + 4 + 4 + 2
# A pack's per-token tensors on the device: input ids, labels and dataset ids (int64), positions
# and loss weights (fp32); MPO adds each token's response side and pair (int64).
TOKEN_BYTES = 8 + 8 + 8 + 4 + 4
MPO_TOKEN_BYTES = 8 + 8


@dataclass
class Hardware:
    """What a node offers and what the estimate assumes about it."""

    gpu_mem_gib: float = 80.0  # H100 SXM 80GB
    peak_tflops: float = 989.0  # dense BF16, H100/H200
    mfu: float = 0.35  # assumed model-FLOPs utilisation for the step-time estimate
    # CUDA context, NCCL and cuBLAS/TE workspaces, allocator fragmentation: not in any term above.
    runtime_reserve_gib: float = 4.0
    # Collective bus bandwidth per GPU (GB/s) inside a node (NVLink) and across nodes (8 x 400G
    # InfiniBand per node): what NCCL reaches on large messages, for the step-time estimate.
    intra_node_gbps: float = 360.0
    inter_node_gbps: float = 40.0


def pack_tiles(data, num_image_token: int) -> int:
    """The most ViT tiles one pack can hold: the tile budget, unless the token budget is tighter
    (each tile is ``num_image_token`` tokens plus <img></img>)."""
    return min(data.max_tiles, data.max_tokens // (num_image_token + 2))


def llm_layer_activation_bytes(lang, tokens: int, tp: int, sp: bool) -> float:
    """Saved for backward by one decoder layer over ``tokens`` tokens on one rank (no recompute).

    Per token, in elements: norm input and norm output (the QKV GEMM's input) before attention,
    the same before the MLP (4h, split over TP under sequence parallelism); q, k, v and the
    attention output (what flash attention keeps; the projection's input is that output); the
    SwiGLU input (2f) and output (f, FC2's input), split over TP.
    """
    h, f = lang.hidden_size, lang.ffn_hidden_size
    q = lang.num_heads * lang.kv_channels  # Qwen3: the query width is not the hidden size
    kv = lang.num_kv_heads * lang.kv_channels
    outside_tp = 4 * h / (tp if sp else 1)
    if getattr(lang, "num_experts", 0):
        # MoE: each token is dispatched to k experts: the all-to-all send and receive buffers
        # (k h each), the experts' fc1 input (k h), SwiGLU input and output (3 k f_e).
        k = lang.moe_top_k
        mlp = k * (3 * h + 3 * lang.moe_ffn_hidden_size)
    else:
        mlp = 3 * f
    inside_tp = (q + 2 * kv + q + mlp) / tp
    return tokens * (outside_tp + inside_tp) * ACT_BYTES


def llm_layer_input_bytes(lang, tokens: int, tp: int, sp: bool) -> float:
    """What full recomputation keeps per layer: its input."""
    return tokens * lang.hidden_size / (tp if sp else 1) * ACT_BYTES


def vit_layer_activation_bytes(vis, tiles: int, tp: int) -> float:
    """One InternViT layer over ``tiles`` tiles (1 + grid^2 tokens each), never sequence-parallel.

    Per token: norm1 input, QKV input, attention projection output (kept by the layer-scale
    product), norm2 input, FC1 input, FC2 output (layer scale): 6h replicated; q, k, v and the
    attention output over the padded heads, the GELU input and output, split over TP; with
    InternViT-6B's QK-norm, its fp32 input and bf16 output for q and k.
    """
    h, f = vis.hidden_size, vis.ffn_hidden_size
    grid = vis.image_size // vis.patch_size
    tokens = tiles * (1 + grid * grid)
    hp = padded_num_heads(vis.num_heads, tp) * (h // vis.num_heads)
    per_token = (6 * h + (4 * hp + 2 * f) / tp) * ACT_BYTES
    if vis.qk_norm:
        per_token += 2 * (4 + ACT_BYTES) * hp / tp
    return tokens * per_token


def vit_layer_input_bytes(vis, tiles: int) -> float:
    grid = vis.image_size // vis.patch_size
    return tiles * (1 + grid * grid) * vis.hidden_size * ACT_BYTES


def projector_activation_bytes(model, tiles: int, tp: int) -> float:
    """LayerNorm input and output (FC1's input) over 4 x ViT hidden, the GELU input and output."""
    scale = round(1 / model.downsample_ratio)
    d_in = model.vision.hidden_size * scale * scale
    tokens = tiles * model.num_image_token
    return tokens * (2 * d_in + 2 * model.language.hidden_size / tp) * ACT_BYTES


def loss_bytes(model, parallel, tokens: int) -> float:
    """The last stage's output layer + loss for one micro-batch of ``tokens`` tokens per rank.

    Fused (``model.fused_loss``): the gathered final hidden states (bf16), their fp32 gradient,
    the fp32 weight-gradient accumulator [V/TP, H] and one chunk of fp32 logits. Not fused: the
    [tokens, V/TP] logits at LOGITS_BYTES_PER_ENTRY bytes each.
    """
    h = model.language.hidden_size
    rows = vocab_rows(model, parallel.tensor_parallel)
    if model.fused_loss:
        return tokens * h * (ACT_BYTES + 4) + rows * h * 4 + FUSED_CE_CHUNK_BYTES
    return tokens * rows * LOGITS_BYTES_PER_ENTRY


def data_bytes(config, stage: int, microbatches: int) -> float:
    """The step's data on one GPU of ``stage``: every micro-batch's token tensors (put on the device
    at the step's start, the loss-weight total needs them), and on the first stage the uint8 tiles
    of the micro-batch being computed and of ``training.micro_batch_prefetch`` more (MPO stages the
    whole step: its reference pass reads all of it), plus one pack normalised in float32 (the
    transient before the cast; the bf16 copy the patch conv keeps is in the ViT term)."""
    model, data, t = config.model, config.data, config.training
    mpo = t.stage == "mpo"
    tokens = microbatches * data.max_tokens * (TOKEN_BYTES + (MPO_TOKEN_BYTES if mpo else 0))
    if stage != 0:
        return tokens
    tile = 3 * model.vision.image_size ** 2  # bytes of one uint8 tile
    tiles = pack_tiles(data, model.num_image_token)
    fetched = microbatches if mpo else min(microbatches, 1 + t.micro_batch_prefetch)
    return tokens + fetched * tiles * tile + tiles * tile * 4


def in_flight(stage: int, pp: int, vpp: int, microbatches: int) -> tuple[float, int]:
    """(stage micro-batches of LLM activations held at the peak, micro-batches of model chunk 0
    -- the ViT's -- held), from megatron's own schedule arithmetic: the warm-up forwards run
    before the first backward, plus the one in flight. 1F1B: stage s holds pp - s micro-batches;
    interleaved: each forward covers 1/vpp of the stage's layers."""
    if pp == 1:
        return 1.0, 1
    from types import SimpleNamespace

    from megatron.core.pipeline_parallel.schedules import get_pp_rank_microbatches, get_schedule_table

    group = SimpleNamespace(size=lambda: pp, rank=lambda: stage)
    comm = SimpleNamespace(pp_group=group, virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None)
    total, all_warmup, warmup, _ = get_pp_rank_microbatches(microbatches, vpp, pp, p2p_communicator=comm)
    held = total if all_warmup else warmup + 1
    if vpp == 1:
        return float(held), held
    order = get_schedule_table(microbatches, vpp, pp)  # (micro-batch, model chunk) per forward
    chunk0 = sum(1 for _, chunk in order[:held] if chunk == 0)
    return held / vpp, chunk0


@dataclass
class StageMemory:
    """Bytes on one GPU of a pipeline stage, term by term."""

    stage: int
    params: StageParams
    weights: float
    gradients: float
    optimizer: float
    activations_llm: float
    activations_vision: float
    loss: float
    reserve: float
    micro_batches_in_flight: float
    reference: float = 0.0  # MPO's frozen reference model (mpo.reference=model), weights only
    data: float = 0.0  # the step's data on the device (data_bytes)

    @property
    def static(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.reference

    @property
    def peak(self) -> float:
        return (self.static + self.activations_llm + self.activations_vision + self.loss
                + self.data + self.reserve)

    def terms(self) -> dict:
        return {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                "MPO reference model": self.reference,
                "activations (LLM)": self.activations_llm,
                "activations (ViT + projector)": self.activations_vision,
                "output layer + loss": self.loss, "data (tokens, uint8 tiles)": self.data,
                "runtime reserve": self.reserve,
                "peak": self.peak}


def _param_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def static_bytes(params: StageParams, precision: str, distributed_optimizer: bool,
                 dp_cp: int, expert_dp: int | None = None) -> tuple[float, float, float]:
    """(weights, gradients, optimizer state) in bytes for one rank. MoE experts (already split
    over EP in ``params``) have their optimizer state sharded over the expert-data-parallel
    group (``expert_dp`` = TP x DP x CP / EP ranks), the rest over DP x CP."""
    weights = params.total * _param_bytes(precision)
    gradients = params.trainable * 4  # fp32 grad buffer (grad_reduce_in_fp32)
    per_param = 8 + (0 if precision == "fp32" else 4)  # Adam m, v (+ fp32 master weights)
    shards = dp_cp if distributed_optimizer else 1
    expert_shards = (expert_dp or dp_cp) if distributed_optimizer else 1
    dense = params.trainable - params.expert_trainable
    optimizer = dense * per_param / shards + params.expert_trainable * per_param / expert_shards
    return weights, gradients, optimizer


def stage_memory(config, world_size: int, hardware: Hardware) -> list[StageMemory]:
    """Per pipeline stage, the memory of its busiest rank."""
    model, p, t, data = config.model, config.parallel, config.training, config.data
    tp, pp, cp = p.tensor_parallel, p.pipeline_parallel, p.context_parallel
    vpp = p.virtual_pipeline_parallel or 1
    dp = world_size // (tp * pp * cp)
    microbatches = t.global_batch_size // (t.micro_batch_size * dp)
    flags = stage_freeze_flags(t)
    train_vit = not flags["vision"]
    train_proj = not flags["projector"]
    # Activations are kept where something at or before them trains (frozen-LLM stages under a
    # trained projector still keep theirs: gradients flow through them).
    keep_proj = train_vit or train_proj
    keep_llm = keep_proj or not flags["language"]
    # Context-parallel ranks each run the whole pack today (the step does not split packs over
    # them; see check_cluster_layout), so nothing below divides by CP.
    tokens = data.max_tokens
    tiles = pack_tiles(data, model.num_image_token)
    recompute = model.recompute == "full"  # selective (core attention) keeps the same tensors
    act_scale = 2 if t.precision == "fp32" else 1  # ACT_BYTES is BF16
    # MPO with mpo.reference=model holds a second, frozen copy of the chunks (same layout); its
    # forward-only pass keeps no activations for backward.
    mpo_reference = t.stage == "mpo" and config.mpo.reference == "model"
    out = []
    for params in stage_params(model, p, t):
        s = params.stage
        expert_dp = max(1, tp * dp * cp // getattr(p, "expert_parallel", 1))
        weights, grads, opt = static_bytes(params, t.precision, p.distributed_optimizer, dp * cp, expert_dp)
        n_llm, n_vit = in_flight(s, pp, vpp, microbatches)
        lang = model.language
        llm = 0.0
        if keep_llm and params.llm_layers:
            full = llm_layer_activation_bytes(lang, tokens, tp, p.sequence_parallel)
            if recompute:
                keep = llm_layer_input_bytes(lang, tokens, tp, p.sequence_parallel)
                llm = n_llm * params.llm_layers * keep + full  # + one layer recomputed in backward
            else:
                llm = n_llm * params.llm_layers * full
        vit = 0.0
        if s == 0:
            vis = model.vision
            k = flags.get("vit_trainable_last_layers")
            layers = vis.num_layers if k is None else min(k, vis.num_layers)
            if train_vit and layers:
                full = vit_layer_activation_bytes(vis, tiles, tp)
                if recompute:
                    vit = n_vit * layers * vit_layer_input_bytes(vis, tiles) + full
                else:
                    vit = n_vit * layers * full
                if k is None:  # the patch conv keeps its input pixels (bf16)
                    vit += n_vit * tiles * 3 * vis.image_size**2 * ACT_BYTES
            if keep_proj:
                vit += n_vit * projector_activation_bytes(model, tiles, tp)
        loss = loss_bytes(model, p, tokens) if s == pp - 1 and keep_llm else 0.0
        out.append(StageMemory(
            stage=s, params=params, weights=weights, gradients=grads, optimizer=opt,
            activations_llm=llm * act_scale, activations_vision=vit * act_scale,
            loss=loss, reserve=hardware.runtime_reserve_gib * GiB,
            micro_batches_in_flight=n_llm,
            reference=params.total * _param_bytes(t.precision) if mpo_reference else 0.0,
            data=data_bytes(config, s, microbatches),
        ))
    return out
