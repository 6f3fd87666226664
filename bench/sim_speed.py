"""Benchmark: how much faster the simulator judges a policy than running the live model.

The simulator exists so that search can try thousands of (policy, budget) candidates on captured
traces instead of generating with the model each time. That pays off only if one policy on one
sample costs a small fraction of one live generation: the target is a ratio live / sim ≥ 1000×.
This script measures three things side by side in one run, on one torch thread per side by default
(see --threads):

1. Per preset (all of `kvsim.policies.PRESETS`, plus the oracle), one policy on one sample of a
   real TraceSet of the bundled model at budget 0.1, against a plain greedy `model.generate` of the
   same prompt for the same number of tokens with the full cache. Two sim times: *cold*, everything
   for that sample (`simulate_sample` with one policy: mapping the file, the prefill views, the
   continuation's full-cache attention, the replay, the result rows), and *marginal*, the policy's
   own replay given precomputed views and full-cache attention (what each extra policy or budget
   costs inside a batch). Live runs are spread over the preset loop (start, middle, end) so drift
   on a shared CPU hits both sides alike; every number is the median of a few repeats. Stepwise
   presets the simulator replays as one stack of layers are also timed stepping each layer alone.
2. Growth with prompt length: synthetic TraceSets shaped like the bundled model (30 layers, 3 KV
   heads, group 3, head_dim 64, window 64, 32 continuation tokens) at 1K-8K prompt tokens, for
   snapkv (prefill-once) and h2o (every-step): is the per-sample cost linear in the prompt?
3. Growth with the number of policies in one `simulate_sample` call (1, 4, 16 presets on the 2K
   synthetic sample at one budget): the policy-independent work is paid once per sample, so the
   cost per policy should fall as the batch grows.
4. Peak memory one sample's simulation adds, per synthetic length, in a fresh process, against the
   sample file's size; and the same with every stepwise layer stepped alone.

The issue-13 targets sit in one table at the top, each with its measured value and, where missed,
the measured gap and its cause: snapkv cold ≥ 1,000× live, every-step presets ≥ 200×, cost linear
in the prompt from 1K to 8K tokens, peak memory ≤ 2× one sample's trace.

Building the inputs (capturing a TraceSet when none is given, generating the synthetic TraceSets:
their column statistics are O(prompt²), about 2 min at 8K on one core) is setup, not measured.

Run: `.venv/bin/python bench/sim_speed.py --traces runs/speed/traces` (about 8 min on 2 cores); results go to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from machine import machine_info  # bench/machine.py (the script's folder is on sys.path)
from kvsim.policies import PRESETS, Budget, Policy
from kvsim.sim.oracle import oracle_keeps
from kvsim.policies.compress import compress_prefill
from kvsim.policies.held import stacks_layers
import kvsim.sim.replay as replay_module
from kvsim.sim.replay import replay, replay_selection, replay_stepwise
from kvsim.sim.simulate import ORACLE, prepare_sample, simulate_sample
from kvsim.traces.capture import CaptureSettings, capture_traceset
from kvsim.traces.models import DEFAULT_MODEL, LoadedModel, load_model
from kvsim.traces.store import TraceSample, TraceSet
from kvsim.traces.synthetic import synthetic_traceset
from kvsim.traces.workloads import Haystack, build_workload

TARGET_RATIO = 1000.0  # snapkv, cold, against a live generate of the same sample
EVERY_STEP_TARGET = 200.0  # every every-step preset, cold
MEMORY_TARGET = 2.0  # peak memory a sample's simulation adds, over the sample file's size
REPO = Path(__file__).resolve().parent.parent
DEMO_TRACES = REPO / "runs" / "demo" / "traces"
# Synthetic TraceSets shaped like the bundled model (SmolLM2-135M) and its default capture.
SYNTHETIC_SHAPE = {"n_layers": 30, "kv_heads": 3, "group": 3, "head_dim": 64, "window": 64, "continuation": 32}
LENGTH_POLICIES = ("snapkv", "h2o")  # prefill-once and every-step representatives
# Batch order for part 3: the SnapKV family first, then the other prefill-once presets, then the
# every-step and lagged ones, so 1 and 4 are prefill-once batches and 16 is every preset.
BATCH_LEAD = ("snapkv", "pyramidkv", "adakv", "cake")
# A linear cost grows 8× from 1K to 8K; up to this exponent (time ∝ tokens^k) we call it ~linear.
LINEAR_EXPONENT = 1.15
# Below this exponent, fixed per-sample costs still dominate at the short end.
SUBLINEAR_EXPONENT = 0.85

# Piped output gets rich's 80 columns, too narrow for the tables; a wider terminal is used as is.
console = Console(width=max(Console().width, 120))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--traces", type=Path, default=DEMO_TRACES if (DEMO_TRACES / "manifest.parquet").is_file() else None,
        help="real TraceSet (default: runs/demo/traces when it exists, else a 2-sample capture into a temp folder)",
    )
    parser.add_argument("--sample", default=None, help="sample_id to time (default: the first query-aware sample)")
    parser.add_argument("--mode", default="query-aware", help="evaluation mode of the timed sample")
    parser.add_argument("--budget", type=float, default=0.1, help="budget (fraction of the prompt)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median kept)")
    parser.add_argument("--cell-seconds", type=float, default=6.0, help="stop repeating a measurement after this many seconds (at least one run)")
    parser.add_argument("--lengths", default="1024,2048,4096,8192", help="synthetic prompt lengths (part 2)")
    parser.add_argument("--long-from", type=int, default=8192, help="prompt length from which --long-repeats applies")
    parser.add_argument("--long-repeats", type=int, default=2, help="timed runs per measurement at long prompts")
    parser.add_argument("--batch-sizes", default="1,4,16", help="policies per simulate_sample call (part 3)")
    parser.add_argument("--batch-length", type=int, default=2048, help="synthetic prompt length of part 3")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads for every timed run, live and sim (0: torch's default). One by default: on a small "
        "shared CPU another busy process makes multi-threaded torch timings swing 10-20×",
    )
    parser.add_argument("--synthetic-dir", type=Path, default=None, help="keep/reuse synthetic TraceSets here (default: a temp folder)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="results folder")
    return parser.parse_args()


def median(runs: Sequence[float]) -> float:
    return statistics.median(runs)


def timed(fn: Callable[[], object], repeats: int, cap_s: float) -> list[float]:
    """Seconds of up to `repeats` runs of `fn`, stopping early once they add up to `cap_s`."""
    runs: list[float] = []
    while len(runs) < repeats and (not runs or sum(runs) < cap_s):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return runs


def schedule_name(policy: Policy | None) -> str:
    return "hindsight" if policy is None else policy.schedule.name


def fresh(traceset: TraceSet, sample: TraceSample) -> TraceSample:
    """A new handle on the sample, so a cold run maps the file and parses its header again."""
    return traceset.sample(sample.sample_id, sample.mode)


def shared_work(traceset: TraceSet, sample: TraceSample):
    """The policy-independent inputs of every replay, as search keeps them (`prepare_sample`: the
    prefill views and the continuation's full-cache attention, read from a format 4 TraceSet), plus
    the views' window attention (kept per window size by the view, so simulate_sample computes it
    once per sample for the first policy reading it)."""
    prepared = prepare_sample(traceset, sample)
    observation_windows(prepared.views)
    return prepared.views, prepared.fulls


def observation_windows(views) -> None:
    """Every preset's observation-window attention, computed here so no policy's marginal time includes it."""
    sizes = ({policy.observation_window for policy in PRESETS.values()} | {1}) - {0}
    for view in views:
        for size in sizes:
            view.window(size)


def cold_run(traceset: TraceSet, sample: TraceSample, policy: Policy | None, budget: Budget) -> Callable[[], object]:
    if policy is None:
        return lambda: simulate_sample(traceset, fresh(traceset, sample), [], [budget], oracle=True)
    return lambda: simulate_sample(traceset, fresh(traceset, sample), [policy], [budget], oracle=False)


def marginal_run(policy: Policy | None, budget: Budget, views, fulls) -> Callable[[], object]:
    if policy is None:
        return lambda: replay_selection(oracle_keeps(fulls, budget), views, fulls)
    return lambda: replay(policy, budget, views, fulls)


def stacked(policy: Policy | None, views) -> bool:
    """Whether the simulator replays this policy's layers as one stack (`replay_stacked`)."""
    return policy is not None and policy.schedule.interval is not None and stacks_layers(policy, views)


