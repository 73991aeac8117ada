"""Rank-side code for the fused output-layer loss tests (spawned by tests/harness.py)."""

from __future__ import annotations

import os

import torch

T, H, V = 45, 32, 300  # tokens, hidden, real vocabulary (padded to a multiple of 128 x TP)


def _case(weighting: str, dtype, tp: int, rank: int, seed: int = 0):
    """Hidden states, this rank's output-weight rows and labels/weights of 3 packed samples."""
    gen = torch.Generator().manual_seed(seed)
    padded = -(-V // (128 * tp)) * 128 * tp
    hidden = torch.randn(T, H, generator=gen)
    weight = torch.randn(padded, H, generator=gen) * 0.3
    # Padding rows hold large values: if they were not masked they would dominate the softmax.
    weight[V:] = 5.0
    labels = torch.randint(0, V, (T,), generator=gen)
    supervised = torch.rand(T, generator=gen) > 0.3
    lengths = [15, 20, 10]
    sample = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))
    weights = torch.zeros(T)
    for s in range(3):
        rows = (sample == s) & supervised
        n = int(rows.sum())
        weights[rows] = {"token": 1.0, "sample": 1.0 / n, "square": n ** -0.5}[weighting]
    labels = torch.where(supervised, labels, torch.full_like(labels, -100))
    local = padded // tp
    return (hidden.to(dtype), weight[rank * local : (rank + 1) * local].contiguous().to(dtype),
            labels, weights)


def _todays_path(hidden, weight, labels, weights, scale):
    """The project's loss before fusion: logits, padding at -inf, megatron's vocab-parallel CE."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from megatron_internvl.training.loss import weighted_token_loss

    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    logits = tensor_parallel.copy_to_tensor_model_parallel_region(h) @ w.t()
    start = ps.get_tensor_model_parallel_rank() * w.shape[0]
    real = max(0, min(w.shape[0], V - start))
    pad = torch.zeros(w.shape[0], dtype=torch.bool)
    pad[real:] = True
    logits = logits.masked_fill(pad, float("-inf"))
    per_token = weighted_token_loss(logits[:, None, :], labels[None], weights[None])
    loss = per_token.sum()
    (loss * scale).backward()
    return loss.detach().float(), per_token[0].detach().float(), h.grad.float(), w.grad.float()


def _fused_path(hidden, weight, labels, weights, scale, backend, chunk_tokens):
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from megatron_internvl.kernels.fused_linear_ce import weighted_linear_cross_entropy

    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = weighted_linear_cross_entropy(
        tensor_parallel.copy_to_tensor_model_parallel_region(h), w, labels, weights,
        ps.get_tensor_model_parallel_group(), vocab_size=V, chunk_tokens=chunk_tokens, backend=backend)
    (out.loss * scale).backward()
    return (out.loss.detach(), (out.ce * weights).detach(), h.grad.float(), w.grad.float(),
            w.grad[max(0, min(w.shape[0], V - ps.get_tensor_model_parallel_rank() * w.shape[0])):])


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def compare_paths(tp: int) -> dict:
    """Fused vs today's path for every weighting, fp32 and bf16, torch and Triton (interpreter)
    backends, several chunk sizes; and differentiable log-probs vs a float64 log-softmax."""
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on the CPU
    from megatron_internvl.config import ParallelConfig
    from megatron_internvl.parallel import distributed

    distributed.initialize(ParallelConfig(tensor_parallel=tp), seed=3)
    from megatron.core import parallel_state as ps

    rank = ps.get_tensor_model_parallel_rank()
    scale = 0.37
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        for weighting in ("token", "sample", "square"):
            case = _case(weighting, dtype, tp, rank)
            ref = _todays_path(*case, scale)
            for backend, chunk in (("torch", 7), ("torch", None), ("triton", 16)):
                got = _fused_path(*case, scale, backend, chunk)
                key = f"{str(dtype)[6:]}/{weighting}/{backend}/{chunk}"
                out[key] = {"loss": _rel(got[0], ref[0]), "ce": _rel(got[1], ref[1]),
                            "grad_hidden": _rel(got[2], ref[2]), "grad_weight": _rel(got[3], ref[3]),
                            "padding_grad": float(got[4].abs().max()) if got[4].numel() else 0.0}

    # Log-probs against float64 math on the full (gathered) vocabulary, with arbitrary upstream
    # gradients; tokens outside the mask are neither computed nor differentiated.
    from megatron.core import tensor_parallel

    from megatron_internvl.kernels.fused_linear_ce import linear_log_probs

    hidden, weight, labels, weights = _case("token", torch.float32, tp, rank, seed=1)
    mask = weights > 0
    targets = torch.where(mask, labels, torch.zeros_like(labels))
    upstream = torch.randn(T, generator=torch.Generator().manual_seed(5))
    full_w = tensor_parallel.gather_from_tensor_model_parallel_region(weight.t().contiguous()).t()
    h64 = hidden.double().requires_grad_(True)
    w64 = full_w.double().requires_grad_(True)
    ref = torch.log_softmax(h64 @ w64[:V].t(), dim=-1).gather(1, targets[:, None]).squeeze(1) * mask
    (ref * upstream).sum().backward()
    logp_out = {}
    for backend in ("torch", "triton"):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        logp = linear_log_probs(tensor_parallel.copy_to_tensor_model_parallel_region(h), w, targets,
                                mask, ps.get_tensor_model_parallel_group(), vocab_size=V,
                                chunk_tokens=8, backend=backend)
        (logp * upstream).sum().backward()
        local = w.shape[0]
        ref_w = w64.grad[rank * local : (rank + 1) * local]
        logp_out[backend] = {"logp": _rel(logp.detach(), ref.detach()), "grad_hidden": _rel(h.grad, h64.grad),
                             "grad_weight": _rel(w.grad, ref_w),
                             "masked_logp_zero": bool((logp.detach()[~mask] == 0).all())}
    out["log_probs"] = logp_out

    from megatron_internvl.kernels.fused_linear_ce import triton_ce

    out["triton_interpreted"] = type(triton_ce._row_lse_kernel).__name__
    bad = labels.clone()
    bad[mask.nonzero()[0]] = V + 3  # a supervised label inside the padding
    try:
        _fused_path(hidden, weight, bad, weights, 1.0, "torch", None)
        out["bad_label_error"] = None
    except ValueError as exc:
        out["bad_label_error"] = str(exc)
    return out
