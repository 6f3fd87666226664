"""Benchmark: what a trace capture costs over plain generation, and how large its files are.

`kvsim capture` runs the same greedy continuation a user would get from `model.generate`, but its
prefill computes attention in float32 chunks that also sum attention columns, it keeps queries,
copies the cache out, computes log-probabilities, and writes one safetensors file per sample.
This script times both on the same prompts of the bundled model, side by side in one process:
per sample it alternates plain generate and capture (query-aware, and both modes at once) for a
few repeats and keeps the median, so drift on a small, shared CPU hits both sides alike. The
target is capture ≤ 1.3× plain. It also splits each capture into setup, record (prefill + decode
with the recording attention) and write (tensor conversion + file + manifest), from
`capture_traceset`'s progress events, and breaks the file into K+V, Q, statistics and
log-probabilities per prompt token, the numbers that size a TraceSet on disk.

Run: `.venv/bin/python bench/capture.py` (or `make bench`); results go to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from machine import machine_info  # bench/machine.py (the script's folder is on sys.path)
from kvsim.traces.capture import CaptureSettings, capture_traceset
from kvsim.traces.models import DEFAULT_MODEL, LoadedModel, load_model
from kvsim.traces.prompt import RenderedPrompt, render_prompt
from kvsim.traces.store import MODES, TraceSample
from kvsim.traces.tensorfile import read_header
from kvsim.traces.workloads import Sample, build_workload

TARGET_RATIO = 1.3
# Capture variants timed against the same plain generate: the default mode, and both modes at once.
VARIANTS = {"aware": ("query-aware",), "both": MODES}
# Sample-file tensor name -> byte category; input_ids and the header count as "other".
CATEGORIES = {r"\.(k|v)$": "kv", r"\.q$": "q", r"\.(colsum|colsq)$": "stats", r"^continuation\.": "logprobs"}
PHASES = ("setup", "record", "write")

# Piped output gets rich's 80 columns, too narrow for the tables; a wider terminal is used as is.
console = Console(width=max(Console().width, 110))


@dataclass
class PlainRun:
    """One timed `generate`: wall seconds, CPU seconds of the process, and the new token ids."""

    seconds: float
    cpu_seconds: float
    new_ids: list[int]


@dataclass
class CaptureRun:
    """One timed capture of one sample: wall and CPU time, wall time of its phases, and what it wrote."""

    seconds: float
    cpu_seconds: float
    phases: dict[str, float]
    gen_ids: list[int]
    prompt_len: int
    total_len: int
    bytes: dict[str, int]  # per category, summed over the files the run wrote, plus "file"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4, help="prompts of the workload mix to time")
    parser.add_argument("--workload", default="default", help="workload spec, as `kvsim capture --workload`")
    parser.add_argument("--context-tokens", type=int, default=1500, help="context length in model tokens")
    parser.add_argument("--seed", type=int, default=0, help="workload seed")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each side per sample (median kept)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="greedy continuation length cap")
    parser.add_argument("--window", type=int, default=64, help="capture observation window")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="results folder")
    return parser.parse_args()


def capture_settings(args: argparse.Namespace) -> dict[str, CaptureSettings]:
    """Default capture settings (float16, top-k 20) for each timed variant."""
    return {
        name: CaptureSettings(window=args.window, max_new_tokens=args.max_new_tokens, modes=modes)
        for name, modes in VARIANTS.items()
    }


def build_prompts(loaded: LoadedModel, args: argparse.Namespace) -> tuple[list[Sample], list[RenderedPrompt]]:
    tokenizer = loaded.tokenizer
    count_tokens = lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    samples = build_workload(
        args.workload, args.samples, seed=args.seed, context_tokens=args.context_tokens, count_tokens=count_tokens
    )
    return samples, [render_prompt(sample, tokenizer) for sample in samples]


@torch.inference_mode()
def plain_generate(loaded: LoadedModel, input_ids: list[int], max_new_tokens: int) -> PlainRun:
    """Seconds and new token ids of a greedy `model.generate` with the model's default attention."""
    ids = torch.tensor([input_ids])
    start, cpu_start = time.perf_counter(), time.process_time()
    out = loaded.model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
    )
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return PlainRun(seconds, cpu_seconds, out[0, ids.shape[1] :].tolist())


