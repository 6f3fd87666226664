"""Benchmark: decode time per token of the live policy cache against the full cache, bytes held, and
the prefill's peak.

A policy cache must not make decoding slower than the cache it replaces, or the memory it saves
costs latency. On the bundled model, one prompt of the default workload (about 1.5K tokens), each
preset at one budget decodes the same greedy steps as a plain transformers DynamicCache (SDPA);
the ratio of median per-token times is measured side by side in one run, with the configurations
interleaved in every repeat so drift on a shared CPU hits all of them alike. The prefill and the
policy's decision are setup, not timed. Targets: at most 1.2× the full cache's time per token for
prefill-once presets (1.3× for per-head budgets, adakv and razor, whose heads hold different
counts), while holding the budgeted bytes (per-head budgets at most 1.02× snapkv's); and a prefill
peak at most 1.1× the plain cache's. Bytes held are counted at the serving dtype (fp16/bf16, as
`kv_bytes` everywhere in kvsim); the prefill peak is measured in real bytes at the model's dtype
(float32 here; a bfloat16 copy of the model is measured too): the cache's keys and values plus
what it keeps for the decision, at the moment before the decision, when it is largest.

Run: `.venv/bin/python bench/live_overhead.py` (about 4 min on 2 cores); results go to bench/results/.
"""

from __future__ import annotations

import argparse
import copy
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
from kvsim.policies.held import KV_ELEMENT_BYTES
from kvsim.traces.models import DEFAULT_MODEL, load_model
from kvsim.traces.prompt import render_prompt
from kvsim.traces.workloads import build_workload

TARGET_RATIO = 1.2
PER_HEAD_TARGET_RATIO = 1.3  # adakv, razor: heads of unequal counts attend one by one
PER_HEAD = ("adakv", "razor")
PEAK_TARGET = 1.1
PLAIN = "plain DynamicCache"
RESULTS = Path(__file__).parent / "results"


