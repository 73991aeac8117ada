"""What the MoE layers did since the last logged step: the router's auxiliary losses and how evenly
each layer's experts were loaded.

The losses are megatron's own (its per-layer tracker, which the router fills and megatron's
``track_moe_metrics`` would read, but that one allocates on CUDA and writes its own TensorBoard
names). The load is counted here: a forward hook on every router adds the tokens it routed to each
expert, on the device (no host read per micro-batch). A layer's load is max / mean tokens per
expert over the window: 1.0 is perfectly even, ``num_experts / top_k`` is every token on the same k
experts. The ratio does not depend on how often a token was counted, so the counts are summed over
all ranks (TP ranks without sequence parallelism see the same tokens; PP ranks hold other layers).
Only forward passes that build a graph are counted: the validation pass and MPO's frozen reference
are not, and a fully recomputed layer counts once (its first forward runs without a graph).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.router import TopKRouter

from megatron_internvl.parallel.distributed import compute_device


def tracked_losses(language) -> list[str]:
    """The names megatron's router logs for this LLM's settings (config/schema.py)."""
    return (["load_balancing_loss"] if language.moe_aux_loss_coeff else []) + (
        ["z_loss"] if language.moe_z_loss_coeff else [])


class MoeMonitor:
    def __init__(self, chunks, language):
        self.num_layers, self.num_experts = language.num_layers, language.num_experts
        self.losses = tracked_losses(language)
        device = compute_device()
        self.counts = torch.zeros(self.num_layers, self.num_experts, dtype=torch.float64, device=device)
        self.calls = torch.zeros(self.num_layers, dtype=torch.float64, device=device)
        for chunk in chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    module.register_forward_hook(self._count)

    def _count(self, router, inputs, output) -> None:
        if not torch.is_grad_enabled():
            return
        routing_map = output[1]  # [tokens, experts], True where a token goes
        self.counts[router.layer_number - 1] += routing_map.sum(0)
        self.calls[router.layer_number - 1] += 1

    def read(self) -> dict:
        """The window's metrics (a collective: every rank calls it), then a fresh window."""
        tracker = moe_utils.get_moe_layer_wise_logging_tracker()
        for name in self.losses:  # ranks without MoE layers (a PP stage of no LLM layer) join too
            tracker.setdefault(name, {"values": torch.zeros(self.num_layers, device=self.counts.device),
                                      "reduce_group": None, "avg_group": None, "reduce_group_has_dp": False})
        moe_utils.reduce_aux_losses_tracker_across_ranks(self.losses)
        for name in self.losses:  # megatron leaves the z-loss rank-local: the mean over the replicas
            if tracker[name]["reduce_group"] is None and tracker[name]["avg_group"] is None:
                torch.distributed.all_reduce(tracker[name]["values"], op=torch.distributed.ReduceOp.AVG,
                                             group=ps.get_data_parallel_group(with_context_parallel=True))
        torch.distributed.all_reduce(self.counts)
        torch.distributed.all_reduce(self.calls, op=torch.distributed.ReduceOp.MAX)
        out = {}
        calls = self.calls.clamp(min=1)
        for name in self.losses:  # summed over the window's micro-batches: their mean per layer
            per_layer = tracker[name]["values"].double() / calls
            out[name] = float(per_layer.mean())
        mean = self.counts.mean(1)
        load = torch.where(mean > 0, self.counts.max(1).values / mean.clamp(min=1e-12), torch.ones_like(mean))
        out["load_max_over_mean"] = float(load.max())
        out.update({f"layer{i}_load_max_over_mean": float(v) for i, v in enumerate(load.tolist())})
        moe_utils.clear_aux_losses_tracker()
        self.counts.zero_()
        self.calls.zero_()
        return out
