"""Training starts from a converted Hugging Face checkpoint, at another layout, and exports back.

HF InternVL (transformers, random weights in the tiny recipe's shape) -> `convert import --tp 2`
-> `train checkpoint.load=<import dir>` at PP=2 for a few steps -> `convert export` ->
transformers loads it with nothing missing and every tensor is the original one moved by a few
optimizer steps (a run that drew fresh weights instead of loading would be far from it).
"""

import json
import os
import subprocess
import sys

import torch

from training.runner import ROOT, step_records

CONVERT = [sys.executable, str(ROOT / "tools" / "convert_hf.py")]


def _hf_tiny(out_dir):
    """A transformers InternVL with exactly examples/tiny/base.yaml's model section."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    text = dict(model_type="qwen2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=128, vocab_size=512, rms_norm_eps=1e-6,
                max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  image_size=56, patch_size=14, norm_type="layer_norm", attention_bias=True,
                  use_qk_norm=False, layer_norm_eps=1e-6)
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=5,
                            image_seq_length=4, downsample_ratio=0.5, tie_word_embeddings=False)
    torch.manual_seed(7)
    model = InternVLForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.05 * noise)
    model.save_pretrained(out_dir)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _run(cmd, timeout=300):
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def test_train_from_converted_hf_checkpoint_and_export(trainer, tmp_path):
    hf, ckpt, run, out = tmp_path / "hf", tmp_path / "imported", tmp_path / "run", tmp_path / "exported"
    original = _hf_tiny(hf)
    _run(CONVERT + ["import", "--hf-dir", hf, "--out", ckpt, "--tp", "2"])

    trainer(run, 2, f"checkpoint.load={ckpt}", "parallel.pipeline_parallel=2",
            "training.train_steps=3", "optimizer.warmup_steps=1", "optimizer.lr=1e-3",
            "optimizer.min_lr=1e-4", timeout=400)
    steps = step_records(run)
    assert sorted(steps) == [1, 2, 3], steps
    # Started from the imported weights (weights only: a fresh step count, no optimizer state).
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps.values())
    final = run / "checkpoints" / "iter_0000003"
    assert final.is_dir(), sorted(p.name for p in (run / "checkpoints").iterdir())

    _run(CONVERT + ["export", "--ckpt", final, "--out", out, "--format", "transformers"])
    assert json.loads((out / "config.json").read_text()) == json.loads((hf / "config.json").read_text())
    from transformers import InternVLForConditionalGeneration

    model, info = InternVLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    trained = model.state_dict()
    assert set(trained) == set(original)
    moved = 0
    for name, before in original.items():
        after = trained[name]
        change = float((after.double() - before.double()).norm() / before.double().norm())
        # Three Adam steps at lr <= 1e-3 move each element by at most ~3e-3; weights drawn afresh
        # instead of loaded would differ by O(1).
        assert change < 0.2, f"{name}: relative change {change:.3f}: not the imported weights"
        moved += change > 0
    assert moved == len(original), f"only {moved} of {len(original)} tensors were trained"
