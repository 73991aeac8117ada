"""Mixed Preference Optimization (InternVL2.5-MPO / InternVL3): DPO + BCO + SFT on preference pairs.

``L = w_dpo * DPO(sigmoid) + w_bco * BCO(pair) + w_sft * SFT(chosen)``, per pair, from the summed
log-probabilities of each response (prompt and image tokens excluded) under the policy and the
frozen reference. :func:`mpo_loss` is the whole formula as one pure function.

In a training step (:class:`MpoObjective`):
- the pair terms are averaged over every pair of the global batch (all micro-batches, all
  data-parallel ranks); the SFT term is ``sum(CE * w) / W`` over the chosen responses' tokens, as
  the SFT loss is (token mean by default, ``mpo.sft_reduction``). Each pair's share of it is
  handed to :func:`mpo_loss` as ``sft_nll`` so that the mean over pairs is that global mean;
- BCO's reward shift ``delta`` is the running mean of the micro-batches' mean rewards (chosen and
  rejected together, TRL's RunningMoments). Every micro-batch of a step uses the value from
  before the step; after the step, the mean rewards of all its micro-batches (every
  data-parallel rank) are folded in at once, from the sums the step reduces anyway. So nothing
  inside the schedule's per-micro-batch path communicates or reads back to the host, and a
  step's delta does not depend on how its micro-batches are spread over data-parallel ranks.
  It is part of the training state: saved in checkpoints and restored;
- reward accuracy counts a pair as correct when its chosen reward is strictly above its rejected
  one: a tie (the reference equal to the policy, at step 0) is not correct.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F


class MpoTerms(NamedTuple):
    """Per-pair values [pairs]: the weighted total and each unweighted term."""

    total: torch.Tensor
    dpo: torch.Tensor
    bco: torch.Tensor
    sft: torch.Tensor


def mpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, sft_nll, delta,
             beta: float = 0.1, weights=(0.8, 0.2, 1.0), label_smoothing: float = 0.0) -> MpoTerms:
    """The MPO loss of each pair from summed response log-probs [pairs] and the SFT NLL [pairs].

    DPO (sigmoid, conservative label smoothing ``eps``):
        ``-(1 - eps) logsigmoid(beta h) - eps logsigmoid(-beta h)``, ``h = (pc - rc) - (pr - rr)``;
    BCO (pair): ``-logsigmoid(beta (pc - rc) - delta) - logsigmoid(-(beta (pr - rr) - delta))``.
    """
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    logits = beta * (chosen_ratio - rejected_ratio)
    dpo = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    bco = -F.logsigmoid(beta * chosen_ratio - delta) - F.logsigmoid(-(beta * rejected_ratio - delta))
    w_dpo, w_bco, w_sft = weights
    return MpoTerms(w_dpo * dpo + w_bco * bco + w_sft * sft_nll, dpo, bco, sft_nll)


@dataclass
class RewardShift:
    """BCO's ``delta``: the running mean of every micro-batch's mean reward seen so far."""

    mean: float = 0.0
    count: float = 0.0

    def update(self, batch_mean_sum: float, n: int) -> float:
        """Fold in ``n`` micro-batch mean rewards that sum to ``batch_mean_sum``; returns delta."""
        total = self.count + n
        self.mean += (batch_mean_sum / n - self.mean) * (n / total)
        self.count = total
        return self.mean

    def state_dict(self) -> dict:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.count = float(state["mean"]), float(state["count"])


def pair_sums(token_values: torch.Tensor, batch) -> torch.Tensor:
    """Per-token values [1, S] -> [pairs, 2] sums over each pair's chosen / rejected response."""
    side, pair = batch["response_side"][0], batch["response_pair"][0]
    keep = side >= 0
    n = int(batch["num_pairs"])
    out = torch.zeros(2 * n, dtype=token_values.dtype, device=token_values.device)
    if n == 0:
        return out.view(0, 2)
    # Tokens outside the responses add 0 to slot 0 (a boolean selection would read its size back).
    slot = torch.where(keep, 2 * pair + side, torch.zeros_like(pair))
    values = torch.where(keep, token_values[0], torch.zeros_like(token_values[0]))
    out = out.index_add(0, slot, values)
    return out.view(n, 2)