def timed_capture(loaded: LoadedModel, sample: Sample, settings: CaptureSettings, workload: dict) -> CaptureRun:
    """Capture one sample into a fresh temporary TraceSet, timing the whole call and its phases."""
    marks: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="kvsim-bench-") as folder:
        start, cpu_start = time.perf_counter(), time.process_time()
        traceset = capture_traceset(
            loaded, [sample], folder, settings, workload, lambda event, _: marks.setdefault(event, time.perf_counter())
        )
        end, cpu_seconds = time.perf_counter(), time.process_time() - cpu_start
        rows = list(traceset)
        first = rows[0]
        return CaptureRun(
            seconds=end - start,
            cpu_seconds=cpu_seconds,
            phases={
                "setup": marks["prefill"] - start,
                "record": marks["write"] - marks["prefill"],
                "write": end - marks["write"],
            },
            gen_ids=first.input_ids[first.full_prompt_len :].tolist(),
            prompt_len=first.full_prompt_len,
            total_len=first.total_len,
            bytes=file_bytes(rows),
        )


def file_bytes(rows: list[TraceSample]) -> dict[str, int]:
    """Bytes of the sample files by tensor category; "file" is their size on disk."""
    totals = {category: 0 for category in (*CATEGORIES.values(), "other", "file")}
    for row in rows:
        header, _, _ = read_header(row.path)
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            category = next((c for pattern, c in CATEGORIES.items() if re.search(pattern, name)), "other")
            totals[category] += end - begin
        size = row.path.stat().st_size
        totals["file"] += size
        totals["other"] += size - sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values())
    return totals


def measure(loaded: LoadedModel, samples: list[Sample], prompts: list[RenderedPrompt], args: argparse.Namespace):
    """Per sample: plain seconds and, per variant, capture runs, interleaved repeat by repeat."""
    settings = capture_settings(args)
    workload = {"spec": args.workload, "seed": args.seed, "context_tokens": args.context_tokens}
    results = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("timing", total=len(samples) * args.repeats * (1 + len(VARIANTS)))
        for sample, prompt in zip(samples, prompts):
            plain: list[PlainRun] = []
            captures: dict[str, list[CaptureRun]] = {name: [] for name in VARIANTS}
            for repeat in range(args.repeats):
                progress.update(bar, description=f"{sample.sample_id} #{repeat + 1}: generate")
                plain.append(plain_generate(loaded, prompt.input_ids, args.max_new_tokens))
                progress.advance(bar)
                for name in VARIANTS:
                    progress.update(bar, description=f"{sample.sample_id} #{repeat + 1}: capture {name}")
                    captures[name].append(timed_capture(loaded, sample, settings[name], workload))
                    progress.advance(bar)
            results.extend(sample_rows(sample, plain, captures))
    return results


def sample_rows(sample: Sample, plain: list[PlainRun], captures: dict[str, list[CaptureRun]]) -> list[dict]:
    """One result row per variant: medians of the repeats and the (deterministic) file sizes."""
    plain_s = statistics.median(r.seconds for r in plain)
    plain_cpu_s = statistics.median(r.cpu_seconds for r in plain)
    plain_ids = plain[0].new_ids
    rows = []
    for name, runs in captures.items():
        run = runs[0]
        capture_s = statistics.median(r.seconds for r in runs)
        capture_cpu_s = statistics.median(r.cpu_seconds for r in runs)
        rows.append({
            "sample_id": sample.sample_id,
            "task": sample.task,
            "variant": name,
            "prompt_len": run.prompt_len,
            "total_len": run.total_len,
            "plain_new_tokens": len(plain_ids),
            "capture_gen_len": len(run.gen_ids),
            "same_tokens": run.gen_ids == plain_ids,
            "plain_s": plain_s,
            "capture_s": capture_s,
            "ratio": capture_s / plain_s,
            "plain_cpu_s": plain_cpu_s,
            "capture_cpu_s": capture_cpu_s,
            "cpu_ratio": capture_cpu_s / plain_cpu_s,
            "phases_s": {phase: statistics.median(r.phases[phase] for r in runs) for phase in PHASES},
            "plain_runs_s": [r.seconds for r in plain],
            "capture_runs_s": [r.seconds for r in runs],
            "bytes": run.bytes,
        })
    return rows


