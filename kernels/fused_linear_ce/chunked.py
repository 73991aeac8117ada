"""Output layer + weighted vocab-parallel cross-entropy, token chunk by token chunk.

Why this exists: InternVL's vocabulary (151,674) times a packed micro-batch (16k-32k tokens)
makes the output layer's logits the largest activation of the small models (16384 x 151674 fp32
is 9.9 GB, held again as the softmax and as its gradient). Fused linear + cross-entropy kernels
exist (Liger, Cut Cross-Entropy) but support neither megatron's vocabulary split over tensor-
parallel ranks nor per-token loss weights (square averaging, MPO's summed log-probs).

Two autograd functions, one per use:
- :class:`WeightedLinearCE` (training loss ``sum_t w_t * CE_t``): the loss is a scalar, so each
  chunk's gradients (hidden rows, output weight) are computed in the forward pass, scaled by the
  upstream scalar in backward. Logits live one chunk at a time; what is kept for backward is
  the size of the inputs (``grad_hidden [T, H]``, ``grad_weight [V/TP, H]``).
- :class:`LinearLogProbs` (per-token log-probabilities of the labels, differentiable against any
  upstream gradient, e.g. MPO's per-pair sums): forward keeps only each token's log-sum-exp;
  backward recomputes each chunk's logits (one extra matmul) and skips tokens whose upstream
  gradient is zero.

Tensor parallelism follows ``megatron.core.tensor_parallel.vocab_parallel_cross_entropy``: each
rank holds rows ``[r V/TP, (r+1) V/TP)`` of the (padded) output weight and sees every token's
full hidden state; the per-token max / sum of exponentials and the target logit are all-reduced
over the TP group; the gradient of the hidden state is this rank's partial sum, completed by the
all-reduce (or reduce-scatter under sequence parallelism) that megatron's region functions do in
backward, as they do for ``ColumnParallelLinear``. Vocabulary rows at or beyond ``vocab_size``
(the padding the model adds so the vocabulary splits evenly) have -inf logits: they never win
the max and get exactly zero gradient.

The per-chunk softmax work is done by a backend: plain torch here (the CPU path and the
reference), or the Triton kernels of :mod:`.triton_ce` on GPUs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# Default size of one chunk's logits (fp32 bytes); the token chunk follows from the local vocab.
DEFAULT_CHUNK_BYTES = 256 * 2**20


class _Work:
    """One chunk's fp32 logits, transformed in place; ``shift`` is set once they hold
    ``exp(logits - shift)`` (after :meth:`TorchBackend.row_lse`)."""

    __slots__ = ("x", "shift")

    def __init__(self, x):
        self.x, self.shift = x, None


class TorchBackend:
    """Chunk softmax work in plain torch (fp32), in place on the chunk's logits: one
    ``[tokens, vocab / TP]`` buffer per chunk (none extra when the logits are fp32)."""

    name = "torch"

    @staticmethod
    def prepare(logits: torch.Tensor, valid: int) -> _Work:
        x = logits.float()
        if valid < x.shape[1]:
            x[:, valid:] = float("-inf")
        return _Work(x)

    @staticmethod
    def row_lse(work: _Work, target, in_range, valid):
        """Local log-sum-exp per row and the target's logit (0 where the target is elsewhere)."""
        x = work.x
        picked = x.gather(1, target[:, None]).squeeze(1)
        picked = torch.where(in_range, picked, torch.zeros_like(picked))
        m = x.amax(dim=1)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # a rank holding only padding
        x.sub_(m[:, None]).exp_()
        work.shift = m
        return m + torch.log(x.sum(dim=1)), picked

    @staticmethod
    def softmax_grad(work: _Work, lse, target, in_range, valid, scale, out_dtype):
        """``(softmax - onehot(target)) * scale`` per row, as ``out_dtype``."""
        x = work.x
        if work.shift is None:
            x.sub_(lse[:, None]).exp_()
        else:
            x.mul_(torch.exp(work.shift - lse)[:, None])
        rows = torch.arange(x.shape[0], device=x.device)
        x[rows, target] -= in_range.to(x.dtype)
        x.mul_(scale[:, None])
        return x.to(out_dtype)


