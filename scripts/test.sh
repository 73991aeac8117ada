#!/usr/bin/env bash
# Run the tests on any machine, fresh or not: creates or reuses a virtualenv (.venv, or the active
# one), installs the CPU torch and the test extras into it when missing, then runs pytest.
#   bash scripts/test.sh                 # the whole suite: python -m pytest tests -q
#   bash scripts/test.sh tests/slurm -x  # anything else is passed to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup_env.sh
source scripts/setup_env.sh
if [ "$#" -eq 0 ]; then
  set -- tests -q
fi
exec python -m pytest "$@"
