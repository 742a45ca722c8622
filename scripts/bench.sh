#!/usr/bin/env bash
# Training-step benchmark, dagmoe against PyTorch eager on the same model.
#
# For each case it runs `dagmoe bench` and scripts/bench/torch_train.py in
# alternation, ROUNDS times each, on the same config, shapes, precision,
# thread count and prepared kernel-docs windows. Each run prints its median
# step time. The table gives the median over rounds, tokens/s, the ratio
# of PyTorch's step time to dagmoe's (above 1: dagmoe is faster) and each
# process's peak resident memory. It then prints the DAG overhead (step time over the
# weighted-sum baseline's, same implementation) and the expert scaling
# (32 experts over 8 at the same top-k and expert size).
#
# PRECISION f32 (the default) runs both in float32. bf16 runs dagmoe with
# train.precision = "bf16" and PyTorch under bf16 autocast, both keeping
# float32 weights, router and losses.
#
# Needs the tokenizer and prepared data of scripts/quickstart.sh.
# Usage: scripts/bench.sh [ROUNDS] [STEPS] [PRECISION]   (defaults 2, 10, f32)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$DAGMOE_ROOT"

rounds=${1:-2}
steps=${2:-10}
precision=${3-f32}
for count in "$rounds" "$steps"; do
    if [[ ! $count =~ ^[1-9][0-9]*$ ]]; then
        echo "bench: ROUNDS and STEPS must be positive integers, got '$count'; see the usage line in $0" >&2
        exit 2
    fi
done
case $precision in
    f32) torch_dtype=float32 ;;
    bf16) torch_dtype=bfloat16 ;;
    *) echo "bench: invalid PRECISION '$precision'; use f32 or bf16" >&2; exit 2 ;;
esac
warmup=3
threads=$(nproc)
data=data/prepared/kernel-docs
if [[ ! -f $data/manifest.json ]]; then
    echo "bench: $data is missing; run scripts/quickstart.sh first" >&2
    exit 1
fi
cargo build --release --quiet --bin dagmoe

# name | config | overrides (space-separated KEY=VALUE)
cases=(
    "moe-8|configs/small-moe.toml|"
    "dag-L1-8|configs/small-dagmoe.toml|model.dag.depth=1"
    "dag-L2-8|configs/small-dagmoe.toml|"
    "moe-32|configs/small-moe.toml|model.moe.n_experts=32"
    "dag-L1-32|configs/small-dagmoe.toml|model.dag.depth=1 model.moe.n_experts=32"
    "dag-L2-32|configs/small-dagmoe.toml|model.moe.n_experts=32"
)

results=$(mktemp)
trap 'rm -f "$results"' EXIT
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/ {print $2}') GiB"
echo "threads $threads, $precision, $warmup warm-up and $steps timed steps per run, $rounds rounds"

for round in $(seq "$rounds"); do
    for entry in "${cases[@]}"; do
        IFS='|' read -r name config overrides <<<"$entry"
        sets=("--set" "train.threads=$threads" "--set" "train.precision=\"$precision\"")
        for override in $overrides; do
            sets+=("--set" "$override")
        done
        echo "round $round: $name" >&2
        target/release/dagmoe bench --config "$config" "${sets[@]}" --warmup "$warmup" --steps "$steps" \
            | sed "s/^{/{\"case\":\"$name\",/" >>"$results"
        .venv/bin/python scripts/bench/torch_train.py --config "$config" "${sets[@]}" --warmup "$warmup" \
            --steps "$steps" --threads "$threads" --data "$data" --dtype "$torch_dtype" \
            | sed "s/^{/{\"case\":\"$name\",/" >>"$results"
    done
done

.venv/bin/python - "$results" <<'PY'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
cases = list(dict.fromkeys(r["case"] for r in runs))
def pick(case, impl, key):
    return statistics.median(r[key] for r in runs if r["case"] == case and r["impl"] == impl)
print()
print(f"{'case':<10} {'params':>11} {'dagmoe ms':>10} {'torch ms':>9} {'dagmoe tok/s':>13} {'torch tok/s':>12} {'ratio':>6} {'dagmoe MiB':>11} {'torch MiB':>10}")
step = {}
for case in cases:
    ours, theirs = pick(case, "dagmoe", "median_step_seconds"), pick(case, "pytorch", "median_step_seconds")
    step[case] = (ours, theirs)
    tokens = pick(case, "dagmoe", "tokens_per_step")
    params = {r["impl"]: r["params"] for r in runs if r["case"] == case}
    mark = "" if params.get("dagmoe") == params.get("pytorch") else "  (parameter counts differ!)"
    print(f"{case:<10} {params['dagmoe']:>11,} {1000 * ours:>10.1f} {1000 * theirs:>9.1f} {tokens / ours:>13.0f} {tokens / theirs:>12.0f} "
          f"{theirs / ours:>5.2f}x {pick(case, 'dagmoe', 'peak_rss_mib'):>11.0f} {pick(case, 'pytorch', 'peak_rss_mib'):>10.0f}{mark}")
print()
for experts in ("8", "32"):
    base = step[f"moe-{experts}"]
    for depth in ("L1", "L2"):
        dag = step[f"dag-{depth}-{experts}"]
        print(f"DAG overhead {depth}, {experts} experts: dagmoe {100 * (dag[0] / base[0] - 1):+.1f}%, "
              f"pytorch {100 * (dag[1] / base[1] - 1):+.1f}%")
for name in ("moe", "dag-L1", "dag-L2"):
    small, large = step[f"{name}-8"], step[f"{name}-32"]
    print(f"expert scaling {name} (32 / 8 experts): dagmoe {large[0] / small[0]:.2f}x, pytorch {large[1] / small[1]:.2f}x")
PY
