#!/usr/bin/env bash
# Installs what dagmoe needs and builds it: libtorch 2.9.0 from the PyPI
# torch wheel in a project-local virtual environment (.venv), then a release
# build of the workspace. Safe to rerun: finished steps are skipped.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$DAGMOE_ROOT"

torch_version=2.9.0
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$torch_version')" 2>/dev/null; then
    echo "setup: installing torch==$torch_version into .venv (about 2 minutes, 7 GB with its CUDA libraries)"
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check "torch==$torch_version"
fi

echo "setup: building dagmoe (release)"
cargo build --release --quiet
