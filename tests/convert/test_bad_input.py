"""Bad input is refused early, with the tensor, field or path named, and nothing half-written."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from megatron_internvl.convert import ConversionError
from megatron_internvl.convert.importer import plan, run_import


def _copy(tiny, tmp_path, name="qwen2"):
    dst = tmp_path / name
    shutil.copytree(tiny.dirs[name], dst)
    return dst


def _edit_tensors(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _edit_config(directory, edit):
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))


def test_missing_tensor(tiny, tmp_path):
    hf = _copy(tiny, tmp_path)
    name = "language_model.model.layers.2.mlp.up_proj.weight"
    _edit_tensors(hf, lambda t: t.pop(name))
    with pytest.raises(ConversionError, match=r"missing tensor\(s\): " + name.replace(".", r"\.")):
        plan(hf, 1, 1)


def test_extra_tensor(tiny, tmp_path):
    hf = _copy(tiny, tmp_path)
    _edit_tensors(hf, lambda t: t.update({"vision_tower.layernorm.weight": t["multi_modal_projector.layer_norm.weight"][:32].clone()}))
    with pytest.raises(ConversionError, match=r"unexpected tensor\(s\).*vision_tower\.layernorm\.weight"):
        plan(hf, 1, 1)


def test_missing_tensor_of_a_remote_code_checkpoint(tiny, tmp_path):
    hf = _copy(tiny, tmp_path, "internlm2-remote")
    index = hf / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"].pop("language_model.model.layers.1.attention.wqkv.weight")
    index.write_text(json.dumps(data))
    with pytest.raises(ConversionError, match=r"language_model\.model\.layers\.1\.attention\.wqkv\.weight"):
        plan(hf, 1, 1)


def test_wrong_shape_names_the_tensor(tiny, tmp_path):
    # Shapes are checked where the tensors are read: on the ranks. The rank's error reaches the
    # caller as is, and the half-written output is removed.
    hf = _copy(tiny, tmp_path)
    name = "vision_tower.encoder.layer.1.attention.k_proj.weight"
    _edit_tensors(hf, lambda t: t.update({name: t[name][:, :16].contiguous()}))
    out = tmp_path / "ckpt"
    with pytest.raises(ConversionError) as err:
        run_import(hf, out, tp=1, pp=1, log=lambda text: None)
    message = str(err.value)
    assert name in message and "(32, 16)" in message and "(32, 32)" in message, message
    assert not out.exists() and not list(tmp_path.glob("ckpt.tmp-*"))


def test_unsupported_model_type_and_variants(tiny, tmp_path):
    hf = _copy(tiny, tmp_path)
    _edit_config(hf, lambda c: c.update(model_type="llava"))
    with pytest.raises(ConversionError, match="model_type='llava' is not supported"):
        plan(hf, 1, 1)

    remote = _copy(tiny, tmp_path, "internlm2-remote")
    _edit_config(remote, lambda c: c["llm_config"].update(architectures=["Phi3ForCausalLM"]))
    with pytest.raises(ConversionError, match=r"llm_config\.architectures\[0\]='Phi3ForCausalLM'"):
        plan(remote, 1, 1)
    _edit_config(remote, lambda c: (c["llm_config"].update(architectures=["InternLM2ForCausalLM"]),
                                    c.update(ps_version="v1")))
    with pytest.raises(ConversionError, match="ps_version='v1'"):
        plan(remote, 1, 1)


def test_layout_that_does_not_divide_the_heads(tiny):
    # 4 LLM heads, 2 KV heads: TP=3 divides neither.
    with pytest.raises(ConversionError, match=r"tensor_parallel=3 does not divide model\.language\.num_heads=4"):
        plan(tiny.dirs["qwen2"], 3, 1)
    with pytest.raises(ConversionError, match="pipeline_parallel=3 does not divide"):
        plan(tiny.dirs["qwen2"], 1, 3)


def test_existing_output_is_never_clobbered(tiny, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ConversionError, match="exists: choose another --out or pass --overwrite"):
        run_import(tiny.dirs["qwen2"], out, tp=1, pp=1)
    assert (out / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging directory left


def test_cli_reports_user_errors_in_one_line(tiny, tmp_path, capsys):
    from megatron_internvl.cli import main

    hf = _copy(tiny, tmp_path)
    _edit_config(hf, lambda c: c.update(model_type="bert"))
    assert main(["convert", "import", "--hf-dir", str(hf), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "model_type='bert'" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("key", ["qkv_bias", "bias"])
def test_internlm3_with_biases_is_refused(tiny, tmp_path, key):
    hf = _copy(tiny, tmp_path, "internlm3-remote")
    _edit_config(hf, lambda cfg: cfg["llm_config"].update({key: True}))
    with pytest.raises(ConversionError, match=rf"llm_config\.{key}=True is not supported"):
        plan(hf, 1, 1)


def test_rope_scaling_other_than_dynamic_is_refused(tiny, tmp_path):
    hf = _copy(tiny, tmp_path, "internlm3-remote")
    _edit_config(hf, lambda cfg: cfg["llm_config"].update(rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ConversionError, match=r"llm_config\.rope_scaling='yarn'"):
        plan(hf, 1, 1)


@pytest.mark.parametrize("name,field", [("qwen3", "text_config"), ("qwen3-remote", "llm_config")])
def test_gpt_oss_is_refused_naming_what_it_needs(tiny, tmp_path, name, field):
    hf = _copy(tiny, tmp_path, name)
    if field == "text_config":
        _edit_config(hf, lambda c: c[field].update(model_type="gpt_oss"))
    else:
        _edit_config(hf, lambda c: c[field].update(architectures=["GptOssForCausalLM"], model_type="gpt_oss"))
    with pytest.raises(ConversionError) as exc:
        plan(hf, 1, 1)
    for need in ("attention-sink", "sliding window", "clamped SwiGLU", "biases", "Harmony"):
        assert need in str(exc.value), need


def test_moe_layout_errors_name_the_field(tiny):
    with pytest.raises(ConversionError, match=r"expert_parallel=3 must .* divide model.language.num_experts=4"):
        plan(tiny.dirs["qwen3-moe"], 1, 1, ep=3)
    with pytest.raises(ConversionError, match=r"expert parallelism needs an MoE language model"):
        plan(tiny.dirs["qwen3"], 1, 1, ep=2)
