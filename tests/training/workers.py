"""Rank-side code for the training tests (spawned by tests/harness.py)."""

from __future__ import annotations

import torch

from training.runner import ROOT


def stage_changes(data_dir: str) -> dict:
    """For each stage: which parameters changed after two steps, which got optimizer state."""
    from megatron_internvl.config import load_config
    from megatron_internvl.data.dataset import build_data_loader, build_tokenizer
    from megatron_internvl.parallel import distributed
    from megatron_internvl.models.factory import build_model_chunks as build_chunks
    from megatron_internvl.training.setup import build_optimizer
    from megatron_internvl.training.stages import apply_stage
    from megatron_internvl.training.step import train_step

    results = {}
    for name, extra in [("mlp_warmup", []), ("vit_incremental", []),
                        ("vit_last_layer", ["training.stage=vit_incremental",
                                            "training.vit_trainable_last_layers=1"]),
                        ("full", ["training.stage=full", "optimizer.lr_mult.vision=0.1",
                                  "optimizer.lr_mult.projector=2.0"])]:
        stage = [] if extra else [f"training.stage={name}"]
        cfg = load_config(ROOT / "examples" / "tiny" / "base.yaml", [
            f"data.meta_path={data_dir}/meta.json", f"data.tokenizer_path={data_dir}/tokenizer.json",
            "optimizer.warmup_steps=0", "optimizer.weight_decay=0.0"] + stage + extra)
        distributed.initialize(cfg.parallel, seed=cfg.training.seed)
        chunks = build_chunks(cfg)
        apply_stage(chunks, cfg.training)
        before = {n: p.detach().clone() for n, p in chunks[0].named_parameters()}
        ddp, optimizer, scheduler = build_optimizer(cfg, chunks)
        # Model parameters the (distributed) optimizer keeps state for.
        in_optimizer = {id(p) for p in optimizer.chained_optimizers[0].model_param_group_index_map}
        loader = build_data_loader(cfg.data, build_tokenizer(cfg.data))
        for _ in range(2):
            batches = [next(loader) for _ in range(2)]
            result = train_step(ddp, optimizer, scheduler, batches, dtype=torch.float32, num_datasets=1)
            assert result.updated
        changed, frozen_with_state = {}, []
        for n, p in chunks[0].named_parameters():
            changed[n] = not torch.equal(p.detach(), before[n])
            if not p.requires_grad and (hasattr(p, "main_grad") or id(p) in in_optimizer):
                frozen_with_state.append(n)
        # The distributed optimizer's groups hold flat shards; map model params to their group.
        opt = optimizer.chained_optimizers[0]
        groups = []
        for n, p in chunks[0].named_parameters():
            if p in opt.model_param_group_index_map:
                g = opt.optimizer.param_groups[opt.model_param_group_index_map[p][0]]
                groups.append(([n], g["max_lr"], g["wd_mult"]))
        results[name] = {"groups": groups, "changed": changed, "frozen_with_state": frozen_with_state,
                         "trainable": {n for n, p in chunks[0].named_parameters() if p.requires_grad}}
    return results
