#!/usr/bin/env bash
# The main job: build aligner and run the quickstart pipeline.
#
#   OPENAI_BASE_URL=http://127.0.0.1:8000/v1 scripts/quickstart.sh
#
# Until the local candle backend lands, the quickstart talks to an OpenAI-compatible server you
# name (vLLM, SGLang, TGI, llama.cpp server, Ollama or OpenAI: see docs/backends.md) that
# serves the models `upstream` and `aligner` (override with the pipeline's `model:` fields).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OPENAI_BASE_URL:?set OPENAI_BASE_URL to your server, e.g. http://127.0.0.1:8000/v1 (see docs/backends.md)}"
export ALIGNER_BASE_URL="${ALIGNER_BASE_URL:-$OPENAI_BASE_URL}"
cargo build --release --bin aligner
exec target/release/aligner run pipelines/quickstart.yaml "$@"
