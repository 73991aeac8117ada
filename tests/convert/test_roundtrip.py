"""The command-line tools end to end: import, torchrun forward, export; bitwise round trips.

- transformers format (6B-style ViT: padded heads at TP=2, QK-norm names): import at TP=2, run
  ``tools/forward.py`` under torchrun at TP=1 x PP=2 (another layout), export, and check every
  tensor is bitwise the original and that ``from_pretrained`` loads it with nothing missing or
  unexpected and computes the same logits;
- remote-code format (InternLM2): import (TP=PP=1, one rank; parity tests import it at PP=2),
  export into several shards, bitwise again, original config and tokenizer/code files restored.
"""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from convert.models import rel_l2

ROOT = Path(__file__).resolve().parents[2]
CONVERT = [sys.executable, str(ROOT / "tools" / "convert_hf.py")]


def _run(cmd, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _tensors(directory) -> dict:
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else sorted(p.name for p in directory.glob("*.safetensors"))
    out = {}
    for file in files:
        with safe_open(str(directory / file), "pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
    return out


def _assert_bitwise(original, exported):
    a, b = _tensors(original), _tensors(exported)
    assert set(a) == set(b), f"names differ: missing {sorted(set(a) - set(b))}, extra {sorted(set(b) - set(a))}"
    for name, tensor in a.items():
        assert b[name].dtype == tensor.dtype, name
        assert torch.equal(b[name], tensor), f"{name} differs after the round trip"


def test_transformers_import_forward_export(tiny, tmp_path):
    src = tiny.dirs["qwen2-vit6b"]
    ckpt, hf_out = tmp_path / "ckpt", tmp_path / "hf"
    proc = _run(CONVERT + ["import", "--hf-dir", src, "--out", ckpt, "--tp", "2"])
    assert "tensors loaded" in proc.stdout + proc.stderr  # progress is shown
    assert (ckpt / "metadata.json").is_file() and (ckpt / "model.yaml").is_file()
    assert not list(tmp_path.glob("ckpt.tmp-*")), "the staging directory must be renamed"

    # Forward at another layout than the one saved: dist_checkpointing reshards.
    batch = tiny.batches["image"]
    torch.save(batch, tmp_path / "in.pt")
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
          str(ROOT / "tools" / "forward.py"), "--ckpt", ckpt, "--tp", "1",
          "--pp", "2", "--inputs", tmp_path / "in.pt", "--out", tmp_path / "out.pt"])
    logits = torch.load(tmp_path / "out.pt")
    assert logits.dtype == torch.float32
    assert rel_l2(logits, tiny.refs["qwen2-vit6b"]["image"]) <= 1e-5

    _run(CONVERT + ["export", "--ckpt", ckpt, "--out", hf_out, "--format", "transformers"])
    _assert_bitwise(src, hf_out)
    assert (hf_out / "model.safetensors.index.json").is_file()
    assert (hf_out / "tokenizer_config.json").is_file()
    assert json.loads((hf_out / "config.json").read_text()) == json.loads((src / "config.json").read_text())

    from transformers import InternVLForConditionalGeneration
    from transformers.utils import logging as hf_logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = hf_logging.get_logger("transformers")
    logger.addHandler(handler)
    try:
        model, info = InternVLForConditionalGeneration.from_pretrained(hf_out, output_loading_info=True)
    finally:
        logger.removeHandler(handler)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"] and not info["error_msgs"], info
    warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert not warnings, warnings
    with torch.no_grad():
        out = model.eval()(**batch).logits
    assert torch.equal(out, tiny.refs["qwen2-vit6b"]["image"])


