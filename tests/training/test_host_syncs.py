"""No host read per layer or per sample, on either spec (issue 25, item 3).

One spawned rank counts the reads that would make the host wait for a GPU
(:class:`megatron_internvl.training.host_reads.HostReads`) during one training step of the tiny
model with 1 or 3 LLM layers, 1 or 3 ViT layers and short or long packs, and during a forward and
backward of the LLM built from the Transformer Engine layer spec, whose TE modules are replaced
by local modules that honour their constructor and call contract (no TE on CPU). A control run
with megatron's own ``SelfAttention`` in that spec shows the counter sees megatron's per-layer
reads of ``cu_seqlens``.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from harness import run_ranks
from training.runner import ROOT

# Reads one training step may make, written down (measured: 4 per micro-batch, 9 per step):
# per micro-batch its loss-weight sum, the sample lengths for FLOPs, the CPU attention's segment
# bounds (none on CUDA: varlen_attn or TE), the fused loss's supervised tokens; per step the loss
# and per-dataset sums, the gradient norm, the non-finite check, the token and tile counters.
PER_MICRO_BATCH = 5
PER_STEP = 12
MICRO_BATCHES = 2


# ---- rank side ------------------------------------------------------------------------------


def _step_reads(data_dir: str, llm_layers: int, vit_layers: int, max_tokens: int) -> dict:
    from megatron_internvl.config import load_config
    from megatron_internvl.data.build import build_data_loader, build_tokenizer
    from megatron_internvl.models.factory import build_model_chunks
    from megatron_internvl.parallel import distributed
    from megatron_internvl.training.host_reads import HostReads, optimizer_host_tensors
    from megatron_internvl.training.setup import build_optimizer
    from megatron_internvl.training.stages import apply_stage
    from megatron_internvl.training.step import train_step

    cfg = load_config(ROOT / "examples" / "tiny" / "base.yaml", [
        f"data.meta_path={data_dir}/meta.json", f"data.tokenizer_path={data_dir}/tokenizer.json",
        "model.spec=local", f"model.language.num_layers={llm_layers}",
        f"model.vision.num_layers={vit_layers}", f"data.max_tokens={max_tokens}"])
    distributed.initialize(cfg.parallel, seed=cfg.training.seed)
    chunks = build_model_chunks(cfg, under_ddp=True)  # as training builds them
    apply_stage(chunks, cfg.training)
    ddp, optimizer, scheduler = build_optimizer(cfg, chunks)
    loader = build_data_loader(cfg.data, build_tokenizer(cfg.data))
    out = {}
    for fused in (True, False):
        # The first step creates the optimizer state; the second is counted.
        for counted in (False, True):
            batches = [next(loader) for _ in range(MICRO_BATCHES)]
            with HostReads(ignore=optimizer_host_tensors(optimizer)) as reads:
                result = train_step(ddp, optimizer, scheduler, batches, dtype=torch.float32,
                                    num_datasets=1, fused_loss=fused)
            assert result.updated
        out["fused" if fused else "logits"] = dict(reads.counts)
    out["samples_per_pack"] = max(len(b["cu_seqlens"]) - 1 for b in batches)
    return out


def _te_stand_in():
    """``megatron.core.extensions.transformer_engine`` and megatron's ``TESpecProvider`` as
    local modules with TE's contract: the fused norm + column linear takes TE's constructor
    arguments and returns ``(output, bias)``; core attention takes TEDotProductAttention's."""
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from megatron_internvl.models.attention import CoreAttention
    from megatron_internvl.models.norms import Norm

    class NormColumnParallelLinear(ColumnParallelLinear):
        """TELayerNormColumnParallelLinear: the layer's RMSNorm inside the linear, its weight
        named ``layer_norm_weight`` as TE names it."""

        def __init__(self, input_size, output_size, *, config, **kwargs):
            super().__init__(input_size, output_size, config=config, **kwargs)
            self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size, dtype=config.params_dtype))
            self.eps = config.layernorm_epsilon

        def forward(self, x, *args, **kwargs):
            x = torch.nn.functional.rms_norm(x, x.shape[-1:], self.layer_norm_weight, self.eps)
            return super().forward(x, *args, **kwargs)

    class Provider(LocalSpecProvider):
        def fuse_layernorm_and_linear(self):
            return True

        def column_parallel_layer_norm_linear(self):
            return NormColumnParallelLinear

        def column_parallel_linear(self):
            return ColumnParallelLinear

        def row_parallel_linear(self):
            return RowParallelLinear

        def layer_norm(self, rms_norm: bool = False, for_qk: bool = False):
            return Norm

        def core_attention(self):
            return CoreAttention

    # megatron's module imports without TE (its classes then refuse to build): the stand-ins
    # take the names the specs read.
    module = importlib.import_module("megatron.core.extensions.transformer_engine")
    module.TENorm = Norm
    module.TELayerNormColumnParallelLinear = NormColumnParallelLinear
    module.TEDotProductAttention = CoreAttention
    module.TERowParallelLinear = RowParallelLinear
    module.TEColumnParallelLinear = ColumnParallelLinear
    return Provider