def _backend(name: str, device: torch.device):
    if name == "auto":
        name = "triton" if device.type == "cuda" and _triton_usable() else "torch"
    if name == "torch":
        return TorchBackend
    if name == "triton":
        from . import triton_ce

        triton_ce.check_usable(device)
        return triton_ce.TritonBackend
    raise ValueError(f"fused cross-entropy backend {name!r}: use 'auto', 'torch' or 'triton'")


def _triton_usable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _tp(group):
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return None, 0
    return group, dist.get_rank(group)


def _combine(lse_local: torch.Tensor, target_logit: torch.Tensor, group):
    """Merge per-rank log-sum-exps and target logits over the vocabulary split."""
    if group is None:
        return lse_local, target_logit
    lse_max = lse_local.clone()
    dist.all_reduce(lse_max, op=dist.ReduceOp.MAX, group=group)
    packed = torch.stack([torch.exp(lse_local - lse_max), target_logit])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    return lse_max + torch.log(packed[0]), packed[1]


def chunk_tokens_for(local_vocab: int, chunk_tokens: int | None) -> int:
    if chunk_tokens is not None:
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1")
        return chunk_tokens
    n = max(1, DEFAULT_CHUNK_BYTES // (4 * max(local_vocab, 1)))
    return n if n < 64 else n - n % 64


class _Shard:
    """This rank's slice of the vocabulary and the labels that fall in it."""

    def __init__(self, weight: torch.Tensor, vocab_size: int | None, group):
        self.group, rank = _tp(group)
        self.local = weight.shape[0]
        self.start = rank * self.local
        full = vocab_size if vocab_size is not None else self.local * (
            1 if self.group is None else dist.get_world_size(self.group))
        self.valid = max(0, min(self.local, full - self.start))
        self.vocab_size = full

    def targets(self, labels: torch.Tensor):
        local = labels - self.start
        in_range = (local >= 0) & (local < self.valid)
        return torch.where(in_range, local, torch.zeros_like(local)), in_range


def _check_inputs(hidden, weight, labels, active, vocab_size):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be "
                         "[tokens, H] and [vocab / TP, H]")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have one dtype")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels {tuple(labels.shape)} must be [tokens] = [{hidden.shape[0]}]")
    if active.numel():
        # Checked on the device, no host read: a CPU tensor fails here naming the range; on a GPU
        # a label out of range is a device-side assertion.
        used = labels.index_select(0, active)
        try:
            torch._assert_async(((used >= 0) & (used < vocab_size)).all(),
                                f"labels of weighted tokens must be in [0, {vocab_size})")
        except RuntimeError:
            lo, hi = int(used.min()), int(used.max())
            raise ValueError(f"labels of weighted tokens must be in [0, {vocab_size}); got "
                             f"[{lo}, {hi}] (give ignored tokens weight 0)") from None


