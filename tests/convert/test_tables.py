"""The mapping tables and transforms on their own (no ranks): inverses, layouts, tying."""

import json
import shutil

import torch
from safetensors.torch import load_file, save_file

from megatron_internvl.convert.hf_config import parse
from megatron_internvl.convert.importer import plan
from megatron_internvl.convert.mapping import Mapping, dims_of
from megatron_internvl.convert.transforms import GATE_UP, LM_QKV, VIT_QKV, VIT_QKV_CONCAT, expected_hf_shapes


def test_transforms_are_exact_inverses(tiny):
    model = parse(tiny.dirs["qwen2"]).model
    dims = dims_of(model)  # 4 heads, 2 KV groups, head_dim 16; ViT 4 heads of 8
    gen = torch.Generator().manual_seed(0)
    for kind, shape in ((LM_QKV, (128, 64)), (LM_QKV, (128,)), (VIT_QKV, (96, 32)),
                        (VIT_QKV_CONCAT, (96, 32)), (GATE_UP, (256, 64))):
        full = torch.randn(shape, generator=gen)
        parts = kind.to_hf(full, dims)
        assert [tuple(p.shape) for p in parts] == expected_hf_shapes(kind, shape, dims)
        assert torch.equal(kind.to_megatron(parts, shape, dims), full), kind


def test_grouped_qkv_order(tiny):
    """Megatron's fused rows: per KV group, the group's q heads, then its k head, then its v head."""
    dims = dims_of(parse(tiny.dirs["qwen2"]).model)
    d = dims.lm_head_dim
    q = torch.arange(4 * d).float()[:, None] + 1000  # heads 0..3
    k = torch.arange(2 * d).float()[:, None] + 2000  # groups 0..1
    v = torch.arange(2 * d).float()[:, None] + 3000
    fused = LM_QKV.to_megatron([q, k, v], (8 * d, 1), dims)[:, 0]
    expected = torch.cat([q[: 2 * d, 0], k[:d, 0], v[:d, 0], q[2 * d :, 0], k[d:, 0], v[d:, 0]])
    assert torch.equal(fused, expected)
    # The ViT: one group per head, from remote code's [all q; all k; all v].
    vd = dims.vit_head_dim
    qkv = torch.arange(3 * 4 * vd).float()[:, None]
    fused = VIT_QKV_CONCAT.to_megatron([qkv], (12 * vd, 1), dims)[:, 0]
    head1 = torch.cat([qkv[vd : 2 * vd, 0], qkv[5 * vd : 6 * vd, 0], qkv[9 * vd : 10 * vd, 0]])
    assert torch.equal(fused[3 * vd : 6 * vd], head1)


def test_every_hf_tensor_is_mapped_once(tiny):
    from megatron_internvl.convert.safetensors_io import SafetensorsReader
    from megatron_internvl.convert.tables import HF_ALIASES

    for name in ("qwen2", "qwen2-vit6b", "llama", "internlm2-remote", "internlm3", "internlm3-remote"):
        _, _, mapping = plan(tiny.dirs[name], 1, 1)
        names = mapping.hf_names()
        assert len(names) == len(set(names)), name
        assert set(names) == set(SafetensorsReader(tiny.dirs[name], HF_ALIASES).names()), name


def test_6b_qk_norm_names(tiny):
    _, _, mapping = plan(tiny.dirs["qwen2-vit6b"], 1, 1)
    row = mapping.entries["vision_model.decoder.layers.1.self_attention.q_layernorm.weight"]
    assert row[1] == ("vision_tower.encoder.layer.1.attention.q_norm.weight",)
    remote = Mapping("remote-code", parse(tiny.dirs["qwen2-vit6b"]).model)
    assert remote.entries["vision_model.decoder.layers.1.self_attention.k_layernorm.weight"][1] == (
        "vision_model.encoder.layers.1.attn.k_norm.weight",)


def test_tied_checkpoint_without_lm_head(tiny, tmp_path):
    hf_dir = tmp_path / "tied"
    shutil.copytree(tiny.dirs["qwen2"], hf_dir)
    tensors = load_file(str(hf_dir / "model.safetensors"))
    tensors.pop("language_model.lm_head.weight")
    save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.pop("tie_word_embeddings")  # transformers' default for InternVL: tied
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    hf, job, mapping = plan(hf_dir, 1, 1)
    assert hf.tied and job.tied
    assert mapping.entries["language_model.output_layer.weight"][1] == (
        "language_model.model.embed_tokens.weight",)
    # The untied original (tied by default config, but with its own lm_head) stays untied.
    hf, _, mapping = plan(tiny.dirs["qwen2"], 1, 1)
    assert not hf.tied