def prompt_ids(loaded, context_tokens: int) -> torch.Tensor:
    count = lambda text: len(loaded.tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    sample = build_workload("passkey", 1, seed=0, context_tokens=context_tokens, count_tokens=count)[0]
    return torch.tensor([render_prompt(sample, loaded.tokenizer).input_ids])


@torch.inference_mode()
def decode_time(model, ids: torch.Tensor, cache, steps: int) -> tuple[float, object, int]:
    """(median seconds per decode step after the prefill, the cache, real bytes at the prefill's peak)."""
    token = model(ids, past_key_values=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
    peak = prefill_peak(cache)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        token = model(token, past_key_values=cache).logits[:, -1:].argmax(-1)
        times.append(time.perf_counter() - started)
    return statistics.median(times), cache, peak


def prefill_peak(cache) -> int:
    """Real bytes the cache holds at its largest during the prefill: a plain cache's keys and values
    once the prompt is in; a policy cache's keys, values and decision inputs right before deciding."""
    if isinstance(cache, PolicyCache):
        return cache.peak_prefill_bytes
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def held_bytes(cache) -> int:
    """KV bytes held after the decode steps, at the serving dtype."""
    if isinstance(cache, PolicyCache):
        return cache.held_bytes()
    return sum(t.numel() for layer in cache.layers for t in (layer.keys, layer.values)) * KV_ELEMENT_BYTES


@torch.inference_mode()
def bf16_prefill_peaks(model, ids: torch.Tensor, names: list[str], budget: Budget) -> dict[str, float]:
    """Prefill peak of a bf16 copy of the model (a serving dtype, where float32 copies would cost
    most), relative to a plain DynamicCache's."""
    model = copy.deepcopy(model).to(torch.bfloat16)
    model.set_attn_implementation("sdpa")
    plain = DynamicCache(config=model.config)
    model(ids, past_key_values=plain, logits_to_keep=1)
    peaks = {}
    for name in names:
        cache = PolicyCache.for_model(PRESETS[name], budget, model)
        model(ids, past_key_values=cache, logits_to_keep=1)
        peaks[name] = prefill_peak(cache) / prefill_peak(plain)
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--context-tokens", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps timings steady on a shared CPU)")
    parser.add_argument("--presets", default="all", help="comma-separated presets to time (default: every preset)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()
    console = Console()
    loaded = load_model(DEFAULT_MODEL)
    model = loaded.model
    ids = prompt_ids(loaded, args.context_tokens)
    budget = Budget(args.budget)
    chosen = [name for name, preset in PRESETS.items() if not preset.requirements()] if args.presets == "all" else args.presets.split(",")
    configs = {PLAIN: None, **{name: PRESETS[name] for name in dict.fromkeys(["snapkv", *chosen])}}
    times: dict[str, list[float]] = {name: [] for name in configs}
    memory: dict[str, tuple[int, int]] = {}
    for repeat in range(args.repeats):
        for name, policy in configs.items():
            if policy is None:
                model.set_attn_implementation("sdpa")
                cache = DynamicCache(config=model.config)
            else:
                cache = PolicyCache.for_model(policy, budget, model)
            seconds, cache, peak = decode_time(model, ids, cache, args.steps)
            times[name].append(seconds)
            memory[name] = (held_bytes(cache), peak)
            console.print(f"repeat {repeat + 1}/{args.repeats} {name}: {1000 * seconds:.1f} ms/token", highlight=False)
    bf16_peaks = bf16_prefill_peaks(model, ids, ["snapkv", "adakv", "cake_prefill"], budget)
    baseline = statistics.median(times[PLAIN])
    rows = []
    for name, policy in configs.items():
        per_token = statistics.median(times[name])
        kv_bytes, peak = memory[name]
        prefill_once = policy is not None and policy.schedule.interval is None
        limit = PER_HEAD_TARGET_RATIO if name in PER_HEAD else TARGET_RATIO
        rows.append(
            {
                "config": name,
                "schedule": "–" if policy is None else policy.schedule.name,
                "ms_per_token": 1000 * per_token,
                "ratio_to_full": per_token / baseline,
                "kv_bytes": kv_bytes,
                "bytes_vs_full": kv_bytes / memory[PLAIN][0],
                "bytes_vs_snapkv": kv_bytes / memory["snapkv"][0],
                "prefill_peak_bytes": peak,
                "peak_vs_full": peak / memory[PLAIN][1],
                "meets_target": None if not prefill_once else per_token / baseline <= limit,
            }
        )
    table = Table("config", "schedule", "ms/token", "× full", "KV held", "bytes vs full", "vs snapkv", "prefill peak × full", "time target")
    for row in rows:
        target = "–" if row["meets_target"] is None else ("yes" if row["meets_target"] else "NO")
        table.add_row(row["config"], row["schedule"], f"{row['ms_per_token']:.1f}", f"{row['ratio_to_full']:.2f}",
                      f"{row['kv_bytes'] / 2**20:.2f} MiB", f"{row['bytes_vs_full']:.3f}", f"{row['bytes_vs_snapkv']:.3f}",
                      f"{row['peak_vs_full']:.3f}", target)
    console.print(table)
    result = {
        "prompt_tokens": ids.shape[1],
        "budget": args.budget,
        "steps": args.steps,
        "repeats": args.repeats,
        "threads": args.threads,
        "bf16_prefill_peak_vs_plain": bf16_peaks,
        "rows": rows,
        "machine": machine_info(load_at_start),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "live_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Live policy cache: decode time per token and KV bytes held",
        "",
        f"Bundled model, prompt {ids.shape[1]} tokens, budget {args.budget}, {args.steps} decode steps, "
        f"median of {args.repeats} interleaved repeats, {args.threads} torch thread(s), model in float32. Targets: "
        f"prefill-once presets at most {TARGET_RATIO}× the plain full cache per token ({PER_HEAD_TARGET_RATIO}× for "
        f"{' and '.join(PER_HEAD)}); per-head budgets at most 1.02× snapkv's bytes; prefill peak at most {PEAK_TARGET}× "
        f"the plain cache's. KV held at the serving dtype (2 bytes per element) after the decode steps; prefill peak in "
        f"real bytes. Load average at start/end: {load_at_start[0]:.2f} / {os.getloadavg()[0]:.2f}.",
        "",
        "| config | schedule | ms/token | × full | KV held (MiB) | bytes vs full | bytes vs snapkv | prefill peak (MiB) | peak × full | meets time target |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        target = "–" if row["meets_target"] is None else ("yes" if row["meets_target"] else "no")
        lines.append(
            f"| {row['config']} | {row['schedule']} | {row['ms_per_token']:.1f} | {row['ratio_to_full']:.2f} | "
            f"{row['kv_bytes'] / 2**20:.2f} | {row['bytes_vs_full']:.3f} | {row['bytes_vs_snapkv']:.3f} | "
            f"{row['prefill_peak_bytes'] / 2**20:.2f} | {row['peak_vs_full']:.3f} | {target} |"
        )
    lines += ["", "Prefill peak of a bfloat16 copy of the model (a serving dtype), relative to a plain DynamicCache's: "
              + ", ".join(f"{name} {ratio:.3f}×" for name, ratio in bf16_peaks.items()) + "."]
    (RESULTS / "live_overhead.md").write_text("\n".join(lines) + "\n")
    console.print(f"results: {RESULTS / 'live_overhead.md'}")


if __name__ == "__main__":
    main()