def layer_by_layer_run(policy: Policy, budget: Budget, views, fulls) -> Callable[[], object]:
    """The same replay with every layer stepped alone (`replay_stepwise`), as before layers were stacked."""

    def run() -> object:
        keeps, budgets = compress_prefill(policy, views, budget, views[0].length)
        return [replay_stepwise(policy, *layer) for layer in zip(views, fulls, keeps, budgets)]

    return run


def why_layer_by_layer(policy: Policy) -> str:
    """Why `stacks_layers` refuses a stepwise policy, in a few words."""
    if not policy.scorer.per_head:
        return f"its scorer ({policy.scorer.name}) pools along the union of held positions"
    return f"its retention ({policy.retention.name}) rewrites tokens while decoding"


# --- inputs -------------------------------------------------------------------------------------


def capture_demo(folder: Path) -> TraceSet:
    """A 2-sample query-aware capture of the default workload with the bundled model (setup only)."""
    console.print("[bold]no --traces and no runs/demo/traces: capturing 2 samples into a temp folder; "
                  "the capture time is not part of the measurement[/]")
    start = time.perf_counter()
    loaded = load_model(DEFAULT_MODEL)
    count_tokens = lambda text: len(loaded.tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    haystack = Haystack.default()
    samples = build_workload("default", 2, seed=0, context_tokens=1500, count_tokens=count_tokens, haystack=haystack)
    settings = CaptureSettings(window=64, max_new_tokens=32, modes=("query-aware",))
    workload = {
        "spec": "default", "seed": 0, "context_tokens": 1500,
        "haystack": haystack.source, "haystack_sha256": haystack.sha256,
    }
    traceset = capture_traceset(loaded, samples, folder, settings, workload)
    console.print(f"captured in {time.perf_counter() - start:.0f} s (setup, not measured)")
    return traceset


def synthetic(root: Path, prompt_len: int) -> TraceSet:
    """The synthetic TraceSet at `prompt_len`, reused from `root` when already built there."""
    folder = root / f"synthetic-{prompt_len}"
    if (folder / "manifest.parquet").is_file():
        existing = TraceSet.open(folder)
        model = existing.meta["model"]
        if (
            len(existing) == 1
            and existing.manifest["prompt_len"][0] == prompt_len
            and existing.manifest["gen_len"][0] == SYNTHETIC_SHAPE["continuation"]
            and existing.meta["window"] == SYNTHETIC_SHAPE["window"]
            and (model["n_layers"], model["kv_heads"], model["head_dim"])
            == (SYNTHETIC_SHAPE["n_layers"], SYNTHETIC_SHAPE["kv_heads"], SYNTHETIC_SHAPE["head_dim"])
        ):
            return existing
        raise SystemExit(f"{folder} holds another synthetic TraceSet: remove it or pass another --synthetic-dir")
    return synthetic_traceset(folder, prompt_len=prompt_len, **SYNTHETIC_SHAPE)


# --- part 1: presets against the live model -------------------------------------------------------


@torch.inference_mode()
def live_generate(loaded: LoadedModel, prompt_ids: torch.Tensor, gen_len: int) -> tuple[float, list[int]]:
    """Seconds and new token ids of a plain greedy full-cache `generate` of exactly `gen_len` tokens."""
    ids = prompt_ids[None]
    start = time.perf_counter()
    out = loaded.model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen_len, min_new_tokens=gen_len, do_sample=False
    )
    return time.perf_counter() - start, out[0, ids.shape[1] :].tolist()


