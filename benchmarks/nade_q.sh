#!/usr/bin/env bash
# The paper's central claim, with P held fixed: an SBN 200-200 generative model trained with a NADE
# inference network (configs/sbn_nade_200_200.yaml, the authors' param-mnist-200-200.py) against the
# same P with an SBN inference network. K = 5, batch 100, wake-sleep Q updates, Adam, same seed.
#
#   bash benchmarks/nade_q.sh [DATA.npz] [BUDGET_CPU_SECONDS] [EVAL_KS]
#
# Runs, one thread each (the budget is process CPU time, so sharing the machine does not change the
# compute each run gets):
#   sbn_nade    Q NADE (hidden 200), BUDGET CPU-s
#   sbn_sbn     Q SBN, BUDGET CPU-s (equal compute: it does several times the epochs)
#   sbn_sbn_eq  Q SBN, stopped after as many epochs as sbn_nade did (equal updates; training is
#               deterministic on a CPU, so this is sbn_sbn at that epoch)
# then each model's test log-likelihood on all 10k test points at every K in EVAL_KS (default
# "100 1000") by benchmarks/eval_k_sweep.sh, whose table pairs the models point by point. Runs:
# benchmarks/out/nade_q/; evaluations: benchmarks/out/evalk/nadeq_*. Re-running skips finished work.
set -euo pipefail
data=${1:-../shared/data/binarized_mnist.npz}
budget=${2:-3600}
eval_ks=${3:-100 1000}
out=benchmarks/out/nade_q
mkdir -p "$out"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

train() {  # NAME Q_LAYER EXTRA_ARGS...
  local name=$1 q_layer=$2; shift 2
  [ -e "$out/$name.train.log" ] && grep -q '`Trainer.fit` stopped\|budget' "$out/$name.train.log" && return 0
  rws fit --config configs/sbn_nade_200_200.yaml --model.q_layer "$q_layer" --data.path "$data" \
    --trainer.limit_val_batches 10 --trainer.enable_progress_bar false --trainer.default_root_dir "$out/$name" \
    "$@" > "$out/$name.train.log" 2>&1
}

train sbn_nade nade --trainer.max_epochs 100000 --cpu_time_budget.seconds "$budget" &
train sbn_sbn sbn --trainer.max_epochs 100000 --cpu_time_budget.seconds "$budget" &
wait
epochs=$(grep -c '^epoch' "$out/sbn_nade.train.log")
train sbn_sbn_eq sbn --trainer.max_epochs "$epochs"
for name in sbn_nade sbn_sbn sbn_sbn_eq; do
  echo "== $name: $(grep -c '^epoch' "$out/$name.train.log") epochs; last: $(grep '^epoch' "$out/$name.train.log" | tail -n 1)"
done
bash benchmarks/eval_k_sweep.sh "$data" 10000 "$eval_ks" \
  nadeq_sbn_nade="$out/sbn_nade" nadeq_sbn_sbn_eq="$out/sbn_sbn_eq" nadeq_sbn_sbn="$out/sbn_sbn"
