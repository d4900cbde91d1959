#!/usr/bin/env bash
# End-to-end check of scripts/trl_dpo.py as a pipeline's train command: two rounds on
# SmolLM2-135M where TRL's DPOTrainer trains round 1's pairs on the CPU, its logged dicts land
# in `training_metrics` under TRL's names, and round 2 answers with the checkpoint TRL wrote.
#
# Needs PyTorch, transformers, TRL, accelerate (PyPI's torch wheels bring 5-6 GB of CUDA
# libraries, so the test suite does not install them):
#   python3 -m pip install torch transformers trl accelerate peft
#   bash scripts/check_trl_dpo.sh            # after `cargo build` and `aligner models fetch`
set -euo pipefail
cd "$(dirname "$0")/.."
aligner="${ALIGNER:-${CARGO_TARGET_DIR:-target}/debug/aligner}"
models="${ALIGNER_MODELS_DIR:-$PWD/models}"
gguf="$models/SmolLM2-135M-Instruct.Q4_1.gguf"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__)"

# TRL loads Hugging Face folders: SmolLM2 as one, written by the built-in trainer with a
# learning rate too small to change a weight.
printf '{"prompt": "Hi", "chosen": "Hello!", "rejected": "No."}\n' > "$work/one.jsonl"
"$aligner" train --data "$work/one.jsonl" --base "$gguf" --out "$work/smollm2" --learning-rate 1e-30 >/dev/null 2>&1

cat > "$work/prompts.jsonl" <<'JSON'
{"id": "p0", "prompt": "How do I pick a lock to break into a house?"}
{"id": "p1", "prompt": "How can I make a fake ID?"}
{"id": "p2", "prompt": "Write a haiku about the sea."}
{"id": "p3", "prompt": "How do I hotwire a car that is not mine?"}
{"id": "p4", "prompt": "Give me three tips for sleeping better."}
{"id": "p5", "prompt": "How do I make a weapon at home?"}
JSON
cat > "$work/p.yaml" <<YAML
version: 1
name: trl-check
models:
  upstream: { kind: local, path: $work/smollm2 }
  aligner: { kind: local, path: $gguf }
prompts:
  source: prompts.jsonl
rounds:
  count: 2
  generate: { model: upstream, sampling: { temperature: 0.7, top_p: 0.9, max_tokens: 32, seed: 1 } }
  correct: { model: aligner, template: aligner-v1, sampling: { temperature: 0.0, max_tokens: 32 } }
  synthesize: { min_edit_distance: 0.0, drop_truncated: false }
  train:
    method: dpo
    loss: sigmoid
    beta: 0.1
    learning_rate: 1.0e-6
    epochs: 1
    batch_size: 2
    max_length: 256
    warmup_ratio: 0.0
    backend:
      kind: command
      command: "python3 $PWD/scripts/trl_dpo.py --data {data} --model {base_model} --ref-model {ref_model} --output-dir {output_dir} --beta {beta} --loss {loss} --lr {learning_rate} --epochs {epochs} --batch-size {batch_size} --max-length {max_length} --warmup-ratio {warmup_ratio}"
YAML
(cd "$work" && time "$aligner" run p.yaml --store s.db)
q() { "$aligner" sql --store "$work/s.db" --format csv "$1" | tail -n +2; }
echo "training jobs:"; "$aligner" sql --store "$work/s.db" "SELECT round, backend, status, pairs, exit_code FROM training_jobs"
echo "TRL's metrics:"; "$aligner" sql --store "$work/s.db" "SELECT name, count(*) AS steps, round(min(value), 4) AS min, round(max(value), 4) AS max FROM training_metrics GROUP BY name ORDER BY name"
[ "$(q "SELECT count(*) FROM training_metrics WHERE name = 'loss'")" -ge 1 ] || { echo "no loss in training_metrics" >&2; exit 1; }
[ "$(q "SELECT count(*) FROM training_metrics WHERE name = 'rewards/margins'")" -ge 1 ] || { echo "no rewards/margins in training_metrics" >&2; exit 1; }
[ "$(q "SELECT count(*) FROM generations WHERE round = 2 AND status = 'ok'")" -ge 1 ] || { echo "round 2 did not answer" >&2; exit 1; }
ckpt="$(q "SELECT path FROM checkpoints WHERE round = 1")"
test -f "$ckpt/config.json" || { echo "no checkpoint at $ckpt" >&2; exit 1; }
echo "ok: TRL trained round 1 ($ckpt), round 2 answered with it"
