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


MISSING = "flash_attn_interface does not import (ModuleNotFoundError)"


@pytest.mark.parametrize("case,te_spec,expected", [
    (dict(versions={"torch": "2.9.0"}), False, ["torch 2.9.0"]),
    (dict(versions={"torch": "2.9.0"}), True, []),                          # TE's attention instead
    (dict(versions={"torch": "2.10.0"}), False, []),
    (dict(versions={"torch": "2.12.0"}, dali_wheel="nvidia-dali-cuda130", driver_cuda=(12, 8)), False, ["CUDA 13 driver"]),
    (dict(versions={"torch": "2.12.0"}, dali_wheel="nvidia-dali-cuda130", driver_cuda=(13, 0)), False, []),
    (dict(versions={"torch": "2.12.0"}, dali_wheel="nvidia-dali-cuda120", driver_cuda=(12, 2)), False, []),
    (dict(versions={"torch": "2.12.0"}, flash_impls=("FA3", "FA4"), fa3_kernels_error=MISSING), False,
     ["FA3 but its kernels are missing"]),                                                  # Hopper, FA2
    (dict(versions={"torch": "2.12.0"}, flash_impls=("FA3", "FA4")), False, []),          # FA3 at build
    (dict(versions={"torch": "2.11.0"}, flash_impls=("FA4",)), False, []),                # auto: quietly FA2
    (dict(versions={"torch": "2.12.0"}, flash_impls=("FA3",), flash_active="FA3"), False, []),
    (dict(versions={"torch": "2.12.0"}, flash_impls=("FA3",), gpu_capability=(10, 0)), False, []),
])
def test_known_bad_combinations(case, te_spec, expected):
    env = Environment(**{"gpu": "NVIDIA H200", "gpu_capability": (9, 0), **case})
    found = warnings_for(env, te_spec)
    assert len(found) == len(expected) and all(e in w for e, w in zip(expected, found)), found


HOPPER = dict(gpu="NVIDIA H200", gpu_capability=(9, 0), versions={"torch": "2.12.0"})


@pytest.mark.parametrize("case,flash_attention,kernels", [
    (dict(flash_impls=("FA3",)), "auto", "FA3 (Hopper GPU, torch lists FA3, flash_attn_interface imports)"),
    (dict(flash_impls=("FA3",), fa3_kernels_error=MISSING), "auto",
     f"PyTorch default (FlashAttention 2) (FA3's kernels are missing ({MISSING}))"),
    (dict(flash_impls=("FA3",)), "default", "PyTorch default (FlashAttention 2) (model.flash_attention=default)"),
    (dict(flash_impls=None, versions={"torch": "2.8.0"}), "auto",
     "PyTorch default (FlashAttention 2) (torch 2.8.0 has no flash-attention registry, no FA3)"),
    (dict(flash_impls=("FA3",), gpu_capability=(8, 0)), "auto",
     "PyTorch default (FlashAttention 2) (the GPU has compute capability 8.0)"),
    (dict(flash_impls=("FA3",), flash_active="FA3", fa3_kernels_error=MISSING), "auto",
     "FA3 (already active in this process)"),
])
def test_attention_line_names_the_flash_implementation_and_why(case, flash_attention, kernels):
    facts = doctor.report(Environment(**{**HOPPER, **case}), spec="local", flash_attention=flash_attention)
    assert facts["attention"].endswith(f"flash kernels (model.flash_attention={flash_attention}): {kernels}")


@pytest.mark.parametrize("case,needs", [
    (dict(flash_impls=("FA4",), versions={"torch": "2.11.0"}), "install torch >= 2.12"),
    (dict(flash_impls=("FA3",), fa3_kernels_error=MISSING), "pip install flash-attn-3 --find-links"),
    (dict(flash_impls=("FA3",), gpu_capability=(10, 0)), "FA3 runs on Hopper (9.0) only"),
])
def test_required_fa3_that_cannot_run_is_a_warning_not_a_crash(case, needs):
    facts = doctor.report(Environment(**{**HOPPER, **case}), spec="local", flash_attention="fa3")
    assert "model.flash_attention=fa3 cannot run here" in facts["attention"]
    (warning,) = [w for w in facts["warnings"] if "training will stop" in w]
    assert needs in warning and "model.flash_attention=auto" in warning


def test_gather_reads_torchs_registry_and_checks_kernels_only_on_hopper(monkeypatch):
    checked = []
    monkeypatch.setattr(doctor.flash, "fa3_kernels_error", lambda: checked.append(1) or MISSING)
    env = doctor.gather()  # this machine: torch 2.13 lists FA3, no GPU
    assert "FA3" in env.flash_impls and env.flash_active is None
    assert env.fa3_kernels_error is None and checked == []
    # A Hopper GPU (stand-ins for what gather asks torch and the driver).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda.nccl, "version", lambda: (2, 27, 3))
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91000)
    monkeypatch.setattr(doctor, "_driver_cuda", lambda: (12, 8))
    env = doctor.gather()
    assert env.gpu_capability == (9, 0) and env.fa3_kernels_error == MISSING and checked == [1]
    assert any("FA3 but its kernels are missing" in w for w in warnings_for(env, te_spec=False))


@pytest.mark.parametrize("gpu,decode_on,where", [
    ("NVIDIA H100", "worker", "in the data-loader workers (set data.decode_on=auto or rank"),
    ("NVIDIA H100", "auto", "on the GPU in the training process (nvJPEG)"),
    ("NVIDIA H100", "rank", "on the GPU in the training process (nvJPEG)"),
    (None, "auto", "in the data-loader workers; data.decode_on=auto"),
    (None, "rank", "on the CPU in the training process (no CUDA)"),
])
def test_dali_line_says_where_images_are_decoded(gpu, decode_on, where):
    env = Environment(gpu=gpu, dali_wheel="nvidia-dali-cuda130", versions={"nvidia-dali": "1.50"})
    line = doctor.report(env, spec="local", image_backend="dali", decode_on=decode_on)["image_decoder"]
    assert line.startswith("DALI 1.50 (nvidia-dali-cuda130)") and where in line, line
