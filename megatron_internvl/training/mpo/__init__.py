"""Mixed Preference Optimization: the objective (`objective.py`: DPO + BCO + SFT per pair, the
reward shift, the step's loss) and its frozen reference (`reference.py`: a reference model in the
step, or a table of log-probs precomputed by `megatron-internvl mpo-reference`). docs/mpo.md."""

from .objective import MpoObjective, MpoTerms, RewardShift, mpo_loss, pair_sums
from .reference import ReferenceTableError, TableReference, build_reference, precompute

__all__ = ["MpoObjective", "MpoTerms", "ReferenceTableError", "RewardShift", "TableReference",
           "build_reference", "mpo_loss", "pair_sums", "precompute"]
