"""Per-token loss weights (InternVL2.5 paper, section 3.4).

A supervised token of a sample with x supervised tokens gets w = 1 / x**p: p = 0 is token
averaging, p = 1 sample averaging, p = 0.5 square averaging (InternVL's default). The
training loss is sum(CE * w) / sum(w), with sum(w) all-reduced over data-parallel ranks and
micro-batches, so a sample's total weight is x**(1 - p) whatever the packing.
"""

from __future__ import annotations

import numpy as np

from .templates import IGNORE_INDEX

LOSS_REDUCTION_EXPONENT = {"token": 0.0, "sample": 1.0, "square": 0.5}


def reduction_exponent(loss_reduction: str | float) -> float:
    if isinstance(loss_reduction, (int, float)):
        return float(loss_reduction)
    if loss_reduction not in LOSS_REDUCTION_EXPONENT:
        raise ValueError(
            f"loss_reduction={loss_reduction!r} is not one of {sorted(LOSS_REDUCTION_EXPONENT)}"
        )
    return LOSS_REDUCTION_EXPONENT[loss_reduction]


def square_average_weights(labels: np.ndarray, loss_reduction: str | float = "square") -> np.ndarray:
    """float32 weights for one sample's (shifted) labels; 0 where the label is ignored."""
    p = reduction_exponent(loss_reduction)
    sup = labels != IGNORE_INDEX
    x = int(sup.sum())
    w = np.zeros(labels.shape, dtype=np.float32)
    if x:
        w[sup] = np.float32(1.0 / float(x) ** p)
    return w
