#!/usr/bin/env bash
# Runs the whole test suite: data, model (libtorch and flex backends) and
# the end-to-end tests of the CLI library on the committed real-text fixture.
set -euo pipefail
"$(dirname "${BASH_SOURCE[0]}")/setup.sh"
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$DAGMOE_ROOT"
cargo test --release --workspace "$@"
