# Sourced by the other scripts: points the libtorch build at the project's
# virtual environment, where scripts/setup.sh installed the torch wheel.
# burn-tch's build script reruns, and tries a download, when these differ
# between cargo invocations, so every script sets them the same way.

DAGMOE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export DAGMOE_ROOT
export VIRTUAL_ENV="$DAGMOE_ROOT/.venv"
export PATH="$VIRTUAL_ENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
