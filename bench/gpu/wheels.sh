#!/usr/bin/env bash
# Download, where the package index is reachable, the wheels the GPU check node lacks, into
# bench/gpu/wheels/ (git-ignored); bench/gpu/run.sh installs them there without network.
#
#   bash bench/gpu/wheels.sh            # CPython 3.12, manylinux x86-64 (the node's Python)
#   PY_VERSION=3.11 bash bench/gpu/wheels.sh
#
# What is needed: setup.py's install_requires, what the GPU check itself imports (transformers,
# the tiny dataset's matplotlib / scikit-learn, pytest) and the dependencies of every wheel
# downloaded; what the node has is bench/gpu/node-packages.txt. Optional packages the check does
# not use (PyAV for video data, Transformer Engine, DALI, flash-attn) are not fetched: the last
# three are far over the 64 MiB a device call can carry.
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=bench/gpu/wheels
node=bench/gpu/node-packages.txt
pyver="${PY_VERSION:-3.12}"
py="${PYTHON:-$(command -v python || command -v python3)}"
mkdir -p "$dest"

download() {  # NAME[==VERSION]
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$dest" "$1"
}

missing() {  # requirement strings on stdin -> the ones whose distribution the node lacks
  "$py" -c '
import re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
have = {norm(l.strip()) for l in open(sys.argv[1]) if l.strip() and not l.startswith("#")}
for req in sys.stdin.read().split():
    name = re.split(r"[<>=!~\[;]", req, maxsplit=1)[0]
    if norm(name) not in have:
        print(req)
' "$node"
}

needed() {  # setup.py's install_requires + what the check imports
  "$py" - <<'PY'
import ast
tree = ast.parse(open("setup.py").read())
for node in ast.walk(tree):
    if isinstance(node, ast.keyword) and node.arg == "install_requires":
        print(" ".join(ast.literal_eval(node.value)))
print("transformers matplotlib scikit-learn pytest pytest-timeout")
PY
}

queue=$(needed | missing)
done_list=""
while [ -n "$queue" ]; do
  next=""
  for req in $queue; do
    name="${req%%[<>=!~\[;]*}"
    case " $done_list " in *" $name "*) continue ;; esac
    echo "[wheels] $req (not on the node)"
    download "$req"
    done_list="$done_list $name"
    whl=$(ls -t "$dest"/*.whl | head -1)
    # Its own dependencies (no extras, no environment markers that exclude Linux / CPython).
    deps=$(unzip -p "$whl" '*.dist-info/METADATA' | sed -n 's/^Requires-Dist: //p' | grep -v 'extra ==' \
           | sed 's/ *;.*//; s/ (\(.*\))/\1/; s/ //g' || true)
    next="$next $(echo "$deps" | missing | tr '\n' ' ')"
  done
  queue=$(echo "$next" | xargs -n1 2>/dev/null | sort -u | tr '\n' ' ' | sed 's/ *$//')
done
echo "[wheels] $(ls "$dest"/*.whl 2>/dev/null | wc -l) wheel(s) in $dest, $(du -sh "$dest" | cut -f1) in all"
