"""What the parallel layout asks of a packed sequence's length.

Sequence parallelism splits a pack over the TP ranks, context parallelism into 2 x CP chunks per
rank, FP8 GEMMs want multiples of 16, and the interleaved pipeline schedule runs fixed-length
packs (it cannot exchange shapes between stages; see `training/setup.py`). Training, the MPO
reference pass and the planner all pad packs by this one rule.
"""

from __future__ import annotations

import math

from megatron_internvl.config import Config, ConfigError


def pack_pad_multiple(config: Config) -> int:
    """The multiple every pack's length is padded to (under VPP: the fixed pack length)."""
    p = config.parallel
    need = 1
    if p.sequence_parallel:
        need = p.tensor_parallel
    if p.context_parallel > 1:
        need = math.lcm(need, 2 * p.context_parallel * p.tensor_parallel)
    if config.training.precision == "fp8":
        need = math.lcm(need, 16)
    if (p.virtual_pipeline_parallel or 1) > 1:
        if config.data.max_tokens % need:
            raise ConfigError(
                f"interleaved pipeline parallelism pads every pack to data.max_tokens="
                f"{config.data.max_tokens}, which must be a multiple of {need} (sequence/context "
                f"parallel, FP8): set data.max_tokens={config.data.max_tokens // need * need}")
        return config.data.max_tokens
    return math.lcm(need, config.data.pad_to_multiple)
