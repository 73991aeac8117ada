"""``megatron-internvl doctor [RECIPE]``: what a run on this machine would use, and why.

Versions (torch, CUDA, cuDNN, NCCL, Transformer Engine, DALI, Triton, transformers,
megatron-core), the GPU and its dense BF16 peak, the layer spec ``model.spec`` picks, the
attention kernels and the flash implementation ``model.flash_attention`` activates (FA3 or
PyTorch's default, and why), the Adam class megatron-core builds, the image decoder, then
warnings for combinations known to fail or to be slow. Nothing here changes the process beyond
importing (FA3's kernel module included: importing it activates nothing).
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field

from megatron_internvl.models import flash

# Distribution names, first found wins (TE and DALI ship per-CUDA wheels).
DISTRIBUTIONS = {
    "torch": ("torch",),
    "transformer-engine": ("transformer-engine", "transformer_engine", "transformer-engine-cu12",
                           "transformer-engine-cu13"),
    "nvidia-dali": ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110"),
    "triton": ("triton", "pytorch-triton"),
    "transformers": ("transformers",),
    "megatron-core": ("megatron-core",),
}
# The CUDA major version each DALI wheel is built for (its driver must support it).
DALI_CUDA = {"nvidia-dali-cuda130": 13, "nvidia-dali-cuda120": 12, "nvidia-dali-cuda110": 11}
LOCAL_GPU_TORCH = (2, 10)  # torch.nn.attention.varlen: the local spec's packed attention on CUDA


@dataclass
class Environment:
    """Facts about this machine, gathered by :func:`gather` (tests build it directly)."""

    versions: dict = field(default_factory=dict)  # name -> version or None
    dali_wheel: str | None = None
    cuda: str | None = None  # torch's CUDA build
    cudnn: int | None = None
    nccl: str | None = None
    driver_cuda: tuple | None = None  # the newest CUDA the driver supports, (major, minor)
    gpu: str | None = None
    gpu_capability: tuple | None = None
    flash_impls: tuple | None = ()  # torch's registered flash-attention implementations; None: no registry
    flash_active: str | None = None
    fa3_kernels_error: str | None = None  # why FA3's kernels do not load (None: they do)


def _version(names) -> tuple[str | None, str | None]:
    for name in names:
        try:
            return importlib.metadata.version(name), name
        except importlib.metadata.PackageNotFoundError:
            continue
    return None, None


def _driver_cuda() -> tuple | None:
    """From nvidia-smi's header ("CUDA Version: 12.4"); None without a driver."""
    try:
        out = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def gather() -> Environment:
    import torch

    env = Environment()
    for key, names in DISTRIBUTIONS.items():
        env.versions[key], found = _version(names)
        if key == "nvidia-dali":
            env.dali_wheel = found
    env.cuda = torch.version.cuda
    if torch.cuda.is_available():
        env.cudnn = torch.backends.cudnn.version()
        env.nccl = ".".join(map(str, torch.cuda.nccl.version()))
        env.gpu = torch.cuda.get_device_name()
        env.gpu_capability = torch.cuda.get_device_capability()
        env.driver_cuda = _driver_cuda()
    impls = flash.registered_impls()
    env.flash_impls = None if impls is None else tuple(impls)
    env.flash_active = flash.active_impl()
    if env.gpu_capability and env.gpu_capability[0] == 9 and flash.FA3 in (impls or ()):
        env.fa3_kernels_error = flash.fa3_kernels_error()
    return env


def _torch_version(text: str | None) -> tuple:
    match = re.match(r"(\d+)\.(\d+)", text or "")
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def warnings_for(env: Environment, te_spec: bool, flash_attention: str = "auto") -> list[str]:
    """Known-bad combinations, each with what to do."""
    out = []
    if env.gpu and not te_spec and _torch_version(env.versions.get("torch")) < LOCAL_GPU_TORCH:
        out.append(f"torch {env.versions.get('torch')} without Transformer Engine: the local spec's packed "
                   f"attention needs torch >= 2.10 (torch.nn.attention.varlen) on CUDA; install torch >= 2.10 "
                   f"or Transformer Engine (an NGC PyTorch container has both)")
    wheel_cuda = DALI_CUDA.get(env.dali_wheel or "")
    if wheel_cuda and env.driver_cuda and env.driver_cuda[0] < wheel_cuda:
        out.append(f"{env.dali_wheel} needs a CUDA {wheel_cuda} driver, this one supports CUDA "
                   f"{env.driver_cuda[0]}.{env.driver_cuda[1]}: install nvidia-dali-cuda{env.driver_cuda[0]}0 "
                   f"instead, or keep data.image_backend=pil")
    try:
        plan = flash_plan(env, te_spec, flash_attention)
    except flash.FlashAttentionUnavailable as exc:
        out.append(f"training will stop: {exc}")
    else:
        if (plan.impl is None and flash_attention == "auto" and not te_spec and env.gpu_capability
                and env.gpu_capability[0] == 9 and env.fa3_kernels_error):
            out.append(f"Hopper GPU on PyTorch's default flash kernels (FlashAttention 2), slow there: torch "
                       f"lists FA3 but its kernels are missing ({env.fa3_kernels_error}); {flash.FA3_INSTALL}, "
                       f"or use Transformer Engine")
    return out


