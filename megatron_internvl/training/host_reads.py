"""Counting the reads that make the host wait for the device, during any piece of code.

A training step on a GPU runs ahead of the device until Python needs a value the device
computes: a scalar (``item()``, ``int()``, ``float()``, ``bool()``, ``tolist()``) or an output
whose size depends on values (``nonzero``, ``masked_select``, a boolean-mask index, ``unique``).
Each of those waits for every kernel queued before it. :class:`HostReads` counts them by
operator, seen at the dispatcher, so the same count comes out on CPU (where every tensor is host
memory: what is counted is what would wait on a GPU) and on CUDA (only reads of device tensors
are counted there). The tests count one training step on CPU; the GPU check counts it on CUDA.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Operators whose result the host must wait for (their inputs' values decide it).
_READS = frozenset({
    "aten::_local_scalar_dense",  # item(), int(), float(), bool() of a tensor
    "aten::nonzero", "aten::masked_select", "aten::is_nonzero", "aten::equal",
    "aten::_unique", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
})
_MASK_INDEXING = frozenset({"aten::index", "aten::index_put", "aten::index_put_"})
_COPIES = frozenset({"aten::_to_copy", "aten::copy_"})


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


class _Dispatch(TorchDispatchMode):
    def __init__(self, owner: "HostReads"):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.owner._see(func._schema.name, args, kwargs)
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    """``tolist()`` reads on the host without passing the dispatcher (CPU) or as a copy (CUDA)."""

    def __init__(self, owner: "HostReads"):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.tolist and args and self.owner._counted(args[0]):
            self.owner.counts["tolist"] += 1
            self.owner._inside_tolist += 1
            try:
                return func(*args, **(kwargs or {}))
            finally:
                self.owner._inside_tolist -= 1
        return func(*args, **(kwargs or {}))


class HostReads:
    """``with HostReads() as reads: ...`` then ``reads.total`` / ``reads.counts`` (by operator).

    ``ignore``: tensors known to live on the host whatever the device (torch Adam's step counts,
    which it reads once per parameter), not counted on CPU either."""

    def __init__(self, ignore=()):
        self.counts: Counter = Counter()
        self._ignore = {id(t) for t in ignore}
        self._inside_tolist = 0
        self._modes = []

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def _counted(self, tensor) -> bool:
        if id(tensor) in self._ignore:
            return False
        return tensor.device.type != "cpu" or not torch.cuda.is_available()

    def _see(self, name: str, args, kwargs) -> None:
        if self._inside_tolist or not args or not isinstance(args[0], torch.Tensor):
            return
        first = args[0]
        if name in _READS:
            hit = self._counted(first)
        elif name in _MASK_INDEXING:
            indices = args[1] if len(args) > 1 else ()
            hit = self._counted(first) and any(
                t.dtype in (torch.bool, torch.uint8) for t in _tensors(indices))
        elif name in _COPIES and torch.cuda.is_available():
            # A blocking copy from the device to the host.
            if name == "aten::_to_copy":
                target = kwargs.get("device")
                hit = (first.device.type == "cuda" and target is not None
                       and torch.device(target).type == "cpu" and not kwargs.get("non_blocking", False))
            else:
                src = args[1] if len(args) > 1 else None
                hit = (isinstance(src, torch.Tensor) and src.device.type == "cuda"
                       and first.device.type == "cpu" and not (args[2:] and args[2]))
        else:
            return
        if hit:
            self.counts[name] += 1

    def __enter__(self) -> "HostReads":
        self._modes = [_Dispatch(self), _Function(self)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self._modes = []


def optimizer_host_tensors(optimizer) -> list:
    """torch Adam's per-parameter step counts: host tensors even when training on CUDA (what
    :class:`HostReads` is told to ignore on CPU); none for TE's or apex's FusedAdam."""
    steps = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", opt)
        for state in inner.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                steps.append(state["step"])
    return steps
