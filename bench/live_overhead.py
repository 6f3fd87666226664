"""Benchmark: decode time per token of the live policy cache against the full cache, and bytes held.

A policy cache must not make decoding slower than the cache it replaces, or the memory it saves
costs latency. On the bundled model, one prompt of the default workload (about 1.5K tokens), each
preset at one budget decodes the same greedy steps as a plain transformers DynamicCache (SDPA);
the ratio of median per-token times is measured side by side in one run, with the configurations
interleaved in every repeat so drift on a shared CPU hits all of them alike. The prefill and the
policy's decision are setup, not timed. Target: at most 1.2× the full cache's time per token for
prefill-once presets, while holding the budgeted bytes.

Run: `.venv/bin/python bench/live_overhead.py` (about 4 min on 2 cores); results go to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import DynamicCache

from machine import machine_info  # bench/machine.py (the script's folder is on sys.path)
from kvsim.live.cache import PolicyCache
from kvsim.policies import PRESETS, Budget
from kvsim.traces.models import DEFAULT_MODEL, load_model
from kvsim.traces.prompt import render_prompt
from kvsim.traces.workloads import build_workload

TARGET_RATIO = 1.2
PLAIN = "plain DynamicCache"
RESULTS = Path(__file__).parent / "results"


def prompt_ids(loaded, context_tokens: int) -> torch.Tensor:
    count = lambda text: len(loaded.tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    sample = build_workload("passkey", 1, seed=0, context_tokens=context_tokens, count_tokens=count)[0]
    return torch.tensor([render_prompt(sample, loaded.tokenizer).input_ids])


@torch.inference_mode()
def decode_time(model, ids: torch.Tensor, cache, steps: int) -> tuple[float, object]:
    """Median seconds per decode step after the prefill (which also makes the policy's decision)."""
    token = model(ids, past_key_values=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        token = model(token, past_key_values=cache).logits[:, -1:].argmax(-1)
        times.append(time.perf_counter() - started)
    return statistics.median(times), cache


def held(cache) -> tuple[int, int]:
    if isinstance(cache, PolicyCache):
        return cache.held_bytes(), cache.padding_bytes()
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers), 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--context-tokens", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps timings steady on a shared CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()
    console = Console()
    loaded = load_model(DEFAULT_MODEL)
    model = loaded.model
    ids = prompt_ids(loaded, args.context_tokens)
    budget = Budget(args.budget)
    configs = {PLAIN: None, **{name: policy for name, policy in PRESETS.items()}}
    times: dict[str, list[float]] = {name: [] for name in configs}
    memory: dict[str, tuple[int, int]] = {}
    for repeat in range(args.repeats):
        for name, policy in configs.items():
            if policy is None:
                model.set_attn_implementation("sdpa")
                cache = DynamicCache(config=model.config)
            else:
                cache = PolicyCache.for_model(policy, budget, model)
            seconds, cache = decode_time(model, ids, cache, args.steps)
            times[name].append(seconds)
            memory[name] = held(cache)
            console.print(f"repeat {repeat + 1}/{args.repeats} {name}: {1000 * seconds:.1f} ms/token", highlight=False)
    baseline = statistics.median(times[PLAIN])
    rows = []
    for name, policy in configs.items():
        per_token = statistics.median(times[name])
        kv_bytes, padding = memory[name]
        prefill_once = policy is not None and policy.schedule.interval is None
        rows.append(
            {
                "config": name,
                "schedule": "–" if policy is None else policy.schedule.name,
                "ms_per_token": 1000 * per_token,
                "ratio_to_full": per_token / baseline,
                "kv_bytes": kv_bytes,
                "padding_bytes": padding,
                "bytes_vs_full": kv_bytes / memory[PLAIN][0],
                "meets_target": None if not prefill_once else per_token / baseline <= TARGET_RATIO,
            }
        )
    table = Table("config", "schedule", "ms/token", "× full", "KV held", "padding", "bytes vs full", "≤ 1.2×")
    for row in rows:
        target = "–" if row["meets_target"] is None else ("yes" if row["meets_target"] else "NO")
        table.add_row(row["config"], row["schedule"], f"{row['ms_per_token']:.1f}", f"{row['ratio_to_full']:.2f}",
                      f"{row['kv_bytes'] / 2**20:.2f} MiB", f"{row['padding_bytes'] / 2**20:.2f} MiB",
                      f"{row['bytes_vs_full']:.3f}", target)
    console.print(table)
    result = {
        "prompt_tokens": ids.shape[1],
        "budget": args.budget,
        "steps": args.steps,
        "repeats": args.repeats,
        "threads": args.threads,
        "rows": rows,
        "machine": machine_info(load_at_start),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "live_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Live policy cache: decode time per token and KV bytes held",
        "",
        f"Bundled model, prompt {ids.shape[1]} tokens, budget {args.budget}, {args.steps} decode steps, "
        f"median of {args.repeats} interleaved repeats, {args.threads} torch thread(s). Target: prefill-once presets "
        f"at most {TARGET_RATIO}× the plain full cache per token. Load average at start/end: "
        f"{load_at_start[0]:.2f} / {os.getloadavg()[0]:.2f}.",
        "",
        "| config | schedule | ms/token | × full | KV held (MiB) | padding (MiB) | bytes vs full | meets 1.2× |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        target = "–" if row["meets_target"] is None else ("yes" if row["meets_target"] else "no")
        lines.append(
            f"| {row['config']} | {row['schedule']} | {row['ms_per_token']:.1f} | {row['ratio_to_full']:.2f} | "
            f"{row['kv_bytes'] / 2**20:.2f} | {row['padding_bytes'] / 2**20:.2f} | {row['bytes_vs_full']:.3f} | {target} |"
        )
    (RESULTS / "live_overhead.md").write_text("\n".join(lines) + "\n")
    console.print(f"results: {RESULTS / 'live_overhead.md'}")


if __name__ == "__main__":
    main()
