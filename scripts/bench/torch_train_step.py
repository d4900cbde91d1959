#!/usr/bin/env python3
"""PyTorch side of aligner's training-throughput benchmark (CPU, float32).

Loads SmolLM2-135M-Instruct's GGUF as a float32 transformers LlamaForCausalLM (eager
attention) through scripts/fixtures/gguf_to_hf.py, the same weights the candle trainer in
crates/aligner-train reads, and times full training steps on random token ids with AdamW
(lr 1e-5, PyTorch defaults otherwise):

  sft  forward, causal-LM loss on all tokens, backward, optimizer step; batch 1 and batch 2
       -> tokens/s
  dpo  one preference pair: policy forward+backward on chosen and rejected (each --seq
       tokens, batched as 2, sharing a --seq/4-token prompt), a frozen reference forward on
       both under no_grad, sigmoid DPO loss (beta 0.1), optimizer step
       -> seconds per step and policy tokens/s (2 * seq / step time)

Each measurement is the median of --steps timed steps after one warm-up step. Prints a
human-readable table on stderr, one JSON object on stdout, and the peak RSS. Each measurement
also records how many cores other processes used meanwhile ("other_load_cores"); with torch's
thread pool filling the machine, even a light competing load slows steps down many times over,
so a run with "contended": true is not representative.

    ~/.cache/aligner/torch-venv/bin/python scripts/bench/torch_train_step.py [--threads 2] [--seq 512] [--steps 3] [--only sft|dpo]

Needs: pip install torch numpy gguf safetensors transformers
Run it on an otherwise idle machine (check `uptime`): it uses --threads cores flat out.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402

import gguf_to_hf  # noqa: E402

DPO_BETA = 0.1
LR = 1e-5


def peak_rss_mib() -> float:
    """Peak resident set size of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class OtherLoad:
    """CPU time used by everything except this process while a measurement ran (Linux only).

    With torch's OpenMP thread pool sized to the whole machine, any other busy process slows a
    step down by far more than its share (threads wait at barriers for a descheduled peer), so
    a measurement is only meaningful when this stays near zero. Reported in cores (busy
    jiffies of the whole system minus this process's, over wall time); None where /proc/stat
    is unavailable.
    """

    CONTENDED_CORES = 0.2

    def __init__(self) -> None:
        self.start_system = self._system_busy_s()
        t = os.times()
        self.start_self = t.user + t.system
        self.start_wall = time.perf_counter()

    @staticmethod
    def _system_busy_s() -> float | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def cores(self) -> float | None:
        end_system = self._system_busy_s()
        if end_system is None or self.start_system is None:
            return None
        t = os.times()
        own = t.user + t.system - self.start_self
        wall = time.perf_counter() - self.start_wall
        return max(0.0, (end_system - self.start_system - own) / wall)


def measure(fn, steps: int) -> tuple[dict[str, float], float | None]:
    """One warm-up call of `fn`, then `steps` timed calls.

    Returns the median of each phase timing and the other processes' CPU load (cores) seen
    during the timed calls.
    """
    fn()
    load = OtherLoad()
    runs = [fn() for _ in range(steps)]
    phases = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return phases, load.cores()


def contention_note(other: float | None) -> str:
    if other is None:
        return ""
    flag = " CONTENDED, not representative" if other > OtherLoad.CONTENDED_CORES else ""
    return f" [other processes: {other:.2f} cores{flag}]"


def sft_step(model, opt, ids: torch.Tensor) -> dict[str, float]:
    """One SFT step on `ids` ([batch, seq]); returns seconds per phase and in total."""
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss  # mean next-token loss over all positions
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2, "total": t3 - t0}