def measure_presets(traceset: TraceSet, sample: TraceSample, loaded: LoadedModel, args, progress) -> dict:
    budget = Budget(args.budget)
    entries: list[tuple[str, Policy | None]] = [*PRESETS.items(), (ORACLE, None)]
    prompt_ids = sample.input_ids[: sample.full_prompt_len].clone()
    gen_len = sample.gen_len
    traced_ids = sample.input_ids[sample.full_prompt_len :].tolist()

    # Warm-up, untimed: first-call allocations, kernel selection, the file in the page cache.
    live_generate(loaded, prompt_ids[:64], 2)
    simulate_sample(traceset, fresh(traceset, sample), [PRESETS["snapkv"]], [budget], oracle=False)

    # Live runs at evenly spread points of the preset loop (0 = before the first, len = after the last).
    slots = [round(i * len(entries) / max(1, args.repeats - 1)) for i in range(args.repeats)]
    live_runs: list[float] = []
    live_ids: list[int] = []

    bar = progress.add_task("part 1", total=len(entries) + args.repeats + 1)

    def live_at(index: int) -> None:
        nonlocal live_ids
        for _ in range(slots.count(index)):
            progress.update(bar, description=f"part 1: live generate ({gen_len} tokens)")
            seconds, live_ids = live_generate(loaded, prompt_ids, gen_len)
            live_runs.append(seconds)
            progress.advance(bar)

    progress.update(bar, description="part 1: shared work (views, window attention, full-cache attention)")
    prepare_runs = timed(lambda: prepare_sample(traceset, fresh(traceset, sample)), args.repeats, args.cell_seconds)
    shared_runs = timed(lambda: shared_work(traceset, sample), args.repeats, args.cell_seconds)
    views, fulls = shared_work(traceset, sample)
    progress.advance(bar)

    rows = []
    for index, (name, policy) in enumerate(entries):
        live_at(index)
        progress.update(bar, description=f"part 1: {name}")
        cold = timed(cold_run(traceset, sample, policy, budget), args.repeats, args.cell_seconds)
        marginal = timed(marginal_run(policy, budget, views, fulls), args.repeats, args.cell_seconds)
        rows.append({
            "policy": name,
            "schedule": schedule_name(policy),
            "cold_s": median(cold),
            "marginal_s": median(marginal),
            "cold_runs_s": cold,
            "marginal_runs_s": marginal,
            "stacked": stacked(policy, views),
        })
        if stacked(policy, views):
            alone = timed(layer_by_layer_run(policy, budget, views, fulls), args.repeats, args.cell_seconds)
            rows[-1] |= {"layer_by_layer_s": median(alone), "layer_by_layer_runs_s": alone}
        progress.advance(bar)
    live_at(len(entries))

    live_s = median(live_runs)
    for row in rows:
        row["ratio_cold"] = live_s / row["cold_s"]
        row["ratio_marginal"] = live_s / row["marginal_s"]
    matched = next((i for i, (a, b) in enumerate(zip(live_ids, traced_ids)) if a != b), min(len(live_ids), len(traced_ids)))
    return {
        "sample_id": sample.sample_id,
        "mode": sample.mode,
        "prompt_len": sample.prompt_len,
        "full_prompt_len": sample.full_prompt_len,
        "gen_len": gen_len,
        "budget": budget.label,
        "live_s": live_s,
        "live_runs_s": live_runs,
        "live_tokens_matching_trace": matched,
        "shared_s": median(shared_runs),
        "shared_runs_s": shared_runs,
        "prepare_s": median(prepare_runs),
        "prepare_runs_s": prepare_runs,
        "reference_stored": traceset.stores_reference,
        "policy_layers": len(traceset.shape.policy_layers),
        "rows": rows,
    }


# --- part 2: growth with prompt length ------------------------------------------------------------


def measure_lengths(tracesets: dict[int, TraceSet], args, progress) -> list[dict]:
    budget = Budget(args.budget)
    bar = progress.add_task("part 2", total=len(tracesets) * (1 + len(LENGTH_POLICIES)))
    rows = []
    for prompt_len, traceset in tracesets.items():
        repeats = args.long_repeats if prompt_len >= args.long_from else args.repeats
        sample = next(traceset.samples())
        simulate_sample(traceset, fresh(traceset, sample), [PRESETS["snapkv"]], [budget], oracle=False)  # warm-up
        progress.update(bar, description=f"part 2: {prompt_len} tokens, shared work")
        shared = timed(lambda: shared_work(traceset, sample), repeats, args.cell_seconds)
        views, fulls = shared_work(traceset, sample)
        progress.advance(bar)
        for name in LENGTH_POLICIES:
            progress.update(bar, description=f"part 2: {prompt_len} tokens, {name}")
            policy = PRESETS[name]
            cold = timed(cold_run(traceset, sample, policy, budget), repeats, args.cell_seconds)
            marginal = timed(marginal_run(policy, budget, views, fulls), repeats, args.cell_seconds)
            rows.append({
                "prompt_len": prompt_len,
                "policy": name,
                "schedule": schedule_name(policy),
                "shared_s": median(shared),
                "marginal_s": median(marginal),
                "cold_s": median(cold),
                "cold_s_per_token": median(cold) / prompt_len,
                "shared_runs_s": shared,
                "marginal_runs_s": marginal,
                "cold_runs_s": cold,
            })
            progress.advance(bar)
        del views, fulls
    return rows


