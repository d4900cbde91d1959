#!/usr/bin/env bash
# The test command: installs what the tests need, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."

# Python packages the tests use: Hugging Face `datasets` loads exports the way TRL does; the
# official `openai` client talks to `aligner serve`; Ray (with its dashboard's Jobs API) runs
# the cluster test's head on loopback ports.
need() { # import name, pip requirement
    # Imported from / so that no folder of this repository passes for the module.
    if ! (cd / && python3 -c "import $1") 2>/dev/null; then
        python3 -m pip install --quiet --disable-pip-version-check "$2"
    fi
}
need datasets datasets
need openai "openai>=1.40"
need "ray, aiohttp_cors" "ray[default]>=2.9"
# pyenv installs new console scripts (`ray`) behind shims only after a rehash.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi

# Debian packages the tests drive: headless Chromium renders `aligner report`'s page and the
# daemon's dashboard; curl is the daemon API's and Ray's client; kill (procps) stops daemons
# mid-run; Slurm and munge run the single-node cluster of the Slurm test.
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v curl >/dev/null 2>&1 || missing+=(curl)
{ [ -x /usr/bin/kill ] || [ -x /bin/kill ]; } || missing+=(procps)
command -v slurmctld >/dev/null 2>&1 || missing+=(slurm-wlm)
command -v munged >/dev/null 2>&1 || missing+=(munge)
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi

cargo fmt --all -- --check
# Lints: every crate under the workspace lints, no warning allowed, and every `unsafe` block
# carries its `// SAFETY:` argument.
cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
cargo clippy --workspace --all-targets -- -D warnings -W clippy::undocumented_unsafe_blocks

# Build the suite (and the `aligner` binary it runs) first, then fetch the real models the
# local-model tests load (models/, or $ALIGNER_MODELS_DIR) and the prompt sets the example
# pipelines read (data/). Both are skipped when already there with the right checksums.
cargo test --workspace --no-run
aligner="${CARGO_TARGET_DIR:-target}/debug/aligner"
"$aligner" models fetch default qwen2.5-coder-0.5b gemma3-270m
"$aligner" prompts fetch

cargo test --workspace "$@"
