"""Rank-side code for the MPO tests (spawned by tests/harness.py, two ranks)."""

from __future__ import annotations

import math

import torch

from training.runner import ROOT

NUM_PACKS = 2  # the global batch: two packed micro-batches


def _config(data_dir, work, tp=1, pp=1, *extra):
    from megatron_internvl.config import load_config

    return load_config(ROOT / "examples" / "tiny" / "mpo.yaml", [
        f"data.meta_path={data_dir}/meta_mpo.json", f"data.tokenizer_path={data_dir}/tokenizer.json",
        "data.shard_by=pack", "data.max_tokens=512", f"parallel.tensor_parallel={tp}",
        f"parallel.pipeline_parallel={pp}", "parallel.distributed_optimizer=false",
        f"checkpoint.load={work}/policy", f"mpo.reference_checkpoint={work}/reference",
        f"logging.run_dir={work}/run", "mpo.beta=0.5", "training.clip_grad=0.0", *extra])


def _packs(cfg, dp_rank=0, dp=1):
    from megatron_internvl.data.build import build_tokenizer
    from megatron_internvl.data.preference import build_preference_loader
    from megatron_internvl.parallel.sequence import pack_pad_multiple

    cfg.data.pad_to_multiple = pack_pad_multiple(cfg)
    loader = build_preference_loader(cfg.data, build_tokenizer(cfg.data), dp_rank, dp,
                                     sft_reduction=cfg.mpo.sft_reduction)
    return [next(loader) for _ in range(NUM_PACKS // dp)]


def _grads(chunks) -> dict:
    from megatron_internvl.parallel.sharding import gather_full_state_dict

    return gather_full_state_dict(chunks, select=lambda p: getattr(p, "main_grad", None)
                                  if getattr(p, "main_grad", None) is not None else torch.zeros_like(p))


def _repeat_tiles(b, nit):
    """The official trainer's layout: each response gets its own copy of the pair's tiles."""
    cu = b["cu_seqlens"].tolist()
    ids = b["input_ids"][0]
    pixels, start = [], 0
    for k in range(b["num_pairs"]):
        n = int((ids[cu[2 * k]:cu[2 * k + 1]] == 5).sum()) // nit
        pixels += [b["pixel_values"][start:start + n]] * 2
        start += n
    return dict(b, pixel_values=torch.cat(pixels), image_slots=None)


def oracle(data_dir, work) -> dict:
    """Single process, no DDP and no schedule: logits from the model, then MPO in float64 written
    here. Delta for both groupings of the two packs (one rank: sequential; two ranks: together)."""
    from megatron_internvl.parallel import distributed
    from megatron_internvl import checkpoint as ckpt
    from megatron_internvl.models.factory import build_model_chunks as build_chunks
    from megatron_internvl.training.stages import apply_stage
    from megatron_internvl.training.step import packed_seq_params

    cfg = _config(data_dir, work)
    distributed.initialize(cfg.parallel, seed=cfg.training.seed)
    packs = _packs(cfg)
    policy = build_chunks(cfg, initialize=False)
    ckpt.load_model_checkpoint(policy, f"{work}/policy")
    apply_stage(policy, cfg.training)
    reference = build_chunks(cfg, initialize=False)
    ckpt.load_model_checkpoint(reference, f"{work}/reference")
    reference[0].eval()
    vocab = cfg.model.language.vocab_size

    def sums(model, b):
        logits = model(b["input_ids"], b["position_ids"], pixel_values=b["pixel_values"],
                       packed_seq_params=packed_seq_params(b), image_slots=b["image_slots"])
        logp = torch.log_softmax(logits[:, 0, :vocab].double(), dim=-1)
        side, pair, labels = b["response_side"][0], b["response_pair"][0], b["labels"][0]
        token = logp.gather(1, labels.clamp(min=0)[:, None])[:, 0]
        out = torch.zeros(b["num_pairs"], 2, dtype=torch.float64)
        for t in torch.nonzero(side >= 0)[:, 0].tolist():
            out[pair[t], side[t]] = out[pair[t], side[t]] + token[t]
        sft = torch.zeros(b["num_pairs"], dtype=torch.float64)
        for t in torch.nonzero(side == 0)[:, 0].tolist():
            sft[pair[t]] = sft[pair[t]] - token[t] * float(b["loss_weights"][0, t])
        return out, sft, logits

    beta, (w_dpo, w_bco, w_sft) = cfg.mpo.beta, cfg.mpo.weights
    total_w = sum(float(b["loss_weights"].sum()) for b in packs)
    total_pairs = sum(b["num_pairs"] for b in packs)
    results = {}
    ref = []
    with torch.no_grad():
        for b in packs:
            ref.append(sums(reference[0], b)[0])
    # Sharing the tiles = encoding them once per response.
    with torch.no_grad():
        shared = sums(policy[0], packs[0])[2]
        repeated = sums(policy[0], _repeat_tiles(packs[0], cfg.data.num_image_token))[2]
    results["tiles_shared_vs_repeated"] = float((shared - repeated).abs().max())
    results["tiles"] = (int(packs[0]["pixel_values"].shape[0]),
                        int(_repeat_tiles(packs[0], cfg.data.num_image_token)["pixel_values"].shape[0]))
    # One step from a non-zero delta (START_DELTA): every micro-batch uses it, and after the step
    # the two micro-batches' mean rewards are folded in, whatever the layout.
    policy[0].zero_grad(set_to_none=True)
    pol = [sums(policy[0], b)[:2] for b in packs]
    means = [float((beta * (p.detach() - r)).mean()) for (p, _), r in zip(pol, ref)]
    delta = START_DELTA["mean"]
    total = torch.zeros((), dtype=torch.float64)
    terms = {"dpo": 0.0, "bco": 0.0, "sft": 0.0, "accuracy": 0.0}
    for (p, sft), r in zip(pol, ref):
        cr, rr = beta * (p[:, 0] - r[:, 0]), beta * (p[:, 1] - r[:, 1])
        dpo = -torch.nn.functional.logsigmoid(cr - rr)
        bco = -torch.nn.functional.logsigmoid(cr - delta) - torch.nn.functional.logsigmoid(-(rr - delta))
        total = total + (w_dpo * dpo.sum() + w_bco * bco.sum()) / total_pairs + w_sft * sft.sum() / total_w
        terms["dpo"] += float(dpo.sum()) / total_pairs
        terms["bco"] += float(bco.sum()) / total_pairs
        terms["sft"] += float(sft.sum()) / total_w
        terms["accuracy"] += float((cr > rr).sum()) / total_pairs
    total.backward()
    grads = {}
    for name, param in policy[0].named_parameters():
        grads[name] = param.grad.clone() if param.grad is not None else torch.zeros_like(param)
    count = START_DELTA["count"]
    after = (delta * count + sum(means)) / (count + len(means))
    results["step"] = {"loss": float(total), "terms": terms, "delta": after,
                       "grads": _canonical(policy, grads)}
    return results


# delta before the checked step (as if resumed after two micro-batches), so that its use shows.
START_DELTA = {"mean": 0.05, "count": 2.0}


def _canonical(chunks, grads_by_name):
    from megatron_internvl.parallel.sharding import gather_full_state_dict

    params = dict(chunks[0].named_parameters())
    by_id = {id(p): grads_by_name[n] for n, p in params.items()}
    return gather_full_state_dict(chunks, select=lambda p: by_id[id(p)])


def save_start(data_dir, work) -> None:
    """The starting policy and a different reference (so that delta and the rewards are not 0)."""
    from megatron_internvl.parallel import distributed
    from megatron_internvl.checkpoint import save_model_checkpoint
    from megatron_internvl.models.factory import build_model_chunks as build_chunks

    cfg = _config(data_dir, work)
    distributed.initialize(cfg.parallel, seed=cfg.training.seed)
    chunks = build_chunks(cfg)
    save_model_checkpoint(chunks, f"{work}/policy")
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in chunks[0].parameters():
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=gen))
    save_model_checkpoint(chunks, f"{work}/reference")


