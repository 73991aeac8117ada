"""Which FlashAttention implementation backs PyTorch's flash kernels: ``model.flash_attention``.

The local spec's packed attention is ``torch.nn.attention.varlen.varlen_attn`` and its ViT
attention SDPA's flash backend (``attention.py``). Both run FlashAttention 2 unless another
implementation is activated in the process: PyTorch >= 2.12 registers "FA3", which
``torch.nn.attention.activate_flash_attention_impl("FA3")`` routes them to. Its registration
imports the FlashAttention-3 kernels (module ``flash_attn_interface``, distribution
``flash-attn-3``, not on PyPI: see :data:`FA3_INSTALL`) and those kernels run on compute
capability 9.0 (Hopper) only.

| ``model.flash_attention`` | Hopper, torch lists FA3, kernels import | otherwise |
|---|---|---|
| ``auto`` (default) | FA3 activated | PyTorch's default (FA2), the reason logged |
| ``fa3`` | FA3 activated | :class:`FlashAttentionUnavailable` naming the fix (on CUDA) |
| ``default`` | PyTorch's default | PyTorch's default |

The Transformer Engine spec chooses its own kernels (TE uses FlashAttention-3 where
``flash-attn-3`` is installed): nothing is activated for it. The choice is made where a model is
built (:func:`apply_flash_attention`, once per process and value) and reported by
``megatron-internvl doctor`` (:func:`plan_flash_attention`, which changes nothing).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

import torch
from torch.nn import attention as torch_attention

from megatron_internvl.config.errors import InternVLError

logger = logging.getLogger(__name__)

CHOICES = ("auto", "fa3", "default")
FA3 = "FA3"
FA3_MODULE = "flash_attn_interface"  # what torch's FA3 registration imports
FA3_TORCH = "2.12"  # the first release whose registry lists FA3
FA3_INSTALL = (
    "install FlashAttention-3 built for this torch and CUDA: PyTorch's builds with `pip install "
    "flash-attn-3 --find-links https://download.pytorch.org/whl/flash-attn-3/`, or from source "
    "(a long nvcc build) with `pip install --no-build-isolation "
    "'git+https://github.com/Dao-AILab/flash-attention.git#subdirectory=hopper'`"
)
DEFAULT_NAME = "PyTorch default (FlashAttention 2)"


class FlashAttentionUnavailable(InternVLError):
    """``model.flash_attention=fa3`` where FA3 cannot run."""


@dataclass(frozen=True)
class FlashPlan:
    impl: str | None  # "FA3": activate it; None: PyTorch's default kernels
    reason: str

    def describe(self) -> str:
        return f"{self.impl or DEFAULT_NAME} ({self.reason})"


def cuda_capability() -> tuple[int, int] | None:
    """The current GPU's compute capability, None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability())


def registered_impls() -> list[str] | None:
    """torch's registered flash-attention implementations; None for a torch without the registry."""
    if not hasattr(torch_attention, "activate_flash_attention_impl"):
        return None
    return list(torch_attention.list_flash_attention_impls())


def active_impl() -> str | None:
    current = getattr(torch_attention, "current_flash_attention_impl", None)
    return current() if current else None


def fa3_kernels_error() -> str | None:
    """Why FA3's kernels cannot be registered (torch's own check: the module imports and defines
    ``torch.ops.flash_attn_3.fwd`` / ``bwd``), None when they can."""
    try:
        importlib.import_module(FA3_MODULE)
    except Exception as exc:  # a wheel for another torch / CUDA fails with OSError or undefined symbols
        return f"{FA3_MODULE} does not import ({type(exc).__name__}: {exc})"
    ops = torch.ops.flash_attn_3
    if not (hasattr(ops, "fwd") and hasattr(ops, "bwd")):
        return f"{FA3_MODULE} imports but defines no torch.ops.flash_attn_3 fwd/bwd kernels"
    return None