def length_growth(rows: list[dict]) -> dict[str, dict]:
    """Per policy: cold (and marginal) time at the longest prompt over the shortest, against the token ratio."""
    growth = {}
    for name in LENGTH_POLICIES:
        mine = sorted((r for r in rows if r["policy"] == name), key=lambda r: r["prompt_len"])
        if len(mine) < 2:
            continue
        first, last = mine[0], mine[-1]
        tokens = last["prompt_len"] / first["prompt_len"]
        ratio = last["cold_s"] / first["cold_s"]
        exponent = math.log(ratio) / math.log(tokens)
        growth[name] = {
            "from": first["prompt_len"],
            "to": last["prompt_len"],
            "token_ratio": tokens,
            "time_ratio": ratio,
            "marginal_time_ratio": last["marginal_s"] / first["marginal_s"],
            # shared + replay measured separately: the compute alone, without cold's allocation churn
            "compute_time_ratio": (last["shared_s"] + last["marginal_s"]) / (first["shared_s"] + first["marginal_s"]),
            "shared_time_ratio": last["shared_s"] / first["shared_s"],
            "exponent": exponent,
            "linear": exponent <= LINEAR_EXPONENT,
            "shape": "sublinear" if exponent < SUBLINEAR_EXPONENT else "~linear" if exponent <= LINEAR_EXPONENT else "superlinear",
        }
    return growth


# --- part 4: peak memory ---------------------------------------------------------------------------


def peak_memory_child(root: str, names: tuple[str, ...], budget: float, threads: int, stacked: bool = True) -> dict:
    """In a fresh process: the resident memory one sample's simulation adds at its peak (the kernel's
    high-water mark, reset to the current size once the TraceSet is open), beside the sample file's size.
    stacked False: stepwise replays step one layer per stack (`kvsim.sim.replay.STACK_ROWS` 0)."""
    torch.set_num_threads(threads)
    if not stacked:
        replay_module.STACK_ROWS = 0
    traceset = TraceSet.open(root)
    sample = next(traceset.samples())
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current resident size
    before = status_bytes("VmRSS")
    simulate_sample(traceset, sample, [PRESETS[name] for name in names], [Budget(budget)], oracle=True)
    return {"prompt_len": sample.prompt_len, "trace_bytes": sample.bytes, "before_bytes": before, "peak_bytes": status_bytes("VmHWM")}


def status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (kB there)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise SystemExit(f"/proc/self/status has no {field}: the memory part needs Linux")


def measure_memory(tracesets: dict[int, TraceSet], args, progress) -> list[dict]:
    """Peak memory of `simulate_sample` (snapkv, h2o and the oracle) per synthetic length, each in its
    own spawned process so one length's allocations do not hide the next's."""
    bar = progress.add_task("part 4", total=len(tracesets))
    rows = []
    context = multiprocessing.get_context("spawn")
    for prompt_len, traceset in tracesets.items():
        progress.update(bar, description=f"part 4: peak memory at {prompt_len} tokens")
        with context.Pool(1) as pool:
            row = pool.apply(peak_memory_child, (str(traceset.root), LENGTH_POLICIES, args.budget, args.threads or 1))
        with context.Pool(1) as pool:
            alone = pool.apply(peak_memory_child, (str(traceset.root), LENGTH_POLICIES, args.budget, args.threads or 1, False))
        row["added_bytes"] = row["peak_bytes"] - row["before_bytes"]
        row["ratio_to_trace"] = row["added_bytes"] / row["trace_bytes"]
        row["layer_by_layer_added_bytes"] = alone["peak_bytes"] - alone["before_bytes"]
        rows.append(row)
        progress.advance(bar)
    return rows


# --- part 3: growth with the number of policies ---------------------------------------------------


def batch_order() -> list[str]:
    prefill = [n for n, p in PRESETS.items() if p.schedule.interval is None and n not in BATCH_LEAD]
    stepwise = [n for n, p in PRESETS.items() if p.schedule.interval is not None and n not in BATCH_LEAD]
    return [*BATCH_LEAD, *prefill, *stepwise]


def measure_batches(traceset: TraceSet, shared_s: float, args, progress) -> list[dict]:
    budget = Budget(args.budget)
    order = batch_order()
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    if max(sizes) > len(order):
        raise SystemExit(f"--batch-sizes: at most {len(order)} presets exist")
    sample = next(traceset.samples())
    bar = progress.add_task("part 3", total=len(sizes))
    rows = []
    for size in sizes:
        names = order[:size]
        policies = [PRESETS[n] for n in names]
        progress.update(bar, description=f"part 3: {size} policies in one simulate_sample")
        runs = timed(
            lambda: simulate_sample(traceset, fresh(traceset, sample), policies, [budget], oracle=False),
            args.repeats, args.cell_seconds,
        )
        total = median(runs)
        policy_only = max(total - shared_s, 0.0)
        separate = size * shared_s + policy_only
        rows.append({
            "policies": size,
            "names": names,
            "prompt_len": sample.prompt_len,
            "total_s": total,
            "s_per_policy": total / size,
            "shared_s": shared_s,
            "policy_only_s": policy_only,
            "separate_runs_s": separate,
            "amortization": separate / total,
            "runs_s": runs,
        })
        progress.advance(bar)
    return rows


# --- targets --------------------------------------------------------------------------------------


