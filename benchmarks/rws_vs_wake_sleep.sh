#!/usr/bin/env bash
# RWS (K=5, wake-sleep Q updates) against classical wake-sleep (K=1, sleep) on full binarized MNIST,
# SBN 200-200-10, the same CPU-time budget each, then test log-likelihood with K=EVAL_K samples.
#
#   bash benchmarks/rws_vs_wake_sleep.sh [DATA.npz] [BUDGET_CPU_SECONDS] [EVAL_K] [EVAL_POINTS]
#
# Both runs use one thread and run side by side (one core each on a 2-core machine); the budget is
# process CPU time (`--cpu_time_budget.seconds`), so the two get the same compute even if the
# machine is shared. Results: benchmarks/out/rws_vs_wake_sleep/{rws_k5,wake_sleep}.json
set -euo pipefail
data=${1:-../shared/data/binarized_mnist.npz}
budget=${2:-1200}
eval_k=${3:-5000}
eval_points=${4:-10000}  # first N points of the test split
out=benchmarks/out/rws_vs_wake_sleep
mkdir -p "$out"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

train() {  # name config extra-args...
  local name=$1 config=$2; shift 2
  rws fit --config "$config" --data.path "$data" --trainer.max_epochs 100000 \
    --trainer.limit_val_batches 10 --trainer.enable_progress_bar false \
    --trainer.default_root_dir "$out/$name" --cpu_time_budget.seconds "$budget" "$@" > "$out/$name.train.log" 2>&1
  rws eval --checkpoint "$out/$name" --num-samples "$eval_k" --split test --max-points "$eval_points" --data-path "$data" --json \
    > "$out/$name.json" 2> "$out/$name.eval.log"
}

train rws_k5 configs/sbn_200_200_10.yaml &
train wake_sleep configs/wake_sleep.yaml &
wait
for name in rws_k5 wake_sleep; do
  grep -E "^epoch" "$out/$name.train.log" | tail -n 3
  echo "$name: $(cat "$out/$name.json")"
done
