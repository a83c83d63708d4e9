#!/usr/bin/env bash
# Sample parallelism on full binarized MNIST: SBN 200-200-10, K=10, the same seed and number of epochs,
# trained once on 1 process and once on 2 processes (Lightning DDP, 1 data group x 2 sample ranks:
# each rank draws K/2 = 5 of the 10 samples per data point). Then the test log-likelihood of both
# with K=EVAL_K samples (`rws eval`, the two evaluations side by side, one thread each).
#
#   bash benchmarks/sample_parallel_mnist.sh [DATA.npz] [EPOCHS] [EVAL_K]
#
# Every process runs on one intra-op thread (OMP_NUM_THREADS=1), so the 1-process run uses one core
# and the 2-process run two. Results: benchmarks/out/sample_parallel_mnist/{s1,s2}.{train.log,json}
set -euo pipefail
data=${1:-/work/shared/data/binarized_mnist.npz}
epochs=${2:-10}
eval_k=${3:-1000}
python=${PYTHON:-python}
out=benchmarks/out/sample_parallel_mnist
rm -rf "$out" && mkdir -p "$out"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

common=(--config configs/sbn_200_200_10.yaml --data.path "$data" --model.num_samples 10 --seed_everything 1234
  --trainer.max_epochs "$epochs" --trainer.limit_val_batches 10 --trainer.enable_progress_bar false)

fit() {  # name extra-args...
  local name=$1; shift
  local start=$SECONDS
  echo "+ $python -m lightning_modules.cli fit ${common[*]} --trainer.default_root_dir $out/$name $*" > "$out/$name.train.log"
  "$python" -m lightning_modules.cli fit "${common[@]}" --trainer.default_root_dir "$out/$name" "$@" >> "$out/$name.train.log" 2>&1
  echo "wall seconds: $((SECONDS - start))" >> "$out/$name.train.log"
}

evaluate() {  # name
  "$python" -m lightning_modules.cli eval --checkpoint "$out/$1" --num-samples "$eval_k" --split test \
    --data-path "$data" --json > "$out/$1.json" 2> "$out/$1.eval.log"
}

fit s1
MASTER_PORT=${MASTER_PORT:-29517} fit s2 --trainer.devices 2 --trainer.strategy ddp --trainer.accelerator cpu \
  --model.sample_parallel 2
evaluate s1 &
evaluate s2 &
wait
for name in s1 s2; do
  echo "== $name"
  grep -E "^epoch" "$out/$name.train.log" | tail -n 2
  grep -E "^wall seconds" "$out/$name.train.log"
  cat "$out/$name.json"
done
