"""Rank-side code of the model tests (spawned by tests/harness.py).

Two spawns serve the whole suite: ``single_rank_suite`` (1 rank: parity with a float64 ViT,
splicing, packing, V2PE, text-only batches, recomputation, freezing, reference gradients) and
``multi_rank_suite`` (4 ranks: TP=2 x PP=2 with sequence parallelism, TP=4 ViT with a rank
holding only dummy heads, DP=4 with overlapped gradient reduction and text-only ranks). Each
returns plain tensors; the assertions live in the test modules.
"""

from __future__ import annotations

import torch

from megatron_internvl.config import ModelConfig, ParallelConfig, build_dataclass

IMG = 7  # <IMG_CONTEXT> id of the tiny models
VOCAB = 203  # padded inside the model (208 at TP 1 and 2: divisor 8 x TP)
VIT_6B = dict(hidden_size=40, num_layers=2, num_heads=5, ffn_hidden_size=64, image_size=56,
              patch_size=14, norm="rmsnorm", qkv_bias=False, qk_norm=True, drop_path_rate=0.0)
VIT_300M = dict(hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=64, image_size=56,
                patch_size=14, norm="layernorm", qkv_bias=True, qk_norm=False, drop_path_rate=0.0)
LLM = dict(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, ffn_hidden_size=128,
           vocab_size=VOCAB, rope_theta=10000.0, qkv_bias=True, make_vocab_size_divisible_by=8)
TOKENS_PER_TILE = 4  # 56 / 14 = 4x4 grid -> 2x2 after pixel unshuffle


QWEN3 = dict(LLM, arch="qwen3", qkv_bias=False, qk_norm=True)  # q/k norms replicated over TP


def model_config(vision=VIT_6B, recompute="none", language=LLM, **vision_overrides) -> ModelConfig:
    vision = dict(vision, **vision_overrides)
    return build_dataclass(ModelConfig, {"language": language, "vision": vision, "spec": "local",
                                         "image_token_id": IMG, "recompute": recompute})


def weights(name: str, shape: tuple) -> torch.Tensor:
    """Identical full tensors for every layout; large enough that every layer matters."""
    from megatron_internvl.parallel.sharding import seeded_full_tensor

    t = seeded_full_tensor(name, shape, scale=0.15)
    if name.endswith((".ls1", ".ls2")):
        t = t + 1.0
    return t


# ---- data -------------------------------------------------------------------------------------


def _sample(gen, n_text: int, tiles: int):
    ids = torch.randint(10, VOCAB, (n_text,), generator=gen)
    cut = n_text // 2
    ids = torch.cat([ids[:cut], torch.full((tiles * TOKENS_PER_TILE,), IMG), ids[cut:]])
    pix = torch.randn(tiles, 3, 56, 56, generator=gen)
    return ids, pix


def packed_batch(seed: int, samples=((6, 1), (4, 2)), total: int = 24) -> dict:
    """A THD micro-batch: samples (text tokens, tiles), then a padding segment up to ``total``."""
    from megatron.core.packed_seq_params import PackedSeqParams

    gen = torch.Generator().manual_seed(seed)
    ids, pos, pix, cu, pieces = [], [], [], [0], []
    for n_text, tiles in samples:
        i, p = _sample(gen, n_text, tiles)
        pieces.append((i[None], torch.arange(len(i), dtype=torch.float32)[None], p))
        ids.append(i)
        pos.append(torch.arange(len(i), dtype=torch.float32))
        pix.append(p)
        cu.append(cu[-1] + len(i))
    pad = total - cu[-1]
    if pad:
        ids.append(torch.zeros(pad, dtype=torch.long))
        pos.append(torch.arange(pad, dtype=torch.float32))
        cu.append(total)
    cu_t = torch.tensor(cu, dtype=torch.int32)
    lens = cu_t.diff()
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_t, cu_seqlens_kv=cu_t,
                             max_seqlen_q=int(lens.max()), max_seqlen_kv=int(lens.max()))
    labels = torch.randint(0, VOCAB, (1, total), generator=gen)
    loss_weights = torch.rand(1, total, generator=gen)
    loss_weights[:, cu[-2] if pad else total:] = 0
    return dict(input_ids=torch.cat(ids)[None], position_ids=torch.cat(pos)[None],
                pixel_values=torch.cat(pix), packed_seq_params=params, pieces=pieces,
                labels=labels, loss_weights=loss_weights)


