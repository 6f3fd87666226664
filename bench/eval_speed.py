"""Benchmark: evaluating N policies live, kvsim against kvpress, side by side on the same samples.

The question a user of both asks: how long does it take to measure N compression methods on my
samples? kvpress's way is one pipeline call per press and sample (`pipeline("kv-press-text-
generation")`: the press compresses the context while it is prefilled, then the question and a
greedy answer follow), so every press pays its own prefill. kvsim's way (`kvsim validate`,
`kvsim.live.runner.LiveSample`) prefills each sample once with a recording cache and decides every
policy from it; per policy it then measures more than kvpress's answer: KL and top-1 agreement on
the full cache's continuation and the reference answer's log-likelihood (teacher-forced), then the
greedy answer.

Policies: the prefill-once kvsim presets whose kvpress presses are their reference (SnapKV, Knorm,
ExpectedAttention, AdaKV(ExpectedAttention), KeyDiff), at one compression. Timings are interleaved
(kvsim then kvpress per sample), medians over the samples; the ratio is kvpress s / kvsim s per
sample for all N policies. Run with the kvpress environment: `.venv-kvpress/bin/python
bench/eval_speed.py --traces runs/quality/heldout-passkey,multivalue-s1` (any TraceSet of the
bundled model with query-agnostic samples; kvpress's pipeline is query-agnostic).

Results: bench/results/eval_speed.md and eval_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from transformers import pipeline

from machine import machine_info  # bench/machine.py (the script's folder is on sys.path)
from kvsim.live.runner import LiveSample
from kvsim.policies import PRESETS, Budget
from kvsim.traces.models import DEFAULT_MODEL, load_model
from kvsim.traces.store import TraceSet

RESULTS = Path(__file__).parent / "results"
POLICIES = ("snapkv", "knorm", "expected_attention", "adakv_expected_attention", "keydiff")
WINDOW = 32  # kvsim presets' SnapKV window, given to kvpress's SnapKVPress so the two decide alike


def press(name: str, ratio: float):
    import kvpress

    return {
        "snapkv": lambda: kvpress.SnapKVPress(compression_ratio=ratio, window_size=WINDOW),
        "knorm": lambda: kvpress.KnormPress(compression_ratio=ratio),
        "expected_attention": lambda: kvpress.ExpectedAttentionPress(compression_ratio=ratio),
        "adakv_expected_attention": lambda: kvpress.AdaKVPress(kvpress.ExpectedAttentionPress(compression_ratio=ratio)),
        "keydiff": lambda: kvpress.KeyDiffPress(compression_ratio=ratio),
    }[name]()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--traces", required=True, help="a TraceSet of the bundled model with query-agnostic samples")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--budget", type=float, default=0.2, help="kept fraction of the context (kvpress compression_ratio = 1 − budget)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    load_at_start = os.getloadavg()
    torch.set_num_threads(args.threads)
    loaded = load_model(DEFAULT_MODEL)
    traceset = TraceSet.open(args.traces)
    samples = list(traceset.samples("query-agnostic"))[: args.samples]
    policies = [PRESETS[name] for name in POLICIES]
    import kvpress  # noqa: F401, PLC0415  (registers the kv-press-text-generation pipeline)

    generate = pipeline("kv-press-text-generation", model=loaded.model, tokenizer=loaded.tokenizer)
    max_new_tokens = traceset.meta["max_new_tokens"]
    per_sample = []
    for sample in samples:
        started = time.perf_counter()
        live = LiveSample(loaded, traceset, sample, max(p.observation_window for p in policies))
        for policy in policies:
            live.run(policy, Budget(args.budget))
        kvsim_s = time.perf_counter() - started

        ids = sample.input_ids
        context = loaded.tokenizer.decode(ids[: sample.context_len])
        question = loaded.tokenizer.decode(ids[sample.context_len : sample.full_prompt_len])
        started = time.perf_counter()
        for name in POLICIES:
            with torch.inference_mode():
                generate(context, question=question, press=press(name, round(1 - args.budget, 6)), max_new_tokens=max_new_tokens)
        kvpress_s = time.perf_counter() - started
        per_sample.append({"sample_id": sample.sample_id, "prompt_tokens": sample.prompt_len, "kvsim_s": kvsim_s, "kvpress_s": kvpress_s,
                           "ratio": kvpress_s / kvsim_s})
        print(f"{sample.sample_id}: kvsim {kvsim_s:.1f} s, kvpress {kvpress_s:.1f} s for {len(POLICIES)} policies ({kvpress_s / kvsim_s:.2f}x)", flush=True)
        write_results(args, per_sample, max_new_tokens, load_at_start)  # after every sample: a stopped run keeps what it measured


def write_results(args, per_sample: list[dict], max_new_tokens: int, load_at_start: tuple[float, ...]) -> None:
    result = {
        "settings": vars(args) | {"policies": list(POLICIES), "max_new_tokens": max_new_tokens},
        "samples": per_sample,
        "median_kvsim_s": statistics.median(s["kvsim_s"] for s in per_sample),
        "median_kvpress_s": statistics.median(s["kvpress_s"] for s in per_sample),
        "median_ratio": statistics.median(s["ratio"] for s in per_sample),
        "machine": machine_info(load_at_start),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "eval_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    load = result["machine"]["load_average"]
    lines = [
        "# Evaluating N policies live: kvsim against kvpress",
        "",
        f"`bench/eval_speed.py`, {len(per_sample)} query-agnostic samples of `{args.traces}`, {len(POLICIES)} policies "
        f"({', '.join(POLICIES)}) at budget {args.budget:g} (kvpress compression_ratio {1 - args.budget:g}), greedy answers of up to "
        f"{max_new_tokens} tokens, torch {args.threads} thread(s), {result['machine']['cpu_count']} CPUs, load average "
        f"{load['start'][0]:.1f} at start, {load['end'][0]:.1f} at end (kvsim and kvpress alternate sample by sample, so the ratio is side by side; the seconds move with the load).",
        "",
        "kvsim: one recording prefill per sample, then per policy KL and top-1 on the full cache's continuation, the reference "
        "answer's log-likelihood and the greedy answer. kvpress: one `kv-press-text-generation` pipeline call per press (its own "
        "prefill each), the greedy answer only.",
        "",
        "| sample | prompt tokens | kvsim s | kvpress s | kvpress / kvsim |",
        "|---|---:|---:|---:|---:|",
        *(f"| {s['sample_id']} | {s['prompt_tokens']} | {s['kvsim_s']:.1f} | {s['kvpress_s']:.1f} | {s['ratio']:.2f}× |" for s in per_sample),
        f"| **median** | | {result['median_kvsim_s']:.1f} | {result['median_kvpress_s']:.1f} | **{result['median_ratio']:.2f}×** |",
    ]
    (RESULTS / "eval_speed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
