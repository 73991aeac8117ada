"""What the CPU and the CUDA attention paths of the local spec share, checked on CPU.

- ``varlen_attn``'s signature check and call adaptation, against fake functions with the 2.10
  (``is_causal``), 2.11 (``window_size``, ``scale``) and 2.12+ (``enable_gqa``) signatures that
  compute float64 attention, and against one that lacks the API (a clear error);
- the backend chosen for every device x dtype x layout (nothing is allocated on the device);
- the packed micro-batch's cu_seqlens / max length / host boundaries are prepared once per
  micro-batch, not per layer, and megatron's THD RoPE (a host read-back per layer) is not called,
  while the logits stay bitwise those of megatron's own RoPE path.
- ``model.flash_attention`` (models/flash.py): the FA3 / PyTorch-default decision for every
  GPU x torch registry x kernel availability, its error texts, and that building a model
  activates FA3 once per process (torch's registry, CUDA and the GPU replaced by stand-ins).
The CUDA kernels themselves run in the GPU check (bench/gpu/run.sh).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType

from harness import run_ranks
from megatron_internvl.models import attention as attn
from megatron_internvl.models import flash

CU = [0, 5, 12, 12, 16]  # an empty segment too
HQ, HKV, D = 4, 2, 8


def reference(q, k, v, cu, causal: bool, scale: float) -> torch.Tensor:
    """float64 attention per segment; query head h reads key/value head h // (HQ / HKV)."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q)
    for a, b in zip(cu[:-1], cu[1:]):
        for h in range(q.shape[1]):
            s = q[a:b, h] @ k[a:b, h // group].T * scale
            if causal:
                s = s.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool).triu(1), float("-inf"))
            out[a:b, h] = torch.softmax(s, -1) @ v[a:b, h // group]
    return out


def qkv(seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = CU[-1]
    return (torch.randn(t, HQ, D, generator=gen), torch.randn(t, HKV, D, generator=gen),
            torch.randn(t, HKV, D, generator=gen))


def _check_lengths(cu_seq_q, cu_seq_k, max_q, max_k):
    assert cu_seq_q.dtype == torch.int32 and cu_seq_k is cu_seq_q
    assert isinstance(max_q, int) and max_q == max_k == max(b - a for a, b in zip(CU[:-1], CU[1:]))


calls = []


def varlen_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    _check_lengths(cu_seq_q, cu_seq_k, max_q, max_k)
    assert key.shape[1] == query.shape[1], "2.10 has no GQA"
    calls.append({"is_causal": is_causal})
    return reference(query, key, value, cu_seq_q.tolist(), is_causal, 1 / math.sqrt(query.shape[-1])).to(query.dtype)


def varlen_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1)):
    _check_lengths(cu_seq_q, cu_seq_k, max_q, max_k)
    assert key.shape[1] == query.shape[1], "no enable_gqa in this signature"
    calls.append({"window_size": tuple(window_size), "scale": scale})
    return reference(query, key, value, cu_seq_q.tolist(), tuple(window_size) == (-1, 0), scale).to(query.dtype)