def text_batch(seed: int, total: int = 24) -> dict:
    b = packed_batch(seed, samples=((total, 0),), total=total)
    b["pixel_values"] = None
    return b


# ---- helpers ----------------------------------------------------------------------------------


def init(tp=1, pp=1, sp=False, first=None):
    from megatron_internvl.parallel import distributed

    parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, sequence_parallel=sp,
                              first_stage_llm_layers=first)
    distributed.initialize(parallel, seed=1234)
    return parallel


def build(cfg, parallel):
    from megatron.core import parallel_state as ps

    from megatron_internvl.models.factory import build_internvl_model
    from megatron_internvl.parallel.sharding import load_full_state_dict

    model = build_internvl_model(cfg, parallel, "fp32", pre_process=ps.is_pipeline_first_stage(),
                                 post_process=ps.is_pipeline_last_stage())
    load_full_state_dict(model, weights)
    return model


def run(model, b, **kw):
    return model(b["input_ids"], b["position_ids"], b["pixel_values"],
                 packed_seq_params=b["packed_seq_params"], **kw)


def full_logits(logits):
    from megatron_internvl.models.internvl import gather_logits

    return gather_logits(logits, VOCAB).detach().clone()


def train_step(model, batches, lr=1e-2, overlap=False, bucket_size=None):
    """One optimizer step of megatron DDP + optimizer + pipeline schedule over ``batches``
    (this rank's micro-batches; the loss is the global weighted mean). Returns the reduced
    gradients (canonical names) and the last stage's full logits per micro-batch."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_internvl.parallel.sharding import gather_full_state_dict
    from megatron_internvl.training.grads import finalize_model_grads
    from megatron_internvl.training.loss import backward_scale, weighted_token_loss

    config = model.config
    ddp = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=overlap,
                                      bucket_size=bucket_size),
        model,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=lr, weight_decay=0.0, clip_grad=0.0,
                        params_dtype=torch.float32),
        [ddp],
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = ddp.no_sync
    total = torch.tensor(float(sum(b["loss_weights"].sum() for b in batches)), dtype=torch.float64)
    torch.distributed.all_reduce(total, group=ps.get_data_parallel_group())
    total = float(total)
    scale = backward_scale(len(batches))
    logits_out = []

    def forward_step(data_iterator, chunk):
        b = next(data_iterator)
        out = run(chunk, b)

        def loss_func(logits):
            logits_out.append(full_logits(logits))
            weighted = weighted_token_loss(logits, b["labels"], b["loss_weights"]).sum()
            return weighted / total * scale, {"loss": (weighted / total).detach()}

        return out, loss_func

    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[ddp],
        num_microbatches=len(batches), seq_length=batches[0]["input_ids"].shape[1],
        micro_batch_size=1, forward_only=False,
    )
    grads = gather_full_state_dict(
        [model], select=lambda p: p.main_grad if hasattr(p, "main_grad") else torch.zeros_like(p))
    ok, _, _ = optimizer.step()
    assert ok
    return grads, logits_out, ddp


def dummy_state(model, select=lambda p: p):
    """max |value| over every dummy-head entry of this rank (0.0 when none), and their count."""
    vit = model.vision_model if hasattr(model, "vision_model") else model
    worst, count = 0.0, 0
    for attn in vit.attention_modules():
        for param, index in attn.dummy_head_slices():
            t = select(param)[index]
            count += t.numel()
            if t.numel():
                worst = max(worst, float(t.abs().max()))
    return worst, count


# ---- the single-rank suite ----------------------------------------------------------------------


def single_rank_suite() -> dict:
    from megatron_internvl.data.positions import position_ids
    from megatron_internvl.models.factory import build_vision_model
    from megatron_internvl.parallel.sharding import gather_full_state_dict, load_full_state_dict
    from megatron_internvl.training.loss import weighted_token_loss

    parallel = init()
    res = {}

    # InternViT parity (300M- and 6B-style) at the native size and at a non-square other size.
    gen = torch.Generator().manual_seed(3)
    pix = torch.randn(2, 3, 56, 56, generator=gen)
    pix_other = torch.randn(1, 3, 84, 56, generator=gen)
    for name, vis in (("vit300m", VIT_300M), ("vit6b", VIT_6B)):
        cfg = model_config(vis)
        vit = build_vision_model(cfg, parallel).eval()
        load_full_state_dict(vit, lambda n, s: weights("vision_model." + n, s))
        with torch.no_grad():
            out = vit(pix).transpose(0, 1).clone()
            out_other = vit(pix_other).transpose(0, 1).clone()
        sd = {"vision_model." + k: v for k, v in gather_full_state_dict(vit).items()}
        res[name] = dict(out=out, out_other=out_other, pix=pix, pix_other=pix_other, sd=sd,
                         vision=vis)

    cfg = model_config()
    model = build(cfg, parallel).eval()
    res["num_image_token"] = (model.num_image_token, cfg.num_image_token)
    res["padded_vocab"] = (model.vocab_size, model.padded_vocab_size)

    with torch.no_grad():
        # THD pack of two samples vs each sample alone.
        b = packed_batch(11)
        res["packed_logits"] = full_logits(run(model, b))
        res["alone_logits"] = [full_logits(model(i, p, x)) for i, p, x in b["pieces"]]
        res["packed_cu"] = b["packed_seq_params"].cu_seqlens_q.clone()
        res["raw_logits"] = run(model, b).clone()  # vocab-parallel (TP=1: all, padding included)

        # Splicing order in a padded batch of two samples (1 and 2 tiles).
        gen = torch.Generator().manual_seed(5)
        a, pa = _sample(gen, 8, 1)
        c, pc = _sample(gen, 4, 2)
        ids = torch.stack([a, c])
        pixels = torch.cat([pa, pc])
        res["splice"] = dict(
            ids=ids,
            spliced=model._spliced_embeddings(ids, pixels).clone(),
            plain=model.language_model.embed(ids).clone(),
            features=model.image_features(pixels).clone(),
        )

        # Count mismatch.
        try:
            model(ids[:1, :-1].clone().fill_(IMG), torch.arange(ids.shape[1] - 1.0)[None], pa)
            res["mismatch_error"] = None
        except ValueError as exc:
            res["mismatch_error"] = str(exc)

        # V2PE: delta = 1 positions vs integers (bitwise), and delta = 1/4 changes the logits.
        i, _, x = b["pieces"][1]
        n = i.shape[1]
        span = [(int(torch.nonzero(i[0] == IMG)[0]), int(torch.nonzero(i[0] == IMG)[-1]) + 1)]
        v2pe1 = torch.from_numpy(position_ids(n, span, [1.0]))[None]
        v2pe4 = torch.from_numpy(position_ids(n, span, [0.25]))[None]
        integer = torch.arange(n, dtype=torch.float32)[None]
        res["v2pe"] = dict(
            int=full_logits(model(i, integer, x)), d1=full_logits(model(i, v2pe1, x)),
            d4=full_logits(model(i, v2pe4, x)), pos1=v2pe1, pos4=v2pe4,
        )

    # Text-only micro-batches: the ViT runs one blank tile in training (zero grads), none in eval.
    calls = []
    hook = model.vision_model.register_forward_hook(lambda *a: calls.append(1))
    t = text_batch(21)
    model.train()
    model.zero_grad(set_to_none=True)
    out = run(model, t)
    weighted_token_loss(out, t["labels"], t["loss_weights"]).sum().backward()
    vis_params = list(model.vision_model.parameters()) + list(model.projector.parameters())
    res["text_only_train"] = dict(
        vit_calls=len(calls),
        missing_grads=sum(p.grad is None for p in vis_params),
        max_abs_grad=max(float(p.grad.abs().max()) for p in vis_params if p.grad is not None),
        llm_grad=float(model.language_model.output_layer.weight.grad.abs().max()),
    )
    model.eval()
    with torch.no_grad():
        run(model, t)
    res["text_only_eval_vit_calls"] = len(calls) - res["text_only_train"]["vit_calls"]
    hook.remove()

    # Recomputation with drop-path on: same gradients as without (megatron restores the RNG).
    grads = {}
    for recompute in ("none", "full", "selective"):
        m = build(model_config(recompute=recompute, drop_path_rate=0.5), parallel).train()
        torch.manual_seed(77)
        out = run(m, b)
        weighted_token_loss(out, b["labels"], b["loss_weights"]).sum().backward()
        grads[recompute] = gather_full_state_dict(m, select=lambda p: p.grad)
        if recompute == "none":
            with torch.no_grad():
                torch.manual_seed(78)
                res["drop_path_train_out"] = m.vision_model(b["pixel_values"]).clone()
                m.eval()
                res["drop_path_eval_out"] = m.vision_model(b["pixel_values"]).clone()
                res["no_drop_path_eval_out"] = model.vision_model(b["pixel_values"]).clone()
    res["recompute_grads"] = grads

    # Freezing: MLP warm-up, and only the last ViT layer trainable (megatron DDP + optimizer).
    for name, kwargs in (("mlp_warmup", dict(vision=True, language=True)),
                         ("vit_last1", dict(vit_trainable_last_layers=1, language=True))):
        m = build(cfg, parallel).train()
        m.freeze(**kwargs)
        before = {k: p.detach().clone() for k, p in m.named_parameters()}
        _, _, ddp = train_step(m, [packed_batch(31)])
        res[name] = dict(
            changed={k: not torch.equal(before[k], p.detach()) for k, p in m.named_parameters()},
            requires_grad={k: p.requires_grad for k, p in m.named_parameters()},
            has_main_grad={k: hasattr(p, "main_grad") for k, p in m.named_parameters()},
            buffer_numel=sum(p.numel() for buf in ddp.buffers for p in buf.params),
            trainable_numel=sum(p.numel() for p in m.parameters() if p.requires_grad),
        )

    # Reference gradients and logits for the multi-rank layouts.
    m = build(cfg, parallel).train()
    res["ref_grads"], res["ref_logits"], _ = train_step(m, [packed_batch(41), packed_batch(42)])
    m = build(cfg, parallel).train()
    mixed = [text_batch(51), packed_batch(52), text_batch(53), packed_batch(54)]
    res["ref_mixed_grads"], _, _ = train_step(m, mixed, overlap=True, bucket_size=2000)
    m = build(model_config(language=QWEN3), parallel).train()
    res["ref_qwen3_grads"], _, _ = train_step(m, [packed_batch(41), packed_batch(42)])
    return res


# ---- the multi-rank suite ------------------------------------------------------------------------


def multi_rank_suite(checkpoint_dir: str) -> dict:
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from megatron_internvl.models.factory import build_vision_model
    from megatron_internvl.parallel.sharding import (
        gather_full_state_dict,
        iter_shards,
        load_full_state_dict,
        canonical_name,
        full_shape,
    )

    res = {}
    cfg = model_config()

    # 1. TP=2 x PP=2, sequence parallel, one LLM layer on the ViT's stage: logits, gradients,
    #    dummy heads (5 ViT heads -> 6: TP rank 1 holds 2 real + 1 dummy).
    parallel = init(tp=2, pp=2, sp=True, first=1)
    model = build(cfg, parallel).train()
    res["llm_layers_here"] = len(model.language_model.decoder.layers)
    res["num_image_token"] = model.num_image_token
    res["first_stage"] = ps.is_pipeline_first_stage()
    res["shapes"] = {canonical_name(sh): full_shape(sh) for sh in iter_shards(model)}
    grads, logits, _ = train_step(model, [packed_batch(41), packed_batch(42)])
    res["grads"], res["logits"] = grads, logits
    if ps.is_pipeline_first_stage():
        res["dummy_after_step"] = dummy_state(model)
        res["dummy_grad"] = dummy_state(model, lambda p: p.main_grad)
    res["params_after_step"] = gather_full_state_dict(model)
    # A distributed checkpoint of this layout (padded vocab and heads trimmed): loaded at TP=1.
    dist_checkpointing.save(model.sharded_state_dict(), checkpoint_dir)

    # 2. ViT alone at TP=4: 5 heads -> 8; rank 2 holds 1 real + 1 dummy, rank 3 only dummies.
    parallel = init(tp=4)
    vit = build_vision_model(cfg, parallel).eval()
    load_full_state_dict(vit, lambda n, s: weights("vision_model." + n, s))
    gen = torch.Generator().manual_seed(3)
    pix = torch.randn(2, 3, 56, 56, generator=gen)
    with torch.no_grad():
        res["vit_tp4_out"] = vit(pix).transpose(0, 1).clone()
    res["vit_tp4_real_heads"] = vit.attention_modules()[0]._real_local_heads()
    res["vit_tp4_sd"] = gather_full_state_dict(vit)
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    vit.train()
    ddp = DistributedDataParallel(vit.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), vit)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.1,
                                                 params_dtype=torch.float32), [ddp])
    ddp.zero_grad_buffer()
    (ddp(pix).square().mean()).backward()
    ddp.finish_grad_sync()
    res["vit_tp4_dummy_grad"] = dummy_state(vit, lambda p: p.main_grad)
    opt.step()
    res["vit_tp4_dummy_after_step"] = dummy_state(vit)
    res["vit_tp4_real_changed"] = not torch.equal(
        gather_full_state_dict(vit)["decoder.layers.0.self_attention.linear_qkv.weight"],
        res["vit_tp4_sd"]["decoder.layers.0.self_attention.linear_qkv.weight"])
    # The TP=2 x PP=2 checkpoint's vision tower, read at TP=4 (rank 3 holds only dummy heads).
    loaded = dist_checkpointing.load(vit.sharded_state_dict(prefix="vision_model."), checkpoint_dir)
    vit.load_state_dict({k[len("vision_model."):]: v for k, v in loaded.items()})
    res["vit_tp4_loaded"] = gather_full_state_dict(vit)
    res["vit_tp4_dummy_after_load"] = dummy_state(vit)

    # 3. TP=1 x DP=4: load the TP=2 x PP=2 checkpoint.
    parallel = init()
    model = build(cfg, parallel).train()
    loaded = dist_checkpointing.load(model.sharded_state_dict(), checkpoint_dir)
    res["load_report"] = str(model.load_state_dict(loaded, strict=False))
    res["params_loaded"] = gather_full_state_dict(model)

    # 4. DP=4 with overlapped, bucketed gradient reduction; ranks 0 and 2 get text-only batches.
    model = build(cfg, parallel).train()
    mixed = [text_batch(51), packed_batch(52), text_batch(53), packed_batch(54)]
    rank = ps.get_data_parallel_rank()
    res["mixed_grads"], _, _ = train_step(model, [mixed[rank]], overlap=True, bucket_size=2000)

    # 5. PP=2 x DP=2 with no LLM layer on the first stage (ViT, projector, embedding only).
    parallel = init(pp=2, first=0)
    model = build(cfg, parallel).train()
    res["first0_llm_layers_here"] = len(model.language_model.decoder.layers)
    batch = [packed_batch(41), packed_batch(42)][ps.get_data_parallel_rank()]
    res["first0_grads"], res["first0_logits"], _ = train_step(model, [batch])

    # 6. TP=2 x DP=2, ViT-6B (QK norms split over TP) under a Qwen3 LLM (QK norms replicated):
    #    megatron's name rule would TP-sum both kinds (training/grads.py).
    parallel = init(tp=2)
    model = build(model_config(language=QWEN3), parallel).train()
    batch = [packed_batch(41), packed_batch(42)][ps.get_data_parallel_rank()]
    res["qwen3_grads"], _, _ = train_step(model, [batch])
    return res