# Sums a micro-batch reports (divided by the global number of pairs after the step), then the
# micro-batch's mean reward and a count of 1 (folded into delta after the step).
STAT_NAMES = ("dpo", "bco", "sft", "reward_chosen", "reward_rejected", "reward_accuracy")


class MpoObjective:
    """The MPO loss inside the training step; holds delta and the reference log-probs' source.

    ``reference``: an object with ``log_probs(batches) -> list[[pairs, 2] tensor] | None`` (the
    frozen model run forward-only, or the precomputed table; :mod:`.reference`).
    """

    def __init__(self, mpo_config, reference):
        self.cfg = mpo_config
        self.reference = reference
        self.delta = RewardShift()

    def prepare(self, batches) -> None:
        """Attach each micro-batch's reference log-probs (needed on the last stage only)."""
        refs = self.reference.log_probs(batches)
        if refs is not None:
            for b, r in zip(batches, refs):
                b["reference_log_probs"] = r

    def loss_func(self, model, b, *, total_w: float, total_pairs: float, scale: float, num_datasets: int):
        from megatron.core.utils import get_attr_wrapped_model

        from ..loss import token_log_probs

        cfg = self.cfg
        delta = self.delta.mean  # the value from before this step, for every micro-batch

        def fn(hidden):
            language_model = get_attr_wrapped_model(model, "language_model")
            logp = token_log_probs(language_model, hidden, b["labels"], b["response_side"] >= 0)
            policy = pair_sums(logp, b)
            ref = b["reference_log_probs"].to(policy.dtype)
            with torch.no_grad():
                rewards = cfg.beta * (policy.detach() - ref)  # [pairs, (chosen, rejected)]
            weighted_ce = -logp * b["loss_weights"]
            sft = pair_sums(weighted_ce, b)[:, 0] * (total_pairs / max(total_w, 1e-12))
            terms = mpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], sft,
                             delta,
                             beta=cfg.beta, weights=tuple(cfg.weights), label_smoothing=cfg.label_smoothing)
            loss = terms.total.sum() / total_pairs
            stats = torch.stack([terms.dpo.sum(), terms.bco.sum(), terms.sft.sum(),
                                 rewards[:, 0].sum(), rewards[:, 1].sum(),
                                 (rewards[:, 0] > rewards[:, 1]).sum()]).detach().double()
            if rewards.numel():
                stats = torch.cat([stats, rewards.double().mean().reshape(1), stats.new_ones(1)])
            else:  # no pair in this micro-batch: nothing for delta
                stats = torch.cat([stats, stats.new_zeros(2)])
            by_ds = torch.zeros(num_datasets, dtype=torch.float64, device=logp.device)
            ds_w = torch.zeros(num_datasets, dtype=torch.float64, device=logp.device)
            ds = b["token_dataset"][0]
            valid = ds >= 0
            slot = torch.where(valid, ds, torch.zeros_like(ds))
            zero = torch.zeros((), dtype=torch.float64, device=logp.device)
            by_ds.index_add_(0, slot, torch.where(valid, weighted_ce[0].detach().double(), zero))
            ds_w.index_add_(0, slot, torch.where(valid, b["loss_weights"][0].double(), zero))
            return loss * scale, {"loss": loss.detach().double(), "ds": by_ds, "ds_w": ds_w, "mpo": stats}

        return fn

    def reduce(self, outputs, total_pairs: float, device) -> dict:
        """The step's MPO metrics on every rank (outputs live on the last stage), and delta
        updated with the step's micro-batch mean rewards: the same sums on every rank, so every
        rank keeps (and saves) the same state."""
        from megatron.core import parallel_state as ps

        sums = torch.zeros(len(STAT_NAMES) + 2, dtype=torch.float64, device=device)
        if ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0:
            for o in outputs:
                sums += o["mpo"]
        torch.distributed.all_reduce(sums)
        values = sums.tolist()
        mean_rewards, micro_batches = values[-2], values[-1]
        if micro_batches:
            self.delta.update(mean_rewards, micro_batches)
        out = {name: v / total_pairs for name, v in zip(STAT_NAMES, values)}
        out["reward_margin"] = out["reward_chosen"] - out["reward_rejected"]
        out["delta"] = self.delta.mean
        return out

    def state_dict(self) -> dict:
        return {"delta": self.delta.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.delta.load_state_dict(state["delta"])