def varlen_2_12(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    _check_lengths(cu_seq_q, cu_seq_k, max_q, max_k)
    assert enable_gqa or key.shape[1] == query.shape[1]
    calls.append({"window_size": tuple(window_size), "scale": scale, "enable_gqa": enable_gqa})
    return reference(query, key, value, cu_seq_q.tolist(), tuple(window_size) == (-1, 0), scale).to(query.dtype)


@pytest.mark.parametrize("fn", [varlen_2_10, varlen_2_11, varlen_2_12])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("scale", [1 / math.sqrt(D), 0.3])
def test_varlen_adapter_matches_float64_attention(fn, causal, scale):
    adapter = attn.varlen_adapter(fn)
    q, k, v = qkv()
    cu = torch.tensor(CU, dtype=torch.int32)
    calls.clear()
    out = adapter(q, k, v, cu, 7, causal, scale)
    torch.testing.assert_close(out.double(), reference(q, k, v, CU, causal, scale), rtol=1e-5, atol=1e-5)
    (call,) = calls
    if fn is varlen_2_12:
        assert call == {"window_size": (-1, 0) if causal else (-1, -1), "scale": scale, "enable_gqa": True}
    elif fn is varlen_2_11:
        assert call == {"window_size": (-1, 0) if causal else (-1, -1), "scale": scale}
    else:
        assert call == {"is_causal": causal}


def test_varlen_adapter_describes_itself():
    assert attn.varlen_adapter(varlen_2_10).describe() == "varlen_attn(is_causal, GQA by repeating k/v)"
    assert attn.varlen_adapter(varlen_2_12).describe() == "varlen_attn(window_size, scale, enable_gqa)"


def test_installed_torch_varlen_is_recognised():
    # This machine's torch (2.13) ships the module; its CUDA kernels are what the GPU check runs.
    assert isinstance(attn.VARLEN_ATTN, attn.VarlenAdapter), attn.VARLEN_ATTN
    assert attn.VARLEN_ATTN.causal_arg == "window_size"


def flash_attn_style(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False):
    raise AssertionError("never called")


def no_causal(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None):
    raise AssertionError("never called")


@pytest.mark.parametrize("fn,message", [
    (None, r"has no torch.nn.attention.varlen.varlen_attn.*PyTorch >= 2.10.*model.spec=te"),
    (flash_attn_style, r"signature this code does not know.*PyTorch >= 2.10"),
    (no_causal, r"neither window_size nor is_causal"),
])
def test_varlen_signature_check_rejects_clearly(fn, message):
    with pytest.raises(attn.VarlenUnavailable, match=message):
        attn.varlen_adapter(fn)


def test_missing_varlen_only_fails_where_it_is_needed():
    missing = attn.VarlenUnavailable("torch X has no varlen_attn")
    with pytest.raises(attn.VarlenUnavailable, match="has no varlen_attn"):
        attn.select_backend("cuda", torch.bfloat16, packed=True, varlen=missing)
    assert attn.select_backend("cuda", torch.float32, packed=True, varlen=missing) == attn.PER_SAMPLE
    assert attn.select_backend("cpu", torch.bfloat16, packed=True, varlen=missing) == attn.PER_SAMPLE
    assert attn.select_backend("cuda", torch.bfloat16, packed=False, varlen=missing) == attn.FUSED


@pytest.mark.parametrize("device,dtype,packed,masked,dropout,expected", [
    ("cuda", torch.bfloat16, True, False, 0.0, attn.VARLEN),
    ("cuda", torch.float16, True, False, 0.0, attn.VARLEN),
    ("cuda", torch.float32, True, False, 0.0, attn.PER_SAMPLE),  # flash has no fp32
    ("cuda", torch.bfloat16, True, False, 0.1, attn.PER_SAMPLE),  # varlen_attn has no dropout
    ("cpu", torch.bfloat16, True, False, 0.0, attn.PER_SAMPLE),
    ("cpu", torch.float32, True, False, 0.0, attn.PER_SAMPLE),
    ("cuda", torch.bfloat16, False, False, 0.0, attn.FUSED),  # ViT tiles
    ("cuda", torch.float32, False, False, 0.0, attn.FUSED),
    ("cuda", torch.bfloat16, False, True, 0.0, attn.SDPA),  # explicit mask: SDPA chooses
    ("cpu", torch.bfloat16, False, False, 0.0, attn.SDPA),
    ("cpu", torch.float32, False, True, 0.0, attn.SDPA),
])
def test_backend_by_device_and_dtype(device, dtype, packed, masked, dropout, expected):
    fake = attn.varlen_adapter(varlen_2_12)
    assert attn.select_backend(torch.device(device), dtype, packed, masked, dropout, varlen=fake) == expected
    assert attn.select_backend(device, dtype, packed, masked, dropout, varlen=fake) == expected


def test_cpu_packed_attention_matches_float64():
    from megatron.core.packed_seq_params import PackedSeqParams

    config = SimpleNamespace(context_parallel_size=1, attention_dropout=0.0, kv_channels=D)
    cu = torch.tensor(CU, dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=7,
                             max_seqlen_kv=7)
    q, k, v = qkv(1)
    for mask_type, causal in ((AttnMaskType.causal, True), (AttnMaskType.no_mask, False)):
        core = attn.CoreAttention(config, 1, mask_type)
        out = core(q, k, v, None, packed_seq_params=params)
        want = reference(q, k, v, CU, causal, 1 / math.sqrt(D)).reshape(CU[-1], -1)
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fake", [varlen_2_10, varlen_2_11, varlen_2_12])
def test_core_attention_varlen_branch_with_a_fake_kernel(monkeypatch, fake):
    """The CUDA branch of CoreAttention (shapes, cu_seqlens, max length, GQA, scale) wired to a
    fake varlen_attn on CPU gives the per-sample CPU result."""
    from megatron.core.packed_seq_params import PackedSeqParams

    config = SimpleNamespace(context_parallel_size=1, attention_dropout=0.0, kv_channels=D)
    cu = torch.tensor(CU, dtype=torch.int32)
    q, k, v = qkv(2)
    core = attn.CoreAttention(config, 1, AttnMaskType.causal, softmax_scale=0.2)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=7, max_seqlen_kv=7)
    want = core(q, k, v, None, packed_seq_params=params)
    monkeypatch.setattr(attn, "VARLEN_ATTN", attn.varlen_adapter(fake))
    monkeypatch.setattr(attn, "select_backend", lambda *a, **k: attn.VARLEN if k.get("packed") else attn.SDPA)
    calls.clear()
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=7, max_seqlen_kv=7)
    got = core(q, k, v, None, packed_seq_params=params)
    assert len(calls) == 1 and got.shape == want.shape == (CU[-1], HQ * D)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fused_sdpa_branch_equals_plain_sdpa(monkeypatch):
    """The ViT's CUDA branch (SDPA restricted to the fused backends) on CPU's fused kernel."""
    config = SimpleNamespace(context_parallel_size=1, attention_dropout=0.0, kv_channels=D)
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(9, 3, HQ, D, generator=gen) for _ in range(3))  # [S, tiles, H, D]
    core = attn.CoreAttention(config, 1, AttnMaskType.no_mask)
    want = core(q, k, v, None)
    monkeypatch.setattr(attn, "select_backend", lambda *a, **k: attn.FUSED)
    torch.testing.assert_close(core(q, k, v, None), want, rtol=1e-5, atol=1e-5)