def _packed_input(samples: list[int], vocab: int):
    from megatron.core.packed_seq_params import PackedSeqParams

    gen = torch.Generator().manual_seed(3)
    total = sum(samples)
    cu = torch.tensor([0] + samples, dtype=torch.int32).cumsum(0).to(torch.int32)
    positions = torch.cat([torch.arange(n, dtype=torch.float32) for n in samples])[None]
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=max(samples), max_seqlen_kv=max(samples))
    return torch.randint(0, vocab, (1, total), generator=gen), positions, params


def _te_spec_reads() -> dict:
    """The LLM from the TE layer spec (stand-in modules) against the local spec: logits and
    reads over a forward and backward, for 1 and 3 layers; and megatron's SelfAttention."""
    import megatron.core.models.gpt.gpt_layer_specs as gpt_layer_specs
    from megatron.core.transformer.attention import SelfAttention

    from megatron_internvl.config import ParallelConfig, build_dataclass, load_config
    from megatron_internvl.models import specs
    from megatron_internvl.models.attention import PackedRotarySelfAttention
    from megatron_internvl.models.factory import language_transformer_config
    from megatron_internvl.models.language import LanguageModel
    from megatron_internvl.parallel import distributed
    from megatron_internvl.training.host_reads import HostReads

    gpt_layer_specs.TESpecProvider = _te_stand_in()
    cfg = load_config(ROOT / "examples" / "tiny" / "base.yaml", ["model.spec=local"])
    parallel = build_dataclass(ParallelConfig, {})
    distributed.initialize(parallel, seed=1)
    out = {"attention": specs.te_decoder_layer_spec().submodules.self_attention.module.__name__}
    assert out["attention"] == PackedRotarySelfAttention.__name__

    def build(layers: int, layer_spec):
        cfg.model.language.num_layers = layers
        config = language_transformer_config(cfg.model, parallel)
        torch.manual_seed(0)
        return LanguageModel(config, layer_spec, vocab_size=cfg.model.language.vocab_size,
                             rope_theta=cfg.model.language.rope_theta, max_sequence_length=4096)

    def run(model, samples):
        ids, positions, params = _packed_input(samples, cfg.model.language.vocab_size)
        with HostReads() as reads:
            logits = model(ids, positions, packed_seq_params=params)
            logits.float().square().mean().backward()
        return logits.detach(), reads.total

    fused_names = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
                   "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
    samples = [5, 9, 3, 7]
    for layers in (1, 3):
        local = build(layers, specs.local_decoder_layer_spec())
        te = build(layers, specs.te_decoder_layer_spec())
        te_params = dict(te.named_parameters())
        with torch.no_grad():
            for name, p in local.named_parameters():
                for old, new in fused_names.items():
                    name = name.replace(old, new)
                te_params.pop(name).copy_(p)
        assert not te_params, f"TE-spec parameters without a local counterpart: {sorted(te_params)}"
        local_logits, out[f"local_{layers}"] = run(local, samples)
        te_logits, out[f"te_{layers}"] = run(te, samples)
        out[f"te_equals_local_{layers}"] = torch.equal(te_logits, local_logits)
        megatron_spec = specs.te_decoder_layer_spec()
        megatron_spec.submodules.self_attention.module = SelfAttention
        out[f"megatron_{layers}"] = run(build(layers, megatron_spec), samples)[1]
    out["te_3_more_samples"] = run(te, samples * 3)[1]
    return out