def sequence_logps(model, ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probs of the tokens where completion_mask is 1 (mask aligned with ids[:, 1:])."""
    logits = model(input_ids=ids).logits
    logp = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (logp * completion_mask).sum(-1)


def dpo_step(policy, reference, opt, ids: torch.Tensor, completion_mask: torch.Tensor) -> dict[str, float]:
    """One DPO step on a single pair: ids rows are [chosen, rejected]."""
    t0 = time.perf_counter()
    with torch.no_grad():
        ref = sequence_logps(reference, ids, completion_mask)
    t1 = time.perf_counter()
    pol = sequence_logps(policy, ids, completion_mask)
    logits = (pol[0] - pol[1]) - (ref[0] - ref[1])
    loss = -F.logsigmoid(DPO_BETA * logits)
    t2 = time.perf_counter()
    loss.backward()
    t3 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    t4 = time.perf_counter()
    return {"reference_forward": t1 - t0, "policy_forward": t2 - t1, "backward": t3 - t2, "optimizer": t4 - t3, "total": t4 - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description="PyTorch CPU training-step benchmark (SFT and DPO)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default %(default)s)")
    ap.add_argument("--seq", type=int, default=512, help="sequence length in tokens (default %(default)s)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per measurement (default %(default)s)")
    ap.add_argument("--model", type=Path, default=None, help="GGUF file (default: models dir)")
    ap.add_argument("--only", choices=["sft", "dpo"], default=None, help="run one measurement only")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model, g = gguf_to_hf.load(a.model)
    model.train()
    vocab = model.config.vocab_size
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    print(f"loaded {g.path.name}; peak RSS {peak_rss_mib():.0f} MiB", file=sys.stderr)

    results: dict = {
        "framework": "pytorch",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "model": g.path.name,
        "dtype": "float32",
        "attention": "eager",
        "threads": a.threads,
        "seq": a.seq,
        "steps": a.steps,
        "optimizer": f"AdamW(lr={LR})",
    }

    for batch in (1, 2) if a.only in (None, "sft") else ():
        ids = torch.randint(0, vocab, (batch, a.seq))
        phases, other = measure(lambda: sft_step(model, opt, ids), a.steps)
        tok_s = batch * a.seq / phases["total"]
        results[f"sft_batch{batch}"] = {
            "seconds_per_step": phases["total"],
            "tokens_per_s": tok_s,
            "phases_s": phases,
            "other_load_cores": other,
        }
        print(
            f"sft batch {batch}: {phases['total']:.2f} s/step, {tok_s:.1f} tok/s "
            f"(fwd {phases['forward']:.2f} s, bwd {phases['backward']:.2f} s, adamw {phases['optimizer']:.2f} s)"
            + contention_note(other),
            file=sys.stderr,
        )

    # DPO on one pair: a shared prompt and two different completions, each row --seq tokens.
    if a.only == "sft":
        finish(results)
        return
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    prompt_len = a.seq // 4
    prompt = torch.randint(0, vocab, (prompt_len,))
    ids = torch.stack([torch.cat([prompt, torch.randint(0, vocab, (a.seq - prompt_len,))]) for _ in range(2)])
    completion_mask = torch.zeros(2, a.seq - 1)
    completion_mask[:, prompt_len - 1 :] = 1.0
    phases, other = measure(lambda: dpo_step(model, reference, opt, ids, completion_mask), a.steps)
    tok_s = 2 * a.seq / phases["total"]
    results["dpo_pair"] = {
        "seconds_per_step": phases["total"],
        "policy_tokens_per_s": tok_s,
        "phases_s": phases,
        "other_load_cores": other,
    }
    print(
        f"dpo 1 pair: {phases['total']:.2f} s/step, {tok_s:.1f} policy tok/s "
        f"(ref fwd {phases['reference_forward']:.2f} s, policy fwd {phases['policy_forward']:.2f} s, "
        f"bwd {phases['backward']:.2f} s, adamw {phases['optimizer']:.2f} s)" + contention_note(other),
        file=sys.stderr,
    )

    finish(results)


def finish(results: dict) -> None:
    loads = [r["other_load_cores"] for r in results.values() if isinstance(r, dict) and "other_load_cores" in r]
    results["contended"] = any(x is not None and x > OtherLoad.CONTENDED_CORES for x in loads)
    results["peak_rss_mib"] = peak_rss_mib()
    print(f"peak RSS {results['peak_rss_mib']:.0f} MiB", file=sys.stderr)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
