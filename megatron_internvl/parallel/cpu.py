"""Run megatron-core on CPU processes (gloo) when the machine has no CUDA device.

megatron-core 0.16.1 assumes CUDA in about 190 places. Our CI and development machines have no
GPU, yet every parallel layout (TP, PP, DP, distributed optimizer, distributed checkpoints) must
be tested there. This module redirects the CUDA assumptions to CPU equivalents, so the *same*
megatron-core code paths run on gloo CPU ranks:

1. ``_CudaToCpu`` (a ``torch.overrides.TorchFunctionMode``) rewrites ``device="cuda"``,
   ``"cuda:N"``, ``torch.device("cuda", N)`` and bare integer devices (what
   ``torch.cuda.current_device()`` returns) to CPU in every torch call; makes ``Tensor.cuda()``,
   ``pin_memory()`` and ``record_stream()`` no-ops. Function modes are not active inside
   autograd's backward, where megatron also allocates (sequence-parallel reduce-scatter), so the
   tensor factories and those Tensor methods are patched directly as well.
2. ``torch.cuda.*`` device, stream, event, memory and RNG functions are replaced by CPU
   equivalents or no-ops. The "CUDA" RNG is the CPU default generator, so megatron's
   model-parallel RNG tracker (``get_cuda_rng_tracker().fork()``) really forks the generator that
   CPU dropout and weight initialisation draw from: per-TP-rank initialisation stays correct.
3. pipeline point-to-point messages are tagged by direction (gloo matches untagged messages
   from one peer in posting order, which swaps activations and gradients when the previous
   and next stage are the same process, as in the interleaved schedule with PP=2);
4. ``Tensor.type()`` without arguments reports ``torch.cuda.<Kind>Tensor`` for CPU tensors,
   because megatron's (distributed) optimizer and gradient clipping refuse parameters whose type
   string is not a CUDA one.

It is installed once per process by :func:`megatron_internvl.parallel.distributed.initialize`
(never by user code) and is a no-op when CUDA is available: on GPU machines nothing is patched.
What it does not cover, the project replaces through its layer specs instead: megatron's local
``DotProductAttention`` (CUDA memory buffer) and ``RotaryEmbedding`` (current CUDA device).
"""

from __future__ import annotations

import contextlib
import logging
import types

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False
_MODE: TorchFunctionMode | None = None

_CPU = torch.device("cpu")


def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


def _to_cpu_device(device):
    return _CPU if _is_cuda_device(device) else device


class _CudaToCpu(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU for every torch function call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if name == "cuda" and args and isinstance(args[0], torch.Tensor):
            return args[0]
        if name in ("pin_memory", "record_stream") and args and isinstance(args[0], torch.Tensor):
            return args[0] if name == "pin_memory" else None
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if name == "to" and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        return func(*args, **kwargs)


class _FakeEvent:
    def __init__(self, *args, **kwargs):
        import time

        self._time = time
        self._t = None

    def record(self, stream=None):
        self._t = self._time.perf_counter()

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, end):
        if self._t is None or end._t is None:
            return 0.0
        return (end._t - self._t) * 1000.0


class _FakeStream:
    def __init__(self, *args, **kwargs):
        self.device = _CPU
        self.cuda_stream = 0

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        event = event or _FakeEvent()
        event.record()
        return event

    def synchronize(self):
        pass

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_DEFAULT_STREAM = _FakeStream()


