"""Time to first corrected token and total time of the correction proxy, correcting the whole
answer once it is in (`aligner serve --upstream ...`) against correcting it sentence by
sentence while it streams (`--stream-correction sentence`), on the same prompts, interleaved.

    python3 scripts/bench_stream_correction.py WHOLE_URL SENTENCE_URL PROMPTS.jsonl [N]

N prompts spread evenly over the file; each is asked of both proxies (streamed, greedy upstream, the order alternating from
prompt to prompt); one request at a time. Prints per-mode medians and means and the ratios.
Needs `python3 -m pip install openai`.
"""
import json
import os
import statistics
import sys
import time

import openai


def ask(client, prompt, max_tokens):
    start = time.monotonic()
    first = None
    text = ""
    stream = client.chat.completions.create(
        model="upstream",
        messages=[{"role": "user", "content": prompt}],
        stream=True,
        temperature=0,
        max_tokens=max_tokens,
    )
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                if first is None:
                    first = time.monotonic() - start
                text += choice.delta.content
    total = time.monotonic() - start
    return (first if first is not None else total), total, text


def main():
    whole_url, sentence_url, prompts_path = sys.argv[1:4]
    n = int(sys.argv[4]) if len(sys.argv) > 4 else 50
    max_tokens = 128
    rows = [json.loads(l)["prompt"] for l in open(prompts_path) if l.strip()]
    # Every k-th row, so that a file sorted by source (the study's held-out set: harmful
    # first) gives a sample of all of it.
    step = max(1, len(rows) // n)
    prompts = rows[::step][:n]
    clients = {
        "whole": openai.OpenAI(base_url=whole_url, api_key="x", max_retries=0, timeout=600),
        "sentence": openai.OpenAI(base_url=sentence_url, api_key="x", max_retries=0, timeout=600),
    }
    # One warm-up request each (model loading, first allocations).
    for c in clients.values():
        ask(c, "Say hello.", 16)
    times = {k: {"first": [], "total": [], "chars": []} for k in clients}
    # The corrected answers, for reading what each mode wrote (BENCH_OUT=path.jsonl).
    out = open(os.environ["BENCH_OUT"], "w") if os.environ.get("BENCH_OUT") else None
    for i, p in enumerate(prompts):
        order = ["whole", "sentence"] if i % 2 == 0 else ["sentence", "whole"]
        for mode in order:
            first, total, text = ask(clients[mode], p, max_tokens)
            times[mode]["first"].append(first)
            times[mode]["total"].append(total)
            times[mode]["chars"].append(len(text))
            if out:
                print(json.dumps({"prompt": p, "mode": mode, "first_s": first, "total_s": total, "text": text}), file=out, flush=True)
        print(
            f"{i + 1:>3}/{len(prompts)}  whole first {times['whole']['first'][-1]:6.2f} s total {times['whole']['total'][-1]:6.2f} s"
            f"  |  sentence first {times['sentence']['first'][-1]:6.2f} s total {times['sentence']['total'][-1]:6.2f} s",
            file=sys.stderr,
            flush=True,
        )
    summary = {}
    for mode, t in times.items():
        summary[mode] = {
            "first_median_s": statistics.median(t["first"]),
            "first_mean_s": statistics.mean(t["first"]),
            "total_median_s": statistics.median(t["total"]),
            "total_mean_s": statistics.mean(t["total"]),
            "chars_mean": statistics.mean(t["chars"]),
        }
    summary["first_ratio_of_medians"] = summary["sentence"]["first_median_s"] / summary["whole"]["first_median_s"]
    summary["total_ratio_of_medians"] = summary["sentence"]["total_median_s"] / summary["whole"]["total_median_s"]
    summary["first_ratio_of_means"] = summary["sentence"]["first_mean_s"] / summary["whole"]["first_mean_s"]
    summary["total_ratio_of_means"] = summary["sentence"]["total_mean_s"] / summary["whole"]["total_mean_s"]
    summary["prompts"] = len(prompts)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
