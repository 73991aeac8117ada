"""Tiny random InternVL checkpoints for the converter tests, and the inputs to run them on.

The reference is transformers' own ``InternVLForConditionalGeneration``. Every parameter gets
seeded random values (transformers initialises class token, position embedding and layer scale
to constants, which would hide a swapped or misplaced tensor). The remote-code (InternLM2)
checkpoint is written here from the transformers Llama one by an independent re-implementation
of OpenGVLab's layout, so the converter's own tables are checked against it, not against
themselves.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

IMAGE_SIZE = 56  # patch 14 -> 4x4 grid -> 2x2 = 4 LLM tokens per tile after pixel unshuffle
TOKENS_PER_TILE = 4
VOCAB = 200  # not a multiple of 128 x TP: the model pads its vocabulary
IMG_START, IMG_END, IMG_CONTEXT = 141, 142, 150

TEXT = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=VOCAB, rms_norm_eps=1e-6, max_position_embeddings=256,
            tie_word_embeddings=False)
VIT_300M = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                image_size=IMAGE_SIZE, patch_size=14, norm_type="layer_norm", attention_bias=True,
                use_qk_norm=False, layer_norm_eps=1e-6)
# InternViT-6B style: RMSNorm, QK-norm, no qkv bias, an odd head count (padded to 4 at TP=2).
VIT_6B = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96,
              image_size=IMAGE_SIZE, patch_size=14, norm_type="rms_norm", attention_bias=False,
              use_qk_norm=True, layer_norm_eps=1e-6)


def tiny_config(text_type: str = "qwen2", vision: dict = VIT_300M):
    from transformers import InternVLConfig

    text = dict(TEXT, model_type=text_type, rope_theta=10000.0)
    if text_type == "llama":
        text.update(attention_bias=False, mlp_bias=False)
    if text_type == "internlm3":
        # InternLM3-8B's kind of config: explicit head_dim, no biases, dynamic NTK rope scaling.
        text.pop("rope_theta")
        text.update(attention_bias=False, mlp_bias=False, head_dim=TEXT["hidden_size"] // TEXT["num_attention_heads"],
                    rope_parameters={"rope_type": "dynamic", "factor": 6.0, "rope_theta": 50000.0})
    if text_type == "qwen3":
        # Qwen3's kind: head_dim set on its own (4 x 32 = 128 query width over a 64 hidden), per-head
        # q/k RMSNorm, no biases, rope theta 1e6.
        text.update(head_dim=32, attention_bias=False, rope_theta=1e6, use_sliding_window=False)
    if text_type == "qwen3_moe":
        # Qwen3-MoE's kind: Qwen3 attention, every layer 4 experts of FFN 48, top-2, renormalised.
        text.update(head_dim=32, attention_bias=False, rope_theta=1e6, use_sliding_window=False,
                    num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                    norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    return InternVLConfig(
        vision_config=dict(vision), text_config=text, image_token_id=IMG_CONTEXT,
        image_seq_length=TOKENS_PER_TILE, downsample_ratio=0.5, tie_word_embeddings=False,
    )


@torch.no_grad()
def randomize(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if name.endswith("mlp.gate.weight"):
            # MoE router: logits far apart, so no near-tie decides the top-k differently between
            # two correct implementations.
            value = 0.5 * noise
        elif "norm" in name or "layernorm" in name:
            value = (1.0 + 0.2 * noise) if name.endswith("weight") else 0.1 * noise
        elif "lambda_" in name:
            value = 0.1 + 0.05 * noise
        elif "cls_token" in name or "position_embeddings" in name:
            value = 0.5 * noise
        else:
            value = 0.08 * noise
        p.copy_(value)


def save_tiny(out_dir, text_type="qwen2", vision=VIT_300M, seed=0):
    """A tiny random transformers InternVL saved with save_pretrained; returns the model."""
    from transformers import InternVLForConditionalGeneration

    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(tiny_config(text_type, vision)).eval()
    randomize(model, seed)
    model.save_pretrained(out_dir)
    (Path(out_dir) / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
    return model


def inputs() -> dict[str, dict]:
    """Text-only and image+text batches, the latter with a 1-tile and a 3-tile image."""
    gen = torch.Generator().manual_seed(123)
    seq = 24
    text = torch.randint(0, 140, (2, seq), generator=gen)
    images = torch.randint(0, 140, (2, seq), generator=gen)

    def place(row, at, tiles):
        block = [IMG_START] + [IMG_CONTEXT] * (TOKENS_PER_TILE * tiles) + [IMG_END]
        images[row, at : at + len(block)] = torch.tensor(block)

    place(0, 2, 1)
    place(1, 5, 3)
    pixels = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    return {
        "text": {"input_ids": text},
        "image": {"input_ids": images, "pixel_values": pixels},
    }


def rel_l2(a, b) -> float:
    """||a - b|| / ||b|| in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm())


@torch.no_grad()
def reference_logits(model, batches: dict) -> dict:
    return {
        name: model(input_ids=b["input_ids"], pixel_values=b.get("pixel_values")).logits.float()
        for name, b in batches.items()
    }


