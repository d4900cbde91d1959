#!/usr/bin/env python3
"""PyTorch side of aligner's GPU training-step benchmark.

A SmolLM2-135M-shaped transformers LlamaForCausalLM with random weights (no model file needed)
takes full SFT steps (forward, causal-LM loss on all tokens, backward, AdamW lr 1e-5) on random
token ids at --batch x --seq, on one CUDA device, in each of these precisions:

  f32   float32 weights and activations, TF32 matmuls off
  tf32  float32 weights and activations, TF32 matmuls on
  bf16  bfloat16 weights, activations and optimizer state

Each figure is the median of --steps timed steps after --warmup steps, timed with
torch.cuda.synchronize() around each step. Prints one line per precision on stderr and a JSON
object on stdout.

    python3 scripts/bench/torch_train_step_gpu.py [--batch 16] [--seq 512] [--steps 10]
        [--attention sdpa|eager] [--dtypes f32,tf32,bf16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import transformers

LR = 1e-5


def smollm2_config(attention: str) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        attn_implementation=attention,
    )


def run(dtype: str, a) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    torch.backends.cudnn.allow_tf32 = dtype == "tf32"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(smollm2_config(a.attention))
    model = model.to(a.device, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    ids = torch.randint(0, 49152, (a.batch, a.seq), device=a.device)
    times = []
    cuda = a.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(a.warmup + a.steps):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - t)
    s = statistics.median(times)
    out = {
        "seconds_per_step": s,
        "tokens_per_s": a.batch * a.seq / s,
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "final_loss": float(loss.detach()),
    }
    print(
        f"sft {dtype:>4} {a.batch}x{a.seq}: {s * 1000:.1f} ms/step, {out['tokens_per_s']:.0f} tok/s, "
        f"peak {out['peak_gpu_mib'] or 0:.0f} MiB",
        file=sys.stderr,
    )
    del model, opt
    if cuda:
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--dtypes", default="f32,tf32,bf16")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run")
    a = ap.parse_args()
    results = {
        "framework": "pytorch",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "gpu": torch.cuda.get_device_name(0) if a.device == "cuda" else None,
        "attention": a.attention,
        "batch": a.batch,
        "seq": a.seq,
    }
    for d in a.dtypes.split(","):
        results[d] = run(d, a)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