def flash_plan(env: Environment, te_spec: bool, flash_attention: str = "auto"):
    """What a model build on this machine activates (models/flash.py's table over ``env``)."""
    if env.flash_active == flash.FA3 and flash_attention != "default" and not te_spec:
        return flash.FlashPlan(flash.FA3, "already active in this process")
    return flash.choose(flash_attention, te_spec, env.gpu_capability if env.gpu else None,
                        None if env.flash_impls is None else list(env.flash_impls),
                        lambda: env.fa3_kernels_error, env.versions.get("torch"))


def report(env: Environment | None = None, spec: str = "auto", image_backend: str = "pil",
           flash_attention: str = "auto", decode_on: str = "worker") -> dict:
    """Everything ``doctor`` prints, as a dict (the GPU check records it)."""
    from megatron_internvl.checkpoint.optimizer_compat import adam_class_name
    from megatron_internvl.models.attention import describe_backends
    from megatron_internvl.models.flops import device_peak_tflops
    from megatron_internvl.models.specs import describe_spec, use_transformer_engine

    env = env or gather()
    te_spec = use_transformer_engine(spec)
    versions = dict(env.versions)
    versions.update(cuda=env.cuda, cudnn=env.cudnn, nccl=env.nccl)
    if env.gpu:
        try:
            kernels = flash_plan(env, te_spec, flash_attention).describe()
        except flash.FlashAttentionUnavailable:
            kernels = "none: model.flash_attention=fa3 cannot run here (see the warnings)"
        varlen = f"flash kernels (model.flash_attention={flash_attention}): {kernels}"
    else:
        varlen = "no CUDA: SDPA per sample (CPU)"
    if image_backend == "dali":
        # data/media.py decode_site's rule: the GPU decode runs only in the training process.
        on_rank = decode_on == "rank" or (decode_on == "auto" and env.gpu)
        if on_rank and env.gpu:
            where = "JPEGs decoded on the GPU in the training process (nvJPEG)"
        elif on_rank:
            where = "JPEGs decoded on the CPU in the training process (no CUDA)"
        else:
            where = ("decoded on the CPU in the data-loader workers" + (
                " (set data.decode_on=auto or rank for the GPU's nvJPEG decoder)" if env.gpu else ""))
        decoder = (f"DALI {versions.get('nvidia-dali') or 'MISSING'} ({env.dali_wheel or 'not installed'}), "
                   f"{where}; data.decode_on={decode_on}")
    else:
        decoder = "Pillow (data.image_backend=pil)"
    return {
        "versions": versions,
        "gpu": env.gpu or "none",
        "gpu_peak_bf16_tflops": device_peak_tflops() if env.gpu else None,
        "driver_cuda": ".".join(map(str, env.driver_cuda)) if env.driver_cuda else None,
        "spec": f"model.spec={spec}: {describe_spec(spec).split(':')[0]}",
        "attention": ("Transformer Engine (TEDotProductAttention)" if te_spec
                      else f"{describe_backends()}; {varlen}"),
        "optimizer": adam_class_name(),
        "image_decoder": decoder,
        "warnings": warnings_for(env, te_spec, flash_attention),
    }


def format_report(facts: dict) -> str:
    lines = ["versions: " + ", ".join(f"{k} {v if v is not None else '-'}" for k, v in facts["versions"].items())]
    peak = facts["gpu_peak_bf16_tflops"]
    lines.append(f"gpu: {facts['gpu']}" + (f" (dense BF16 peak {peak:g} TFLOP/s)" if peak else "")
                 + (f", driver supports CUDA {facts['driver_cuda']}" if facts["driver_cuda"] else ""))
    for key in ("spec", "attention", "optimizer", "image_decoder"):
        lines.append(f"{key.replace('_', ' ')}: {facts[key]}")
    lines += [f"WARNING: {w}" for w in facts["warnings"]] or ["no known-bad combination found"]
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="megatron-internvl doctor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?",
                   help="read model.spec, model.flash_attention, data.image_backend and data.decode_on from this recipe")
    p.add_argument("--json", action="store_true", help="print the facts as JSON")
    args = p.parse_args(argv)
    spec, backend, flash_attention, decode_on = "auto", "pil", "auto", "worker"
    if args.recipe:
        from megatron_internvl.config import load_config

        config = load_config(args.recipe, [])
        spec, backend, flash_attention = config.model.spec, config.data.image_backend, config.model.flash_attention
        decode_on = config.data.decode_on
    facts = report(spec=spec, image_backend=backend, flash_attention=flash_attention, decode_on=decode_on)
    print(json.dumps(facts, indent=1) if args.json else format_report(facts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
