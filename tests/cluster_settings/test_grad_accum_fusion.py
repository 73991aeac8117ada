"""gradient_accumulation_fusion: on wherever every linear of the model supports it."""

import importlib.util

import pytest
import torch

from megatron_internvl.config import load_config
from megatron_internvl.models import factory
from training.runner import ROOT


@pytest.mark.parametrize("cuda,extension,expected", [
    (True, True, True),     # NGC container: TE linears fuse natively, apex's kernel serves the local ones
    (True, False, False),   # TE from pip without apex: megatron's output layer would refuse the flag
    (False, True, False),   # CPU
    (False, False, False),
])
def test_decision(monkeypatch, cuda, extension, expected):
    real = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "fused_weight_gradient_mlp_cuda" and extension
                        else (None if name == "fused_weight_gradient_mlp_cuda" else real(name, *a)))
    assert factory.gradient_accumulation_fusion() is expected


def test_both_towers_take_the_decision_when_trained_under_ddp(monkeypatch):
    """Only chunks megatron's DDP wraps (training/setup.py) have main_grad buffers to fuse into;
    converters, the MPO reference, evaluation and benches build without it."""
    config = load_config(str(ROOT / "examples" / "tiny" / "full.yaml"), ["model.spec=local"])
    for decided in (True, False):
        monkeypatch.setattr(factory, "gradient_accumulation_fusion", lambda: decided)
        for under_ddp in (True, False):
            lang = factory.language_transformer_config(config.model, config.parallel, under_ddp=under_ddp)
            vis = factory.vision_transformer_config(config.model, config.parallel, under_ddp=under_ddp)
            want = decided and under_ddp
            assert lang.gradient_accumulation_fusion is want and vis.gradient_accumulation_fusion is want
    import inspect

    from megatron_internvl.training import setup
    assert "build_model_chunks(config, initialize=source is None, under_ddp=True)" in inspect.getsource(setup.setup)