def test_segments_without_max_length_are_computed_once():
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = torch.tensor(CU, dtype=torch.int64)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    seg = attn.packed_segments(params)
    assert seg.cu_seqlens.dtype == torch.int32 and seg.max_seqlen == 7
    assert seg.bounds() == [(0, 5), (5, 12), (12, 16)]
    assert attn.packed_segments(params) is seg


# --- model.flash_attention: FA3 or PyTorch's default ---------------------------------------------
MISSING = "flash_attn_interface does not import (ModuleNotFoundError: No module named 'flash_attn_interface')"


class FakeRegistry:
    """torch.nn.attention's flash registry (>= 2.12) with a counting activate."""

    def __init__(self, impls=("FA3", "FA4"), fail=None):
        self.impls, self.fail, self.active, self.activated = list(impls), fail, None, []

    def install(self, monkeypatch):
        from torch.nn import attention as torch_attention

        monkeypatch.setattr(torch_attention, "list_flash_attention_impls", lambda: sorted(self.impls))
        monkeypatch.setattr(torch_attention, "current_flash_attention_impl", lambda: self.active)
        monkeypatch.setattr(torch_attention, "activate_flash_attention_impl", self.activate)
        monkeypatch.setattr(torch_attention, "restore_flash_attention_impl", self.restore)
        return self

    def activate(self, impl):
        if impl not in self.impls:
            raise ValueError(f"Unknown flash attention impl '{impl}'")
        if self.fail:
            raise self.fail
        self.activated.append(impl)
        self.active = impl

    def restore(self):
        self.active = None


@pytest.fixture
def machine(monkeypatch):
    """A CUDA machine of a given compute capability, a fresh process-wide decision cache."""
    monkeypatch.setattr(flash, "_APPLIED", {})

    def make(capability=(9, 0), impls=("FA3", "FA4"), kernels=None, fail=None):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: capability is not None)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
        monkeypatch.setattr(flash, "fa3_kernels_error", lambda: kernels)
        return FakeRegistry(impls, fail).install(monkeypatch)
    return make