def _accumulate(grad_w: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    """grad_w (fp32) += g^T h, without a [V/TP, H] temporary when the inputs are fp32."""
    if g.dtype == grad_w.dtype:
        grad_w.addmm_(g.t(), h)
    else:
        grad_w += g.t() @ h  # bf16 product (half the size), accumulated in fp32


def _chunks(hidden, weight, labels, active, shard, be, chunk_tokens):
    """The active tokens chunk by chunk: indices, hidden rows, this rank's targets and the
    prepared logits. The caller drops each chunk's buffers before asking for the next, so one
    chunk of logits is alive at a time."""
    step = chunk_tokens_for(shard.local, chunk_tokens)
    for a in range(0, active.numel(), step):
        idx = active[a : a + step]
        h = hidden.index_select(0, idx)
        target, in_range = shard.targets(labels.index_select(0, idx))
        yield idx, h, target, in_range, be.prepare(h @ weight.t(), shard.valid)


def _grad_buffers(ctx, hidden, weight):
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    return (torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None,
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None)


def _add_grads(g, idx, h, weight, grad_h, grad_w) -> None:
    """Chunk logit gradient g -> its hidden rows and the weight gradient."""
    if grad_h is not None:
        grad_h.index_copy_(0, idx, (g @ weight).float())
    if grad_w is not None:
        _accumulate(grad_w, g, h)


class WeightedLinearCE(torch.autograd.Function):
    """``loss = sum_t w_t CE_t`` (scalar) and the detached per-token CE (0 where ``w_t == 0``)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, token_weights, group, vocab_size, chunk_tokens, backend):
        shard = _Shard(weight, vocab_size, group)
        be = _backend(backend, hidden.device)
        active = (token_weights != 0).nonzero().squeeze(1)  # host sync: the supervised tokens
        _check_inputs(hidden, weight, labels, active, shard.vocab_size)
        ce = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_h, grad_w = _grad_buffers(ctx, hidden, weight)
        w_all = token_weights.float()
        for idx, h, target, in_range, work in _chunks(hidden, weight, labels, active, shard, be, chunk_tokens):
            lse, picked = _combine(*be.row_lse(work, target, in_range, shard.valid), shard.group)
            ce.index_copy_(0, idx, lse - picked)
            if grad_h is not None or grad_w is not None:
                g = be.softmax_grad(work, lse, target, in_range, shard.valid,
                                    w_all.index_select(0, idx), weight.dtype)
                _add_grads(g, idx, h, weight, grad_h, grad_w)
                del g
            del work, h
        loss = (ce * w_all).sum()
        ctx.hidden_dtype = hidden.dtype
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(weight.dtype))
        ctx.mark_non_differentiable(ce)
        return loss, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce):
        grad_h, grad_w = ctx.saved_tensors
        # In place: these buffers exist only for this backward (no double backward).
        dh = None if grad_h is None else grad_h.mul_(grad_loss).to(ctx.hidden_dtype)
        dw = None if grad_w is None else grad_w.mul_(grad_loss.to(grad_w.dtype))
        return dh, dw, None, None, None, None, None, None


class LinearLogProbs(torch.autograd.Function):
    """Per-token ``log p(label)`` [T] fp32, differentiable; backward recomputes chunk logits."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, mask, group, vocab_size, chunk_tokens, backend):
        shard = _Shard(weight, vocab_size, group)
        be = _backend(backend, hidden.device)
        active = mask.nonzero().squeeze(1)
        _check_inputs(hidden, weight, labels, active, shard.vocab_size)
        lse_all = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        logp = torch.zeros_like(lse_all)
        for idx, h, target, in_range, work in _chunks(hidden, weight, labels, active, shard, be, chunk_tokens):
            lse, picked = _combine(*be.row_lse(work, target, in_range, shard.valid), shard.group)
            del work, h
            lse_all.index_copy_(0, idx, lse)
            logp.index_copy_(0, idx, picked - lse)
        ctx.save_for_backward(hidden, weight, labels, lse_all)
        ctx.mask = mask
        ctx.args = (group, vocab_size, chunk_tokens, backend)
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, labels, lse_all = ctx.saved_tensors
        group, vocab_size, chunk_tokens, backend = ctx.args
        shard = _Shard(weight, vocab_size, group)
        be = _backend(backend, hidden.device)
        grad_logp = torch.where(ctx.mask, grad_logp.float(), torch.zeros_like(grad_logp, dtype=torch.float32))
        active = (grad_logp != 0).nonzero().squeeze(1)
        grad_h, grad_w = _grad_buffers(ctx, hidden, weight)
        for idx, h, target, in_range, work in _chunks(hidden, weight, labels, active, shard, be, chunk_tokens):
            # d log p / d logits = onehot - softmax = -(softmax - onehot)
            g = be.softmax_grad(work, lse_all.index_select(0, idx), target, in_range, shard.valid,
                                -grad_logp.index_select(0, idx), weight.dtype)
            _add_grads(g, idx, h, weight, grad_h, grad_w)
            del g, work, h
        return (None if grad_h is None else grad_h.to(hidden.dtype),
                None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None, None, None)
