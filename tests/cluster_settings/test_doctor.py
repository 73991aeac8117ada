"""`megatron-internvl doctor`: this machine's facts, and the known-bad combinations it warns about."""

import json

import megatron.core
import pytest
import torch

from megatron_internvl.cli import main as cli_main
from megatron_internvl.launch import doctor
from megatron_internvl.launch.doctor import Environment, warnings_for


def test_this_cpu_machine(capsys):
    assert cli_main(["doctor", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["versions"]["torch"] == torch.__version__
    assert facts["versions"]["megatron-core"] == megatron.core.__version__
    assert facts["gpu"] == "none" and facts["versions"]["cuda"] is None
    assert facts["spec"].startswith("model.spec=auto: local (no CUDA)")
    assert facts["optimizer"].startswith("torch.optim.AdamW")  # no TE, no apex here
    assert facts["image_decoder"].startswith("Pillow") and facts["warnings"] == []
    assert cli_main(["doctor"]) == 0
    assert "no known-bad combination found" in capsys.readouterr().out


def test_optimizer_line_follows_megatrons_choice(monkeypatch):
    from checkpoint_specs import standins

    import megatron.core.optimizer as mcore_optimizer
    monkeypatch.setattr(mcore_optimizer, "USING_PYTORCH_OPTIMIZER", False)
    monkeypatch.setattr(mcore_optimizer, "Adam", standins.FusedAdam)
    assert doctor.report(Environment())["optimizer"].endswith("standins.FusedAdam")


def test_dali_wheel_and_driver_from_installed_versions(monkeypatch):
    installed = {"torch": "2.9.1", "nvidia-dali-cuda130": "2.4.0"}

    def version(name):
        if name not in installed:
            raise doctor.importlib.metadata.PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(doctor.importlib.metadata, "version", version)
    env = doctor.gather()
    assert env.versions["torch"] == "2.9.1" and env.dali_wheel == "nvidia-dali-cuda130"
    assert env.versions["transformer-engine"] is None
    env.gpu, env.gpu_capability, env.driver_cuda = "NVIDIA H100 80GB HBM3", (9, 0), (12, 4)
    found = warnings_for(env, te_spec=False)
    assert any("torch 2.9.1 without Transformer Engine" in w and ">= 2.10" in w for w in found), found
    assert any("nvidia-dali-cuda130 needs a CUDA 13 driver" in w and "nvidia-dali-cuda120" in w for w in found)


@pytest.mark.parametrize("case,te_spec,expected", [
    (dict(versions={"torch": "2.9.0"}), False, ["torch 2.9.0"]),
    (dict(versions={"torch": "2.9.0"}), True, []),                          # TE's attention instead
    (dict(versions={"torch": "2.10.0"}), False, []),
    (dict(versions={"torch": "2.12.0"}, dali_wheel="nvidia-dali-cuda130", driver_cuda=(12, 8)), False, ["CUDA 13 driver"]),
    (dict(versions={"torch": "2.12.0"}, dali_wheel="nvidia-dali-cuda130", driver_cuda=(13, 0)), False, []),
    (dict(versions={"torch": "2.12.0"}, dali_wheel="nvidia-dali-cuda120", driver_cuda=(12, 2)), False, []),
    (dict(versions={"torch": "2.12.0"}, flash_impls=("FA3", "FA4")), False, ["FA3"]),       # Hopper, FA2
    (dict(versions={"torch": "2.12.0"}, flash_impls=("FA3",), flash_active="FA3"), False, []),
    (dict(versions={"torch": "2.12.0"}, flash_impls=("FA3",), gpu_capability=(10, 0)), False, []),
])
def test_known_bad_combinations(case, te_spec, expected):
    env = Environment(**{"gpu": "NVIDIA H200", "gpu_capability": (9, 0), **case})
    found = warnings_for(env, te_spec)
    assert len(found) == len(expected) and all(e in w for e, w in zip(expected, found)), found
