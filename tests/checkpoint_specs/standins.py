"""CPU stand-ins for the two Transformer Engine contracts a checkpoint meets on GPU nodes.

- **Extra state.** TE's linears and attention override ``get_extra_state`` / ``set_extra_state``:
  their FP8 scaling metadata travels as a serialized uint8 tensor, so megatron's sharded state dict
  carries a ``ShardedObject`` ``..._extra_state`` per module, and ``set_extra_state(None)`` (or an
  empty tensor) means "nothing to restore". :func:`use_te_extra_state` makes the local spec's
  linears and core attention do the same, with a metadata tensor that changes at every training
  forward (like an amax history), so a checkpoint of the stand-in spec holds real FP8-like state.
  The local spec's attention has no extra state at all, and megatron's local linears store
  ``None``: exactly the differences between the two specs' checkpoints.
- **FusedAdam.** TE's (and apex's) FusedAdam keeps ``exp_avg`` / ``exp_avg_sq`` per parameter and
  the step count in each param group; megatron-core takes its ``HAVE_APEX_OR_TE`` branches for
  it. :func:`use_fused_adam` installs :class:`FusedAdam` (the same AdamW arithmetic as torch's
  single-tensor AdamW) where megatron-core looks for TE's class.

Both patch module attributes, so they act in the process that calls them (the training wrapper
:mod:`train_with_standins` or a spawned worker) and in nothing else.
"""

from __future__ import annotations

import collections
import io

import torch

# What set_extra_state received, per kind: "none" (the checkpoint had no extra state, or megatron's
# local None), "empty", "fp8" (the stand-in's metadata).
RESTORED: collections.Counter = collections.Counter()


def _encode(meta: torch.Tensor) -> torch.Tensor:
    buf = io.BytesIO()
    torch.save({"fp8_meta": meta.clone()}, buf)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


class TEExtraState:
    """TE's extra-state contract (mixed in before a module class)."""

    def _init_extra_state(self) -> None:
        # [forward count, amax of the last input]: changes with training, as TE's amax history does.
        self.fp8_meta = torch.zeros(2, dtype=torch.float64)

    def _record_forward(self, x) -> None:
        if self.training and isinstance(x, torch.Tensor):
            self.fp8_meta[0] += 1
            self.fp8_meta[1] = float(x.detach().abs().max())

    def get_extra_state(self):
        return _encode(self.fp8_meta)

    def set_extra_state(self, state) -> None:
        if state is None:
            RESTORED["none"] += 1
            return
        if isinstance(state, torch.Tensor) and state.numel() == 0:
            RESTORED["empty"] += 1
            return
        data = state.detach().cpu().numpy().tobytes() if isinstance(state, torch.Tensor) else state.getvalue()
        self.fp8_meta = torch.load(io.BytesIO(data))["fp8_meta"]
        RESTORED["fp8"] += 1


def _with_extra_state(base):
    class Module(TEExtraState, base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._init_extra_state()

        def forward(self, *args, **kwargs):
            self._record_forward(args[0] if args else None)
            return super().forward(*args, **kwargs)

    Module.__name__ = Module.__qualname__ = f"TEStandIn{base.__name__}"
    return Module


def use_te_extra_state() -> None:
    """Build the local spec from modules with TE's extra-state contract (linears, attention)."""
    from megatron_internvl.models import specs

    for name in ("ColumnParallelLinear", "RowParallelLinear", "ColumnParallelLinearNoBias", "CoreAttention"):
        setattr(specs, name, _with_extra_state(getattr(specs, name)))


def fp8_meta_of(model) -> dict[str, torch.Tensor]:
    return {name: m.fp8_meta.clone() for name, m in model.named_modules() if isinstance(m, TEExtraState)}


class FusedAdam(torch.optim.Optimizer):
    """TE FusedAdam's interface and state layout on CPU: ``exp_avg`` / ``exp_avg_sq`` per
    parameter, ``step`` an int in each param group (counted only for groups with parameters);
    ``adam_w_mode`` decoupled weight decay. The arithmetic is torch's single-tensor AdamW."""

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8,
                 adam_w_mode=True, weight_decay=0.0, **unused):
        if not bias_correction or not adam_w_mode:
            raise NotImplementedError("the stand-in implements megatron's configuration only")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if not group["params"]:
                continue
            group["step"] = group.get("step", 0) + 1
            step, (beta1, beta2), lr = group["step"], group["betas"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                p.mul_(1 - lr * group["weight_decay"])
                state["exp_avg"].lerp_(p.grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad.conj(), value=1 - beta2)
                denom = (state["exp_avg_sq"].sqrt() / (1 - beta2**step) ** 0.5).add_(group["eps"])
                p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**step))


def use_fused_adam() -> None:
    """Make megatron-core build :class:`FusedAdam` and take its TE-optimizer branches."""
    import megatron.core.optimizer as mcore_optimizer
    from megatron.core.optimizer import distrib_optimizer

    mcore_optimizer.Adam = FusedAdam
    mcore_optimizer.USING_PYTORCH_OPTIMIZER = False
    distrib_optimizer.Adam = FusedAdam
    distrib_optimizer.HAVE_APEX_OR_TE = True
    distrib_optimizer.USING_TE_OPTIMIZER = True


def install(names) -> None:
    for name in names:
        {"te_extra_state": use_te_extra_state, "fused_adam": use_fused_adam}[name]()
