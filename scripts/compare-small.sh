#!/usr/bin/env bash
# Compares small-moe and small-dagmoe trained the same way. It prints their
# perplexity side by side on the kernel-docs validation split and the Python
# docs, their accuracy on a cloze task built from held-out kernel docs before
# and after a short continued pretraining on the Python docs, and one
# generated sample each.
# Needs the corpora and tokenizer of scripts/quickstart.sh; trains either
# model first when runs/<name>/run.json is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dagmoe=target/release/dagmoe
steps=${FINETUNE_STEPS:-60}

for name in small-moe small-dagmoe; do
    if [[ ! -f runs/$name/run.json ]]; then
        "$dagmoe" pretrain --config "configs/$name.toml"
    fi
done
checkpoint() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["checkpoint"])' "runs/$1/run.json"; }

if [[ ! -f data/kernel-cloze.jsonl ]]; then
    "$dagmoe" data make-cloze --input data/corpus/kernel-docs/sources --output data/kernel-cloze.jsonl --items 200 --seed 0
fi

echo "== perplexity and cloze accuracy, #1 small-moe, #2 small-dagmoe"
"$dagmoe" eval --checkpoint "$(checkpoint small-moe)" --checkpoint "$(checkpoint small-dagmoe)" \
    --data kernel-docs=data/prepared/kernel-docs --data python-docs=data/prepared/python-docs \
    --task cloze=data/kernel-cloze.jsonl

for name in small-moe small-dagmoe; do
    out=runs/$name-finetune-python-docs
    if [[ ! -f $out/run.json ]]; then
        echo "== $name: $steps steps of continued pretraining on the Python docs"
        "$dagmoe" finetune --from "$(checkpoint "$name")" --config configs/finetune-python-docs.toml \
            --set "train.steps=$steps" --set "train.out_dir=$out" --set 'data.tasks={ cloze = "data/kernel-cloze.jsonl" }'
    fi
    python3 - "$out/run.json" "$name" <<'PY'
import json, sys
run = json.load(open(sys.argv[1]))
for label, tasks, sets in [("before", run["tasks_before"], run["eval_before"]), ("after", run["tasks"], run["eval"])]:
    ppl = ", ".join(f"{s['set']} ppl {s['perplexity']:.2f}" for s in sets)
    acc = ", ".join(f"{t['task']} accuracy {t['accuracy']:.3f} (norm {t['accuracy_norm']:.3f})" for t in tasks)
    print(f"{sys.argv[2]} {label} fine-tune: {acc}; {ppl}")
PY
done

for name in small-moe small-dagmoe; do
    echo "== $name sample (seed 0)"
    "$dagmoe" generate --checkpoint "$(checkpoint "$name")" --prompt "The maintainer of a subsystem" --max-tokens 48 --seed 0
done