def summarize(rows: list[dict]) -> dict[str, dict]:
    """Per variant over all samples: ratio of summed times, bytes per summed token."""
    summary = {}
    for name in VARIANTS:
        mine = [row for row in rows if row["variant"] == name]
        plain = sum(row["plain_s"] for row in mine)
        capture = sum(row["capture_s"] for row in mine)
        prompt_tokens = sum(row["prompt_len"] for row in mine)
        total_tokens = sum(row["total_len"] for row in mine)
        summed = {key: sum(row["bytes"][key] for row in mine) for key in mine[0]["bytes"]}
        summary[name] = {
            "plain_s": plain,
            "capture_s": capture,
            "ratio": capture / plain,
            "meets_target": capture / plain <= TARGET_RATIO,
            "cpu_ratio": sum(row["capture_cpu_s"] for row in mine) / sum(row["plain_cpu_s"] for row in mine),
            "phases_s": {phase: sum(row["phases_s"][phase] for row in mine) for phase in PHASES},
            "prompt_tokens": prompt_tokens,
            "total_tokens": total_tokens,
            "bytes": summed,
            "bytes_per_prompt_token": {key: value / prompt_tokens for key, value in summed.items()},
            "bytes_per_total_token": summed["file"] / total_tokens,
            "all_same_length": all(row["plain_new_tokens"] == row["capture_gen_len"] for row in mine),
            "all_same_tokens": all(row["same_tokens"] for row in mine),
        }
    return summary


TIME_HEADERS = ("sample", "mode", "prompt", "new tok", "plain s", "cap s", "ratio", "cpu ratio", "record s", "write s")
SIZE_HEADERS = ("sample", "mode", "MiB", "B/prompt tok", "B/total tok", "K+V", "Q", "stats", "logprobs")


def table_lines(rows: list[dict], summary: dict[str, dict]) -> tuple[list[list[str]], list[list[str]]]:
    """Lines of the timing and the size table: one per result row, then one per variant overall."""
    entries = [
        (row["sample_id"], row["variant"], token_counts(row), row, row["prompt_len"], row["total_len"]) for row in rows
    ]
    for name, entry in summary.items():
        tokens = "same" if entry["all_same_tokens"] else "differ"
        entries.append(("overall", name, tokens, entry, entry["prompt_tokens"], entry["total_tokens"]))
    times = [
        [
            name, variant, str(prompt), tokens,
            *(f"{entry[key]:.2f}" for key in ("plain_s", "capture_s", "ratio", "cpu_ratio")),
            *(f"{entry['phases_s'][phase]:.2f}" for phase in ("record", "write")),
        ]
        for name, variant, tokens, entry, prompt, total in entries
    ]
    sizes = [
        [
            name, variant, f"{entry['bytes']['file'] / 2**20:.1f}",
            f"{entry['bytes']['file'] / prompt:,.0f}", f"{entry['bytes']['file'] / total:,.0f}",
            *(f"{entry['bytes'][key] / prompt:,.0f}" for key in ("kv", "q", "stats", "logprobs")),
        ]
        for name, variant, tokens, entry, prompt, total in entries
    ]
    return times, sizes


def token_counts(row: dict) -> str:
    """New tokens of plain generate / capture, flagged when the token ids themselves differ."""
    return f"{row['plain_new_tokens']}/{row['capture_gen_len']}" + ("" if row["same_tokens"] else " (ids differ)")


def print_table(title: str, headers: tuple[str, ...], lines: list[list[str]]) -> None:
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    for index, header in enumerate(headers):
        table.add_column(header, justify="left" if index < 2 else "right")
    for line in lines:
        overall = line[0] == "overall"
        table.add_row(*line, style="bold" if overall else None)
    console.print(table)


def markdown_table(headers: tuple[str, ...], lines: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" if index < 2 else "---:" for index in range(len(headers))) + "|",
        *("| " + " | ".join(line) + " |" for line in lines),
    ]


