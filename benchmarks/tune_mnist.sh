#!/usr/bin/env bash
# Issue 6: a small Ray Tune search on full binarized MNIST (configs/tune/mnist.yaml: 16 trials of at
# most 10 short epochs or 100 CPU-seconds, ASHA, Optuna TPE, 2 trials at a time on 1 CPU each).
#   bash benchmarks/tune_mnist.sh [PATH/binarized_mnist.npz]
# Writes benchmarks/out/tune/NAME/{trials.csv,trials.md,best.yaml}, the log, and
# benchmarks/out/tune_section.md (the section for benchmarks/RESULTS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/binarized_mnist.npz}
NAME=${RWS_TUNE_NAME:-mnist-$(date +%Y%m%d-%H%M%S)}
OUT=benchmarks/out/tune
mkdir -p "$OUT"
COMMAND="rws tune --config configs/tune/mnist.yaml --fixed.data.path $DATA --storage-path $OUT --name $NAME"
START=$(date +%s)
nice -n 5 $COMMAND | tee "$OUT/$NAME.log"
WALL=$(( $(date +%s) - START ))

BEST=$(sed -n 's/^# \(val\/log_likelihood [^ ]*\).*/\1/p' "$OUT/$NAME/best.yaml")
{
  echo "## Issue 6: Ray Tune search on full MNIST"
  echo
  echo "- date: $(date +%Y-%m-%d); machine: 2-core CPU, no GPU; wall time: ${WALL} s"
  echo "- command: \`bash benchmarks/tune_mnist.sh\`, which runs \`nice -n 5 $COMMAND\`"
  echo "- search: configs/tune/mnist.yaml (16 trials, Optuna TPE, ASHA on val/log_likelihood with grace 1 epoch and"
  echo "  reduction 2, epochs of 200 minibatches, at most 10 epochs or 100 CPU-seconds per trial, validation on 2000"
  echo "  points with K = 100)"
  echo "- best: $BEST (validation subset, K = 100; higher is better)"
  echo
  echo "Trials, best first (val/log_likelihood: the best over the trial's epochs):"
  echo
  cat "$OUT/$NAME/trials.md"
  echo
  echo "Best config (\`$OUT/$NAME/best.yaml\`, for \`rws fit --config\`):"
  echo
  echo '```yaml'
  cat "$OUT/$NAME/best.yaml"
  echo '```'
} > benchmarks/out/tune_section.md
echo "section: benchmarks/out/tune_section.md"
