"""Rank the parallel layouts that fit a cluster by estimated step time.

Candidates: TP within a node (1, 2, 4, 8 where the heads divide), every PP that divides the
rest, VPP where the stage's layers split, recompute none/full, sequence parallelism
whenever TP > 1, EP (MoE LLMs) over the powers of two that divide the experts and the
ranks of a stage. Without VPP, the first stage's LLM layers (``parallel.first_stage_llm_layers``)
are chosen to balance the ViT: the split with the smallest slowest-stage time. Everything else
(batch, budgets, optimizer) stays as the recipe says. Context parallelism is left out: the
training step does not split packs over CP ranks yet.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron_internvl.config.schema import ConfigError

from .layout import Plan, balanced_first_stage_layers, make_plan
from .memory import Hardware


@dataclass
class Candidate:
    overrides: dict  # dotted field -> value, ready for the command line
    plan: Plan

    def override_args(self) -> str:
        return " ".join(f"{k}={'null' if v is None else str(v).lower() if isinstance(v, bool) else v}"
                        for k, v in self.overrides.items())


def with_layout(config, tp: int, pp: int, cp: int, vpp, first, recompute: str, ep: int = 1):
    parallel = dataclasses.replace(
        config.parallel, tensor_parallel=tp, pipeline_parallel=pp, context_parallel=cp,
        virtual_pipeline_parallel=vpp, first_stage_llm_layers=first, sequence_parallel=tp > 1,
        expert_parallel=ep)
    model = dataclasses.replace(config.model, recompute=recompute)
    return dataclasses.replace(config, parallel=parallel, model=model)


def search_layouts(config, nodes: int, gpus_per_node: int, hardware: Hardware | None = None,
                   recompute_options=("none", "full")) -> list[Candidate]:
    """Every fitting layout, fastest first (ties: lower peak memory)."""
    hardware = hardware or Hardware()
    world = nodes * gpus_per_node
    layers = config.model.language.num_layers
    found = []
    for tp in (1, 2, 4, 8):
        if tp > gpus_per_node:
            continue
        for cp in (1,):
            if world % (tp * cp):
                continue
            rest = world // (tp * cp)
            for pp in range(1, min(rest, layers) + 1):
                if rest % pp:
                    continue
                vpps = [None] + [v for v in (2, 3, 4, 6, 8)
                                 if pp > 1 and layers % pp == 0 and (layers // pp) % v == 0]
                # MoE: experts over EP ranks of the tensor x data-parallel groups.
                experts = getattr(config.model.language, "num_experts", 0)
                eps = [e for e in (1, 2, 4, 8, 16, 32, 64, 128)
                       if experts and experts % e == 0 and (world // pp) % e == 0] or [1]
                for vpp, ep, recompute in ((v, e, r) for v in vpps for e in eps for r in recompute_options):
                        trial = with_layout(config, tp, pp, cp, vpp, None, recompute, ep)
                        if pp > 1 and vpp is None:
                            trial = with_layout(config, tp, pp, cp, vpp,
                                                balanced_first_stage_layers(trial), recompute, ep)
                        try:
                            plan = make_plan(trial, nodes, gpus_per_node, hardware)
                        except ConfigError:
                            continue
                        if not plan.fits:
                            continue
                        q = trial.parallel
                        found.append(Candidate({
                            "parallel.tensor_parallel": tp, "parallel.pipeline_parallel": pp,
                            "parallel.virtual_pipeline_parallel": vpp,
                            "parallel.context_parallel": cp,
                            "parallel.sequence_parallel": tp > 1,
                            "parallel.expert_parallel": ep,
                            "parallel.first_stage_llm_layers": q.first_stage_llm_layers,
                            "model.recompute": recompute,
                        }, plan))
    found.sort(key=lambda c: (c.plan.step_seconds, c.plan.peak_bytes))
    return found