def conclusion(summary: dict[str, dict]) -> list[str]:
    aware, both = summary["aware"], summary["both"]
    verdict = "meets" if aware["meets_target"] else "misses"
    per_token = aware["bytes_per_prompt_token"]
    lines = [
        f"Capture (query-aware) takes {aware['ratio']:.2f}× a plain greedy `generate`, which {verdict} the "
        f"≤ {TARGET_RATIO} target; of its {aware['capture_s']:.1f} s, {aware['phases_s']['record']:.1f} s are "
        f"prefill + decode with the recording attention and {aware['phases_s']['write']:.1f} s conversion and "
        f"file writing (plain: {aware['plain_s']:.1f} s); by CPU time, which other load disturbs less, "
        f"{aware['cpu_ratio']:.2f}×.",
        f"Writing both modes from one capture costs {both['ratio']:.2f}× plain ({both['cpu_ratio']:.2f}× by CPU "
        f"time), {both['capture_s'] / aware['capture_s']:.2f}× the query-aware capture alone.",
        f"A query-aware trace is {per_token['file']:,.0f} bytes per prompt token "
        f"({aware['bytes_per_total_token']:,.0f} per total token): K+V {per_token['kv']:,.0f}, "
        f"Q {per_token['q']:,.0f}, stats {per_token['stats']:,.0f}, log-probs {per_token['logprobs']:,.0f}; "
        f"both modes together {both['bytes_per_prompt_token']['file']:,.0f} bytes per prompt token.",
    ]
    if not (aware["all_same_length"] and both["all_same_length"]):
        lines.append("Plain generate and capture stopped after different numbers of tokens on some samples.")
    return lines


def write_markdown(
    path: Path, tables: tuple[list[list[str]], list[list[str]]], summary: dict, args: argparse.Namespace, machine: dict
) -> None:
    times, sizes = tables
    load = machine["load_average"]
    text = [
        "# Capture benchmark",
        "",
        f"`bench/capture.py`: {args.samples} samples of workload `{args.workload}` at {args.context_tokens} context "
        f"tokens (seed {args.seed}), {args.max_new_tokens} new tokens, window {args.window}, float16 storage; "
        f"median of {args.repeats} interleaved runs per side. Mode `aware` writes the query-aware file, `both` "
        "writes query-aware and query-agnostic files from one capture. Ratio = capture s / plain generate s "
        "(wall clock); cpu ratio = the same with the process's CPU seconds, steadier when other processes compete "
        "for the cores; record = prefill + decode with the recording attention, write = tensor conversion + "
        "files + manifest (wall clock).",
        "",
        f"Machine: {machine['cpu_count']} CPUs, torch {machine['torch']} with {machine['torch_threads']} threads; "
        f"1-minute load average {load['start'][0]:.1f} at start, {load['end'][0]:.1f} at end.",
        "",
        *markdown_table(TIME_HEADERS, times),
        "",
        "Trace size; K+V, Q, stats and logprobs are bytes per prompt token.",
        "",
        *markdown_table(SIZE_HEADERS, sizes),
        "",
        *conclusion(summary),
        "",
    ]
    path.write_text("\n".join(text))


def run_info(loaded: LoadedModel, load_at_start: tuple[float, ...]) -> dict:
    """The machine (see bench/machine.py) and how the plain side ran."""
    return {
        **machine_info(load_at_start),
        "torch_threads": torch.get_num_threads(),
        "plain_attention": loaded.model.config._attn_implementation,
        "model": DEFAULT_MODEL,
        "compute_dtype": str(loaded.model.dtype).removeprefix("torch."),
    }


def main() -> None:
    args = parse_args()
    load_at_start = os.getloadavg()
    loaded = load_model()
    samples, prompts = build_prompts(loaded, args)
    plain_generate(loaded, prompts[0].input_ids[:64], 4)  # warm-up: first-call allocations and kernel selection
    rows = measure(loaded, samples, prompts, args)
    summary = summarize(rows)
    times, sizes = table_lines(rows, summary)
    print_table("capture vs plain generate (median seconds)", TIME_HEADERS, times)
    print_table("trace size (K+V … logprobs: bytes per prompt token)", SIZE_HEADERS, sizes)
    for line in conclusion(summary):
        console.print(line)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {
        **{key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
        "capture": {name: asdict(value) for name, value in capture_settings(args).items()},
    }
    machine = run_info(loaded, load_at_start)
    report = {"machine": machine, "settings": settings, "samples": rows, "summary": summary}
    (args.out / "capture.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(args.out / "capture.md", (times, sizes), summary, args, machine)
    console.print(f"wrote {args.out / 'capture.json'} and {args.out / 'capture.md'}")


if __name__ == "__main__":
    main()
