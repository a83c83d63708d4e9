#!/usr/bin/env bash
# Ablation over K (1, 5, 10, 25) and Q's update (wake, sleep, wake-sleep) on full binarized MNIST,
# SBN 200-200-10, the same number of updates for every run; K=1 with sleep is classical wake-sleep.
#
#   bash benchmarks/ablation.sh [DATA.npz] [EPOCHS] [EVAL_K] [EVAL_POINTS] [PARALLEL]
#
# Every run: `rws fit` for EPOCHS epochs (500 updates each, batch 100) on one thread, then `rws eval`
# of the last checkpoint on the first EVAL_POINTS test points with EVAL_K samples (same seed for
# all). PARALLEL runs go side by side. Results: benchmarks/out/ablation/<name>.json, a table on stdout.
set -euo pipefail
data=${1:-../shared/data/binarized_mnist.npz}
epochs=${2:-5}
eval_k=${3:-1000}
eval_points=${4:-2000}
parallel=${5:-2}
out=benchmarks/out/ablation
mkdir -p "$out"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 DATA=$data EPOCHS=$epochs EVAL_K=$eval_k EVAL_POINTS=$eval_points OUT=$out

run() {  # K Q_UPDATE
  local name="k$1-$2"
  [ -s "$OUT/$name.json" ] && return 0  # finished earlier: the script can be re-run after an interruption
  local start=$SECONDS
  rws fit --config configs/sbn_200_200_10.yaml --data.path "$DATA" --model.num_samples "$1" --model.q_update "$2" \
    --trainer.max_epochs "$EPOCHS" --trainer.limit_val_batches 10 --trainer.enable_progress_bar false \
    --trainer.default_root_dir "$OUT/$name" > "$OUT/$name.train.log" 2>&1
  local train_seconds=$((SECONDS - start))
  rws eval --checkpoint "$OUT/$name" --num-samples "$EVAL_K" --split test --max-points "$EVAL_POINTS" \
    --data-path "$DATA" --json 2> "$OUT/$name.eval.log" \
    | python -c "import json, sys; r = json.load(sys.stdin); r['train_seconds'] = $train_seconds; print(json.dumps(r))" \
    > "$OUT/$name.json"
}
export -f run

for k in 1 5 10 25; do for q in wake sleep wake-sleep; do echo "$k $q"; done; done \
  | xargs -P "$parallel" -L 1 bash -c 'run "$0" "$1"'

python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| K | Q update | test LL (nats) | stderr | train wall s |")
print("|---|---|---|---|---|")
for k in (1, 5, 10, 25):
    for q in ("wake", "sleep", "wake-sleep"):
        r = json.loads((out / f"k{k}-{q}.json").read_text())
        label = f"{q} (classical wake-sleep)" if (k, q) == (1, "sleep") else q
        print(f"| {k} | {label} | {r['log_likelihood']:.2f} | {r['stderr']:.2f} | {r['train_seconds']} |")
PY
