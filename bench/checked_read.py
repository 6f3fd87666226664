"""Benchmark: what checking a sample file's sha256 on first read costs a cold `kvsim simulate`.

Every sample file is hashed once per process before its tensors are used (`kvsim.traces.store.
checked_tensors`), so a damaged file is an error instead of a silently different sim_score. The
target is at most 5 % of a cold simulate. This script measures, side by side in one run on one
torch thread, a simulate of one sample with the file's pages evicted from the OS page cache
(`posix_fadvise(DONTNEED)`, a truly cold read) with the check and without it (the file marked as
already verified), alternating the two so drift on a shared CPU hits both alike; each number is
the median of a few repeats. Two workloads: one policy at one budget (the smallest simulate, the
worst case for the ratio) and every preset at one budget (`kvsim simulate`'s default runs three).

The sample is synthetic, shaped like the bundled model (30 layers, 3 KV heads, group 3, head_dim
64, window 64, 32 continuation tokens) at a 2K-token prompt, stored in float32 (twice the bytes
of a default float16 capture, so the hash's share is overstated, not understated).

Run: `.venv/bin/python bench/checked_read.py` (about 5 min on 2 cores); results go to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from machine import machine_info  # bench/machine.py (the script's folder is on sys.path)
from kvsim.paths import sha256_file, write_atomically
from kvsim.policies import PRESETS, Budget
from kvsim.sim import simulate
from kvsim.traces import store
from kvsim.traces.synthetic import synthetic_traceset

TARGET_OVERHEAD = 0.05
SHAPE = {"n_layers": 30, "kv_heads": 3, "group": 3, "head_dim": 64, "window": 64, "continuation": 32}
WORKLOADS = {
    "snapkv at 0.1 (one policy)": ([PRESETS["snapkv"]], [Budget(0.1)]),
    "all presets at 0.1": (list(PRESETS.values()), [Budget(0.1)]),
}


def evict_from_page_cache(path: Path) -> None:
    with open(path, "rb") as handle:
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def cold_simulate_s(traceset: store.TraceSet, policies, budgets, checked: bool) -> float:
    """One simulate from a cold file; `checked=False` marks the file verified so no hash runs."""
    sample = next(iter(traceset))
    evict_from_page_cache(sample.path)
    store._verified.clear()
    if not checked:
        stat = sample.path.stat()
        store._verified.add((str(sample.path.resolve()), stat.st_size, stat.st_mtime_ns, sample.row["sha256"]))
    fresh = store.TraceSet.open(traceset.root)  # no tensors mapped yet
    start = time.perf_counter()
    simulate(fresh, policies, budgets, oracle=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    load_at_start = os.getloadavg()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        traceset = synthetic_traceset(Path(folder) / "traces", prompt_len=args.prompt_len, **SHAPE)
        path = next(iter(traceset)).path
        file_bytes = path.stat().st_size
        hash_s = []
        for _ in range(args.repeats):
            evict_from_page_cache(path)
            start = time.perf_counter()
            sha256_file(path)
            hash_s.append(time.perf_counter() - start)
        rows = []
        for name, (policies, budgets) in WORKLOADS.items():
            times = {True: [], False: []}
            for _ in range(args.repeats):
                for checked in (False, True):
                    times[checked].append(cold_simulate_s(traceset, policies, budgets, checked))
            checked_s, unchecked_s = statistics.median(times[True]), statistics.median(times[False])
            overhead = checked_s / unchecked_s - 1
            rows.append({"workload": name, "unchecked_s": unchecked_s, "checked_s": checked_s, "overhead": overhead,
                         "meets_target": overhead <= TARGET_OVERHEAD})
    result = {
        "prompt_len": args.prompt_len,
        "file_mib": file_bytes / 2**20,
        "cold_sha256_s": statistics.median(hash_s),
        "target_overhead": TARGET_OVERHEAD,
        "rows": rows,
        "machine": machine_info(load_at_start),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    write_atomically(args.results / "checked_read.json", lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))
    lines = [
        "# Checked reads: sha256 on first read vs a cold simulate",
        "",
        f"One synthetic sample of {result['file_mib']:.0f} MiB ({args.prompt_len}-token prompt, bundled-model shape, float32); "
        f"a cold sha256 of the file alone takes {result['cold_sha256_s'] * 1000:.0f} ms. Medians of {args.repeats} runs, page cache evicted before each.",
        "",
        "| simulate | unchecked s | checked s | overhead | target ≤ 5 % |",
        "|---|---|---|---|---|",
        *(f"| {r['workload']} | {r['unchecked_s']:.2f} | {r['checked_s']:.2f} | {r['overhead']:+.1%} | {'yes' if r['meets_target'] else 'no'} |"
          for r in rows),
        "",
    ]
    write_atomically(args.results / "checked_read.md", lambda tmp: tmp.write_text("\n".join(lines)))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
