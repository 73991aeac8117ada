#!/usr/bin/env bash
# The GPU check (docs/performance.md): correctness of the local spec on CUDA, and of the
# Transformer Engine spec where TE is importable (resume, FP8, gradients, host reads), and the
# training throughput against transformers on the same GPU.
#
#   bash bench/gpu/run.sh [OUT_DIR]              # on a GPU node; OUT_DIR defaults to $OUT, else
#                                                # bench/results/gpu-check
#   bash bench/gpu/run.sh --cpu-smoke [OUT_DIR]  # the same steps on CPU with tiny shapes (CI)
#
# The checkout is installed, not put on sys.path: into a throwaway virtualenv whose only other
# packages are the interpreter's own (torch, transformers, ... as dependencies) and, where
# megatron-core is not importable, the wheels the node lacks (bench/gpu/wheels.sh, run where the
# package index is reachable) from bench/gpu/wheels/, all without network. PYTHON picks the
# interpreter (default: python, else python3).
set -euo pipefail
cd "$(dirname "$0")/../.."

smoke=()
out=""
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) smoke=(--cpu-smoke) ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    -*) echo "run.sh: unknown option $arg (use --cpu-smoke or an output folder)" >&2; exit 2 ;;
    *) out="$arg" ;;
  esac
done
out="${out:-${OUT:-bench/results/gpu-check}}"
mkdir -p "$out"
py="${PYTHON:-$(command -v python || command -v python3)}"

venv=$(mktemp -d "${TMPDIR:-/tmp}/megatron-internvl-gpu-check.XXXXXX")
trap 'rm -rf "$venv"' EXIT
"$py" -m venv --without-pip "$venv"
vpy="$venv/bin/python"
# The interpreter's site folders as plain path lines: their .pth files stay unread, so a
# development install of this checkout there (an editable finder) is not active in the venv.
"$py" - "$("$vpy" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" <<'PY'
import site, sys
dirs = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
open(f"{sys.argv[1]}/interpreter-packages.pth", "w").write("".join(d + "\n" for d in dirs))
PY
pip=("$vpy" -m pip install -q --no-index --no-deps --no-cache-dir --disable-pip-version-check)

wheels=bench/gpu/wheels
if ! "$vpy" -c "import megatron.core" 2>/dev/null && compgen -G "$wheels/*.whl" >/dev/null; then
  echo "[gpu-check] installing $(ls "$wheels"/*.whl | wc -l) wheels from $wheels into $venv"
  "${pip[@]}" --find-links "$wheels" "$wheels"/*.whl
fi
# Built from a copy of what setup.py packages, so the build writes nothing into the checkout.
echo "[gpu-check] installing this checkout into $venv"
mkdir "$venv/src"
cp -r setup.py README.md megatron_internvl kernels slurm "$venv/src"
"${pip[@]}" --no-build-isolation --ignore-installed "$venv/src"
# The check's processes start in the checkout: `python -m` and `python -` must not put it on sys.path.
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
"$vpy" - "$PWD" <<'PY'
import pathlib, sys
import megatron_internvl.kernels.fused_linear_ce
where = pathlib.Path(megatron_internvl.__file__).resolve()
if pathlib.Path(sys.argv[1]).resolve() in where.parents:
    sys.exit(f"run.sh: megatron_internvl imported from the checkout ({where}), not from the install")
print(f"[gpu-check] megatron_internvl from {where.parent}")
PY

"$vpy" bench/gpu/check.py run --out "$out" "${smoke[@]}" --command "bash bench/gpu/run.sh $*"