def target_lines(part1: dict, growth: dict, memory: list[dict]) -> list[list[str]]:
    """[target, measured, met, gap and its cause] for each of the issue's targets, from this run's numbers."""
    live = part1["live_s"]
    by_name = {row["policy"]: row for row in part1["rows"]}
    snap = by_name["snapkv"]
    windows = max(part1["shared_s"] - part1["prepare_s"], 0.0)
    steps = part1["gen_len"] * part1["policy_layers"]
    lines = [[
        f"snapkv cold ≥ {TARGET_RATIO:,.0f}× live", fmt_ratio(snap["ratio_cold"]) + f" ({snap['cold_s'] * 1e3:.0f} ms)",
        yes(snap["ratio_cold"] >= TARGET_RATIO),
        f"{TARGET_RATIO:,.0f}× needs ≤ {live / TARGET_RATIO * 1e3:.1f} ms; the observation-window attention alone (64 queries × "
        f"{part1['prompt_len']} keys × every head of {part1['policy_layers']} layers, policy-independent but too large to store) "
        f"takes {windows * 1e3:.0f} ms, mapping and views {part1['prepare_s'] * 1e3:.0f} ms, the replay {snap['marginal_s'] * 1e3:.0f} ms",
    ]]
    stepwise = [row for row in part1["rows"] if row["schedule"] == "every_step"]
    if stepwise:
        worst = min(stepwise, key=lambda row: row["ratio_cold"])
        fastest = min((row for row in stepwise if row["stacked"]), key=lambda row: row["cold_s"], default=None)
        alone = [row for row in stepwise if not row["stacked"]]
        cause = [f"{EVERY_STEP_TARGET:,.0f}× needs ≤ {live / EVERY_STEP_TARGET * 1e3:.0f} ms"]
        if alone:
            cause.append(
                ", ".join(f"{row['policy']} ({why_layer_by_layer(PRESETS[row['policy']])})" for row in alone)
                + f" step {steps} (row, layer) pairs one at a time, {worst['marginal_s'] / steps * 1e3:.2f} ms each for {worst['policy']}"
            )
        if fastest:
            cause.append(
                f"stacked, the fastest ({fastest['policy']}) takes {fastest['marginal_s'] / part1['gen_len'] * 1e3:.1f} ms per row for all "
                f"{part1['policy_layers']} layers: every row copies the held cache twice (appending, then shrinking) and runs about "
                "a hundred small tensor operations, so Python dispatch and copies, not arithmetic, set the pace"
            )
        lines.append([
            f"every-step presets ≥ {EVERY_STEP_TARGET:,.0f}× live (cold)",
            f"{fmt_ratio(worst['ratio_cold'])} ({worst['policy']}) … {fmt_ratio(max(r['ratio_cold'] for r in stepwise))}",
            yes(worst["ratio_cold"] >= EVERY_STEP_TARGET),
            "; ".join(cause),
        ])
    for name, g in growth.items():
        lines.append([
            f"{name}: cost linear in prompt length, {g['from']}→{g['to']}", f"{g['time_ratio']:.1f}× for {g['token_ratio']:.0f}× tokens "
            f"(exponent {g['exponent']:.2f})", yes(g["linear"]), "" if g["linear"] else
            f"shared work {g['shared_time_ratio']:.1f}×, replay {g['marginal_time_ratio']:.1f}×: the window attention is O(window × prompt) "
            "per layer, the rest allocation churn at long prompts",
        ])
    if memory:
        worst = max(memory, key=lambda row: row["ratio_to_trace"])
        h2o_gain = by_name["h2o"]["layer_by_layer_s"] / by_name["h2o"]["marginal_s"]
        lines.append([
            f"peak memory per worker ≤ {MEMORY_TARGET:g}× one sample's trace",
            f"{worst['ratio_to_trace']:.2f}× at {worst['prompt_len']} tokens ({worst['added_bytes'] / 2**20:.0f} MiB over a "
            f"{worst['trace_bytes'] / 2**20:.0f} MiB file)", yes(worst["ratio_to_trace"] <= MEMORY_TARGET),
            "" if worst["ratio_to_trace"] <= MEMORY_TARGET else "fixed costs weigh most at the short end: beside the mapped file, the views keep "
            f"their window attention ([heads, w, P] float32 per layer and window size), and h2o's replay holds every layer's cache as one stack "
            f"and copies it on every row: stepping layer by layer adds {worst['layer_by_layer_added_bytes'] / 2**20:.0f} MiB "
            f"({worst['layer_by_layer_added_bytes'] / worst['trace_bytes']:.2f}×), at {h2o_gain:.1f}× the time (part 1)",
        ])
    return lines


def yes(met: bool) -> str:
    return "yes" if met else "**no**"


# --- report ---------------------------------------------------------------------------------------


def fmt_s(seconds: float) -> str:
    return f"{seconds:.3f}" if seconds < 10 else f"{seconds:.1f}"


def fmt_ratio(ratio: float) -> str:
    return f"{ratio:,.0f}×" if ratio >= 10 else f"{ratio:.2f}×"


PRESET_HEADERS = ("policy", "schedule", "cold s", "marginal s", "live/cold", "live/marginal", "layer by layer s", "stack gain", "runs")
LENGTH_HEADERS = ("prompt", "policy", "shared s", "marginal s", "cold s", "µs/token", "× shortest")
TARGET_HEADERS = ("target", "measured", "met", "gap and cause")
MEMORY_HEADERS = ("prompt", "trace file MiB", "added at peak MiB", "× trace", "layer by layer MiB", "× trace ")
BATCH_HEADERS = ("policies", "total s", "s/policy", "shared s", "policies-only s", "N separate runs s", "amortization")