def _grads_finite_cases() -> dict:
    from types import SimpleNamespace

    from megatron_internvl.parallel import distributed
    from megatron_internvl.config import ParallelConfig, build_dataclass
    from megatron_internvl.training.host_reads import HostReads
    from megatron_internvl.training.step import _grads_finite

    distributed.initialize(build_dataclass(ParallelConfig, {}), seed=1)

    def chunk(*grads):
        return SimpleNamespace(buffers=[SimpleNamespace(grad_data=g) for g in grads],
                               expert_parallel_buffers=[])

    out = {}
    for name, bad in (("finite", None), ("inf", float("inf")), ("-inf", float("-inf")), ("nan", float("nan"))):
        grads = [torch.ones(100) for _ in range(6)]
        if bad is not None:
            grads[4][17] = bad
        with HostReads() as reads:
            out[name] = _grads_finite([chunk(*grads[:3]), chunk(*grads[3:5]), chunk(grads[5])])
        out[f"{name}_reads"] = reads.total
    plus, minus = torch.ones(10), torch.ones(10)
    plus[0], minus[0] = float("inf"), float("-inf")
    out["inf_and_minus_inf"] = _grads_finite([chunk(plus, minus)])
    out["bf16_finite"] = _grads_finite([chunk(torch.full((10,), 1e30).bfloat16())])
    return out


def host_reads_suite(data_dir: str) -> dict:
    """Every count of this file in one spawned process (imports cost ~7 s per process)."""
    out = {"finite": _grads_finite_cases(), "te": _te_spec_reads()}
    for llm, vit, tokens in ((1, 1, 256), (3, 1, 256), (1, 3, 256), (1, 1, 1024)):
        out[(llm, vit, tokens)] = _step_reads(data_dir, llm, vit, tokens)
    return out


# ---- tests ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def counts(tiny_data):
    return run_ranks(host_reads_suite, 1, str(tiny_data), timeout=400)[0]


@pytest.mark.parametrize("loss", ["fused", "logits"])
def test_step_reads_do_not_grow_with_layers_or_samples(counts, loss):
    base = counts[(1, 1, 256)]
    assert counts[(1, 1, 1024)]["samples_per_pack"] >= 2 * base["samples_per_pack"]
    for key in ((3, 1, 256), (1, 3, 256), (1, 1, 1024)):
        assert counts[key][loss] == base[loss], f"{key}: {counts[key][loss]} != {base[loss]}"
    total = sum(base[loss].values())
    assert 0 < total <= PER_MICRO_BATCH * MICRO_BATCHES + PER_STEP, base[loss]


def test_te_spec_uses_packed_rope_attention_without_reads_per_layer(counts):
    te = counts["te"]
    assert te["attention"] == "PackedRotarySelfAttention"
    assert te["te_equals_local_1"] and te["te_equals_local_3"]
    assert te["te_1"] == te["te_3"] == te["local_1"] == te["local_3"] == te["te_3_more_samples"]
    assert te["te_1"] <= 2, te  # the CPU attention's segment bounds, once per micro-batch
    # The counter sees megatron's own THD RoPE reading cu_seqlens back in every layer.
    assert te["megatron_3"] > te["megatron_1"] > te["te_1"]


def test_non_finite_check_reads_once(counts):
    finite = counts["finite"]
    assert finite["finite"] and finite["bf16_finite"]
    assert not finite["inf"] and not finite["-inf"] and not finite["nan"]
    assert not finite["inf_and_minus_inf"]
    assert {finite[f"{n}_reads"] for n in ("finite", "inf", "-inf", "nan")} == {1}