# --- OpenGVLab remote-code layouts (InternLM2 / InternLM3 LLMs), written independently -------------
def _remote_vision(sd: dict, vc) -> dict:
    """Pop the vision tower and projector of a transformers InternVL state dict ``sd`` and return
    them under OpenGVLab's remote-code names."""
    out = {}
    for i in range(vc.num_hidden_layers):
        s, t = f"model.vision_tower.encoder.layer.{i}.", f"vision_model.encoder.layers.{i}."
        for p in ("weight", "bias"):
            out[t + f"attn.qkv.{p}"] = torch.cat([sd.pop(s + f"attention.{x}_proj.{p}") for x in "qkv"])
            out[t + f"attn.proj.{p}"] = sd.pop(s + f"attention.projection_layer.{p}")
            out[t + f"norm1.{p}"] = sd.pop(s + f"layernorm_before.{p}")
            out[t + f"norm2.{p}"] = sd.pop(s + f"layernorm_after.{p}")
            out[t + f"mlp.fc1.{p}"] = sd.pop(s + f"mlp.fc1.{p}")
            out[t + f"mlp.fc2.{p}"] = sd.pop(s + f"mlp.fc2.{p}")
        out[t + "ls1"] = sd.pop(s + "lambda_1")
        out[t + "ls2"] = sd.pop(s + "lambda_2")
    e = "model.vision_tower.embeddings."
    out["vision_model.embeddings.class_embedding"] = sd.pop(e + "cls_token")
    out["vision_model.embeddings.position_embedding"] = sd.pop(e + "position_embeddings")
    for p in ("weight", "bias"):
        out[f"vision_model.embeddings.patch_embedding.{p}"] = sd.pop(e + f"patch_embeddings.projection.{p}")
        for src, dst in (("layer_norm", "0"), ("linear_1", "1"), ("linear_2", "3")):
            out[f"mlp1.{dst}.{p}"] = sd.pop(f"model.multi_modal_projector.{src}.{p}")
    return out


