"""Recipes: inheritance, overrides, strict keys and cross-field errors that name the fix."""

import subprocess
import sys
import textwrap

import pytest
import yaml

from megatron_internvl.config import Config, ConfigError, load_config, save_config
from megatron_internvl.config.loader import config_to_dict

DATA = {"datasets": [{"name": "toy", "annotation": "toy.jsonl"}]}


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def base(tmp_path):
    write(tmp_path / "base.yaml", """
        model:
          language: {hidden_size: 64, num_layers: 4, num_heads: 4, num_kv_heads: 2,
                     ffn_hidden_size: 128, vocab_size: 256}
          vision: {hidden_size: 32, num_layers: 2, num_heads: 2, ffn_hidden_size: 64}
        data:
          datasets: [{name: toy, annotation: toy.jsonl}]
          tokenizer_path: tok.json
        training: {train_steps: 10, global_batch_size: 4}
        optimizer: {lr: 1.0e-3}
    """)
    return tmp_path / "base.yaml"


def test_inheritance_and_overrides(tmp_path, base):
    child = write(tmp_path / "child.yaml", """
        defaults: base.yaml
        training: {train_steps: 20}
        optimizer: {warmup_steps: 5}
    """)
    cfg = load_config(child, ["optimizer.lr=2e-4", "parallel.tensor_parallel=2", "checkpoint.load=null"])
    assert cfg.training.train_steps == 20  # child wins
    assert cfg.training.global_batch_size == 4  # inherited
    assert cfg.model.language.hidden_size == 64  # inherited, merged key by key
    assert cfg.model.language.arch == "qwen2"  # schema default
    assert cfg.optimizer.lr == pytest.approx(2e-4)  # "2e-4" (no dot) still parses as a number
    assert cfg.optimizer.warmup_steps == 5
    assert cfg.parallel.tensor_parallel == 2


def test_multiple_bases_later_wins(tmp_path, base):
    write(tmp_path / "fast.yaml", "training: {train_steps: 3, log_interval: 7}\n")
    child = write(tmp_path / "child.yaml", "base: [base.yaml, fast.yaml]\ntraining: {log_interval: 2}\n")
    cfg = load_config(child)
    assert (cfg.training.train_steps, cfg.training.log_interval) == (3, 2)


def test_resolved_config_roundtrip(tmp_path, base):
    cfg = load_config(base, ["training.seed=7"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)
    assert isinstance(again, Config)


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["model.language.hiden_size=3"], "did you mean 'model.language.hidden_size'"),
        (["trainig.train_steps=3"], "did you mean 'training'"),
        (["parallel.tensor_parallel=3"], "parallel.tensor_parallel=3 does not divide model.language.num_heads=4"),
        (["parallel.pipeline_parallel=3"], "does not divide model.language.num_layers=4"),
        (["parallel.pipeline_parallel=2", "parallel.first_stage_llm_layers=5"], "first_stage_llm_layers=5 is outside"),
        (["parallel.sequence_parallel=true"], "sequence_parallel=true needs parallel.tensor_parallel > 1"),
        (["training.stage=warmup"], "training.stage='warmup': choose one of"),
        (["training.train_steps=many"], "training.train_steps must be an integer"),
        (["optimizer.decay_style=step"], "optimizer.decay_style='step'"),
        (["model.language.num_kv_heads=3"], "num_heads=4 is not a multiple of model.language.num_kv_heads=3"),
        (["training.train_steps"], "not of the form section.key=value"),
        (["data.datasets=[]"], "data.datasets is empty"),
        (["parallel.context_parallel=2"], "parallel.context_parallel=2 is not supported yet"),
        (["model.language.arch=internlm3"], "InternLM3 has no attention biases"),
    ],
)
def test_bad_config_names_field_and_fix(base, overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(base, overrides)
    assert needle in str(err.value)


def test_world_size_and_batch_checks(base):
    with pytest.raises(ConfigError, match="world size 3 is not divisible by parallel.tensor_parallel"):
        load_config(base, ["parallel.tensor_parallel=2"], world_size=3)
    with pytest.raises(ConfigError, match="global_batch_size=4 is not divisible .* make it a multiple of 8"):
        load_config(base, [], world_size=8)  # DP = 8
    cfg = load_config(base, ["parallel.tensor_parallel=2"], world_size=4)  # DP = 2
    assert cfg.parallel.data_parallel(4) == 2


def test_recipe_errors(tmp_path):
    with pytest.raises(ConfigError, match="recipe not found"):
        load_config(tmp_path / "nope.yaml")
    write(tmp_path / "a.yaml", "defaults: b.yaml\n")
    write(tmp_path / "b.yaml", "defaults: a.yaml\n")
    with pytest.raises(ConfigError, match="inheritance cycle"):
        load_config(tmp_path / "a.yaml")
    write(tmp_path / "bad.yaml", "model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        load_config(tmp_path / "list.yaml")


def test_cli_help_and_malformed_recipe(tmp_path):
    out = subprocess.run([sys.executable, "-m", "megatron_internvl.cli", "train", "--help"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "section.key=value" in out.stdout
    bad = write(tmp_path / "bad.yaml", "parallel:\n  tensor_paralel: 2\n")
    out = subprocess.run([sys.executable, "-m", "megatron_internvl.cli", "train", str(bad)],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "unknown config key 'parallel.tensor_paralel'; did you mean 'parallel.tensor_parallel'" in out.stderr


def test_plan_prints_layout(base):
    out = subprocess.run([sys.executable, "-m", "megatron_internvl.cli", "plan", str(base),
                          "parallel.tensor_parallel=2", "--world-size", "4"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "DP=2; 2 micro-batches per rank per step" in out.stdout
    assert yaml.safe_load(out.stdout.split("# layout")[0])["parallel"]["tensor_parallel"] == 2
