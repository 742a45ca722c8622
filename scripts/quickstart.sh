#!/usr/bin/env bash
# The main job, end to end on a fresh machine: set-up, real-text corpora,
# tokenizer, shards, pretraining of small-dagmoe, then evaluation on the
# kernel-docs validation split and the Python docs. Finished stages are
# skipped on a rerun, an interrupted pretraining resumes from its last
# checkpoint; delete runs/small-dagmoe to train again.
#
# Results: runs/small-dagmoe/run.json (run summary) and
# <checkpoint>/eval.json (perplexity report).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

config=${1:-configs/small-dagmoe.toml}
run_dir=runs/$(basename "$config" .toml)
dagmoe=target/release/dagmoe

# stage NAME COMMAND...: runs a stage and prints its wall time.
stage() {
    local name=$1
    shift
    local start=$SECONDS
    echo "== $name"
    "$@"
    echo "== $name: $((SECONDS - start)) s"
}

stage "setup" scripts/setup.sh
stage "corpus" scripts/get-corpus.sh

if [[ ! -f data/tokenizer.json ]]; then
    stage "tokenizer" "$dagmoe" data tokenizer --input data/corpus/kernel-docs/sources --vocab-size 8192 --output data/tokenizer.json
fi
for name in kernel-docs python-docs; do
    if [[ ! -f data/prepared/$name/manifest.json ]]; then
        fraction=0.05
        [[ $name == python-docs ]] && fraction=0.1
        stage "prepare $name" "$dagmoe" data prepare --input "data/corpus/$name/sources" \
            --tokenizer data/tokenizer.json --output "data/prepared/$name" --valid-fraction "$fraction"
    fi
done

if [[ -f $run_dir/run.json ]]; then
    echo "== pretrain: $run_dir/run.json exists, reusing that run"
elif [[ -d $run_dir/checkpoints ]]; then
    stage "pretrain $(basename "$config" .toml) (resume)" "$dagmoe" pretrain --config "$config" --set "train.out_dir=$run_dir" --resume
elif [[ -e $run_dir ]]; then
    echo "quickstart: $run_dir exists but contains no checkpoint to resume; delete it and rerun" >&2
    exit 1
else
    stage "pretrain $(basename "$config" .toml)" "$dagmoe" pretrain --config "$config" --set "train.out_dir=$run_dir"
fi

checkpoint=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["checkpoint"])' "$run_dir/run.json")
stage "eval" "$dagmoe" eval --checkpoint "$checkpoint" \
    --data kernel-docs=data/prepared/kernel-docs --data python-docs=data/prepared/python-docs
