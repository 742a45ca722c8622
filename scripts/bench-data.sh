#!/usr/bin/env bash
# Data pipeline benchmark. Prints, from one invocation:
#  1. tokenization throughput of `dagmoe data prepare` against the Python
#     `tokenizers` package encoding the same files with the same
#     tokenizer.json and thread count, alternating, two passes each;
#  2. the training loader's batches/s on the small preset's shapes;
#  3. the share of a short small-dagmoe training run spent waiting for
#     batches (the prefetch thread should keep it under 1%).
# Needs the corpus, tokenizer and prepared kernel docs of scripts/quickstart.sh.
# Usage: scripts/bench-data.sh [CORPUS_DIR]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$DAGMOE_ROOT"

input=${1:-data/corpus/kernel-docs/sources}
tokenizer=data/tokenizer.json
prepared=data/prepared/kernel-docs
for path in "$input" "$tokenizer" "$prepared/manifest.json"; do
    if [[ ! -e $path ]]; then
        echo "bench-data: $path is missing; run scripts/quickstart.sh first" >&2
        exit 1
    fi
done
if ! .venv/bin/python -c "import tokenizers" 2>/dev/null; then
    echo "bench-data: installing the Python tokenizers package into .venv"
    .venv/bin/pip install --quiet --disable-pip-version-check "tokenizers>=0.22,<0.23"
fi
cargo build --release --quiet --bin dagmoe --example loader_throughput -p dagmoe -p dagmoe-data

threads=$(nproc)
export RAYON_NUM_THREADS=$threads
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); threads $threads"
echo "python tokenizers $(.venv/bin/python -c 'import tokenizers; print(tokenizers.__version__)')"

echo "== tokenization: $input"
for pass in 1 2; do
    started=$(date +%s.%N)
    target/release/dagmoe data prepare --input "$input" --tokenizer "$tokenizer" \
        --output "$work/prepared-$pass" --valid-fraction 0.05 >/dev/null
    finished=$(date +%s.%N)
    python_json=$(.venv/bin/python scripts/bench/tokenize_python.py --input "$input" --tokenizer "$tokenizer")
    .venv/bin/python - "$work/prepared-$pass/manifest.json" "$started" "$finished" "$python_json" "$pass" <<'PY'
import json, sys
manifest = json.load(open(sys.argv[1]))
seconds = float(sys.argv[3]) - float(sys.argv[2])
python = json.loads(sys.argv[4])
splits = [manifest[s] for s in ("train", "valid", "test") if s in manifest]
text_bytes = sum(s["bytes"] for s in splits)
documents = sum(s["documents"] for s in splits)
# prepare counts one EOS per document; the Python side encodes the text only.
tokens = sum(s["tokens"] for s in splits) - documents
ours = text_bytes / seconds / 1e6
theirs = python["bytes"] / python["seconds"] / 1e6
print(f"pass {sys.argv[5]}: dagmoe prepare {ours:.2f} MB/s ({seconds:.1f} s, shards written), "
      f"python tokenizers {theirs:.2f} MB/s ({python['seconds']:.1f} s, encode only), ratio {ours / theirs:.2f}x")
if (documents, tokens) != (python["documents"], python["tokens"]):
    print(f"  MISMATCH: dagmoe {documents} documents / {tokens} tokens, python {python['documents']} / {python['tokens']}")
else:
    print(f"  same output: {documents} documents, {tokens} tokens")
PY
done

echo "== loader (small preset: seq_len 128, batch_size 16)"
target/release/examples/loader_throughput "$prepared" 128 16 3

echo "== data wait during training (small-dagmoe, 30 steps)"
target/release/dagmoe pretrain --config configs/small-dagmoe.toml --set train.steps=30 \
    --set train.warmup_steps=3 --set train.checkpoint_every=0 --set data.eval_tokens=4096 \
    --set "train.out_dir=\"$work/run\"" >/dev/null 2>&1
.venv/bin/python - "$work/run/run.json" <<'PY'
import json, sys
run = json.load(open(sys.argv[1]))
print(f"train {run['train_tokens_per_second']:.0f} tokens/s, waiting for batches {100 * run['data_wait_fraction']:.3f}% of step time")
PY