def write_remote_internlm2(src_dir, out_dir, model) -> None:
    """The weights of a transformers (Llama text) InternVL in OpenGVLab's remote-code layout."""
    cfg = model.config
    tc = cfg.text_config
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = _remote_vision(sd, cfg.vision_config)
    heads, groups = tc.num_attention_heads, tc.num_key_value_heads
    d = tc.hidden_size // heads
    for i in range(tc.num_hidden_layers):
        s, t = f"model.language_model.layers.{i}.", f"language_model.model.layers.{i}."
        q = sd.pop(s + "self_attn.q_proj.weight").reshape(groups, heads // groups, d, -1)
        k = sd.pop(s + "self_attn.k_proj.weight").reshape(groups, 1, d, -1)
        v = sd.pop(s + "self_attn.v_proj.weight").reshape(groups, 1, d, -1)
        # InternLM2 packs wqkv as (kv_heads, [q x group, k, v], head_dim).
        out[t + "attention.wqkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, tc.hidden_size)
        out[t + "attention.wo.weight"] = sd.pop(s + "self_attn.o_proj.weight")
        out[t + "feed_forward.w1.weight"] = sd.pop(s + "mlp.gate_proj.weight")
        out[t + "feed_forward.w3.weight"] = sd.pop(s + "mlp.up_proj.weight")
        out[t + "feed_forward.w2.weight"] = sd.pop(s + "mlp.down_proj.weight")
        out[t + "attention_norm.weight"] = sd.pop(s + "input_layernorm.weight")
        out[t + "ffn_norm.weight"] = sd.pop(s + "post_attention_layernorm.weight")
    out["language_model.model.tok_embeddings.weight"] = sd.pop("model.language_model.embed_tokens.weight")
    out["language_model.model.norm.weight"] = sd.pop("model.language_model.norm.weight")
    out["language_model.output.weight"] = sd.pop("lm_head.weight")
    assert not sd, f"unconverted: {sorted(sd)}"
    llm_config = {
        "architectures": ["InternLM2ForCausalLM"],
        "model_type": "internlm2",
        "hidden_size": tc.hidden_size,
        "num_hidden_layers": tc.num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": groups,
        "intermediate_size": tc.intermediate_size,
        "vocab_size": tc.vocab_size,
        "rms_norm_eps": tc.rms_norm_eps,
        "rope_theta": 10000.0,
        "max_position_embeddings": tc.max_position_embeddings,
        "hidden_act": "silu",
        "bias": False,
        "tie_word_embeddings": False,
    }
    _write_remote(out_dir, out, llm_config, cfg.vision_config)


def write_remote_internlm3(src_dir, out_dir, model) -> None:
    """The weights of a transformers InternLM3-text InternVL in the remote-code layout of
    InternVL3-9B: Llama names under ``language_model.``; the config in InternLM3's own spelling
    (``qkv_bias`` / ``bias``, ``rope_theta`` + ``rope_scaling``)."""
    cfg = model.config
    tc = cfg.text_config
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = _remote_vision(sd, cfg.vision_config)
    for name in list(sd):
        if name.startswith("model.language_model."):
            out["language_model.model." + name[len("model.language_model."):]] = sd.pop(name)
    out["language_model.lm_head.weight"] = sd.pop("lm_head.weight")
    assert not sd, f"unconverted: {sorted(sd)}"
    rope = tc.rope_parameters
    llm_config = {
        "architectures": ["InternLM3ForCausalLM"],
        "model_type": "internlm3",
        "hidden_size": tc.hidden_size,
        "num_hidden_layers": tc.num_hidden_layers,
        "num_attention_heads": tc.num_attention_heads,
        "num_key_value_heads": tc.num_key_value_heads,
        "head_dim": tc.head_dim,
        "intermediate_size": tc.intermediate_size,
        "vocab_size": tc.vocab_size,
        "rms_norm_eps": tc.rms_norm_eps,
        "rope_theta": rope["rope_theta"],
        "rope_scaling": {"rope_type": "dynamic", "factor": rope["factor"]},
        "max_position_embeddings": tc.max_position_embeddings,
        "hidden_act": "silu",
        "qkv_bias": False,
        "bias": False,
        "tie_word_embeddings": False,
    }
    _write_remote(out_dir, out, llm_config, cfg.vision_config)


def _saved_state_dict(src_dir) -> dict:
    """The tensors save_pretrained wrote (experts one by one), under transformers' in-memory
    prefixes (``model.language_model.``, ``model.vision_tower.``, ``lm_head.``)."""
    from safetensors.torch import load_file

    sd = {}
    for file in sorted(Path(src_dir).glob("*.safetensors")):
        sd.update(load_file(str(file)))
    renames = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
               ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."))
    out = {}
    for name, tensor in sd.items():
        for old, new in renames:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        out[name] = tensor
    return out


def write_remote_qwen3(src_dir, out_dir, model) -> None:
    """The weights of a transformers Qwen3 or Qwen3-MoE text InternVL in the remote-code layout
    of InternVL3.5 (OpenGVLab/InternVL3_5-*): Qwen3(Moe)ForCausalLM names under ``language_model.``."""
    cfg = model.config
    tc = cfg.text_config
    sd = _saved_state_dict(src_dir)
    out = _remote_vision(sd, cfg.vision_config)
    for name in list(sd):
        if name.startswith("model.language_model."):
            out["language_model.model." + name[len("model.language_model."):]] = sd.pop(name)
    out["language_model.lm_head.weight"] = sd.pop("lm_head.weight")
    assert not sd, f"unconverted: {sorted(sd)}"
    moe = tc.model_type == "qwen3_moe"
    llm_config = {
        "architectures": ["Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"],
        "model_type": tc.model_type,
        "hidden_size": tc.hidden_size,
        "num_hidden_layers": tc.num_hidden_layers,
        "num_attention_heads": tc.num_attention_heads,
        "num_key_value_heads": tc.num_key_value_heads,
        "head_dim": tc.head_dim,
        "intermediate_size": tc.intermediate_size,
        "vocab_size": tc.vocab_size,
        "rms_norm_eps": tc.rms_norm_eps,
        "rope_theta": tc.rope_parameters["rope_theta"],
        "rope_scaling": None,
        "max_position_embeddings": tc.max_position_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
    }
    if moe:
        llm_config.update(num_experts=tc.num_experts, num_experts_per_tok=tc.num_experts_per_tok,
                          moe_intermediate_size=tc.moe_intermediate_size, norm_topk_prob=True,
                          decoder_sparse_step=1, mlp_only_layers=[])
    _write_remote(out_dir, out, llm_config, cfg.vision_config)


def _write_remote(out_dir, out: dict, llm_config: dict, vc) -> None:
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True)
    # Two files with an index, as published checkpoints have.
    names = sorted(out)
    half = len(names) // 2
    weight_map = {}
    for k, part in enumerate((names[:half], names[half:])):
        file = f"model-{k + 1:05d}-of-00002.safetensors"
        save_file({n: out[n].contiguous() for n in part}, str(out_dir / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (out_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "downsample_ratio": 0.5,
        "force_image_size": IMAGE_SIZE,
        "ps_version": "v2",
        "select_layer": -1,
        "template": "internvl2_5",
        "torch_dtype": "float32",
        "llm_config": llm_config,
        "vision_config": {
            "model_type": "intern_vit_6b",
            "hidden_size": vc.hidden_size,
            "num_hidden_layers": vc.num_hidden_layers,
            "num_attention_heads": vc.num_attention_heads,
            "intermediate_size": vc.intermediate_size,
            "image_size": IMAGE_SIZE,
            "patch_size": 14,
            "norm_type": "layer_norm",
            "layer_norm_eps": vc.layer_norm_eps,
            "qkv_bias": True,
            "qk_normalization": False,
            "hidden_act": "gelu",
            "initializer_factor": 0.1,
            "drop_path_rate": 0.0,
        },
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "added_tokens.json").write_text(
        json.dumps({"<img>": IMG_START, "</img>": IMG_END, "<IMG_CONTEXT>": IMG_CONTEXT})
    )
    (out_dir / "modeling_internvl_chat.py").write_text("# stands in for OpenGVLab's remote code\n")
