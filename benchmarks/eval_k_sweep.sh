#!/usr/bin/env bash
# Test log-likelihood against the evaluation's K: how much of a model's score is its proposal Q.
#
#   bash benchmarks/eval_k_sweep.sh DATA.npz POINTS "K1 K2 ..." NAME=CHECKPOINT [NAME=CHECKPOINT ...]
#
# For every model and K: `rws eval --compile` on the first POINTS test points, 2 torch threads.
# The estimate of log p(x) rises with K towards the model's true log-likelihood, and it gets there
# sooner the closer Q is to P's posterior; models compared at one small K are therefore ranked
# partly by their Q. Results go to benchmarks/out/evalk/NAME.kK.pPOINTS.{json,txt} (the .txt holds
# each point's estimate; a finished result is not run again, so the script can be re-run after an
# interruption). The table printed at the end gives each model's mean ± stderr over the points and
# each later model's difference from the first, paired point by point: all models see the same
# points, so the spread between points, which dominates each model's stderr, cancels.
set -euo pipefail
data=$1 points=$2 ks=$3
shift 3
out=benchmarks/out/evalk
mkdir -p "$out"

for model in "$@"; do
  name=${model%%=*} checkpoint=${model#*=}
  for k in $ks; do
    stem=$out/$name.k$k.p$points
    [ -s "$stem.json" ] && continue
    OMP_NUM_THREADS=2 rws eval --checkpoint "$checkpoint" --num-samples "$k" --split test --max-points "$points" \
      --data-path "$data" --json --compile --per-point "$stem.txt" > "$stem.json.tmp" 2> "$stem.log"
    mv "$stem.json.tmp" "$stem.json"
    echo "$(date -u +%FT%TZ) $name K=$k: $(cat "$stem.json")"
  done
done

python - "$out" "$points" "$ks" "$@" <<'EOF'
import json, math, statistics, sys
from pathlib import Path

out, points, ks = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split()
models = [m.split("=", 1)[0] for m in sys.argv[4:]]
first = models[0]
header = [f"K (first {points} test points)", *models, *(f"{m} - {first}, paired" for m in models[1:])]
print("\n| " + " | ".join(header) + " |\n|" + "---:|" * len(header))
for k in ks:
    stems = {name: f"{out}/{name}.k{k}.p{points}" for name in models}
    cells = []
    for stem in stems.values():
        report = json.loads(Path(f"{stem}.json").read_text())
        cells.append(f"{report['log_likelihood']:.2f} ± {report['stderr']:.2f} ({report['seconds']:.0f} s)")
    estimates = {name: [float(v) for v in Path(f"{stem}.txt").read_text().split()] for name, stem in stems.items()}
    for name in models[1:]:
        diff = [a - b for a, b in zip(estimates[name], estimates[first])]
        cells.append(f"{statistics.fmean(diff):+.2f} ± {statistics.stdev(diff) / math.sqrt(len(diff)):.2f}")
    print(f"| {k} | " + " | ".join(cells) + " |")
EOF
