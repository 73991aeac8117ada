"""Imported checkpoints compute what transformers computes, at every TP x PP layout.

One 4-rank spawn imports each tiny checkpoint at its layout and runs forwards at the same and at
other layouts (dist_checkpointing reshards); logits must match transformers' own forward within
a relative L2 error of 1e-5 (fp32), on text-only and on image+text batches (a 1-tile and a
3-tile image).
"""

import pytest

from convert.models import rel_l2
from convert.workers import import_and_forward
from harness import run_ranks

TOL = 1e-5

QWEN2_LAYOUTS = [
    # (save layout (tp, pp, first-stage layers), load layouts)
    ((1, 1, None), [(1, 1), (2, 2)]),
    ((2, 1, None), [(2, 1)]),
    ((1, 2, 1), [(1, 2)]),  # uneven stages: ViT + 1 LLM layer, then 3 layers
    ((2, 2, None), [(2, 2), (1, 1)]),
]


@pytest.fixture(scope="module")
def parity(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    jobs = []

    def job(name, hf, save, loads):
        ckpt = root / f"{name}-{len(jobs)}"
        ckpt.mkdir()
        jobs.append(dict(name=name, hf_dir=str(tiny.dirs[hf]), ckpt=str(ckpt), save=save, loads=loads))

    for save, loads in QWEN2_LAYOUTS:
        job(f"qwen2 saved at TP={save[0]} PP={save[1]}", "qwen2", save, loads)
    job("vit6b", "qwen2-vit6b", (2, 1, None), [(2, 1), (1, 1)])
    job("llama", "llama", (2, 1, None), [(2, 1)])
    job("internlm2", "internlm2-remote", (1, 2, None), [(2, 1)])
    job("internlm3", "internlm3", (2, 1, None), [(2, 1), (1, 2)])
    job("internlm3-remote", "internlm3-remote", (1, 2, None), [(2, 1)])
    job("qwen3", "qwen3", (2, 1, None), [(2, 1), (1, 2)])
    job("qwen3-remote", "qwen3-remote", (1, 2, None), [(2, 1), (2, 2)])
    # Qwen3-MoE: experts split over EP ranks on import, resharded on load (EP=2 -> EP=1, TP=2 x EP=2).
    job("qwen3-moe", "qwen3-moe", (1, 1, None, 2), [(1, 1, 2), (2, 1, 2), (1, 1, 1)])
    job("qwen3-moe-remote", "qwen3-moe-remote", (2, 1, None, 2), [(1, 2, 2), (2, 1, 1)])
    results = {}
    for rank_result in run_ranks(import_and_forward, 4, jobs, tiny.batches, timeout=800):
        results.update(rank_result)
    return results


def _check(logits, ref, what):
    assert set(logits) == {"text", "image"}, what
    for batch, value in logits.items():
        assert value.shape == ref[batch].shape, f"{what} {batch}: {value.shape} vs {ref[batch].shape}"
        err = rel_l2(value, ref[batch])
        print(f"[parity] {what}, {batch}: relative L2 error {err:.2e}")  # shown with -s
        assert err <= TOL, f"{what}, {batch} batch: relative L2 error {err:.2e} > {TOL}"


@pytest.mark.parametrize("save,loads", QWEN2_LAYOUTS, ids=lambda v: str(v))
def test_qwen2_layouts_match_transformers(parity, tiny, save, loads):
    for tp, pp in loads:
        key = (f"qwen2 saved at TP={save[0]} PP={save[1]}", f"TP={tp} PP={pp}")
        assert key in parity, f"no result for {key}: {sorted(parity)}"
        _check(parity[key], tiny.refs["qwen2"], " loaded at ".join(key))


def test_vit6b_padded_heads_tp2_matches_transformers(parity, tiny):
    # 3 ViT heads at TP=2: the model pads a dummy head; RMSNorm and the joint QK-norm.
    _check(parity[("vit6b", "TP=2 PP=1")], tiny.refs["qwen2-vit6b"], "6B-style ViT at TP=2")
    _check(parity[("vit6b", "TP=1 PP=1")], tiny.refs["qwen2-vit6b"], "6B-style ViT, TP=2 -> TP=1")


def test_internlm2_remote_code_equals_transformers_llama(parity, tiny):
    llama = parity[("llama", "TP=2 PP=1")]
    internlm2 = parity[("internlm2", "TP=2 PP=1")]
    _check(llama, tiny.refs["llama"], "transformers Llama layout")
    _check(internlm2, tiny.refs["llama"], "remote-code InternLM2 layout")
    for batch in llama:
        # Same weights through two key layouts -> the same checkpoint, so the same numbers.
        assert rel_l2(internlm2[batch], llama[batch]) <= 1e-6, batch


def test_internlm3_matches_transformers_in_both_formats(parity, tiny):
    """InternVL3-9B's LLM: transformers' own InternLM3 (its Llama implementation, dynamic NTK rope
    config) is the reference; the remote-code layout of the same weights gives the same numbers."""
    ref = tiny.refs["internlm3"]
    _check(parity[("internlm3", "TP=2 PP=1")], ref, "InternLM3 at TP=2")
    _check(parity[("internlm3", "TP=1 PP=2")], ref, "InternLM3 saved at TP=2, loaded at PP=2")
    remote = parity[("internlm3-remote", "TP=2 PP=1")]
    _check(remote, ref, "remote-code InternLM3 saved at PP=2, loaded at TP=2")


def test_qwen3_matches_transformers_in_both_formats(parity, tiny):
    """InternVL3.5's dense LLM: transformers' Qwen3 (head_dim 32 over a 64 hidden with 4 heads,
    per-head q/k RMSNorm before RoPE, no biases) is the reference, in the transformers-native and
    the remote-code (Qwen3ForCausalLM) layouts, at TP=2, PP=2 and TP=2 x PP=2."""
    ref = tiny.refs["qwen3"]
    _check(parity[("qwen3", "TP=2 PP=1")], ref, "Qwen3 at TP=2")
    _check(parity[("qwen3", "TP=1 PP=2")], ref, "Qwen3 saved at TP=2, loaded at PP=2")
    _check(parity[("qwen3-remote", "TP=2 PP=1")], ref, "remote-code Qwen3 saved at PP=2, loaded at TP=2")
    _check(parity[("qwen3-remote", "TP=2 PP=2")], ref, "remote-code Qwen3 saved at PP=2, loaded at TP=2 x PP=2")


def test_qwen3_moe_matches_transformers_at_ep2(parity, tiny):
    """InternVL3.5's MoE LLM through megatron's MoELayer (4 experts, top-2 renormalised, all-to-all
    dispatcher, sequential local experts): transformers' Qwen3-MoE is the reference, both layouts,
    at EP=2, EP=2 x TP=2, EP=2 x PP=2, and EP=2 checkpoints loaded at EP=1."""
    ref = tiny.refs["qwen3-moe"]
    _check(parity[("qwen3-moe", "TP=1 PP=1 EP=2")], ref, "Qwen3-MoE at EP=2")
    _check(parity[("qwen3-moe", "TP=2 PP=1 EP=2")], ref, "Qwen3-MoE saved at EP=2, loaded at TP=2 x EP=2")
    _check(parity[("qwen3-moe", "TP=1 PP=1")], ref, "Qwen3-MoE saved at EP=2, loaded at EP=1")
    remote = "remote-code Qwen3-MoE saved at TP=2 x EP=2"
    _check(parity[("qwen3-moe-remote", "TP=1 PP=2 EP=2")], ref, remote + ", loaded at PP=2 x EP=2")
    _check(parity[("qwen3-moe-remote", "TP=2 PP=1")], ref, remote + ", loaded at TP=2")
