#!/usr/bin/env bash
# The one-command quick start: a tiny InternVL trained with TP=2 on two CPU processes.
#   bash examples/quickstart.sh [OUT_DIR]        (default runs/quickstart)
# Sets up a virtualenv with what is missing, builds a tiny dataset from real photos that ship with matplotlib and
# scikit-learn, trains ~50 steps, shows the loss falling, saves a checkpoint, plots the curves,
# exports the model to the transformers format and loads it back with transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/quickstart}"
STEPS="${QUICKSTART_STEPS:-50}"

# A virtualenv (.venv, or the active one) with the CPU torch and the package, created when missing.
# shellcheck source=scripts/setup_env.sh
source scripts/setup_env.sh

echo "== building the tiny dataset in $OUT/data"
rm -rf "$OUT"
python examples/tiny/make_dataset.py "$OUT/data"

echo "== training $STEPS steps with tensor parallelism 2 on 2 CPU processes"
OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc-per-node 2 --master-port "${MASTER_PORT:-29517}" \
  -m megatron_internvl.train examples/tiny/full.yaml \
  parallel.tensor_parallel=2 training.train_steps="$STEPS" checkpoint.save_interval="$STEPS" \
  data.meta_path="$OUT/data/meta.json" data.tokenizer_path="$OUT/data/tokenizer.json" \
  logging.run_dir="$OUT/train" logging.progress=false

python - "$OUT/train/metrics.jsonl" <<'PY'
import json, sys
recs = [r for r in map(json.loads, open(sys.argv[1])) if "loss" in r]
first = sum(r["loss"] for r in recs[:5]) / 5
last = sum(r["loss"] for r in recs[-5:]) / 5
print(f"== loss: first 5 steps {first:.3f} -> last 5 steps {last:.3f}")
for r in recs[:: max(1, len(recs) // 10)]:
    print(f"   step {r['step']:3d}  loss {r['loss']:.3f}  {'#' * int(10 * r['loss'])}")
if not last < first - 1.0:
    sys.exit("quickstart: the loss did not fall")
PY

echo "== plots"
python tools/plot_metrics.py "$OUT/train"

CKPT="$OUT/train/checkpoints/$(cat "$OUT/train/checkpoints/latest")"
echo "== exporting $CKPT to the transformers format"
python tools/convert_hf.py export --ckpt "$CKPT" --out "$OUT/hf" --format transformers
python examples/tiny/check_export.py "$OUT/hf" "$OUT/data"
echo "== done: run directory $OUT/train, transformers model $OUT/hf"
