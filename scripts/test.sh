#!/usr/bin/env bash
# The test command: installs what the tests need, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# Exports are checked by loading them with Hugging Face `datasets`, as TRL does.
if ! python3 -c "import datasets" 2>/dev/null; then
    python3 -m pip install --quiet --disable-pip-version-check datasets
fi
cargo fmt --all -- --check
cargo test --workspace "$@"
