"""Rank functions of the spec-portability tests (spawned by tests/harness.py)."""

from __future__ import annotations

from pathlib import Path

import torch


def _config(local_ckpt: str):
    from megatron_internvl.config import load_config

    root = Path(__file__).resolve().parents[2]
    return load_config(str(root / "examples" / "tiny" / "full.yaml"),
                       ["data.synthetic.enabled=true", "data.synthetic.sample_tokens=64",
                        "data.synthetic.tiles_per_sample=1", f"mpo.reference_checkpoint={local_ckpt}",
                        "parallel.timeout_minutes=7"])


def _state(chunks, prefixes=("",)) -> dict:
    module = getattr(chunks[0], "module", chunks[0])
    return {k: v.detach().clone() for k, v in module.state_dict().items()
            if k.startswith(prefixes) and isinstance(v, torch.Tensor) and "_extra_state" not in k}


def _plain_tensor(ckpt: str, key: str, like: torch.Tensor) -> torch.Tensor:
    """One tensor read with megatron's plain API (no project code): the reference."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    request = {"t": ShardedTensor.from_rank_offsets(key, torch.empty_like(like), replica_id=0)}
    return dist_checkpointing.load(request, ckpt)["t"]


def portability(local_ckpt: str, standin_ckpt: str, work: str) -> dict:
    """Loads that do not go through the training loop, across specs:

    local spec <- stand-in checkpoint (FP8-like extra state): the MPO reference, `convert export`;
    stand-in spec <- local checkpoint: the MPO reference, init_language / init_vision;
    both: a checkpoint lacking a tensor, or holding one the model lacks, stops the load naming it."""
    import safetensors.torch
    from megatron.core import dist_checkpointing

    from checkpoint_specs import standins
    from megatron_internvl import checkpoint as ckpt
    from megatron_internvl.checkpoint.io import model_sharded_state_dict
    from megatron_internvl.convert.exporter import export_on_rank
    from megatron_internvl.models.factory import build_model_chunks
    from megatron_internvl.parallel import distributed
    from megatron_internvl.training.mpo.reference import ModelReference
    from megatron_internvl.training.setup import init_components

    config = _config(local_ckpt)
    distributed.initialize(config.parallel, seed=config.training.seed)
    out = {"timeouts": _group_timeouts()}

    # The local spec reads the stand-in's checkpoint, ignoring its FP8 metadata.
    config.mpo.reference_checkpoint = standin_ckpt
    ref = ModelReference(config, variable_seq_lengths=False)
    emb_key = "language_model.embedding.word_embeddings.weight"
    emb = _state(ref.chunks)[emb_key]
    out["local_ref_equal"] = torch.equal(emb, _plain_tensor(standin_ckpt, emb_key, emb))
    facts = export_on_rank(standin_ckpt, _fresh(f"{work}/export"), "transformers", 1 << 30)
    exported = {}
    for f in Path(f"{work}/export").glob("*.safetensors"):
        exported.update(safetensors.torch.load_file(f))
    out["export_tensors"] = facts["tensors"]
    out["export_has_embedding"] = any(torch.equal(t, emb) for t in exported.values())

    # The stand-in spec (TE's extra-state contract) reads the local spec's checkpoint.
    standins.use_te_extra_state()
    standins.RESTORED.clear()
    config.mpo.reference_checkpoint = local_ckpt
    ref = ModelReference(config, variable_seq_lengths=False)
    local_state = _state(ref.chunks)
    out["standin_ref_restored"] = dict(standins.RESTORED)
    out["standin_ref_equal"] = torch.equal(local_state[emb_key],
                                           _plain_tensor(local_ckpt, emb_key, local_state[emb_key]))
    standins.RESTORED.clear()
    ckpt.load_model_checkpoint(build_model_chunks(config, initialize=False), standin_ckpt)
    out["standin_from_standin_restored"] = dict(standins.RESTORED)
    out["standin_has_extra_state"] = any(k.endswith("core_attention._extra_state")
                                         for k in ref.chunks[0].state_dict())

    chunks = build_model_chunks(config, initialize=True)
    config.checkpoint.init_language, config.checkpoint.init_vision = local_ckpt, ""
    init_components(config, chunks)
    after_language = _state(chunks)
    config.checkpoint.init_language, config.checkpoint.init_vision = "", local_ckpt
    init_components(config, chunks)
    after_vision = _state(chunks)
    lang, vis = ("language_model.",), ("vision_model.", "projector.")
    out["init_language"] = all(torch.equal(v, local_state[k]) for k, v in after_language.items()
                               if k.startswith(lang))
    out["init_language_kept_vision"] = not any(torch.equal(v, local_state[k]) for k, v in after_language.items()
                                               if k.startswith("vision_model.") and v.dim() > 1)
    out["init_vision"] = all(torch.equal(v, local_state[k]) for k, v in after_vision.items())

    # Any other difference stops the load and names the tensor.
    model_request = model_sharded_state_dict(chunks)["model"]
    lacking_key = "projector.linear_fc1.bias"
    lacking = {k: v for k, v in model_request.items() if v.key != lacking_key}
    dist_checkpointing.save({"model": lacking}, _fresh(f"{work}/lacking"))
    out["lacking_error"] = _error(lambda: ckpt.load_model_checkpoint(chunks, f"{work}/lacking"))
    extra = dict(model_request)
    extra["surplus"] = dist_checkpointing.ShardedTensor.from_rank_offsets(
        "language_model.decoder.layers.surplus.weight", torch.zeros(3), replica_id=0)
    dist_checkpointing.save({"model": extra}, _fresh(f"{work}/surplus"))
    out["surplus_error"] = _error(lambda: ckpt.load_model_checkpoint(chunks, f"{work}/surplus"))
    out["surplus_component_error"] = _error(lambda: ckpt.load_component(chunks, f"{work}/surplus",
                                                                        ("language_model.",)))
    out["surplus_other_component"] = ckpt.load_component(chunks, f"{work}/surplus", ("projector.",))
    return out


def _group_timeouts() -> dict:
    """parallel.timeout_minutes as the process groups hold it (the default one, megatron's TP)."""
    from megatron.core import parallel_state as ps

    def minutes(group):
        return group._get_backend(torch.device("cpu")).options._timeout.total_seconds() / 60

    return {"default": minutes(torch.distributed.distributed_c10d._get_default_group()),
            "tensor_parallel": minutes(ps.get_tensor_model_parallel_group())}


def _fresh(path: str) -> str:
    Path(path).mkdir(parents=True)
    return path


def _error(fn) -> str:
    from megatron_internvl.checkpoint import CheckpointError

    try:
        fn()
    except CheckpointError as exc:
        return str(exc)
    return "no error"