def mpo_step(data_dir, work, tp, pp, *extra) -> dict:
    """One MPO optimizer step in a layout: loss, terms, delta, gathered gradients."""
    from megatron.core import parallel_state as ps

    from megatron_internvl.data.preference import open_preference_sources
    from megatron_internvl.parallel import distributed
    from megatron_internvl import checkpoint as ckpt
    from megatron_internvl.models.factory import build_model_chunks as build_chunks
    from megatron_internvl.training.setup import build_optimizer
    from megatron_internvl.training.mpo import MpoObjective
    from megatron_internvl.training.mpo.reference import build_reference
    from megatron_internvl.training.stages import apply_stage
    from megatron_internvl.training.step import train_step

    cfg = _config(data_dir, work, tp, pp, *extra)
    distributed.initialize(cfg.parallel, seed=cfg.training.seed)
    chunks = build_chunks(cfg, initialize=False)
    ckpt.load_model_checkpoint(chunks, f"{work}/policy")
    apply_stage(chunks, cfg.training)
    ddp, optimizer, scheduler = build_optimizer(cfg, chunks)
    specs, _ = open_preference_sources(cfg.data)
    objective = MpoObjective(cfg.mpo, build_reference(cfg, specs, ddp[0].config.variable_seq_lengths))
    objective.load_state_dict({"delta": START_DELTA})
    batches = _packs(cfg, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    result = train_step(ddp, optimizer, scheduler, batches, dtype=torch.float32, num_datasets=1,
                        fused_loss=True, mpo=objective)
    assert result.updated
    return {"loss": result.loss, "mpo": result.mpo, "delta_state": objective.state_dict(),
            "grads": _grads(chunks)}


def layouts(data_dir, work) -> dict:
    """Every check of the spawned pair of ranks, in one process group lifetime each."""
    from megatron_internvl.training.mpo.reference import precompute

    save_start(data_dir, work)
    out = {"oracle": oracle(data_dir, work)}  # on both ranks: gathering the gradients is collective
    out["tp2"] = mpo_step(data_dir, work, 2, 1)
    out["pp2"] = mpo_step(data_dir, work, 1, 2)
    out["dp2"] = mpo_step(data_dir, work, 1, 1)
    table = ("mpo.reference=precomputed", f"mpo.reference_file={work}/reference.pt")
    cfg = _config(data_dir, work, 1, 2, *table)
    precompute(cfg)  # at PP=2; training below at TP=2
    out["tp2_precomputed"] = mpo_step(data_dir, work, 2, 1, *table)
    # The table was computed with {work}/reference as the reference: refused for another one.
    from megatron_internvl.data.preference import open_preference_sources
    from megatron_internvl.training.mpo.reference import ReferenceTableError, TableReference

    out["resumed_table"] = resumed_precompute(data_dir, work, table)
    other = _config(data_dir, work, 2, 1, *table, f"mpo.reference_checkpoint={work}/policy")
    try:
        TableReference(other, open_preference_sources(other.data)[0])
        out["stale"] = None
    except ReferenceTableError as exc:
        out["stale"] = str(exc)
    out["pairs_in_table"] = len(torch.load(f"{work}/reference.pt", weights_only=True)["ids"])
    out["log2"] = math.log(2)
    return out


def resumed_precompute(data_dir, work, table) -> dict:
    """mpo-reference continues from the chunk files a crashed run left: chunk 0 is planted with
    marked values (+1000) and must come back unchanged, the other chunks computed (TP=2)."""
    import json
    from pathlib import Path

    import torch.distributed as dist

    import megatron_internvl.training.mpo.reference as mr
    from megatron_internvl.data.preference import open_preference_sources, pair_id

    full = torch.load(f"{work}/reference.pt", weights_only=True)
    mr.CHUNK_PAIRS = 8
    cfg = _config(data_dir, work, 2, 1, table[0], f"mpo.reference_file={work}/resumed.pt")
    parts = Path(f"{work}/resumed.pt.parts")
    if dist.get_rank() == 0:
        parts.mkdir()
        stamp = json.dumps(mr.fingerprint(cfg, open_preference_sources(cfg.data)[0]), sort_keys=True)
        (parts / "fingerprint.json").write_text(stamp)
        lines = (Path(data_dir) / "preference.jsonl").read_text().splitlines()[:8]  # chunk 0: lines 0-7
        first = [pair_id("tiny_preference", json.loads(x)) for x in lines]
        values = torch.stack([full["log_probs"][full["ids"].index(i)] for i in first]) + 1000
        torch.save({"ids": first, "log_probs": values}, parts / "chunk000000-dp0.pt")
    dist.barrier()
    mr.precompute(cfg)
    mr.CHUNK_PAIRS = 256
    got = torch.load(f"{work}/resumed.pt", weights_only=True)
    want = {i: full["log_probs"][k] for k, i in enumerate(full["ids"])}
    planted = got["ids"][:8]
    return {"same_ids": sorted(got["ids"]) == sorted(full["ids"]) and len(set(got["ids"])) == len(got["ids"]),
            "planted_kept": bool(torch.equal(got["log_probs"][:8], torch.stack([want[i] for i in planted]) + 1000)),
            "rest": got["log_probs"][8:], "full_rest": torch.stack([want[i] for i in got["ids"][8:]]),
            "parts_removed": not parts.exists()}