@pytest.mark.parametrize("capability,impls,kernels,te,want", [
    ((9, 0), ("FA3", "FA4"), None, False, "FA3"),
    ((9, 0), ("FA3",), MISSING, False, "FA3's kernels are missing"),
    ((9, 0), ("FA4",), None, False, "has a registry of ['FA4'], no FA3"),  # torch 2.10 / 2.11
    ((8, 0), ("FA3",), None, False, "compute capability 8.0"),
    ((10, 0), ("FA3",), None, False, "compute capability 10.0"),
    (None, ("FA3",), None, False, "no CUDA device"),
    ((9, 0), ("FA3",), None, True, "Transformer Engine spec"),
])
def test_flash_auto_decision_table(machine, capability, impls, kernels, te, want):
    registry = machine(capability, impls, kernels)
    plan = flash.apply_flash_attention("auto", te_spec=te)
    if want == "FA3":
        assert plan.impl == "FA3" and registry.activated == ["FA3"]
    else:
        assert plan.impl is None and want in plan.reason and registry.activated == []
    # fa3 = required: the same machines either activate FA3 or stop with a fix; default never activates.
    flash._APPLIED.clear()
    registry.active, registry.activated = None, []
    if want == "FA3" or capability is None:
        assert flash.apply_flash_attention("fa3", te_spec=te).impl == (None if capability is None else "FA3")
    else:
        with pytest.raises(flash.FlashAttentionUnavailable, match="model.flash_attention=fa3"):
            flash.apply_flash_attention("fa3", te_spec=te)
    assert flash.apply_flash_attention("default", te_spec=te).impl is None
    assert registry.active is None  # default restores what fa3 had activated


@pytest.mark.parametrize("case,message", [
    (dict(kernels=MISSING), r"FA3's kernels are missing \(flash_attn_interface does not import.*"
                            r"pip install flash-attn-3 --find-links https://download.pytorch.org/whl/flash-attn-3/"),
    (dict(impls=("FA4",)), r"has a registry of \['FA4'\], no FA3: install torch >= 2.12"),
    (dict(capability=(8, 6)), r"compute capability 8.6: FA3 runs on Hopper \(9.0\) only"),
    (dict(fail=RuntimeError("Module 'flash_attn_interface' does not expose FA3 kernels")),
     r"activating FA3 failed \(Module 'flash_attn_interface' does not expose FA3 kernels\).*hopper"),
])
def test_required_fa3_errors_name_the_fix(machine, case, message):
    machine(**case)
    with pytest.raises(flash.FlashAttentionUnavailable, match=message) as err:
        flash.apply_flash_attention("fa3")
    assert "model.flash_attention=auto" in str(err.value) or "activating" in str(err.value)


def test_auto_keeps_the_default_when_activation_fails(machine, caplog):
    registry = machine(fail=RuntimeError("FA3 requires compute capability 9.0"))
    with caplog.at_level("WARNING", logger=flash.__name__):
        plan = flash.apply_flash_attention("auto")
    assert plan.impl is None and "activating FA3 failed" in plan.reason and registry.active is None
    assert "on a Hopper GPU, where FA3 is faster" in caplog.text


def test_torch_without_the_registry(machine, monkeypatch):
    """torch < 2.9 has no activate_flash_attention_impl: auto keeps the default quietly."""
    from torch.nn import attention as torch_attention

    machine()
    monkeypatch.delattr(torch_attention, "activate_flash_attention_impl")
    plan = flash.apply_flash_attention("auto")
    assert plan.impl is None and "no flash-attention registry, no FA3" in plan.reason
    with pytest.raises(flash.FlashAttentionUnavailable, match=r"install torch >= 2.12"):
        flash.apply_flash_attention("fa3")


def test_fa3_kernels_check_follows_torchs_registration(monkeypatch):
    # torch's register_flash_attention_fa3 imports flash_attn_interface, then needs
    # torch.ops.flash_attn_3.fwd and .bwd.
    assert flash.fa3_kernels_error() == MISSING  # not installed on this machine
    monkeypatch.setitem(__import__("sys").modules, "flash_attn_interface", SimpleNamespace())
    assert "defines no torch.ops.flash_attn_3 fwd/bwd kernels" in flash.fa3_kernels_error()


