# shellcheck shell=bash
# Sourced by scripts/test.sh and examples/quickstart.sh: make sure a virtualenv with this checkout
# (editable), the CPU build of torch and the test extras exists and is active. Works on a fresh
# machine and where the system Python refuses `pip install` (PEP 668): everything goes into the
# virtualenv.
#   MI_VENV=DIR   the virtualenv to create or reuse (default: the active one, else .venv)
#   MI_PYTHON=P   the interpreter that creates it (default python3)
# Expects the current directory to be the repository root.

MI_VENV="${MI_VENV:-${VIRTUAL_ENV:-.venv}}"
if [ ! -x "$MI_VENV/bin/python" ]; then
  echo "== creating the virtualenv $MI_VENV"
  if ! "${MI_PYTHON:-python3}" -m venv "$MI_VENV"; then
    # Debian and Ubuntu ship venv's pip bootstrap separately.
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      rm -rf "$MI_VENV"
      apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
      "${MI_PYTHON:-python3}" -m venv "$MI_VENV"
    else
      echo "cannot create a virtualenv: install python3-venv (apt-get install python3-venv)," \
           "or point MI_VENV at an existing virtualenv" >&2
      return 1
    fi
  fi
fi
# shellcheck disable=SC1091
source "$MI_VENV/bin/activate"

# Installed already, from this checkout? (find_spec: no slow imports.)
if ! python - <<'PY'
import importlib.util, os, sys
names = ["torch", "megatron.core", "pytest", "pytest_timeout", "transformers", "matplotlib", "sklearn"]
if any(importlib.util.find_spec(n) is None for n in names):
    sys.exit(1)
spec = importlib.util.find_spec("megatron_internvl")
sys.exit(spec is None or not os.path.realpath(spec.origin).startswith(os.path.realpath(os.getcwd())))
PY
then
  echo "== installing into $MI_VENV: the CPU torch first (an unpinned torch is a multi-GB CUDA build), then the package with its test extras"
  python -m pip install -q torch==2.13.0
  python -m pip install -q -e ".[test]"
fi