def test_remote_code_internlm2_roundtrip(tiny, tmp_path):
    src = tiny.dirs["internlm2-remote"]
    ckpt, hf_out = tmp_path / "ckpt", tmp_path / "hf"
    _run(CONVERT + ["import", "--hf-dir", src, "--out", ckpt])
    saved = yaml_model(ckpt)
    assert saved["language"]["arch"] == "internlm2" and saved["image_token_id"] == 150
    _run(CONVERT + ["export", "--ckpt", ckpt, "--out", hf_out, "--format", "remote-code",
                    "--max-shard-size", "100KB"])
    _assert_bitwise(src, hf_out)
    assert len(list(hf_out.glob("model-*.safetensors"))) > 1, "--max-shard-size must shard"
    assert json.loads((hf_out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    for name in ("added_tokens.json", "modeling_internvl_chat.py"):
        assert (hf_out / name).read_bytes() == (src / name).read_bytes(), name


def test_internlm3_roundtrips_and_crosses_formats(tiny, tmp_path):
    """InternLM3 (InternVL3-9B): the remote-code checkpoint comes back bitwise with its own config
    (rope scaling included); exported in the transformers format instead, transformers loads it
    with nothing missing and computes the reference logits."""
    src = tiny.dirs["internlm3-remote"]
    ckpt = tmp_path / "ckpt"
    _run(CONVERT + ["import", "--hf-dir", src, "--out", ckpt, "--tp", "2"])
    saved = yaml_model(ckpt)["language"]
    assert saved["arch"] == "internlm3" and saved["qkv_bias"] is False
    assert saved["rope_theta"] == 50000.0 and saved["rope_dynamic_factor"] == 6.0
    remote, native = tmp_path / "remote", tmp_path / "native"
    _run(CONVERT + ["export", "--ckpt", ckpt, "--out", remote, "--format", "remote-code"])
    _assert_bitwise(src, remote)
    assert json.loads((remote / "config.json").read_text()) == json.loads((src / "config.json").read_text())

    _run(CONVERT + ["export", "--ckpt", ckpt, "--out", native, "--format", "transformers"])
    _assert_bitwise(tiny.dirs["internlm3"], native)
    text = json.loads((native / "config.json").read_text())["text_config"]
    assert text["model_type"] == "internlm3"
    assert text["rope_parameters"] == {"rope_theta": 50000.0, "rope_type": "dynamic", "factor": 6.0}
    from transformers import InternVLForConditionalGeneration

    model, info = InternVLForConditionalGeneration.from_pretrained(native, output_loading_info=True)
    assert not any(info.values()), info
    assert type(model.model.language_model).__name__ == "LlamaModel"
    with torch.no_grad():
        for name, batch in tiny.batches.items():
            assert torch.equal(model.eval()(**batch).logits, tiny.refs["internlm3"][name]), name


def test_qwen3_roundtrips_and_crosses_formats(tiny, tmp_path):
    """Qwen3 (InternVL3.5): remote code -> TP=2 -> remote code is bitwise with its own config;
    exported in the transformers format, the tensors are those of the transformers twin and
    from_pretrained computes the reference logits."""
    src = tiny.dirs["qwen3-remote"]
    ckpt = tmp_path / "ckpt"
    _run(CONVERT + ["import", "--hf-dir", src, "--out", ckpt, "--tp", "2"])
    saved = yaml_model(ckpt)["language"]
    assert saved["arch"] == "qwen3" and saved["qkv_bias"] is False and saved["qk_norm"] is True
    assert saved["head_dim"] == 32 and saved["rope_theta"] == 1e6
    remote, native = tmp_path / "remote", tmp_path / "native"
    _run(CONVERT + ["export", "--ckpt", ckpt, "--out", remote, "--format", "remote-code"])
    _assert_bitwise(src, remote)
    assert json.loads((remote / "config.json").read_text()) == json.loads((src / "config.json").read_text())

    _run(CONVERT + ["export", "--ckpt", ckpt, "--out", native, "--format", "transformers"])
    _assert_bitwise(tiny.dirs["qwen3"], native)
    text = json.loads((native / "config.json").read_text())["text_config"]
    assert text["model_type"] == "qwen3" and text["head_dim"] == 32
    from transformers import InternVLForConditionalGeneration

    model, info = InternVLForConditionalGeneration.from_pretrained(native, output_loading_info=True)
    assert not any(info.values()), info
    assert type(model.model.language_model).__name__ == "Qwen3Model"
    with torch.no_grad():
        for name, batch in tiny.batches.items():
            assert torch.equal(model.eval()(**batch).logits, tiny.refs["qwen3"][name]), name


def test_qwen3_moe_roundtrips_through_ep2(tiny, tmp_path):
    """Qwen3-MoE: remote code -> ``import --ep 2`` (experts split over two ranks) -> export
    (experts gathered) is bitwise with its own config; the transformers export has the tensors
    of the transformers twin and from_pretrained computes the reference logits."""
    src = tiny.dirs["qwen3-moe-remote"]
    ckpt = tmp_path / "ckpt"
    _run(CONVERT + ["import", "--hf-dir", src, "--out", ckpt, "--ep", "2"])
    saved = yaml_model(ckpt)["language"]
    assert saved["arch"] == "qwen3_moe" and saved["num_experts"] == 4 and saved["moe_top_k"] == 2
    assert saved["moe_ffn_hidden_size"] == 48 and saved["moe_norm_topk_prob"] is True
    remote, native = tmp_path / "remote", tmp_path / "native"
    _run(CONVERT + ["export", "--ckpt", ckpt, "--out", remote, "--format", "remote-code"])
    _assert_bitwise(src, remote)
    assert json.loads((remote / "config.json").read_text()) == json.loads((src / "config.json").read_text())

    _run(CONVERT + ["export", "--ckpt", ckpt, "--out", native, "--format", "transformers"])
    _assert_bitwise(tiny.dirs["qwen3-moe"], native)
    from transformers import InternVLForConditionalGeneration

    model, info = InternVLForConditionalGeneration.from_pretrained(native, output_loading_info=True)
    assert not any(info.values()), info
    assert type(model.model.language_model).__name__ == "Qwen3MoeModel"
    with torch.no_grad():
        for name, batch in tiny.batches.items():
            assert torch.equal(model.eval()(**batch).logits, tiny.refs["qwen3-moe"][name]), name


def yaml_model(ckpt):
    import yaml

    return yaml.safe_load((Path(ckpt) / "model.yaml").read_text())["model"]