def test_flash_attention_is_a_validated_model_field():
    from megatron_internvl.config import ConfigError
    from megatron_internvl.config.schema import ModelConfig

    assert ModelConfig().flash_attention == "auto"
    with pytest.raises(ConfigError, match=r"model.flash_attention='fa2': use 'auto', 'fa3' or 'default'"):
        ModelConfig(flash_attention="fa2").validate()


# --- through the model (one spawned rank) --------------------------------------------------------
def model_paths_worker():
    from megatron.core.transformer import attention as megatron_attention
    from megatron.core.transformer.attention import SelfAttention
    from models.workers import build, full_logits, init, model_config, packed_batch, run

    from megatron_internvl.models import specs

    parallel = init()
    cfg = model_config()
    # A Hopper machine with FA3 installed, as far as models/flash.py can tell: the two builds
    # below activate it once (the kernels themselves stay CPU's).
    from torch.nn import attention as torch_attention

    activated = []
    flash.cuda_capability = lambda: (9, 0)
    flash.fa3_kernels_error = lambda: None
    torch_attention.list_flash_attention_impls = lambda: ["FA3"]
    torch_attention.current_flash_attention_impl = lambda: activated[-1] if activated else None
    torch_attention.activate_flash_attention_impl = activated.append
    model = build(cfg, parallel).eval()
    counts = {"prepare": 0, "bounds": 0, "megatron_rope": 0}
    prepare, bounds, rope = attn.prepare_segments, attn.PackedSegments.bounds, megatron_attention.apply_rotary_pos_emb

    def counting_prepare(*a, **k):
        counts["prepare"] += 1
        return prepare(*a, **k)

    def counting_bounds(self):
        counts["bounds"] += self._bounds is None
        return bounds(self)

    def counting_rope(*a, **k):
        counts["megatron_rope"] += 1
        return rope(*a, **k)

    attn.prepare_segments = counting_prepare
    attn.PackedSegments.bounds = counting_bounds
    megatron_attention.apply_rotary_pos_emb = counting_rope
    res = {"layers": cfg.language.num_layers}
    batches = [packed_batch(21), packed_batch(22, samples=((5, 1), (3, 0), (6, 2)), total=32)]
    with torch.no_grad():
        res["ours"] = [full_logits(run(model, b)) for b in batches]
        res["packed_counts"] = dict(counts)
        model(*batches[0]["pieces"][0])  # a padded (sbhd) batch: megatron's RoPE path
        res["sbhd_rope_calls"] = counts["megatron_rope"]
        # The same weights with megatron's own SelfAttention (its THD RoPE) for comparison.
        specs.PackedRotarySelfAttention = SelfAttention
        try:
            plain = build(cfg, parallel).eval()
        finally:
            specs.PackedRotarySelfAttention = attn.PackedRotarySelfAttention
        fresh = [packed_batch(21), packed_batch(22, samples=((5, 1), (3, 0), (6, 2)), total=32)]
        res["megatron"] = [full_logits(run(plain, b)) for b in fresh]
    res["plain_type"] = type(plain.language_model.decoder.layers[0].self_attention).__name__
    res["flash_activations"] = activated
    return res


@pytest.fixture(scope="module")
def paths():
    return run_ranks(model_paths_worker, 1, timeout=240)[0]


def test_packed_segments_prepared_once_per_micro_batch(paths):
    assert paths["layers"] >= 2
    counts = paths["packed_counts"]
    assert counts["prepare"] == 2, counts  # two micro-batches, not 2 x layers
    assert counts["bounds"] == 2, counts  # one host read-back of cu_seqlens per micro-batch
    assert counts["megatron_rope"] == 0, counts  # megatron's THD RoPE reads cu_seqlens per layer


def test_packed_rotary_is_bitwise_megatron_rope(paths):
    assert paths["plain_type"] == "SelfAttention"
    assert paths["sbhd_rope_calls"] > 0  # the counter does see megatron's RoPE when it runs
    for ours, theirs in zip(paths["ours"], paths["megatron"]):
        assert torch.equal(ours, theirs)


def test_model_builds_activate_fa3_once_per_process(paths):
    assert paths["flash_activations"] == ["FA3"]  # two builds, one activation
