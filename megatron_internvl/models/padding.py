"""Padding that tensor parallelism needs, kept out of checkpoints.

Two sizes in InternVL do not divide every tensor-parallel size:
- the LLM vocabulary (151674 for Qwen2.5): embedding and output layer are padded to a multiple
  of ``make_vocab_size_divisible_by * TP`` rows; padded logits are set to -inf;
- InternViT-6B's 25 attention heads: padded to a multiple of TP with dummy heads whose q/k/v rows
  and output-projection columns are zero (so they contribute nothing and get zero gradients).

The padding sits at the end of its axis (the last vocab rows, the last heads), and depends on TP.
Checkpoints and the canonical full tensors of :mod:`megatron_internvl.parallel.sharding` hold
only the real rows: :func:`trim_padding` turns a module's ShardedTensor into a
ShardedTensorFactory whose shards cover the real part of the global tensor (an irregular grid,
which dist_checkpointing accepts) and whose merge re-pads with zeros on load. So a checkpoint
saved at TP=2 loads at TP=8, and converters never see padding.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory


def padded_vocab_size(vocab_size: int, tensor_parallel: int, divisible_by: int = 128) -> int:
    """Rows of the embedding / output layer inside the model (megatron's rule)."""
    multiple = divisible_by * tensor_parallel
    return -(-vocab_size // multiple) * multiple


def padded_num_heads(num_heads: int, tensor_parallel: int) -> int:
    """Attention heads inside the ViT: the next multiple of TP (25 -> 26, 28, 32 at TP 2, 4, 8)."""
    return -(-num_heads // tensor_parallel) * tensor_parallel


def trim_padding(sh: ShardedTensor, axis: int, real_size: int) -> ShardedTensorFactory:
    """Describe only the first ``real_size`` entries of the global tensor along ``axis``.

    ``axis`` counts the local tensor's dimensions. Ranks whose slice is all padding write
    nothing (they read a scratch copy of one real row, discarded); on load padding is zeros. megatron's uneven-shard path cannot take
    a stacked layer axis, so a per-layer tensor gets its own per-layer key instead
    (``...layers.<global layer>.<rest>``, the canonical name).
    """
    n = sh.prepend_axis_num
    if n > 1:
        raise NotImplementedError(f"{sh.key}: {n} stacked axes")
    offset = sh.global_offset[n + axis]
    local = sh.local_shape[axis]
    keep = max(0, min(local, real_size - offset))
    global_shape = list(sh.global_shape[n:])
    global_shape[axis] = real_size
    global_offset = tuple(sh.global_offset[n:])
    layer = sh.global_offset[0] if n else None
    local_shape = tuple(sh.local_shape)

    def build(key, data, replica_id, flattened_range):
        if flattened_range is not None:
            raise NotImplementedError(f"{key}: flattened (padded) shards are not supported")
        if layer is not None:
            if ".layers." not in key:
                raise NotImplementedError(f"{key}: stacked axis outside a layer stack")
            head, tail = key.split(".layers.", 1)
            key = f"{head}.layers.{layer}.{tail}"
        offsets = global_offset
        if keep:
            part = data.narrow(axis, 0, keep)
        else:
            # All padding here. An empty sub-state-dict would vanish from the loaded state and
            # break the merge, so this rank reads (never writes: not a main replica) a scratch
            # copy of the last real row, which the merge discards.
            part = data.narrow(axis, 0, 1).detach().clone()
            offsets = list(global_offset)
            offsets[axis] = real_size - 1
            offsets = tuple(offsets)
            replica_id = (1,) + tuple(replica_id[1:]) if isinstance(replica_id, tuple) else 1
        out = dataclasses.replace(
            sh, key=key, data=part, dtype=part.dtype, local_shape=tuple(part.shape),
            global_shape=tuple(global_shape), global_offset=offsets,
            axis_fragmentations=None, replica_id=replica_id, prepend_axis_num=0,
            allow_shape_mismatch=False,
        )
        out.validate_metadata_integrity()
        return out

    def merge(loaded: torch.Tensor) -> torch.Tensor:
        if keep == local:
            return loaded
        full = torch.zeros(local_shape, dtype=loaded.dtype, device=loaded.device)
        if keep:
            full.narrow(axis, 0, keep).copy_(loaded)
        return full

    return ShardedTensorFactory(sh.key, sh.data, build, merge, sh.replica_id)


def trim_entries(sharded_state_dict: dict, suffix_axes: dict[str, int], real_size: int) -> None:
    """Apply :func:`trim_padding` in place to the entries whose dict key ends with a suffix."""
    for key, value in list(sharded_state_dict.items()):
        if not isinstance(value, ShardedTensor):
            continue
        for suffix, axis in suffix_axes.items():
            if key.endswith(suffix):
                sharded_state_dict[key] = trim_padding(value, axis, real_size)
                break
