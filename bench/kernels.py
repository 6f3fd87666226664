"""Benchmark: time and achieved bandwidth of each kvsim kernel at T = 2K, 8K and 32K tokens.

For every kernel, side by side in one run: the PyTorch twin, `torch.compile` of the twin, and, on a
machine with a CUDA GPU, the Triton kernel (on a CPU-only machine the Triton rows are absent and the
results say so). Bandwidth is the bytes a kernel must move at least (each input read once, each
output written once) divided by its time: how close it runs to the speed of the memory. Kernel 1 is
quadratic in T, so its GFLOP/s (4 · heads · T²/2 · d for Q·Kᵀ and P·V, causal) is given beside it.

Shapes follow the bundled model (SmolLM2-135M: 9 query heads, 3 KV heads, head_dim 64):
1. `causal_attention_column_stats`: a whole-prompt forward (n = T) of one KV head's group of 3
   query heads, as capture runs it per layer; dtype float32 on a CPU, bfloat16 on a GPU.
2. `masked_attention_sums`: 32 retained sets (e.g. 16 presets × 2 budgets) of 10% of the prompt
   plus the 32 continuation tokens, for 3 query heads per KV head, in float32 as the simulator
   holds its traces; one layer (3 KV heads) on a CPU, all 30 layers stacked along the KV-head axis
   (90) on a GPU, as a simulator on a GPU would call it once per sample.

On a CPU, kernel 2 is also timed the way the simulator scores prefill-once policies today
(`replay_selection` once per set, which gathers each set's kept columns, after one full-cache
attention of the continuation): the evidence for whether the twin should replace that path.

Every number is the median of up to --repeats runs after one warm-up call (for torch.compile the
warm-up is the compilation, reported separately). Run: `.venv/bin/python bench/kernels.py`
(about 5 min on 2 cores); results go to bench/results/kernels.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from machine import machine_info  # bench/machine.py (the script's folder is on sys.path)
from kvsim.kernels import causal_attention_column_stats_torch, masked_attention_sums_torch
from kvsim.policies.view import CacheView
from kvsim.sim.continuation import ContinuationAttention
from kvsim.sim.replay import replay_selection

HEAD_DIM = 64
GROUP = 3
SETS = 32
CONTINUATION = 32
KEPT_FRACTION = 0.1
GPU_LAYERS = 30
# torch.compile unrolls the twins' chunk loops, one specialized graph per chunk shape. For the
# column-stats twin (a chunk of query rows per 8 MiB of scores, each with its own key range) that
# did not finish compiling within 8 minutes at T = 2048 on this 2-core CPU, so it is not timed on
# a CPU; the masked-sums twin compiles in seconds up to --compile-max-length.
COMPILED_ON_CPU = ("masked_sums",)


@dataclass
class Case:
    """One kernel call: its arguments per device, and the work it does."""

    kernel: str
    length: int
    args: tuple
    bytes_moved: int
    flops: int


def column_stats_case(length: int, device: str, dtype: torch.dtype) -> Case:
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(GROUP, length, HEAD_DIM, generator=generator).to(device, dtype)
    key, value = (torch.randn(1, length, HEAD_DIM, generator=generator).to(device, dtype) for _ in range(2))
    element = query.element_size()
    # Read Q, K, V; write the output (input dtype), the lse, Σp and Σp² (float32).
    moved = (2 * GROUP + 2) * length * HEAD_DIM * element + GROUP * length * 4 * 3
    flops = 4 * GROUP * (length * length // 2) * HEAD_DIM
    return Case("column_stats", length, (query, key, value, HEAD_DIM**-0.5), moved, flops)


def masked_sums_case(length: int, device: str, kv_heads: int) -> Case:
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(kv_heads, GROUP, CONTINUATION, HEAD_DIM, generator=generator).to(device)
    keys, values = (torch.randn(kv_heads, length, HEAD_DIM, generator=generator).to(device) for _ in range(2))
    readable = torch.rand(SETS, kv_heads, length, generator=generator) < KEPT_FRACTION
    readable[:, :, length - CONTINUATION :] = True
    evidence = torch.zeros(length, dtype=torch.bool)
    evidence[length // 3 : length // 3 + 16] = True
    # Read Q, K, V (float32), the bool masks and the evidence mask; the per-set outputs are negligible.
    moved = 4 * (queries.numel() + keys.numel() + values.numel()) + readable.numel() + length
    flops = 2 * kv_heads * GROUP * CONTINUATION * length * HEAD_DIM * (2 + SETS)
    args = (queries, keys, values, HEAD_DIM**-0.5, readable.to(device), evidence.to(device))
    return Case("masked_sums", length, args, moved, flops)


def simulator_path(queries, keys, values, scaling, readable, evidence) -> list:
    """Kernel 2's sums the way `simulate` gets them for prefill-once policies: the continuation's
    full-cache attention once, then `replay_selection` (gathered columns, `block_metrics`) per set."""
    kv_heads, group, context, head_dim = queries.shape
    total = keys.shape[1]
    prompt = total - context
    full = ContinuationAttention.of(queries, keys, values, evidence, scaling)
    view = CacheView(
        layer=0, n_layers=1, keys=keys[:, :prompt], values=values[:, :prompt], positions=torch.arange(prompt),
        queries=queries.reshape(kv_heads * group, context, head_dim), query_positions=torch.arange(prompt, total),
        scaling=scaling,
    )
    return [replay_selection([keep[:, :prompt]], [view], [full]) for keep in readable]


def timed(fn: Callable[[], object], repeats: int, cap_s: float, sync: Callable[[], None]) -> list[float]:
    """Seconds of up to `repeats` runs of `fn`, stopping early once they add up to `cap_s`."""
    runs: list[float] = []
    while len(runs) < repeats and (not runs or sum(runs) < cap_s):
        start = time.perf_counter()
        fn()
        sync()
        runs.append(time.perf_counter() - start)
    return runs


def measure(name: str, fn: Callable, case: Case, args: argparse.Namespace, sync: Callable[[], None]) -> dict:
    start = time.perf_counter()
    fn(*case.args)  # warm-up: compilation for torch.compile and Triton, allocator and caches otherwise
    sync()
    warmup = time.perf_counter() - start
    runs = timed(lambda: fn(*case.args), args.repeats, args.cell_seconds, sync)
    seconds = statistics.median(runs)
    row = {
        "kernel": case.kernel, "T": case.length, "implementation": name, "seconds": seconds,
        "GB_per_s": case.bytes_moved / seconds / 1e9, "GFLOP_per_s": case.flops / seconds / 1e9,
        "bytes_moved": case.bytes_moved, "flops": case.flops, "warmup_seconds": warmup, "runs": len(runs),
    }
    print(
        f"{case.kernel:13s} T={case.length:6d} {name:14s} {seconds * 1e3:10.2f} ms {row['GB_per_s']:8.2f} GB/s "
        f"{row['GFLOP_per_s']:9.1f} GFLOP/s  (warm-up {warmup:.1f} s, {len(runs)} runs)",
        flush=True,
    )
    return row


def implementations(kernel: str, cuda: bool, compile_ok: bool) -> dict[str, Callable]:
    twin = {"column_stats": causal_attention_column_stats_torch, "masked_sums": masked_attention_sums_torch}[kernel]
    chosen = {"twin": twin}
    if kernel == "masked_sums" and not cuda:
        chosen["simulator path"] = simulator_path
    if compile_ok:
        chosen["compiled twin"] = torch.compile(twin, dynamic=False)
    if cuda:
        from kvsim.kernels.column_stats_triton import causal_attention_column_stats_triton
        from kvsim.kernels.masked_attention_triton import masked_attention_sums_triton

        chosen["triton"] = {"column_stats": causal_attention_column_stats_triton, "masked_sums": masked_attention_sums_triton}[kernel]
    return chosen


def triton_note(cuda: bool) -> str:
    if cuda:
        return f"Triton kernels ran on {torch.cuda.get_device_name()}."
    return "No CUDA GPU on this machine: the Triton kernels were not timed (their correctness is tested in the CPU interpreter)."


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,8192,32768", help="sequence lengths T")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median kept)")
    parser.add_argument("--cell-seconds", type=float, default=5.0, help="stop repeating a measurement after this many seconds")
    parser.add_argument(
        "--compile-max-length", type=int, default=8192,
        help="longest T at which torch.compile of the masked-sums twin is timed on a CPU",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads on a CPU (0: torch's default)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="results folder")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    load_at_start = os.getloadavg()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    device_name = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    print(f"device: {device_name}. {triton_note(cuda)}", flush=True)
    rows = []
    for length in (int(text) for text in args.lengths.split(",")):
        cases = [
            column_stats_case(length, device, torch.bfloat16 if cuda else torch.float32),
            masked_sums_case(length, device, 3 * (GPU_LAYERS if cuda else 1)),
        ]
        for case in cases:
            compile_ok = cuda or (case.kernel in COMPILED_ON_CPU and length <= args.compile_max_length)
            for name, fn in implementations(case.kernel, cuda, compile_ok).items():
                rows.append(measure(name, fn, case, args, sync))
        torch._dynamo.reset()  # compiled graphs are per shape: drop the last length's before the next
    machine = machine_info(load_at_start) | {"device": device_name, "torch_threads_timed": torch.get_num_threads()}
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {key: str(value) for key, value in vars(args).items()}
    (args.out / "kernels.json").write_text(json.dumps({"machine": machine, "settings": settings, "rows": rows}, indent=2) + "\n")
    write_markdown(args.out / "kernels.md", rows, machine, args, cuda)
    print(f"wrote {args.out / 'kernels.md'} and kernels.json")


def write_markdown(path: Path, rows: list[dict], machine: dict, args: argparse.Namespace, cuda: bool) -> None:
    twin_seconds = {(row["kernel"], row["T"]): row["seconds"] for row in rows if row["implementation"] == "twin"}
    load = machine["load_average"]
    lines = [
        "# Kernel benchmark",
        "",
        f"`bench/kernels.py` on **{machine['device']}**; torch {machine['torch']}; 1-minute load average "
        f"{load['start'][0]:.1f} at start, {load['end'][0]:.1f} at end. Medians of up to {args.repeats} runs after a "
        f"warm-up call (a measurement stops repeating after {args.cell_seconds:g} s). {triton_note(cuda)}",
        "",
        "Shapes (see the script's docstring): column_stats = causal forward of 3 query heads over one KV head, "
        f"n = T, head_dim {HEAD_DIM}; masked_sums = {SETS} retained sets of {KEPT_FRACTION:.0%} of the prompt + "
        f"{CONTINUATION} continuation queries per head, 3 query heads per KV head, "
        f"{'90 KV heads (30 layers stacked)' if cuda else '3 KV heads (one layer)'}. Bandwidth = minimal bytes moved / time.",
        "",
        "| kernel | T | implementation | ms | GB/s | GFLOP/s | vs twin | warm-up s | runs |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        speedup = twin_seconds[(row["kernel"], row["T"])] / row["seconds"]
        lines.append(
            f"| {row['kernel']} | {row['T']} | {row['implementation']} | {row['seconds'] * 1e3:.2f} | {row['GB_per_s']:.2f} "
            f"| {row['GFLOP_per_s']:.1f} | {speedup:.2f}× | {row['warmup_seconds']:.1f} | {row['runs']} |"
        )
    skipped = [] if cuda else [
        "torch.compile of the column-stats twin is not timed on a CPU: it did not finish compiling within 8 minutes "
        "at T = 2048 (dynamo unrolls the chunk loop into one graph per chunk shape). torch.compile of the masked-sums "
        f"twin is timed up to T = {args.compile_max_length}."
    ]
    notes = [
        "GFLOP/s counts the dense work (every key, every set) for every row; the simulator path gathers each set's "
        "kept columns and does about a tenth of it, so its GFLOP/s is nominal.",
        *skipped,
    ]
    simulator = {row["T"]: row["seconds"] for row in rows if row["implementation"] == "simulator path"}
    if simulator:
        ratios = ", ".join(f"{twin_seconds[('masked_sums', length)] / seconds:.2f}× at T = {length}" for length, seconds in simulator.items())
        notes.append(
            f"Conclusion for the CPU: the simulator's per-set path is faster than the masked-sums twin at a 10% budget ({ratios}): "
            "dense masks cost work in proportion to the whole cache while the gather costs work in proportion to what is kept, "
            "so the twin is not wired into the CPU simulator. The masked kernel is for the GPU, where one pass over K and V "
            "for all sets replaces one gather per set."
        )
    path.write_text("\n".join(lines + [""] + [note + "\n" for note in notes]))


if __name__ == "__main__":
    main()
