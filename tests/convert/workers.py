"""Rank-side code for the converter tests (spawned by tests/harness.py).

One spawn does many imports and forwards (each spawn costs ~7 s of imports per rank): every
import runs at its own TP x PP layout inside the same 4-rank world (the other ranks are
data-parallel replicas; dist_checkpointing writes each shard once), and every saved checkpoint
is loaded back at one or more layouts.
"""

from __future__ import annotations

import torch


def _layout_name(tp, pp, first=None, ep=1):
    return (f"TP={tp} PP={pp}" + (f" EP={ep}" if ep > 1 else "")
            + (f" (first stage {first} layers)" if first is not None else ""))


def import_and_forward(jobs: list[dict], batches: dict) -> dict:
    """jobs: dicts with hf_dir, ckpt (an existing empty directory), save=(tp, pp, first_stage[,
    ep]), loads=[(tp, pp[, ep]), ...] (MoE: experts split over ep ranks). Returns {(job name, load layout): {batch name: logits}} from the rank
    that holds the logits (last stage, TP rank 0, DP rank 0); other ranks return {}."""
    from megatron.core import parallel_state as ps

    from megatron_internvl.config import ParallelConfig
    from megatron_internvl.convert.checkpoint import build_chunk, load_weights
    from megatron_internvl.convert.forward import check_inputs, forward_logits
    from megatron_internvl.convert.importer import convert_on_rank, plan
    from megatron_internvl.parallel import distributed

    out = {}
    for job in jobs:
        tp, pp, first, *ep = job["save"]
        hf, import_job, _ = plan(job["hf_dir"], tp, pp, first, ep=ep[0] if ep else 1)
        import_job.out_dir = job["ckpt"]
        convert_on_rank(import_job)
        for ltp, lpp, *lep in job["loads"]:
            lep = lep[0] if lep else 1
            parallel = ParallelConfig(tensor_parallel=ltp, pipeline_parallel=lpp, expert_parallel=lep)
            distributed.initialize(parallel)
            model = build_chunk(hf.model, parallel, "fp32")
            load_weights(model, job["ckpt"])
            logits = {
                name: forward_logits(model, check_inputs(batch, hf.model), hf.model)
                for name, batch in batches.items()
            }
            holder = (
                ps.is_pipeline_last_stage()
                and ps.get_tensor_model_parallel_rank() == 0
                and ps.get_data_parallel_rank() == 0
            )
            if holder:
                out[(job["name"], _layout_name(ltp, lpp, ep=lep))] = logits
            torch.distributed.barrier()
    return out
