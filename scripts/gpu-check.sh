#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA GPU. It builds dagmoe, then times
# a few hundred training steps of the paper-size DAG-MoE preset
# (configs/paper/dagmoe-l.toml: 24 layers, 16 experts, about 700M
# parameters) with dagmoe and with the PyTorch eager reference. For each it
# prints tokens/s, model FLOPs utilisation against the card's bf16 dense
# peak, and peak GPU memory sampled with nvidia-smi.
#
# The vocabulary is set to the prepared kernel-docs tokenizer's 8192 so the
# check runs offline on data that travels with the repository's data/
# directory; every other shape is the preset's. Both dagmoe and PyTorch run
# once in float32 and once with bf16 matrix products (train.precision =
# "bf16" and torch.autocast), float32 weights in both.
#
# Usage: scripts/gpu-check.sh [STEPS] [PEAK_BF16_TFLOPS]
#   STEPS defaults to 200. The peak defaults to 989 TFLOP/s, the dense bf16
#   figure usually quoted for H100 and H200 SXM cards (an estimate here;
#   check it against your card's datasheet and pass that value).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$DAGMOE_ROOT"

steps=${1:-200}
peak_tflops=${2:-989}
config=configs/paper/dagmoe-l.toml
data=data/prepared/kernel-docs
sets=(--set model.vocab_size=8192 --set "data.train=\"$data\"" --set 'data.tokenizer="data/tokenizer.json"'
      --set 'data.valid={}' --set train.device=\"cuda:0\" --set train.batch_size=16 --set data.seq_len=1024)

if ! command -v nvidia-smi >/dev/null; then
    echo "gpu-check: nvidia-smi not found; run this on a machine with an NVIDIA GPU" >&2
    exit 1
fi
if [[ ! -f $data/manifest.json ]]; then
    echo "gpu-check: $data is missing; run scripts/quickstart.sh (or copy data/) first" >&2
    exit 1
fi
scripts/setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# Runs a command while sampling GPU memory; prints its JSON line with peak_gpu_mib added.
measure() {
    local samples
    samples=$(mktemp)
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$samples" &
    local sampler=$!
    local line
    line=$("$@" | tail -1)
    kill "$sampler"
    local peak
    peak=$(sort -n "$samples" | tail -1)
    rm -f "$samples"
    echo "$line" | sed "s/}\$/,\"peak_gpu_mib_sampled\":${peak:-0}}/"
}

results=$(mktemp)
trap 'rm -f "$results"' EXIT
for precision in f32 bf16; do
    measure target/release/dagmoe bench --config "$config" "${sets[@]}" --set "train.precision=\"$precision\"" \
        --warmup 10 --steps "$steps" >>"$results"
done
for dtype in float32 bfloat16; do
    measure .venv/bin/python scripts/bench/torch_train.py --config "$config" "${sets[@]}" --device cuda:0 \
        --dtype "$dtype" --warmup 10 --steps "$steps" --data "$data" >>"$results"
done

.venv/bin/python - "$results" "$peak_tflops" <<'PY'
import json, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
peak = float(sys.argv[2]) * 1e12
flops_per_token = next(r["flops_per_token"] for r in runs if r["impl"] == "dagmoe")
print(f"{'impl':<8} {'dtype':<9} {'params':>13} {'tokens/s':>10} {'MFU':>7} {'peak GPU MiB':>13}")
names = {"f32": "float32", "bf16": "bfloat16"}
for r in runs:
    r.setdefault("dtype", names.get(r.get("precision"), "float32"))
    mfu = r["tokens_per_second"] * flops_per_token / peak
    print(f"{r['impl']:<8} {r['dtype']:<9} {r['params']:>13,} {r['tokens_per_second']:>10.0f} "
          f"{100 * mfu:>6.1f}% {r['peak_gpu_mib_sampled']:>13}")
PY
