"""Initial weights that do not depend on the parallel layout.

megatron draws each full weight matrix on every rank (``use_cpu_initialization``) and keeps the
rank's slice, so tensor parallelism already gives the same weights as one process. Pipeline
parallelism does not: each stage builds only its own layers, so a stage's random stream depends
on what was built before it. Every independently placed piece (each transformer layer, the
output layer, the vision tower, the projector) is therefore built inside its own RNG scope seeded
from the run's seed and the piece's name: the same seed trains the same model in every layout.
"""

from __future__ import annotations

import contextlib
import zlib

import torch


@contextlib.contextmanager
def init_rng_scope(name: str):
    """Run the block with the CPU generator seeded from (current seed, name); restore it after."""
    seed = (torch.initial_seed() * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def seeded_layer_spec(spec):
    """The same layer spec, with each layer built in its own scope (keyed by its global number)."""
    from dataclasses import replace

    base = spec.module
    if getattr(base, "_seeded", False):
        return spec

    def __init__(self, config, submodules, layer_number: int = 1, *args, **kwargs):
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

        # megatron passes the stage-local number; the key needs the global one.
        offset = get_transformer_layer_offset(config, kwargs.get("vp_stage"),
                                              ps.get_pipeline_model_parallel_rank())
        key = f"{base.__name__}.{config.hidden_size}.{config.num_layers}.{layer_number + offset}"
        with init_rng_scope(key):
            base.__init__(self, config, submodules, layer_number, *args, **kwargs)

    seeded = type(base.__name__, (base,), {"__init__": __init__, "_seeded": True,
                                           "__module__": base.__module__})
    return replace(spec, module=seeded)


@torch.no_grad()
def redraw_column_parallel_weight(layer, name: str, std: float, rows: int | None = None) -> None:
    """Draw the full [out, in] weight of a column-parallel linear in its own scope and keep this
    TP rank's rows (``rows`` real output rows; the padded rest is zero)."""
    from megatron.core import parallel_state as ps

    weight = layer.weight
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    out_full = weight.shape[0] * tp
    with init_rng_scope(name):
        full = torch.empty(out_full, weight.shape[1], dtype=torch.float32).normal_(0.0, std)
    if rows is not None:
        full[rows:] = 0
    weight.copy_(full[rank * weight.shape[0] : (rank + 1) * weight.shape[0]].to(weight.dtype))
