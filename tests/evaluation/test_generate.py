"""`megatron-internvl generate` (TP=2, TP=1) produces exactly transformers' greedy token ids on the same
tiny random checkpoint, with one image and with several: a Qwen2 backbone, and an InternLM2
(remote-code layout) backbone whose transformers reference is the Llama model it was written from."""

import json
import os
import subprocess
import sys

import pytest
import torch

from training.runner import ROOT, free_port

sys.path.insert(0, str(ROOT / "tests"))
from convert.models import randomize, tiny_config, write_remote_internlm2  # noqa: E402

CONVERT = [sys.executable, str(ROOT / "tools" / "convert_hf.py")]
NEW_TOKENS = 8


def _hf_model(text_type, out_dir):
    """A random tiny transformers InternVL whose vocabulary and image token fit the tiny tokenizer."""
    from transformers import InternVLForConditionalGeneration

    config = tiny_config(text_type)
    config.text_config.vocab_size = 512
    config.image_token_id = 5
    torch.manual_seed(3)
    model = InternVLForConditionalGeneration(config).eval()
    randomize(model, 3)
    model.save_pretrained(out_dir)
    (out_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
    return model


def _run(cmd, nproc=1):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}"] + cmd[1:]
    out = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out


@pytest.mark.parametrize("backbone,runs", [
    ("qwen2", [(["china_wide.jpg", "flower_tall.jpg"], 2), (["grace_hopper_full.jpg"], 1)]),
    ("internlm2", [(["grace_hopper_full.jpg"], 1), (["flower_tall.jpg", "china_wide.jpg"], 1)]),
])
def test_generate_equals_transformers_greedy(val_data, tmp_path, backbone, runs):
    """``runs``: (images, TP size) of each generate call on the backbone's checkpoint."""
    from transformers import GenerationConfig

    from megatron_internvl.convert.checkpoint import read_model_config
    from megatron_internvl.data.tokenizer import load_tokenizer
    from megatron_internvl.training.generate import prompt_inputs, stop_ids

    hf, ckpt = tmp_path / "hf", tmp_path / "ckpt"
    reference = _hf_model("qwen2" if backbone == "qwen2" else "llama", hf)
    if backbone == "internlm2":
        remote = tmp_path / "remote"
        write_remote_internlm2(hf, remote, reference)
        # remote-code configs keep <IMG_CONTEXT> in the tokenizer files: the tiny tokenizer's id
        (remote / "added_tokens.json").write_text(json.dumps({"<IMG_CONTEXT>": 5}))
        hf = remote
    _run(CONVERT + ["import", "--hf-dir", hf, "--out", ckpt, "--dtype", "fp32"])
    tok = load_tokenizer(str(val_data / "tokenizer.json"))
    for images, tp in runs:
        paths = [val_data / "images" / name for name in images]
        cmd = [sys.executable, "-m", "megatron_internvl.cli", "generate", ckpt, "--prompt", "What is shown?",
               "--tokenizer", val_data / "tokenizer.json", "--max-new-tokens", NEW_TOKENS, "--max-tiles", 4,
               "--precision", "fp32", "--ids"]
        for p in paths:
            cmd += ["--image", p]
        out = _run(cmd, nproc=tp)
        result = json.loads(out.stdout.strip().splitlines()[-1])

        inputs = prompt_inputs(tok, read_model_config(ckpt), [str(p) for p in paths], "What is shown?", max_tiles=4)
        ids = inputs["input_ids"]
        assert result["prompt_ids"] == ids[0].tolist()
        assert (ids == 5).sum() == inputs["pixel_values"].shape[0] * 4
        assert len(paths) == int((ids == tok.img_start_id).sum())
        with torch.no_grad():
            expected = reference.generate(input_ids=ids, pixel_values=inputs["pixel_values"],
                                          attention_mask=torch.ones_like(ids), generation_config=GenerationConfig(
                                              do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=stop_ids(tok),
                                              pad_token_id=0))
        assert result["new_ids"] == expected[0, ids.shape[1]:].tolist(), images
        assert len(set(result["new_ids"])) > 1, "a degenerate answer would not test much"
