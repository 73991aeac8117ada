"""The mpo: section's user errors name the field and the fix."""

import pytest

from megatron_internvl.config import ConfigError, load_config
from training.runner import ROOT

RECIPE = ROOT / "examples" / "tiny" / "mpo.yaml"


@pytest.mark.parametrize("overrides,message", [
    (["checkpoint.load=null"], "set checkpoint.load (or mpo.reference_checkpoint)"),
    (["mpo.reference=precomputed"], "needs mpo.reference_file"),
    (["mpo.reference=precomputed", "mpo.reference_file=x.pt", "data.v2pe=random"], "data.v2pe=random"),
    (["mpo.reference=frozen"], "use one of model, precomputed"),
    (["mpo.weights=[0.8,0.2]"], "three non-negative weights"),
    (["mpo.sft_reduction=mean"], "use token, sample or square"),
    (["mpo.label_smoothing=0.7"], "must be in [0, 0.5)"),
    (["data.synthetic.enabled=true"], "trains on preference pairs"),
])
def test_mpo_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_config(RECIPE, overrides)


def test_tiny_mpo_recipe_is_valid_with_the_internvl3_defaults():
    cfg = load_config(RECIPE, [])
    assert cfg.training.stage == "mpo"
    assert (cfg.mpo.beta, list(cfg.mpo.weights), cfg.mpo.reference, cfg.mpo.sft_reduction) == \
        (0.1, [0.8, 0.2, 1.0], "model", "token")