def table_lines(part1: dict, lengths: list[dict], batches: list[dict]) -> tuple[list[list[str]], ...]:
    presets = [
        [
            row["policy"], row["schedule"], fmt_s(row["cold_s"]), fmt_s(row["marginal_s"]),
            fmt_ratio(row["ratio_cold"]), fmt_ratio(row["ratio_marginal"]),
            *((fmt_s(row["layer_by_layer_s"]), fmt_ratio(row["layer_by_layer_s"] / row["marginal_s"])) if row["stacked"] else ("", "")),
            f"{len(row['cold_runs_s'])}/{len(row['marginal_runs_s'])}",
        ]
        for row in part1["rows"]
    ]
    blank = [""] * 5
    presets.append(["live generate", f"{part1['gen_len']} tok", fmt_s(part1["live_s"]), *blank, str(len(part1["live_runs_s"]))])
    presets.append(["shared work", "views+attn", fmt_s(part1["shared_s"]), *blank, str(len(part1["shared_runs_s"]))])
    presets.append(["of which prepare", "map+views+ref", fmt_s(part1["prepare_s"]), *blank, str(len(part1["prepare_runs_s"]))])
    shortest = {}
    length_lines = []
    for row in lengths:
        base = shortest.setdefault(row["policy"], row)
        length_lines.append([
            str(row["prompt_len"]), row["policy"], fmt_s(row["shared_s"]), fmt_s(row["marginal_s"]), fmt_s(row["cold_s"]),
            f"{row['cold_s_per_token'] * 1e6:.0f}", f"{row['cold_s'] / base['cold_s']:.2f}",
        ])
    batch_lines = [
        [
            str(row["policies"]), fmt_s(row["total_s"]), fmt_s(row["s_per_policy"]), fmt_s(row["shared_s"]),
            fmt_s(row["policy_only_s"]), fmt_s(row["separate_runs_s"]), f"{row['amortization']:.2f}×",
        ]
        for row in batches
    ]
    return presets, length_lines, batch_lines


def print_table(title: str, headers: tuple[str, ...], lines: list[list[str]], left: int = 2) -> None:
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    for index, header in enumerate(headers):
        table.add_column(header, justify="left" if index < left else "right")
    for line in lines:
        table.add_row(*line)
    console.print(table)


def markdown_table(headers: tuple[str, ...], lines: list[list[str]], left: int = 2) -> list[str]:
    return [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" if index < left else "---:" for index in range(len(headers))) + "|",
        *("| " + " | ".join(line) + " |" for line in lines),
    ]


def summarize(part1: dict, growth: dict, batches: list[dict]) -> dict:
    rows = part1["rows"]
    cold = sorted(rows, key=lambda r: r["ratio_cold"])
    marginal = sorted(rows, key=lambda r: r["ratio_marginal"])
    by_name = {row["policy"]: row for row in rows}
    return {
        "live_s": part1["live_s"],
        "target_ratio": TARGET_RATIO,
        "cold_ratio": {"min": cold[0]["ratio_cold"], "min_policy": cold[0]["policy"],
                       "median": median([r["ratio_cold"] for r in rows]),
                       "max": cold[-1]["ratio_cold"], "max_policy": cold[-1]["policy"]},
        "marginal_ratio": {"min": marginal[0]["ratio_marginal"], "min_policy": marginal[0]["policy"],
                           "median": median([r["ratio_marginal"] for r in rows]),
                           "max": marginal[-1]["ratio_marginal"], "max_policy": marginal[-1]["policy"]},
        "meets_target_cold": [r["policy"] for r in rows if r["ratio_cold"] >= TARGET_RATIO],
        "meets_target_marginal": [r["policy"] for r in rows if r["ratio_marginal"] >= TARGET_RATIO],
        "snapkv": {k: by_name["snapkv"][k] for k in ("cold_s", "marginal_s", "ratio_cold", "ratio_marginal")},
        "shared_s": part1["shared_s"],
        "shared_share_of_snapkv_cold": part1["shared_s"] / by_name["snapkv"]["cold_s"],
        "length_growth": growth,
        "batch": {
            row["policies"]: {
                **{k: row[k] for k in ("total_s", "s_per_policy", "amortization")},
                "shared_share": min(row["shared_s"] / row["total_s"], 1.0),
            }
            for row in batches
        },
    }


