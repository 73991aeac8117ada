"""Full-vocabulary logits of a converted checkpoint at any TP x PP layout (``tools/forward.py``).

Inputs are what transformers' InternVL takes: ``input_ids`` [B, S] with each image already
expanded to ``<img>`` + ``<IMG_CONTEXT>`` x (tokens per tile x tiles) + ``</img>``,
``pixel_values`` [tiles, 3, H, W] (optional) and ``position_ids`` [B, S] (optional, default
0..S-1). The pipeline runs through megatron's own schedule (forward only, one micro-batch); the
last stage gathers the vocab-parallel logits over TP and drops the vocabulary padding.
"""

from __future__ import annotations

import torch

from megatron_internvl.checkpoint.layout import read_info


def check_inputs(inputs: dict, model_cfg) -> dict:
    from . import ConversionError

    if not isinstance(inputs, dict) or "input_ids" not in inputs:
        raise ConversionError("the inputs file must hold a dict with 'input_ids' [B, S]")
    ids = inputs["input_ids"]
    if ids.dim() != 2:
        raise ConversionError(f"input_ids must be [B, S], got shape {tuple(ids.shape)}")
    out = {"input_ids": ids.long()}
    pos = inputs.get("position_ids")
    if pos is None:
        pos = torch.arange(ids.shape[1]).expand_as(ids)
    if tuple(pos.shape) != tuple(ids.shape):
        raise ConversionError(f"position_ids {tuple(pos.shape)} must match input_ids {tuple(ids.shape)}")
    out["position_ids"] = pos.to(torch.float32)
    pix = inputs.get("pixel_values")
    n_image_tokens = int((ids == model_cfg.image_token_id).sum())
    if pix is not None:
        size = model_cfg.vision.image_size
        if pix.dim() != 4 or tuple(pix.shape[1:]) != (3, size, size):
            raise ConversionError(f"pixel_values must be [tiles, 3, {size}, {size}], got {tuple(pix.shape)}")
        want = pix.shape[0] * model_cfg.num_image_token
        if n_image_tokens != want:
            raise ConversionError(
                f"input_ids hold {n_image_tokens} image tokens (id {model_cfg.image_token_id}) but "
                f"{pix.shape[0]} tiles need {want}"
            )
        out["pixel_values"] = pix
    elif n_image_tokens:
        raise ConversionError(f"input_ids hold {n_image_tokens} image tokens but no pixel_values")
    return out


def forward_logits(model, inputs: dict, model_cfg) -> torch.Tensor | None:
    """[B, S, V] float32 logits on the last pipeline stage (every TP rank), None elsewhere."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_internvl.models.internvl import gather_logits

    ids, pos = inputs["input_ids"], inputs["position_ids"]
    pixels = inputs.get("pixel_values")
    batch, seq = ids.shape

    def step(data_iterator, chunk):
        next(data_iterator)
        return chunk(ids, pos, pixel_values=pixels), None

    was_training = model.training
    model.eval()
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([None]), model=[model],
            num_microbatches=1, seq_length=seq, micro_batch_size=batch, forward_only=True,
        )
    model.train(was_training)
    if not ps.is_pipeline_last_stage():
        return None
    logits = gather_logits(outputs[0], model_cfg.language.vocab_size)  # [S, B, V]
    return logits.transpose(0, 1).float().contiguous()


def run_forward(ckpt, tp: int, pp: int, inputs_path, out_path, precision: str | None = None) -> None:
    """Rank side of ``tools/forward.py`` (under torchrun or any launcher)."""
    from megatron.core import parallel_state as ps

    from megatron_internvl.config import ParallelConfig
    from megatron_internvl.parallel import distributed

    from .checkpoint import build_chunk, check_layout, load_weights, read_model_config

    model_cfg = read_model_config(ckpt)
    parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp)
    check_layout(model_cfg, parallel)
    precision = precision or read_info(ckpt).get("precision", "fp32")
    inputs = check_inputs(torch.load(inputs_path, weights_only=True), model_cfg)
    distributed.initialize(parallel)
    model = build_chunk(model_cfg, parallel, precision)
    if torch.cuda.is_available():  # GPU nodes (nccl); on CPU the gloo execution layer runs it
        model.cuda()
        inputs = {k: v.cuda() for k, v in inputs.items()}
    load_weights(model, ckpt)
    logits = forward_logits(model, inputs, model_cfg)
    if (
        logits is not None
        and ps.get_tensor_model_parallel_rank() == 0
        and ps.get_data_parallel_rank() == 0
    ):
        torch.save(logits.cpu(), out_path)
    torch.distributed.barrier()
