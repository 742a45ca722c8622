#!/usr/bin/env bash
# Measures the training step time of every aggregation on the small preset,
# in one invocation, relative to the weighted sum: the same config with only
# model.moe.aggregation (and the DAG settings) changed, no shared expert,
# 30 steps a run, the first step excluded from the timing. The variants run
# in turn PASSES times (default 2) so machine noise spreads over all of
# them; the table gives each variant's mean speed over the passes.
# Needs the prepared kernel docs of scripts/quickstart.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dagmoe=target/release/dagmoe
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

variants=(
    'weighted-sum|model.moe.aggregation="weighted-sum"'
    'dag L=1|model.dag.depth=1'
    'dag L=2|model.dag.depth=2'
    'dag L=2 vector edges|model.dag.edge_gate="vector"'
    'chain-of-experts (2 rounds)|model.moe.aggregation="chain-of-experts"'
    'mlp-mix|model.moe.aggregation="mlp-mix"'
)
passes=${PASSES:-2}
for pass in $(seq "$passes"); do
    for index in "${!variants[@]}"; do
        setting=${variants[$index]#*|}
        "$dagmoe" pretrain --config configs/small-dagmoe.toml --set "$setting" \
            --set train.steps=30 --set train.warmup_steps=3 --set train.checkpoint_every=0 \
            --set 'data.valid={}' --set "train.out_dir=$out/$pass-$index" > /dev/null 2>&1
    done
done

printf '%-30s %12s %10s\n' variant 'tokens/s' 'step time'
for index in "${!variants[@]}"; do
    name=${variants[$index]%%|*}
    python3 - "$out" "$index" "$passes" "$name" <<'PY'
import json, sys
out, index, passes, name = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
def speed(i):
    runs = [json.load(open(f"{out}/{p}-{i}/run.json"))["train_tokens_per_second"] for p in range(1, passes + 1)]
    return sum(runs) / len(runs)
print(f"{name:<30} {speed(index):>12.0f} {speed(0) / speed(index):>9.3f}x")
PY
done
