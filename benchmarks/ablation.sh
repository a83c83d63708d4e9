#!/usr/bin/env bash
# Ablation over K (1, 5, 10, 25) and Q's update (wake, sleep, wake-sleep) on full binarized MNIST,
# SBN 200-200-10, the same number of updates for every run; K=1 with sleep is classical wake-sleep.
#
#   [KS="1 5 10 25"] [Q_UPDATES="wake sleep wake-sleep"] [SEEDS=1234] [OUT=benchmarks/out/ablation] \
#     bash benchmarks/ablation.sh [DATA.npz] [EPOCHS] [EVAL_K] [EVAL_POINTS] [PARALLEL]
#
# Every run: `rws fit` for EPOCHS epochs (500 updates each, batch 100) on one thread, then `rws eval`
# of the last checkpoint on the first EVAL_POINTS test points with EVAL_K samples (same seed for
# all). PARALLEL runs go side by side. SEEDS lists training seeds (`--seed_everything`; 1234 is the
# CLI's default): with several, every cell is trained once per seed and the table gives the mean and
# the spread over seeds. Results: $OUT/<name>.json (default benchmarks/out/ablation), a table on stdout.
set -euo pipefail
data=${1:-../shared/data/binarized_mnist.npz}
epochs=${2:-5}
eval_k=${3:-1000}
eval_points=${4:-2000}
parallel=${5:-2}
out=${OUT:-benchmarks/out/ablation}
mkdir -p "$out"
export KS=${KS:-1 5 10 25} Q_UPDATES=${Q_UPDATES:-wake sleep wake-sleep} SEEDS=${SEEDS:-1234}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 DATA=$data EPOCHS=$epochs EVAL_K=$eval_k EVAL_POINTS=$eval_points OUT=$out

name_of() {  # K Q_UPDATE SEED: the default seed keeps the names of the single-seed table
  if [ "$3" = 1234 ]; then echo "k$1-$2"; else echo "k$1-$2-seed$3"; fi
}
export -f name_of

run() {  # K Q_UPDATE SEED
  local name
  name=$(name_of "$1" "$2" "$3")
  [ -s "$OUT/$name.json" ] && return 0  # finished earlier: the script can be re-run after an interruption
  local start=$SECONDS
  rws fit --config configs/sbn_200_200_10.yaml --data.path "$DATA" --model.num_samples "$1" --model.q_update "$2" \
    --trainer.max_epochs "$EPOCHS" --trainer.limit_val_batches 10 --trainer.enable_progress_bar false \
    --seed_everything "$3" --trainer.default_root_dir "$OUT/$name" > "$OUT/$name.train.log" 2>&1
  local train_seconds=$((SECONDS - start))
  rws eval --checkpoint "$OUT/$name" --num-samples "$EVAL_K" --split test --max-points "$EVAL_POINTS" \
    --data-path "$DATA" --json 2> "$OUT/$name.eval.log" \
    | python -c "import json, sys; r = json.load(sys.stdin); r['train_seconds'] = $train_seconds; print(json.dumps(r))" \
    > "$OUT/$name.json"
}
export -f run

grid() {  # one line per run: K Q_UPDATE SEED
  for k in $KS; do for q in $Q_UPDATES; do for seed in $SEEDS; do echo "$k $q $seed"; done; done; done
}
grid | xargs -P "$parallel" -L 1 bash -c 'run "$0" "$1" "$2"'

# The table reads "K Q_UPDATE NAME" lines in grid order, so that name_of stays the one naming rule.
CELLS=$(grid | while read -r k q seed; do echo "$k $q $(name_of "$k" "$q" "$seed")"; done) python - "$out" <<'PY'
import itertools, json, os, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| K | Q update | test LL (nats) | stderr over points | seeds | spread over seeds (sd) | train wall s |")
print("|---|---|---|---|---|---|---|")
lines = [line.split() for line in os.environ["CELLS"].splitlines()]
for (k, q), cell in itertools.groupby(lines, key=lambda fields: tuple(fields[:2])):
    runs = [json.loads((out / f"{name}.json").read_text()) for _, _, name in cell]
    lls = [r["log_likelihood"] for r in runs]
    spread = f"{statistics.stdev(lls):.2f}" if len(lls) > 1 else "-"
    label = f"{q} (classical wake-sleep)" if (k, q) == ("1", "sleep") else q
    print(f"| {k} | {label} | {statistics.mean(lls):.2f} | {statistics.mean(r['stderr'] for r in runs):.2f} "
          f"| {len(runs)} | {spread} | {round(statistics.mean(r['train_seconds'] for r in runs))} |")
PY
