"""setup.py's GPU extras hold what the code imports, and nothing that needs a source build."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Distribution -> the module the package imports from it.
MODULES = {"transformer-engine": "transformer_engine", "nvidia-dali-cuda130": "nvidia.dali",
           "nvidia-dali-cuda120": "nvidia.dali"}


def extras() -> dict:
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    value = next(k.value for k in call.keywords if k.arg == "extras_require")
    return ast.literal_eval(value)


def imported(module: str) -> bool:
    pattern = re.compile(rf"^\s*(import|from) {re.escape(module)}\b", re.M)
    return any(pattern.search(p.read_text()) for p in (ROOT / "megatron_internvl").rglob("*.py"))


def test_gpu_extras():
    e = extras()
    names = {re.split(r"[\[<>=]", r)[0]: r for r in e["gpu"]}
    assert names.keys() == {"torch", "transformer-engine"}, e["gpu"]  # no flash-attn, no DALI
    assert names["torch"] == "torch>=2.10"  # torch.nn.attention.varlen for the local spec on CUDA
    for extra in ("gpu", "dali-cuda13", "dali-cuda12", "dali-cpu"):
        for req in e[extra]:
            name = re.split(r"[\[<>=]", req)[0]
            assert name == "torch" or imported(MODULES[name]), f"[{extra}] {req}: nothing imports it"
    assert e["dali-cuda13"] == ["nvidia-dali-cuda130"] and e["dali-cuda12"] == ["nvidia-dali-cuda120"]
    assert "apex" not in {re.split(r"[\[<>=]", r)[0] for reqs in e.values() for r in reqs}
