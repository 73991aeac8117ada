"""One optimizer step: packed THD micro-batches through megatron's pipeline schedule.

The loss is the exact global weighted mean (see :mod:`.loss`): the weights of every micro-batch on
every data-parallel rank are summed first, each micro-batch contributes ``sum(CE * w) / W``.
Non-finite loss or gradients skip the update on every rank.

Only the small tensors of the step's micro-batches (tokens, labels, weights: what ``W`` needs)
are put on the device before the schedule; with ``fetch_pixels`` each micro-batch's tiles follow
when the schedule asks for it, ``prefetch`` ahead (``parallel.data.MicroBatchFeed``), so the
step's pixels are never all on the device. The arithmetic is the same either way, and so are the
losses, bit for bit.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state as ps
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_attr_wrapped_model

from megatron_internvl.parallel.data import MicroBatchFeed
from megatron_internvl.parallel.distributed import compute_device

from megatron_internvl.models.flops import StepShapes
from megatron_internvl.models.pixels import normalize_pixels
from .loss import (backward_scale, dataset_sums, fused_weighted_token_loss, global_weight_sum,
                   weighted_token_loss)


@dataclass
class StepResult:
    loss: float
    grad_norm: float | None
    updated: bool
    tokens: int  # real tokens over the global batch
    tiles: int
    dataset_loss: dict = field(default_factory=dict)
    shapes: StepShapes | None = None
    mpo: dict = field(default_factory=dict)  # MPO terms, rewards, delta (training/mpo/objective.py)
    times: dict = field(default_factory=dict)  # seconds: forward_backward, optimizer


def packed_seq_params(batch) -> PackedSeqParams:
    cu = batch["cu_seqlens"].to(torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=int(batch["max_seqlen"]), max_seqlen_kv=int(batch["max_seqlen"]))


def sample_lengths(batch) -> list[int]:
    """Real sample lengths of a pack (the trailing padding segment excluded)."""
    cu = batch["cu_seqlens"].tolist()
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    real = int(batch["num_tokens"])
    out, seen = [], 0
    for length in lengths:
        if seen >= real:
            break
        out.append(length)
        seen += length
    return out


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _grads_finite(chunks) -> bool:
    """Whether every gradient on every rank is finite, with one host read.

    A buffer's sum is inf or nan exactly when one of its elements is (finite gradients would have
    to total beyond fp32's 3e38 to overflow it): one reduction per buffer, no temporary of the
    buffer's size (``isfinite(buffer)`` allocated one bool per gradient element), the sums added
    on the device, one all-reduce and one read."""
    sums = [buffer.grad_data.sum().float() for chunk in chunks
            for buffer in chunk.buffers + chunk.expert_parallel_buffers]
    total = torch.stack(sums).sum() if sums else torch.zeros((), device=compute_device())
    finite = torch.isfinite(total).to(torch.float32).reshape(1)
    torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return bool(finite.item())


def train_step(chunks, optimizer, scheduler, batches, *, dtype, num_datasets: int,
               inject_nan: bool = False, fused_loss: bool = False, mpo=None,
               fetch_pixels=None, prefetch: int = 1) -> StepResult:
    """Forward/backward over this rank's micro-batches, then one optimizer step.

    ``fused_loss``: the last stage hands its hidden states to the fused output-layer loss
    instead of materialising the logits (same loss, see :mod:`.loss`).
    ``mpo``: a :class:`.mpo.MpoObjective`: preference pairs, the MPO loss over the global batch's
    pairs (its reference log-probs are fetched first, a forward-only pass in ``model`` mode).
    ``fetch_pixels``: the loader's (``BroadcastLoader.fetch_pixels``) when ``batches`` came from
    its ``next_deferred``: tiles moved to the device as the schedule needs them, ``prefetch``
    micro-batches ahead. MPO's reference pass needs the whole step first: there they are staged."""
    n_micro = len(batches)
    device = compute_device()
    if fetch_pixels is not None and mpo is not None:  # the reference pass reads the whole step
        batches, fetch_pixels = [dict(b, pixel_values=fetch_pixels(b)) for b in batches], None
    feed = None
    if fetch_pixels is None:
        batches = [to_device(b, device) for b in batches]
    else:
        feed = MicroBatchFeed([dict(to_device({k: v for k, v in b.items() if k != "pixel_values"}, device),
                                    pixel_values=b["pixel_values"]) for b in batches], fetch_pixels, prefetch)
        batches = feed.batches
    local_w = torch.tensor(sum(float(b["loss_weights"].sum()) for b in batches), device=device)
    total_w = float(global_weight_sum(local_w))
    scale = backward_scale(n_micro)
    if mpo is not None:
        total_pairs = float(global_weight_sum(torch.tensor(float(sum(int(b["num_pairs"]) for b in batches)),
                                                           device=device)))
        mpo.prepare(batches)

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        pixels = normalize_pixels(b["pixel_values"], dtype)
        out = model(b["input_ids"], b["position_ids"], pixel_values=pixels,
                    packed_seq_params=packed_seq_params(b), output_hidden=fused_loss or mpo is not None,
                    image_slots=b.get("image_slots"))
        if mpo is not None:
            return out, mpo.loss_func(model, b, total_w=total_w, total_pairs=total_pairs, scale=scale,
                                      num_datasets=num_datasets)

        def loss_func(output):
            if fused_loss:
                language_model = get_attr_wrapped_model(model, "language_model")
                weighted, per_token = fused_weighted_token_loss(
                    language_model, output, b["labels"], b["loss_weights"])
            else:
                per_token = weighted_token_loss(output, b["labels"], b["loss_weights"])
                weighted = per_token.sum()
            if inject_nan:
                weighted = weighted * float("nan")
            by_ds, ds_w = dataset_sums(per_token, b["loss_weights"], b["token_dataset"], num_datasets)
            return weighted / max(total_w, 1e-12) * scale, {
                "loss": weighted.detach().double() / max(total_w, 1e-12), "ds": by_ds, "ds_w": ds_w}

        return out, loss_func

    t0 = time.monotonic()
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    seq_len = int(batches[0]["input_ids"].shape[1])
    fixed = ps.get_pipeline_model_parallel_world_size() > 1 and not chunks[0].config.variable_seq_lengths
    if fixed and any(int(b["input_ids"].shape[1]) != seq_len for b in batches):
        raise RuntimeError("this pipeline schedule needs micro-batches of one length; the packs "
                           f"have {sorted({int(b['input_ids'].shape[1]) for b in batches})}")
    data = [feed.iterator(c) if feed is not None else iter(batches) for c in range(len(chunks))]
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data[0] if len(chunks) == 1 else data,
        model=chunks,
        num_microbatches=n_micro,
        seq_length=seq_len,
        micro_batch_size=1,
        forward_only=False,
    )

    # Loss and per-dataset sums live on the last stage: reduce them to every rank.
    stats = torch.zeros(1 + 2 * num_datasets, dtype=torch.float64, device=device)
    if ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0:
        for o in outputs:
            stats[0] += o["loss"]
            stats[1 : 1 + num_datasets] += o["ds"]
            stats[1 + num_datasets :] += o["ds_w"]
        if ps.get_context_parallel_rank() != 0:
            stats.zero_()
    torch.distributed.all_reduce(stats)
    loss = float(stats[0])
    mpo_stats = mpo.reduce(outputs, total_pairs, device) if mpo is not None else {}

    t1 = time.monotonic()  # float(stats[0]) waited for the last stage's loss
    finite = math.isfinite(loss) and _grads_finite(chunks)
    grad_norm = None
    if finite:
        ok, grad_norm, _ = optimizer.step()
        finite = bool(ok) and grad_norm is not None and math.isfinite(grad_norm)
        if finite:
            scheduler.step(increment=1)
    times = {"forward_backward": t1 - t0, "optimizer": time.monotonic() - t1}
    tokens = torch.tensor([sum(int(b["num_tokens"]) for b in batches),
                           sum(int(b["pixel_values"].shape[0]) for b in batches)], dtype=torch.float64,
                          device=device)
    torch.distributed.all_reduce(tokens, group=ps.get_data_parallel_group(with_context_parallel=True))
    ds_loss = {}
    for i in range(num_datasets):
        w = float(stats[1 + num_datasets + i])
        if w > 0:
            ds_loss[i] = float(stats[1 + i]) / w
    shapes = StepShapes(sample_lengths=[l for b in batches for l in sample_lengths(b)],
                        tiles=sum(int(b["pixel_values"].shape[0]) for b in batches))
    return StepResult(loss=loss, grad_norm=None if grad_norm is None else float(grad_norm),
                      updated=finite, tokens=int(tokens[0]), tiles=int(tokens[1]),
                      dataset_loss=ds_loss, shapes=shapes, mpo=mpo_stats, times=times)
