#!/usr/bin/env bash
# The GPU check (docs/performance.md): correctness of the local spec on CUDA without Transformer
# Engine, and its training throughput against transformers on the same GPU.
#
#   bash bench/gpu/run.sh [OUT_DIR]              # on a GPU node; OUT_DIR defaults to $OUT, else
#                                                # bench/results/gpu-check
#   bash bench/gpu/run.sh --cpu-smoke [OUT_DIR]  # the same steps on CPU with tiny shapes (CI)
#
# Where megatron-core is not importable, the wheels the node lacks (bench/gpu/wheels.sh, run
# where the package index is reachable) are installed from bench/gpu/wheels/ without network. PYTHON picks the interpreter (default: python,
# else python3).
set -euo pipefail
cd "$(dirname "$0")/../.."

smoke=()
out=""
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) smoke=(--cpu-smoke) ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    -*) echo "run.sh: unknown option $arg (use --cpu-smoke or an output folder)" >&2; exit 2 ;;
    *) out="$arg" ;;
  esac
done
out="${out:-${OUT:-bench/results/gpu-check}}"
mkdir -p "$out"
py="${PYTHON:-$(command -v python || command -v python3)}"

wheels=bench/gpu/wheels
if ! "$py" -c "import megatron.core" 2>/dev/null && compgen -G "$wheels/*.whl" >/dev/null; then
  site="${TMPDIR:-/tmp}/megatron-internvl-site"
  echo "[gpu-check] installing $(ls "$wheels"/*.whl | wc -l) wheels from $wheels into $site"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" --find-links "$wheels" "$wheels"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

exec "$py" bench/gpu/check.py run --out "$out" "${smoke[@]}" --command "bash bench/gpu/run.sh $*"
