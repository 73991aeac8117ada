"""Tiny HF checkpoints shared by the converter tests (built once per session)."""

from __future__ import annotations

import pytest

from convert import models


class TinyCheckpoints:
    """Paths of the tiny HF checkpoints, their transformers models and reference logits."""

    def __init__(self, root):
        self.root = root
        self.batches = models.inputs()
        self.dirs, self.refs, self.models = {}, {}, {}
        self._add("qwen2", "qwen2", models.VIT_300M, seed=1)
        self._add("qwen2-vit6b", "qwen2", models.VIT_6B, seed=2)
        self._add("llama", "llama", models.VIT_300M, seed=3)
        # The same weights as "llama", in OpenGVLab's remote-code layout with an InternLM2 LLM.
        self.dirs["internlm2-remote"] = root / "internlm2-remote"
        models.write_remote_internlm2(self.dirs["llama"], self.dirs["internlm2-remote"], self.models["llama"])
        # InternLM3 (InternVL3-9B's LLM): transformers format, and the same weights in the
        # remote-code layout.
        self._add("internlm3", "internlm3", models.VIT_300M, seed=4)
        self.dirs["internlm3-remote"] = root / "internlm3-remote"
        models.write_remote_internlm3(self.dirs["internlm3"], self.dirs["internlm3-remote"], self.models["internlm3"])
        # Qwen3 (InternVL3.5's dense LLMs): head_dim apart from hidden / heads, q/k norms.
        self._add("qwen3", "qwen3", models.VIT_300M, seed=5)
        self.dirs["qwen3-remote"] = root / "qwen3-remote"
        models.write_remote_qwen3(self.dirs["qwen3"], self.dirs["qwen3-remote"], self.models["qwen3"])
        # Qwen3-MoE (InternVL3.5-30B-A3B's kind): 4 experts, top-2, in both layouts.
        self._add("qwen3-moe", "qwen3_moe", models.VIT_300M, seed=6)
        self.dirs["qwen3-moe-remote"] = root / "qwen3-moe-remote"
        models.write_remote_qwen3(self.dirs["qwen3-moe"], self.dirs["qwen3-moe-remote"], self.models["qwen3-moe"])

    def _add(self, name, text_type, vision, seed):
        path = self.root / name
        model = models.save_tiny(path, text_type, vision, seed)
        self.dirs[name] = path
        self.models[name] = model
        self.refs[name] = models.reference_logits(model, self.batches)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return TinyCheckpoints(tmp_path_factory.mktemp("hf"))