def choose(preference: str, te_spec: bool, capability: tuple | None, impls: list | None,
           kernels_error, torch_version: str | None = None) -> FlashPlan:
    """The decision table from the facts: the GPU's compute capability (None: no CUDA), torch's
    registered implementations (None: no registry), and ``kernels_error()``, called only when
    it matters, saying why FA3's kernels cannot load (None: they can). ``fa3`` where FA3 cannot
    run raises :class:`FlashAttentionUnavailable`."""
    if preference not in CHOICES:
        raise FlashAttentionUnavailable(f"model.flash_attention={preference!r}: use one of {', '.join(CHOICES)}")
    if preference == "default":
        return FlashPlan(None, "model.flash_attention=default")
    if te_spec:
        if preference == "fa3":
            raise FlashAttentionUnavailable(
                "model.flash_attention=fa3 applies to the local spec; Transformer Engine chooses its own "
                "attention (FlashAttention-3 where flash-attn-3 is installed): set model.spec=local, or "
                "model.flash_attention=auto")
        return FlashPlan(None, "Transformer Engine spec: TE chooses its own attention kernels")

    def unavailable(why: str, fix: str) -> FlashPlan:
        if preference == "fa3":
            raise FlashAttentionUnavailable(f"model.flash_attention=fa3 but {why}: {fix}; or set "
                                            f"model.flash_attention=auto")
        return FlashPlan(None, why)

    if capability is None:  # nothing runs flash kernels: fa3 too builds CPU models (tests, conversion)
        return FlashPlan(None, "no CUDA device")
    if capability[0] != 9:
        return unavailable(f"the GPU has compute capability {capability[0]}.{capability[1]}",
                           "FA3 runs on Hopper (9.0) only")
    if impls is None or FA3 not in impls:
        listed = "no flash-attention registry" if impls is None else f"a registry of {list(impls)}"
        return unavailable(f"torch {torch_version or torch.__version__} has {listed}, no FA3",
                           f"install torch >= {FA3_TORCH}, whose varlen_attn and SDPA can run on FA3")
    missing = kernels_error()
    if missing:
        return unavailable(f"FA3's kernels are missing ({missing})", FA3_INSTALL)
    return FlashPlan(FA3, f"Hopper GPU, torch lists FA3, {FA3_MODULE} imports")


def plan_flash_attention(preference: str = "auto", te_spec: bool = False) -> FlashPlan:
    """What :func:`apply_flash_attention` would activate on this machine, and why; changes nothing."""
    return choose(preference, te_spec, cuda_capability(), registered_impls(), fa3_kernels_error)


_APPLIED: dict[str, FlashPlan] = {}  # "preference/spec" -> what this process did for it


def apply_flash_attention(preference: str = "auto", te_spec: bool = False) -> FlashPlan:
    """Activate what :func:`plan_flash_attention` chooses; called by every model build, it
    decides and logs once per process and value (further builds reuse the decision)."""
    key = f"{preference}/{'te' if te_spec else 'local'}"
    if key in _APPLIED:
        return _APPLIED[key]
    plan = plan_flash_attention(preference, te_spec)
    if plan.impl and active_impl() != plan.impl:
        try:
            torch_attention.activate_flash_attention_impl(plan.impl)
        except (ImportError, OSError, RuntimeError, ValueError) as exc:
            if preference == "fa3":
                raise FlashAttentionUnavailable(
                    f"model.flash_attention=fa3: activating FA3 failed ({exc}): {FA3_INSTALL}") from exc
            plan = FlashPlan(None, f"activating FA3 failed: {exc}")
    elif plan.impl is None and preference == "default" and active_impl() is not None:
        torch_attention.restore_flash_attention_impl()
    capability = cuda_capability()
    if plan.impl is None and preference == "auto" and not te_spec and capability and capability[0] == 9:
        logger.warning("model.flash_attention=auto: %s on a Hopper GPU, where FA3 is faster: %s",
                       plan.describe(), FA3_INSTALL)
    else:
        logger.info("model.flash_attention=%s: %s", preference, plan.describe())
    _APPLIED[key] = plan
    return plan