def _current_memory() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except Exception:  # psutil is a dependency; tolerate a broken install in diagnostics only
        return 0


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    patches = {
        "current_device": lambda: 0,
        "set_device": lambda device: None,
        "synchronize": lambda device=None: None,
        "device_count": lambda: 1,
        "Stream": _FakeStream,
        "ExternalStream": _FakeStream,
        "Event": _FakeEvent,
        "current_stream": lambda device=None: _DEFAULT_STREAM,
        "default_stream": lambda device=None: _DEFAULT_STREAM,
        "set_stream": lambda stream: None,
        "stream": lambda stream=None: contextlib.nullcontext(),
        "empty_cache": lambda: None,
        "memory_allocated": lambda device=None: _current_memory(),
        "max_memory_allocated": lambda device=None: _current_memory(),
        "memory_reserved": lambda device=None: _current_memory(),
        "max_memory_reserved": lambda device=None: _current_memory(),
        "reset_peak_memory_stats": lambda device=None: None,
        "memory_stats": lambda device=None: {},
        "is_current_stream_capturing": lambda: False,
        "get_device_capability": lambda device=None: (0, 0),
        "get_device_name": lambda device=None: "cpu",
        "get_rng_state": lambda device="cuda": torch.get_rng_state(),
        "set_rng_state": lambda state, device="cuda": torch.set_rng_state(state),
        "manual_seed": lambda seed: torch.default_generator.manual_seed(int(seed)),
        "manual_seed_all": lambda seed: None,  # torch.manual_seed calls it: seeds CPU already
    }
    for name, fn in patches.items():
        setattr(cuda, name, fn)
    cuda.random.get_rng_state = patches["get_rng_state"]
    cuda.random.set_rng_state = patches["set_rng_state"]
    cuda.nvtx = types.SimpleNamespace(
        range_push=lambda *a, **k: None,
        range_pop=lambda *a, **k: None,
        range=lambda *a, **k: contextlib.nullcontext(),
        mark=lambda *a, **k: None,
    )


def _patch_tensor_type() -> None:
    original = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original(self)
            if name.startswith("torch.") and not name.startswith("torch.cuda."):
                return "torch.cuda." + name[len("torch.") :]
            return name
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_


def _patch_megatron_rng() -> None:
    """megatron's tracker reads/writes CUDA generator state through private helpers."""
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: (
        torch.get_rng_state()
    )
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: (
        torch.set_rng_state(new_state)
    )

    class _QuietTrackerWarning(logging.Filter):
        # Inside fork() CPU ops legitimately advance the (shared) generator.
        def filter(self, record):
            return "CPU RNG state changed within GPU RNG context" not in record.getMessage()

    logging.getLogger(mrandom.__name__).addFilter(_QuietTrackerWarning())


_FACTORIES = (
    "empty", "zeros", "ones", "full", "arange", "tensor", "as_tensor", "rand", "randn", "randint",
    "randperm", "empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like",
    "empty_strided", "linspace", "eye",
)