def conclusion(summary: dict, part1: dict) -> list[str]:
    cold, marginal = summary["cold_ratio"], summary["marginal_ratio"]
    n = len(part1["rows"])
    snap = summary["snapkv"]
    lines = [
        f"One policy on one {part1['prompt_len']}-token sample ({part1['gen_len']} continuation tokens) against a live "
        f"full-cache generate of {summary['live_s']:.2f} s: cold {fmt_ratio(cold['min'])} ({cold['min_policy']}) to "
        f"{fmt_ratio(cold['max'])} ({cold['max_policy']}), median {fmt_ratio(cold['median'])}; marginal "
        f"{fmt_ratio(marginal['min'])} ({marginal['min_policy']}) to {fmt_ratio(marginal['max'])} "
        f"({marginal['max_policy']}), median {fmt_ratio(marginal['median'])}. "
        f"The ≥ {TARGET_RATIO:,.0f}× target is met by {len(summary['meets_target_cold'])}/{n} presets cold and "
        f"{len(summary['meets_target_marginal'])}/{n} marginal.",
        f"snapkv: {snap['cold_s']:.3f} s cold ({fmt_ratio(snap['ratio_cold'])}), {snap['marginal_s']:.3f} s marginal "
        f"({fmt_ratio(snap['ratio_marginal'])}); the shared views, window and full-cache attention take {summary['shared_s']:.3f} s, "
        f"{summary['shared_share_of_snapkv_cold']:.0%} of its cold time. Every-step policies replay the continuation "
        "token by token and are the slowest.",
    ]
    gains = [row for row in part1["rows"] if row["stacked"]]
    if gains:
        lines.append(
            "Stacking the layers of per-head stepwise presets: "
            + ", ".join(f"{row['policy']} {row['layer_by_layer_s'] / row['marginal_s']:.1f}×" for row in gains)
            + " faster than stepping each layer alone (marginal, same run)."
        )
    growth_parts = []
    for name, g in summary["length_growth"].items():
        shape = g["shape"]
        growth_parts.append(
            f"{name} ({PRESETS[name].schedule.name}) {g['time_ratio']:.1f}× from {g['from']} to {g['to']} tokens "
            f"(linear: {g['token_ratio']:.0f}×; exponent {g['exponent']:.2f}, {shape}; shared work + replay alone "
            f"{g['compute_time_ratio']:.1f}×)"
        )
    if growth_parts:
        lines.append("Per-sample cost with prompt length: " + "; ".join(growth_parts) + ".")
    batch = summary["batch"]
    if batch:
        sizes = sorted(batch)
        parts = ", ".join(f"{s}: {batch[s]['total_s']:.2f} s ({batch[s]['s_per_policy']:.3f} s/policy)" for s in sizes)
        lines.append(
            f"Policies per simulate_sample call ({parts}): the shared work is paid once per sample, "
            f"{batch[sizes[-1]]['amortization']:.2f}× less time than {sizes[-1]} separate calls; at {sizes[-1]} "
            f"policies it is {batch[sizes[-1]]['shared_share']:.0%} of the call, the replays the rest."
        )
    return lines


def memory_lines(memory: list[dict]) -> list[list[str]]:
    return [
        [
            str(row["prompt_len"]), f"{row['trace_bytes'] / 2**20:.0f}", f"{row['added_bytes'] / 2**20:.0f}", f"{row['ratio_to_trace']:.2f}×",
            f"{row['layer_by_layer_added_bytes'] / 2**20:.0f}", f"{row['layer_by_layer_added_bytes'] / row['trace_bytes']:.2f}×",
        ]
        for row in memory
    ]


def write_markdown(path: Path, tables, summary: dict, part1: dict, args, machine: dict, traces_note: str, memory, targets) -> None:
    presets, lengths, batches = tables
    load = machine["load_average"]
    shape = SYNTHETIC_SHAPE
    text = [
        "# Simulator speed benchmark",
        "",
        f"`bench/sim_speed.py`: the simulator against the live model, side by side in one run; torch "
        f"{machine['torch']} with {machine['torch_threads_timed']} thread(s) for every timed run, on "
        f"{machine['cpu_count']} CPUs; 1-minute load average {load['start'][0]:.1f} at start, {load['end'][0]:.1f} at "
        f"end. Medians of up to {args.repeats} runs ({args.long_repeats} at ≥ {args.long_from} tokens; a measurement "
        f"stops repeating after {args.cell_seconds:g} s).",
        "",
        "## Targets (issue 13), side by side",
        "",
        *markdown_table(TARGET_HEADERS, targets, left=4),
        "",
        "## 1. One policy on one sample vs the live model",
        "",
        f"{traces_note} Full-cache continuation attention "
        f"{'read from the TraceSet (format 4)' if part1['reference_stored'] else 'recomputed (TraceSet older than format 4)'}. "
        f"Sample `{part1['sample_id']}` ({part1['mode']}, {part1['prompt_len']} prompt tokens, "
        f"{part1['gen_len']} generated), budget {part1['budget']}. Live = `model.generate(prompt, max_new_tokens="
        f"{part1['gen_len']}, min_new_tokens={part1['gen_len']}, do_sample=False)` with the full cache "
        f"({part1['live_tokens_matching_trace']}/{part1['gen_len']} leading tokens equal the trace's). Cold = "
        "`simulate_sample` with that one policy (file mapping, prefill views, full-cache continuation attention, "
        "replay, rows); marginal = the policy's replay given the shared work, i.e. the views with their window "
        "attention and the full-cache attention (oracle: "
        f"`replay_selection(oracle_keeps(...))`). Ratios are live s / sim s; target ≥ {TARGET_RATIO:,.0f}×. "
        "Runs = cold/marginal repeats. Shared work = `prepare_sample` (file mapping, views, the stored "
        "full-cache reference) plus every preset's observation-window attention; its `prepare` part is timed alone. "
        "Stepwise presets whose decisions are per KV head replay all layers as one stack of heads (`replay_stacked`); "
        "for them, layer by layer = the same replay with each layer stepped alone (`replay_stepwise`, the engine the "
        "live cache runs per layer; both decide the same, as the tests check), timed in the same run, and stack gain = "
        "layer by layer / marginal.",
        "",
        *markdown_table(PRESET_HEADERS, presets),
        "",
        "## 2. Growth with prompt length (synthetic)",
        "",
        f"Synthetic TraceSets shaped like the bundled model ({shape['n_layers']} layers, {shape['kv_heads']} KV heads, "
        f"group {shape['group']}, head_dim {shape['head_dim']}, window {shape['window']}, {shape['continuation']} "
        "continuation tokens; float32 storage). Shared = views, window attention and full-cache attention, marginal = replay, cold = "
        "`simulate_sample` with the one policy; µs/token = cold / prompt tokens; × shortest = cold / cold at the "
        "shortest prompt.",
        "",
        *markdown_table(LENGTH_HEADERS, lengths),
        "",
        "## 3. Growth with policies per `simulate_sample` call",
        "",
        f"Synthetic {args.batch_length}-token sample, budget {args.budget:g}; presets in the order "
        f"{', '.join(batch_order())} (the first N). Shared s is part 2's measurement on the same sample; "
        "policies-only = total − shared; N separate runs = N × shared + policies-only.",
        "",
        *markdown_table(BATCH_HEADERS, batches, left=1),
        "",
        "## 4. Peak memory of one sample's simulation (synthetic)",
        "",
        f"`simulate_sample` with {', '.join(LENGTH_POLICIES)} and the oracle in a fresh spawned process per length: "
        "peak resident memory (VmHWM, reset once the TraceSet is open) minus the resident memory then, against the "
        "sample file's size (float32 storage; mapped pages that are read count as resident). Layer by layer: the same in "
        "another process with every stepwise layer stepped alone (`kvsim.sim.replay.STACK_ROWS` 0).",
        "",
        *markdown_table(MEMORY_HEADERS, memory_lines(memory), left=1),
        "",
        "## Conclusion",
        "",
        *conclusion(summary, part1),
        "",
    ]
    path.write_text("\n".join(text))


