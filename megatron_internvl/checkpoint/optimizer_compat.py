"""Workarounds in megatron-core 0.16.1's checkpointing of a plain ``torch.optim.Adam`` state.

Without Transformer Engine or apex (the CPU path; also any GPU install without them),
``megatron.core.optimizer.distrib_optimizer`` sets ``HAVE_APEX_OR_TE = False`` and
``get_megatron_optimizer`` builds ``torch.optim.Adam`` / ``AdamW`` instead of a fused Adam.
torch Adam keeps its iteration count as a per-parameter ``state[p]["step"]`` tensor, where the
fused optimizers keep it in the param groups, and megatron's ``DistributedOptimizer`` handles
that key in ways that break a ``fully_reshardable`` load (the format the training checkpoints use):

- :func:`prime_optimizer_state`, before ``sharded_state_dict(is_loading=True)``;
- :func:`skip_torch_adam_step_on_load`, before ``dist_checkpointing.load``;
- :func:`unshare_adam_steps`, after ``optimizer.load_state_dict``.

They apply only where megatron-core built torch Adam (:func:`torch_adam_in_use`): with TE's or
apex's FusedAdam (``HAVE_APEX_OR_TE``), the step lives in the param groups, megatron's own code
handles it, and a per-parameter ``step`` would be foreign state that the next save writes out.
Each is also a no-op where its problem does not arise (an optimizer that has stepped, a
non-distributed optimizer). Check them again when megatron-core is upgraded.
"""

from __future__ import annotations

import torch


def torch_adam_in_use() -> bool:
    """Whether megatron-core's distributed optimizer runs on torch Adam (no TE, no apex): the
    module-level choice it made at import (``distrib_optimizer.HAVE_APEX_OR_TE``)."""
    from megatron.core.optimizer import distrib_optimizer

    return not distrib_optimizer.HAVE_APEX_OR_TE


def adam_class_name() -> str:
    """The Adam class ``get_megatron_optimizer`` builds here (for logs and ``doctor``)."""
    import megatron.core.optimizer as mcore_optimizer

    if mcore_optimizer.USING_PYTORCH_OPTIMIZER:
        return "torch.optim.AdamW (torch.optim.Adam without decoupled weight decay): no TE, no apex"
    cls = mcore_optimizer.Adam
    return f"{cls.__module__}.{cls.__qualname__}"


def prime_optimizer_state(optimizer) -> None:
    """Give a fresh torch Adam a (zero) state with a ``step`` before loading into it.

    Without apex or TE, megatron's distributed optimizer reads ``step`` from the inner torch
    optimizer's state, which megatron's own state initialiser does not create, so loading into an
    optimizer that has not stepped yet fails on an assertion. (In 0.16.1:
    ``DistributedOptimizer.state_dict``, which ``sharded_state_dict(is_loading=True)`` calls,
    asserts that every ``state[p]["step"]`` has one common value; ``get_megatron_optimizer``'s
    ``init_state_fn`` creates only ``exp_avg`` and ``exp_avg_sq``.)
    """
    if not torch_adam_in_use():
        return
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if not st:
                    st["exp_avg"] = torch.zeros_like(p.data)
                    st["exp_avg_sq"] = torch.zeros_like(p.data)
                st.setdefault("step", torch.tensor(0.0))


def skip_torch_adam_step_on_load(optimizer) -> None:
    """megatron 0.16.1 without apex/TE keeps torch Adam's ``step`` inside the per-parameter state,
    but its fully-reshardable loader copies every state key from tensors that never contain
    ``step`` (it restores ``step`` from the param groups instead): skip that key.

    (In 0.16.1: ``load_parameter_state_from_fully_reshardable`` leaves ``step`` out of the tensors
    it passes to ``_set_main_param_and_optimizer_states``, which copies ``{"param", **state}`` key
    by key and so fails with a ``KeyError: 'step'``. Wrapped once per optimizer; the precision-aware
    optimizer path and a state without ``step`` go to megatron's own setter.)"""
    if not torch_adam_in_use():
        return
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        setter = getattr(opt, "_set_main_param_and_optimizer_states", None)
        if setter is None or getattr(setter, "_skips_step", False):
            continue

        def patched(model_param, tensors, _opt=opt):
            group_index, group_order = _opt.model_param_group_index_map[model_param]
            main_param = _opt.optimizer.param_groups[group_index]["params"][group_order]
            state = _opt.optimizer.state[main_param]
            if "step" in state and "step" not in tensors and not \
                    _opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
                main_param.detach().copy_(tensors["param"])
                for key, value in state.items():
                    if key != "step":
                        value.copy_(tensors[key])
                return
            return setter(model_param, tensors)

        patched._skips_step = True
        opt._set_main_param_and_optimizer_states = patched


def unshare_adam_steps(optimizer) -> None:
    """After a load, megatron (no apex/TE) gives every parameter the *same* ``step`` tensor, which
    torch Adam then increments in place once per parameter: give each its own copy.

    (In 0.16.1: ``DistributedOptimizer.load_state_dict`` assigns one ``torch.tensor(step)`` to
    every ``state[p]["step"]``; torch Adam's ``step += 1`` would then advance the step count by the
    number of parameters per optimizer step, changing the bias correction after a resume.)"""
    if not torch_adam_in_use():
        return
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for st in getattr(inner, "state", {}).values():
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].clone()