def _patch_factories() -> None:
    """The function mode is not active inside autograd's backward (e.g. megatron's
    sequence-parallel reduce-scatter allocates with ``device=current_device()`` there), so the
    tensor factories and the CUDA-moving Tensor methods are also patched directly."""

    def wrap(fn):
        def factory(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _to_cpu_device(kwargs["device"])
            if kwargs.get("pin_memory"):
                kwargs["pin_memory"] = False
            return fn(*args, **kwargs)

        factory.__name__ = getattr(fn, "__name__", "factory")
        factory.__doc__ = fn.__doc__
        return factory

    for name in _FACTORIES:
        setattr(torch, name, wrap(getattr(torch, name)))

    original_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        if args and _is_cuda_device(args[0]):
            args = (_CPU,) + tuple(args[1:])
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        return original_to(self, *args, **kwargs)

    torch.Tensor.to = to
    # megatron's all-to-all (MoE dispatch) allocates with new_empty(device=current_device()),
    # also inside backward.
    original_new_empty = torch.Tensor.new_empty

    def new_empty(self, *args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        return original_new_empty(self, *args, **kwargs)

    torch.Tensor.new_empty = new_empty
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
    torch.Tensor.record_stream = lambda self, *args, **kwargs: None


_TAG_FORWARD, _TAG_BACKWARD = 1, 2
_TAG_FORWARD_SHAPE, _TAG_BACKWARD_SHAPE = 3, 4


def _patch_pipeline_p2p() -> None:
    """Tag pipeline messages by direction.

    gloo matches a receive to the first pending send from the same peer with the same tag. With
    two pipeline stages the previous and the next stage are the same process, so in the
    interleaved schedule an activation (to next) and a gradient (to previous) can be in flight to
    the same peer at once, both untagged, and get swapped. Activations travel with one tag,
    gradients with another. The shapes exchanged first for variable-length (packed) micro-batches
    get tags of their own for the same reason.
    """
    from megatron.core.pipeline_parallel import p2p_communication as p2p

    def batched(*, tensor_send_prev, tensor_recv_prev, tensor_send_next, tensor_recv_next, group,
                prev_pipeline_rank, next_pipeline_rank):
        ops = []
        dist = torch.distributed
        if tensor_send_prev is not None:
            ops.append(dist.P2POp(dist.isend, tensor_send_prev, prev_pipeline_rank, group, _TAG_BACKWARD))
        if tensor_recv_prev is not None:
            ops.append(dist.P2POp(dist.irecv, tensor_recv_prev, prev_pipeline_rank, group, _TAG_FORWARD))
        if tensor_send_next is not None:
            ops.append(dist.P2POp(dist.isend, tensor_send_next, next_pipeline_rank, group, _TAG_FORWARD))
        if tensor_recv_next is not None:
            ops.append(dist.P2POp(dist.irecv, tensor_recv_next, next_pipeline_rank, group, _TAG_BACKWARD))
        return dist.batch_isend_irecv(ops) if ops else []

    p2p._batched_p2p_ops = batched

    def communicate_shapes(self, tensor_send_next, tensor_send_prev, recv_prev, recv_next):
        dist = torch.distributed
        ops, received = [], {}

        def shape_of(t):
            return torch.tensor(t.size(), dtype=torch.int64)

        if tensor_send_prev is not None:
            ops.append(dist.P2POp(dist.isend, shape_of(tensor_send_prev), self.prev_rank, self.pp_group,
                                  _TAG_BACKWARD_SHAPE))
        if recv_prev:
            received["prev"] = torch.empty(3, dtype=torch.int64)
            ops.append(dist.P2POp(dist.irecv, received["prev"], self.prev_rank, self.pp_group,
                                  _TAG_FORWARD_SHAPE))
        if tensor_send_next is not None:
            ops.append(dist.P2POp(dist.isend, shape_of(tensor_send_next), self.next_rank, self.pp_group,
                                  _TAG_FORWARD_SHAPE))
        if recv_next:
            received["next"] = torch.empty(3, dtype=torch.int64)
            ops.append(dist.P2POp(dist.irecv, received["next"], self.next_rank, self.pp_group,
                                  _TAG_BACKWARD_SHAPE))
        for req in dist.batch_isend_irecv(ops) if ops else []:
            req.wait()
        return tuple(received[k].tolist() if k in received else [0, 0, 0] for k in ("prev", "next"))

    p2p.P2PCommunicator._communicate_shapes = communicate_shapes


def _patch_moe() -> None:
    """megatron's MoE layer without Transformer Engine on gloo: the router names TE's gemm even
    when TE is absent (a NameError), and the all-to-all dispatcher turns its split sizes into
    host arrays only for CUDA tensors, while gloo's all_to_all_single wants lists."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and not tensor.is_cuda and as_numpy:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def cpu_mode_active() -> bool:
    return _INSTALLED


def install() -> bool:
    """Install the CPU redirection once per process. Returns True if it is active."""
    global _INSTALLED, _MODE
    if _INSTALLED:
        return True
    if torch.cuda.is_available():
        return False
    _patch_torch_cuda()
    _patch_tensor_type()
    _patch_megatron_rng()
    _patch_factories()
    _patch_pipeline_p2p()
    _patch_moe()
    _MODE = _CudaToCpu()
    _MODE.__enter__()
    _INSTALLED = True
    return True
