"""Move whole ("full") tensors in and out of any TP x PP layout, generically.

megatron-core already describes, for every parameter of a model chunk, which slice of which
global tensor it holds: ``model.sharded_state_dict()`` yields ``ShardedTensor`` objects with the
global shape and offset (TP splits, the SwiGLU w/v halves, and the layer axis that pipeline
stages split). This module reads that description instead of re-deriving per-tensor rules, so the
same two functions serve weight initialisation in tests, the Hugging Face converters and the
parallel-equivalence checks.

Full tensors are named canonically: the stacked-layer key ``decoder.layers.mlp.linear_fc1.weight``
at layer 5 becomes ``decoder.layers.5.mlp.linear_fc1.weight``. Tensor layouts are those of a
TP=1 megatron model (fused QKV in megatron's grouped order, SwiGLU as [gate; up]).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory


def _flatten(obj) -> Iterator:
    if isinstance(obj, dict):
        for value in obj.values():
            yield from _flatten(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _flatten(value)
    elif isinstance(obj, ShardedTensorFactory):
        yield from _flatten(obj.build())
    else:
        yield obj


def canonical_name(sh: ShardedTensor) -> str:
    """Per-layer name of the full tensor a shard belongs to. MoE experts (megatron's
    ``...mlp.experts.experts.linear_fc1.weight`` stacked over layers and global experts) become
    ``...layers.L.mlp.experts.local_experts.E.linear_fc1.weight`` with the global expert E."""
    if sh.prepend_axis_num == 0:
        return sh.key
    if sh.prepend_axis_num == 2 and ".layers." in sh.key and ".experts.experts." in sh.key:
        head, tail = sh.key.split(".layers.", 1)
        tail = tail.replace(".experts.experts.", f".experts.local_experts.{sh.global_offset[1]}.", 1)
        return f"{head}.layers.{sh.global_offset[0]}.{tail}"
    if sh.prepend_axis_num != 1 or ".layers." not in sh.key:
        raise NotImplementedError(f"unexpected stacked shard {sh.key} ({sh.prepend_axis_num} axes)")
    head, tail = sh.key.split(".layers.", 1)
    return f"{head}.layers.{sh.global_offset[0]}.{tail}"


def _local_index(sh: ShardedTensor):
    n = sh.prepend_axis_num
    dims = sh.global_offset[n:]
    return tuple(slice(off, off + size) for off, size in zip(dims, sh.data.shape))


def full_shape(sh: ShardedTensor) -> tuple:
    return tuple(sh.global_shape[sh.prepend_axis_num :])


def iter_shards(model) -> Iterator[ShardedTensor]:
    """The ShardedTensors (parameters and buffers) of one model chunk."""
    for item in _flatten(model.sharded_state_dict()):
        if isinstance(item, ShardedTensor):
            if item.flattened_range is not None:
                raise NotImplementedError(f"{item.key}: flattened shards are optimizer state")
            yield item


@torch.no_grad()
def load_full_state_dict(model, get_full: Callable[[str, tuple], torch.Tensor]) -> set[str]:
    """Copy into ``model`` its slice of every full tensor; ``get_full(name, shape)`` supplies them.

    Returns the canonical names that were loaded. Shape mismatches raise with the tensor named.
    """
    loaded = set()
    for sh in iter_shards(model):
        name = canonical_name(sh)
        full = get_full(name, full_shape(sh))
        if tuple(full.shape) != full_shape(sh):
            raise ValueError(
                f"tensor {name}: expected shape {full_shape(sh)}, got {tuple(full.shape)}"
            )
        sh.data.copy_(full[_local_index(sh)])
        loaded.add(name)
    return loaded


def _main_replica(sh: ShardedTensor) -> bool:
    rid = sh.replica_id
    return all(r == 0 for r in rid) if isinstance(rid, tuple) else rid == 0


@torch.no_grad()
def gather_full_state_dict(models, select=None, group=None) -> dict[str, torch.Tensor]:
    """Assemble full tensors from all ranks (every rank gets the result).

    ``select(param) -> tensor`` picks what to gather for each parameter (default: the parameter
    itself; e.g. ``lambda p: p.main_grad`` gathers gradients). Meant for tests and small models:
    every rank receives every shard.
    """
    if not isinstance(models, (list, tuple)):
        models = [models]
    local = []
    for model in models:
        params = {id(p): p for p in model.parameters()}
        for item in _flatten_with_source(model.sharded_state_dict(), select, params):
            sh, tensor = item
            if _main_replica(sh):
                local.append((canonical_name(sh), full_shape(sh), _local_index(sh), tensor.cpu().clone()))
    gathered = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(gathered, local, group=group)
    out: dict[str, torch.Tensor] = {}
    for shards in gathered:
        for name, shape, index, tensor in shards:
            if name not in out:
                out[name] = torch.zeros(shape, dtype=tensor.dtype)
            out[name][index] = tensor
    return out


def _flatten_with_source(sharded, select, params):
    """Yield (ShardedTensor, tensor-to-gather) pairs, mapping factories through ``select``."""
    for obj in _flatten_raw(sharded):
        if isinstance(obj, ShardedTensorFactory):
            data = obj.data
            if select is not None and id(data) in params:
                data = select(data)
            built = obj.build_fn(obj.key, data, obj.replica_id, obj.flattened_range)
            for sh in _flatten(built):
                yield sh, sh.data
        elif isinstance(obj, ShardedTensor):
            data = obj.data
            if select is not None:
                if id(data) not in params:
                    continue  # buffers have no gradient
                data = select(data)
            yield obj, data


def _flatten_raw(obj):
    if isinstance(obj, dict):
        for value in obj.values():
            yield from _flatten_raw(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _flatten_raw(value)
    else:
        yield obj


def seeded_full_tensor(name: str, shape: tuple, seed: int = 0, scale: float = 0.02) -> torch.Tensor:
    """A deterministic full tensor that depends only on (name, shape, seed): identical weights
    for every parallel layout. Norm weights are drawn around 1."""
    import zlib

    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    t = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    if "norm" in name and name.endswith("weight"):
        t = t + 1.0
    return t.to(torch.float32)
