#!/usr/bin/env bash
# Sentence-by-sentence correction against whole-answer correction (docs/benchmarks.md):
# a local SmolLM2-135M upstream (`aligner serve`), one proxy correcting whole answers with a
# whole-answer Aligner and one correcting sentence by sentence with a stream Aligner, both
# in-process SmolLM2-135M checkpoints; 50 held-out prompts, interleaved.
#
#   scripts/bench_stream_correction.sh WHOLE_ALIGNER STREAM_ALIGNER [PROMPTS.jsonl] [N]
#
# WHOLE_ALIGNER: e.g. the study's round-0 Aligner (runs/study/study-1/aligner/checkpoint);
# STREAM_ALIGNER: one trained by `aligner train-aligner --template stream-aligner-v1`.
set -euo pipefail
cd "$(dirname "$0")/.."
whole=$1 stream=$2 prompts=${3:-data/study/heldout.jsonl} n=${4:-50}
bin=${ALIGNER_BIN:-target/release/aligner}
model=${ALIGNER_MODELS_DIR:-models}/SmolLM2-135M-Instruct.Q4_1.gguf
log=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
start() { # log name, args...: prints the server's URL once it listens
    local name=$1; shift
    "$bin" serve --port 0 "$@" > "$log/$name.out" 2> "$log/$name.err" &
    pids+=($!)
    for _ in $(seq 600); do
        if grep -q "http://" "$log/$name.out" 2>/dev/null; then
            grep -o "http://[0-9.:]*/v1" "$log/$name.out" | tail -1
            return
        fi
        sleep 0.5
    done
    echo "$name did not start: $(cat "$log/$name.err")" >&2
    exit 1
}
up=$(start upstream "$model" --name upstream)
w=$(start whole --upstream "$up" --upstream-model upstream --aligner "$whole" --aligner-max-tokens 160)
s=$(start sentence --upstream "$up" --upstream-model upstream --aligner "$stream" --aligner-max-tokens 160 --stream-correction sentence)
python3 scripts/bench_stream_correction.py "$w" "$s" "$prompts" "$n"