def run_info(load_at_start: tuple[float, ...], threads: int) -> dict:
    """The machine (see bench/machine.py) and the torch threads every timed run used."""
    return {**machine_info(load_at_start), "torch_threads_timed": threads}


def main() -> None:
    args = parse_args()
    load_at_start = os.getloadavg()
    setup_threads = torch.get_num_threads()
    timed_threads = args.threads or setup_threads
    lengths = [int(x) for x in args.lengths.split(",")]
    with tempfile.TemporaryDirectory(prefix="kvsim-sim-speed-") as scratch:
        scratch = Path(scratch)
        # Setup (not measured), with every thread.
        if args.traces is None:
            traceset = capture_demo(scratch / "traces")
            traces_note = "TraceSet: a fresh 2-sample capture of the default workload (1500 context tokens, window 64)."
        else:
            traceset = TraceSet.open(args.traces)
            traces_note = f"TraceSet: `{args.traces}`."
        meta_model = traceset.meta["model"]
        candidates = list(traceset.samples(args.mode))
        if args.sample:
            candidates = [s for s in candidates if s.sample_id == args.sample]
        if not candidates:
            raise SystemExit(f"{traceset.root} has no {args.mode} sample {args.sample or ''}".rstrip())
        sample = candidates[0]
        console.print(f"loading live model {meta_model['id']} (the TraceSet's model)")
        loaded = load_model(meta_model["id"])
        synthetic_root = args.synthetic_dir or scratch
        synthetic_root.mkdir(parents=True, exist_ok=True)
        tracesets = {}
        for prompt_len in sorted(set(lengths) | {args.batch_length}):
            start = time.perf_counter()
            with console.status(f"building the synthetic {prompt_len}-token TraceSet (setup, not measured)"):
                tracesets[prompt_len] = synthetic(synthetic_root, prompt_len)
            console.print(f"synthetic {prompt_len}-token TraceSet ready in {time.perf_counter() - start:.0f} s (not measured)")

        torch.set_num_threads(timed_threads)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            part1 = measure_presets(traceset, sample, loaded, args, progress)
            length_rows = measure_lengths({p: tracesets[p] for p in lengths}, args, progress)
            batch_shared = next((r["shared_s"] for r in length_rows if r["prompt_len"] == args.batch_length), None)
            if batch_shared is None:
                sample_b = next(tracesets[args.batch_length].samples())
                batch_shared = median(timed(lambda: shared_work(tracesets[args.batch_length], sample_b), args.repeats, args.cell_seconds))
            batch_rows = measure_batches(tracesets[args.batch_length], batch_shared, args, progress)
            memory_rows = measure_memory({p: tracesets[p] for p in lengths}, args, progress)
        torch.set_num_threads(setup_threads)
        machine = run_info(load_at_start, timed_threads)

    growth = length_growth(length_rows)
    summary = summarize(part1, growth, batch_rows)
    tables = table_lines(part1, length_rows, batch_rows)
    targets = target_lines(part1, growth, memory_rows)
    print_table("targets", TARGET_HEADERS, targets, left=1)
    print_table("4. peak memory of one sample's simulation", MEMORY_HEADERS, memory_lines(memory_rows), left=1)
    print_table(f"1. one policy, one sample ({part1['sample_id']}, {part1['prompt_len']} tokens, budget "
                f"{part1['budget']}) vs live generate (median s)", PRESET_HEADERS, tables[0])
    print_table("2. growth with prompt length (synthetic, one sample)", LENGTH_HEADERS, tables[1])
    print_table(f"3. policies per simulate_sample call ({args.batch_length}-token synthetic sample)", BATCH_HEADERS, tables[2], left=1)
    for line in conclusion(summary, part1):
        console.print(line)

    args.out.mkdir(parents=True, exist_ok=True)
    settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    settings["synthetic_shape"] = SYNTHETIC_SHAPE
    settings["batch_order"] = batch_order()
    report = {
        "machine": machine,
        "settings": settings,
        "traceset": {"root": str(traceset.root), "model": meta_model, "window": traceset.meta["window"]},
        "presets": part1,
        "lengths": length_rows,
        "batches": batch_rows,
        "memory": memory_rows,
        "targets": [dict(zip(TARGET_HEADERS, line)) for line in targets],
        "summary": summary,
    }
    (args.out / "sim_speed.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(args.out / "sim_speed.md", tables, summary, part1, args, machine, traces_note, memory_rows, targets)
    console.print(f"wrote {args.out / 'sim_speed.json'} and {args.out / 'sim_speed.md'}")


if __name__ == "__main__":
    main()
