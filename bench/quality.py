"""Benchmark: does the searched policy beat the published presets live, on a workload search never saw?

The comparison that matters (issue 5). A winner is searched on the simulator per (mode, budget) on
the search traces (default workload: passkey, multikey, variable_tracking; seed 0). Everything is
then run live on a held-out workload with another seed and at least one task family the search
never saw (default: passkey, multivalue; seed 1): the full cache, every preset, and the searched
winner, at each budget (a fraction of the prompt, the one budget rule of kvsim.policies.budget), in
both evaluation modes. Where kvpress is installed its presses run at the same compression
(compression_ratio = 1 − budget), query-agnostic only, the way kvpress's pipeline runs them: press
active during the context prefill, then the question and a greedy answer with the press inactive.
So kvpress rows appear in the query-agnostic table alone (like with like).

Per (mode, budget, policy): task score (the workload's own rule, in [0, 1]) with a 95 % percentile
bootstrap interval over samples, fidelity to the full cache on its stored continuation (mean KL,
nats, lower bound over the top-20 tokens; top-1 agreement) and KV bytes held. Per (mode, budget) the
table says whether the winner beats the best preset (best = highest mean score, ties broken by lower
KL): "yes"/"no" when the two intervals are disjoint, "within CI" when they overlap; a paired
bootstrap interval of the difference (same samples) is given beside it. Query-agnostic rows also
compare the winner with the best kvpress press.

Cost, measured on this 2-core machine under a load average of 5-6 (other sessions running): one
live run of a prefill-once policy takes 20-40 s (a ~1.5K-token prompt of the bundled model, the
teacher-forced continuation for fidelity, then a greedy answer of up to --max-new-tokens); an
every-step policy (streaming_llm, h2o, tova, d2o; lazy every 16) feeds the question and the
continuation one token at a time and took up to ~6 min in query-agnostic mode; a kvpress press
re-runs the context prefill, ~45-80 s. So every preset at 4 budgets in both modes is an estimated
2-3 hours per held-out sample under that load: the 45-minute target is met only by cutting presets, budgets or samples,
and --deadline-min makes any configuration stop starting samples in time (a sample in flight
finishes; the results say which samples were skipped). Captured traces and finished searches are
kept under --workdir and reused by a re-run (the results note what was reused).

Full run as specified (every preset, 4 budgets, both modes, kvpress). Not run yet: under the load
measured above even its first sample exceeds 45 min (the deadline only stops further samples), so it
needs a quiet or larger machine, or --presets without the every-step ones:

    PYTHONPATH=src .venv/bin/python bench/quality.py --label full \
        --budgets 0.02,0.05,0.1,0.2 --modes query-aware,query-agnostic \
        --search-samples 12 --trials 60 --heldout-samples 8 --deadline-min 30

The reduced run committed in bench/results/ (≤ 15 min here; its exact command is in quality.md):

    PYTHONPATH=src .venv/bin/python bench/quality.py --label reduced --modes query-aware,query-agnostic \
        --budgets 0.05,0.2 --search-samples 6 --trials 8 --heldout-samples 3 \
        --presets snapkv,pyramidkv,adakv,knorm --kvpress-presses snapkv,knorm --deadline-min 8

Results: bench/results/quality.md, quality.json and quality.png (the --label is written into them).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import random
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import DynamicCache

from machine import machine_info  # bench/machine.py (the script's folder is on sys.path)
from kvsim.live.runner import LiveSample, fidelity
from kvsim.live.validate import check_model_matches, select_samples
from kvsim.policies import PRESETS, Budget
from kvsim.policies.policy import Policy
from kvsim.search import SearchSettings, search
from kvsim.traces.capture import CaptureSettings, capture_traceset
from kvsim.traces.models import DEFAULT_MODEL, LoadedModel, eos_token_ids, load_model
from kvsim.traces.store import TraceSample, TraceSet
from kvsim.traces.workloads import DEFAULT_MIX, Haystack, build_workload, score

RESULTS = Path(__file__).parent / "results"
SEARCHED = "searched"
FULL = "full"
KVPRESS_PRESSES = ("snapkv", "pyramidkv", "knorm", "streaming_llm", "tova", "expected_attention")


# ---------------------------------------------------------------------------------------------
# Traces and searches (cached under --workdir)


def capture(loaded: LoadedModel, spec: str, n: int, seed: int, out: Path, args, notes: list[str]) -> TraceSet:
    """The TraceSet of `n` samples of `spec` in both modes (resumed when `out` already holds it)."""
    count = lambda text: len(loaded.tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    haystack = Haystack.default()
    samples = build_workload(spec, n, seed=seed, context_tokens=args.context_tokens, count_tokens=count, haystack=haystack)
    # The same workload record as `kvsim capture`, so a CLI capture into the same folder is resumed too.
    workload = {"spec": spec, "seed": seed, "context_tokens": args.context_tokens, "haystack": haystack.source, "haystack_sha256": haystack.sha256}
    settings = CaptureSettings(max_new_tokens=args.max_new_tokens, modes=("query-aware", "query-agnostic"))
    reused = []

    def report(event: str, sample) -> None:
        if event == "captured":
            log(f"captured {spec} {sample.sample_id}")
        elif event == "skipped":
            reused.append(sample.sample_id)

    traceset = capture_traceset(loaded, samples, out, settings, workload, report)
    if reused:
        notes.append(f"{len(reused)} of {n} samples of {spec} (seed {seed}) were already captured in {out} and reused: their capture time is not in the wall time")
    return traceset


def searched_winner(traces: Path, mode: str, budget: float, args, notes: list[str], loaded: LoadedModel) -> tuple[Policy, dict]:
    """The winner of a `kvsim search` at `budget` in `mode` (exact tier: the proxy prunes, the model
    ranks by answer log-likelihood; the best trials re-ranked on validation samples), renamed
    `searched`. The search's own test split is empty: this bench's test is the held-out workload.
    The winner is kept in RUNDIR/winner.json."""
    rundir = Path(args.workdir) / f"search-{mode}-{budget:g}-t{args.trials}"
    saved = rundir / "winner.json"
    if saved.exists():
        notes.append(f"search {rundir.name} was already complete and reused: its time is not in the wall time")
        info = json.loads(saved.read_text())
    else:
        shutil.rmtree(rundir, ignore_errors=True)  # an interrupted run: start its study over
        started = time.perf_counter()
        settings = SearchSettings(traces=traces, budget=Budget(budget), rundir=rundir, trials=args.trials,
                                  study=f"quality-{mode}-{budget:g}", mode=mode, validation=0.25, test=0.0)
        summary = search(settings, loaded=loaded).summary()
        best = summary["top"][0]
        info = {"rundir": str(rundir), "spec": json.loads((rundir / best["spec"]).read_text())["policy"],
                "search_value": best["search_value"], "validation": best["validation"], "trials": summary["trials"],
                "search_samples": summary["samples"]["search"], "validation_samples": summary["samples"]["validation"]}
        saved.write_text(json.dumps(info, indent=2) + "\n")
        log(f"searched {mode} at {budget:g}: {args.trials} trials in {time.perf_counter() - started:.0f} s, "
            f"answer log-lik. {info['validation']['answer_logprob']:.3f} on validation samples")
        torch.set_num_threads(args.threads)  # the search sets one thread per process
    return replace(Policy.from_spec(info["spec"]), name=SEARCHED), info


# ---------------------------------------------------------------------------------------------
# Live runs


def live_rows(loaded: LoadedModel, traceset: TraceSet, sample: TraceSample, presets: list[Policy], winners: dict, budgets: list[float]) -> list[dict]:
    """One prefill of `sample`, then the full cache once and every preset and the winner per budget."""
    policies = [PRESETS[FULL], *presets, *(winners[(sample.mode, b)] for b in budgets)]
    for policy in policies:
        policy.check_traces(traceset.n_layers, traceset.meta["window"])
    live = LiveSample(loaded, traceset, sample, max(max(p.observation_window for p in policies), 1))
    runs = [(PRESETS[FULL], None)] + [(policy, b) for b in budgets for policy in [*presets, winners[(sample.mode, b)]]]
    rows = []
    for policy, budget in runs:
        started = time.perf_counter()
        outcome = live.run(policy, Budget(budget if budget is not None else budgets[0]))
        kind = FULL if budget is None else SEARCHED if policy.name == SEARCHED else "preset"
        rows.append(row(sample, policy.name, kind, budget, outcome.prediction, outcome.score, outcome.kl, outcome.top1, outcome.kv_bytes, time.perf_counter() - started))
    return rows


def row(sample: TraceSample, policy: str, kind: str, budget: float | None, prediction: str, task_score: float, kl: float, top1: float, kv_bytes: int, seconds: float) -> dict:
    return {
        "sample_id": sample.sample_id, "task": sample.task, "mode": sample.mode, "policy": policy, "kind": kind, "budget": budget,
        "score": task_score, "kl": kl, "top1": top1, "kv_bytes": kv_bytes, "prediction": prediction, "seconds": round(seconds, 2),
    }


def kvpress_press(name: str, budget: float, window: int):
    """A kvpress press removing 1 − budget of the context: its reference defaults, SnapKV's window
    set to kvsim's presets' 32 and StreamingLLM's 4 sinks so the two libraries' SnapKV/streaming rows compare."""
    import kvpress

    ratio = round(1.0 - budget, 6)
    presses = {
        "snapkv": lambda: kvpress.SnapKVPress(compression_ratio=ratio, window_size=window),
        "pyramidkv": lambda: kvpress.PyramidKVPress(compression_ratio=ratio, window_size=window),
        "knorm": lambda: kvpress.KnormPress(compression_ratio=ratio),
        "streaming_llm": lambda: kvpress.StreamingLLMPress(compression_ratio=ratio, n_sink=4),
        "tova": lambda: kvpress.TOVAPress(compression_ratio=ratio),
        "expected_attention": lambda: kvpress.ExpectedAttentionPress(compression_ratio=ratio),
        "keydiff": lambda: kvpress.KeyDiffPress(compression_ratio=ratio),
    }
    return presses[name]()


@torch.inference_mode()
def kvpress_row(loaded: LoadedModel, traceset: TraceSet, sample: TraceSample, name: str, press, budget: float) -> dict:
    """kvpress's query-agnostic pipeline on one sample: the press compresses the context prefill; the
    question and the greedy answer follow with explicit positions (the cache is shorter than the
    sequence); fidelity is measured on the stored full-cache continuation like kvsim's rows."""
    started = time.perf_counter()
    model, ids, start = loaded.model, sample.input_ids, sample.prompt_len
    previous = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        cache = DynamicCache(config=model.config)
        with press(model):
            first = model(ids[None, :start], past_key_values=cache, logits_to_keep=1).logits[0]
        kv_bytes = sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size() for layer in cache.layers)
        rest = ids[start : sample.total_len - 1]
        positions = torch.arange(start, start + rest.numel())[None]
        teacher = model(rest[None], past_key_values=copy.deepcopy(cache), position_ids=positions).logits[0]
        reference = sample.tensors["continuation.topk_ids"], sample.tensors["continuation.topk_logprobs"].float()
        kl, top1 = fidelity(torch.cat([first, teacher]), *reference)
        question = ids[start : sample.full_prompt_len]
        position = start + question.numel()
        logits = model(question[None], past_key_values=cache, position_ids=torch.arange(start, position)[None]).logits[0]
        generated, eos = [int(logits[-1].argmax())], eos_token_ids(loaded)
        while generated[-1] not in eos and len(generated) < traceset.meta["max_new_tokens"]:
            logits = model(torch.tensor([[generated[-1]]]), past_key_values=cache, position_ids=torch.tensor([[position]])).logits[0]
            generated.append(int(logits[-1].argmax()))
            position += 1
    finally:
        model.set_attn_implementation(previous)
    prediction = loaded.tokenizer.decode(generated, skip_special_tokens=True)
    task_score = score(prediction, sample.answers, sample.scoring)
    return row(sample, f"kvpress:{name}", "kvpress", budget, prediction, task_score, kl, top1, kv_bytes, time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------
# Statistics


def bootstrap_mean_ci(values: list[float], resamples: int, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean over samples (a single sample: its value)."""
    if len(values) < 2:
        return values[0], values[0]
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(resamples))
    return means[int(0.025 * resamples)], means[min(resamples - 1, int(0.975 * resamples))]


def summarize(rows: list[dict], modes: list[str], budgets: list[float], resamples: int) -> list[dict]:
    """Mean and CI per (mode, budget, policy); the full cache, run once per sample, is repeated per budget."""
    out = []
    for mode in modes:
        for budget in budgets:
            group: dict[str, list[dict]] = {}
            for r in rows:
                if r["mode"] == mode and (r["budget"] == budget or r["kind"] == FULL):
                    group.setdefault(r["policy"], []).append(r)
            for policy, members in group.items():
                scores = [r["score"] for r in members]
                low, high = bootstrap_mean_ci(scores, resamples)
                out.append({
                    "mode": mode, "budget": budget, "policy": policy, "kind": members[0]["kind"], "samples": len(members),
                    "score": statistics.fmean(scores), "score_ci": [low, high],
                    "kl": statistics.fmean(r["kl"] for r in members), "top1": statistics.fmean(r["top1"] for r in members),
                    "kv_mib": statistics.fmean(r["kv_bytes"] for r in members) / 2**20,
                    "per_sample": {r["sample_id"]: r["score"] for r in members},
                })
    return out


def verdict(winner: dict, rival: dict | None, resamples: int) -> dict | None:
    """Does the winner beat `rival`? By the overlap of the two intervals, with the paired difference beside it."""
    if rival is None:
        return None
    (w_low, w_high), (r_low, r_high) = winner["score_ci"], rival["score_ci"]
    if w_low > r_high:
        word = "yes"
    elif w_high < r_low:
        word = "no"
    else:
        word = "within CI"
    shared = sorted(set(winner["per_sample"]) & set(rival["per_sample"]))
    diffs = [winner["per_sample"][s] - rival["per_sample"][s] for s in shared]
    low, high = bootstrap_mean_ci(diffs, resamples, seed=1)
    return {"rival": rival["policy"], "verdict": word, "difference": statistics.fmean(diffs), "difference_ci": [low, high]}


def best(stats: list[dict]) -> dict | None:
    return min(stats, key=lambda s: (-s["score"], s["kl"])) if stats else None


def comparisons(summary: list[dict], modes: list[str], budgets: list[float], resamples: int) -> list[dict]:
    out = []
    for mode in modes:
        for budget in budgets:
            here = [s for s in summary if s["mode"] == mode and s["budget"] == budget]
            winner = next((s for s in here if s["kind"] == SEARCHED), None)
            if winner is None:  # no sample of this mode was run (deadline)
                continue
            best_preset = best([s for s in here if s["kind"] == "preset"])
            best_press = best([s for s in here if s["kind"] == "kvpress"])
            out.append({
                "mode": mode, "budget": budget, "winner_score": winner["score"], "winner_ci": winner["score_ci"],
                "vs_best_preset": verdict(winner, best_preset, resamples), "best_preset_ci": best_preset and best_preset["score_ci"],
                "best_preset_score": best_preset and best_preset["score"],
                "vs_best_kvpress": verdict(winner, best_press, resamples), "best_kvpress_score": best_press and best_press["score"],
                "best_kvpress_ci": best_press and best_press["score_ci"],
            })
    return out


# ---------------------------------------------------------------------------------------------
# Outputs


def ci_text(mean: float, ci: list[float]) -> str:
    return f"{mean:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def verdict_text(v: dict | None) -> str:
    if v is None:
        return "–"
    return f"{v['verdict']} vs {v['rival']} (Δ {v['difference']:+.2f} [{v['difference_ci'][0]:+.2f}, {v['difference_ci'][1]:+.2f}])"


def write_markdown(path: Path, result: dict) -> None:
    s = result["settings"]
    lines = [
        f"# Searched policy vs presets, live, on a held-out workload — {s['label']} run",
        "",
        f"**{s['label']} run** with exactly: `{result['command']}`. Wall time {result['wall_s'] / 60:.1f} min; load average at "
        f"start/end {result['machine']['load_average']['start'][0]:.2f} / {result['machine']['load_average']['end'][0]:.2f} on "
        f"{result['machine']['cpu_count']} cores.",
        "",
        f"Search: workload `{s['search_workload']}` seed {s['search_seed']}, {s['search_samples']} samples, {s['trials']} trials per "
        f"(mode, budget), the exact tier's answer log-likelihood (the proxy prunes), re-ranked on validation samples. Held-out (live): workload `{s['heldout_workload']}` seed {s['heldout_seed']}, "
        f"{s['heldout_samples']} samples per mode (families never searched: {', '.join(result['unseen_families'])}), "
        f"~{s['context_tokens']}-token contexts, bundled model. Budgets: {', '.join(f'{b:g}' for b in s['budgets'])} of the "
        "compressed prompt (sinks and windows inside the budget). Score: task score with 95 % bootstrap CI over samples; "
        "KL: mean KL(full ‖ policy) over the stored full-cache continuation (nats, top-20 lower bound); top-1: agreement with the "
        "full cache's next token. kvpress presses (compression_ratio = 1 − budget) run query-agnostic only.",
        "",
        "## Does the searched winner beat the best preset?",
        "",
        "Verdict by overlap of the 95 % CIs (yes/no only when disjoint); Δ is the paired mean difference in score over the same "
        "samples with its bootstrap CI.",
        "",
        "| mode | budget | winner score | best preset score | vs best preset | best kvpress score | vs best kvpress |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in result["comparisons"]:
        preset = ci_text(c["best_preset_score"], c["best_preset_ci"]) if c["best_preset_ci"] else "–"
        press = ci_text(c["best_kvpress_score"], c["best_kvpress_ci"]) if c["best_kvpress_ci"] else "–"
        lines.append(f"| {c['mode']} | {c['budget']:g} | {ci_text(c['winner_score'], c['winner_ci'])} | {preset} | "
                     f"{verdict_text(c['vs_best_preset'])} | {press} | {verdict_text(c['vs_best_kvpress'])} |")
    for mode in s["modes"]:
        lines += ["", f"## {mode}", "", "| budget | policy | kind | n | score [95 % CI] | KL | top-1 | KV MiB |", "|---|---|---|---|---|---|---|---|"]
        for st in sorted((x for x in result["summary"] if x["mode"] == mode), key=lambda x: (x["budget"], x["kind"] != FULL, -x["score"], x["kl"])):
            lines.append(f"| {st['budget']:g} | {st['policy']} | {st['kind']} | {st['samples']} | {ci_text(st['score'], st['score_ci'])} | "
                         f"{st['kl']:.3f} | {st['top1']:.2f} | {st['kv_mib']:.2f} |")
    lines += ["", "## Searched winners", ""]
    for key, w in result["winners"].items():
        same = [name for name, preset in PRESETS.items() if {**preset.to_spec(), "name": None} == {**w["spec"], "name": None}]
        twin = f" — the same policy as preset `{same[0]}`" if same else ""
        lines.append(f"- {key}: answer log-lik. {w['validation']['answer_logprob']:.3f} on validation samples, trials {w['trials']}{twin}, spec `{json.dumps(w['spec'], separators=(',', ':'))}`")
    if result["notes"]:
        lines += ["", "## Notes", "", *(f"- {note}" for note in result["notes"])]
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, result: dict) -> None:
    """Score and KL against budget per mode: winner, best presets and full cache drawn bold, the rest thin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = result["settings"]["modes"]
    fig, axes = plt.subplots(2, len(modes), figsize=(6.5 * len(modes), 8), squeeze=False)
    for col, mode in enumerate(modes):
        stats = [s for s in result["summary"] if s["mode"] == mode]
        policies = sorted({s["policy"] for s in stats})
        highlighted = {SEARCHED, FULL} | {c["vs_best_preset"]["rival"] for c in result["comparisons"] if c["mode"] == mode and c["vs_best_preset"]}
        for policy in policies:
            series = sorted((s for s in stats if s["policy"] == policy), key=lambda s: s["budget"])
            budgets = [s["budget"] for s in series]
            bold = policy in highlighted
            style = {"linewidth": 2.2 if bold else 0.8, "alpha": 1.0 if bold else 0.45, "label": policy,
                     "linestyle": "--" if series[0]["kind"] == "kvpress" else "-", "marker": "o" if bold else None}
            line = axes[0][col].plot(budgets, [s["score"] for s in series], **style)[0]
            if bold:
                axes[0][col].fill_between(budgets, [s["score_ci"][0] for s in series], [s["score_ci"][1] for s in series], color=line.get_color(), alpha=0.12)
            axes[1][col].plot(budgets, [s["kl"] for s in series], **style)
        axes[0][col].set_title(f"{mode}: task score (95 % CI shaded for bold lines)")
        axes[1][col].set_title(f"{mode}: KL to the full cache (nats)")
        budgets = result["settings"]["budgets"]
        for row_axes in axes:
            row_axes[col].set_xscale("log")
            row_axes[col].set_xticks(budgets, [f"{b:g}" for b in budgets])
            row_axes[col].minorticks_off()
            row_axes[col].set_xlabel("budget (fraction of the prompt)")
        axes[1][col].set_ylim(bottom=0)
        axes[0][col].legend(fontsize=6, ncol=2)
    fig.suptitle(f"kvsim quality ({result['settings']['label']} run): searched winner vs presets, held-out workload", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", default="full", help="written into the results: 'full', 'reduced', 'smoke'")
    parser.add_argument("--budgets", default="0.02,0.05,0.1,0.2")
    parser.add_argument("--modes", default="query-aware,query-agnostic")
    parser.add_argument("--search-workload", default="default")
    parser.add_argument("--search-samples", type=int, default=12)
    parser.add_argument("--search-seed", type=int, default=0)
    parser.add_argument("--trials", type=int, default=60, help="search trials per (mode, budget)")
    parser.add_argument("--heldout-workload", default="passkey,multivalue")
    parser.add_argument("--heldout-samples", type=int, default=4, help="held-out samples run live per mode")
    parser.add_argument("--heldout-seed", type=int, default=1)
    parser.add_argument("--context-tokens", type=int, default=1500)
    parser.add_argument("--max-new-tokens", type=int, default=16, help="answer cap (every live run decodes up to this)")
    parser.add_argument("--presets", default="all", help="'all' or a comma-separated list (the full cache always runs)")
    parser.add_argument("--kvpress-presses", default=",".join(KVPRESS_PRESSES), help="empty to skip kvpress")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the CIs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default="runs/quality", help="captured traces and searches, reused by a re-run")
    parser.add_argument("--deadline-min", type=float, default=None,
                        help="start no further held-out sample after this many minutes (results cover the samples finished)")
    args = parser.parse_args()
    started = time.perf_counter()
    load_at_start = os.getloadavg()
    torch.set_num_threads(args.threads)
    budgets, modes = floats(args.budgets), names(args.modes)
    search_families = set(DEFAULT_MIX if args.search_workload == "default" else names(args.search_workload))
    unseen = sorted(set(names(args.heldout_workload)) - search_families)
    if not unseen or args.heldout_seed == args.search_seed:
        parser.error("the held-out workload needs another seed and at least one task family the search workload lacks")
    presets = [p for name, p in PRESETS.items() if name != FULL and (args.presets == "all" or name in names(args.presets))]
    notes: list[str] = []

    loaded = load_model(DEFAULT_MODEL)
    work = Path(args.workdir)
    search_traces = capture(loaded, args.search_workload, args.search_samples, args.search_seed, work / f"search-{args.search_workload}-s{args.search_seed}", args, notes)
    heldout = capture(loaded, args.heldout_workload, args.heldout_samples, args.heldout_seed, work / f"heldout-{args.heldout_workload}-s{args.heldout_seed}", args, notes)
    check_model_matches(loaded, heldout)
    log(f"traces ready ({time.perf_counter() - started:.0f} s)")

    winners, winner_info = {}, {}
    for mode in modes:
        for budget in budgets:
            winners[(mode, budget)], winner_info[f"{mode} @ {budget:g}"] = searched_winner(search_traces.root, mode, budget, args, notes, loaded)
    log(f"searches ready ({time.perf_counter() - started:.0f} s)")

    rows: list[dict] = []
    pressed: list[TraceSample] = []
    for mode in modes:
        for sample in select_samples(heldout, mode, args.heldout_samples):
            if args.deadline_min is not None and time.perf_counter() - started > 60 * args.deadline_min:
                notes.append(f"deadline of {args.deadline_min:g} min reached: {mode} sample {sample.sample_id} and later ones not run")
                log(notes[-1])
                continue
            rows += live_rows(loaded, heldout, sample, presets, winners, budgets)
            log(f"{mode} {sample.sample_id}: kvsim policies done ({time.perf_counter() - started:.0f} s)")
            if mode == "query-agnostic":
                pressed.append(sample)

    # kvpress patches transformers' attention functions when imported, and its wrapper passes `dropout`
    # positionally where kvsim_live takes `scaling`: so it is imported only after every kvsim run.
    press_names = names(args.kvpress_presses)
    if press_names and pressed and importlib.util.find_spec("kvpress") is None:
        notes.append("kvpress is not installed here: no kvpress rows")
        press_names = []
    for sample in pressed if press_names else []:
        for budget in budgets:
            for name in press_names:
                try:
                    rows.append(kvpress_row(loaded, heldout, sample, name, kvpress_press(name, budget, 32), budget))
                except Exception as err:  # a press that fails on this model/transformers is reported, not fatal
                    note = f"kvpress {name} at {budget:g} failed: {type(err).__name__}: {err}"
                    if note not in notes:
                        notes.append(note)
                        log(note)
        log(f"query-agnostic {sample.sample_id}: kvpress done ({time.perf_counter() - started:.0f} s)")

    summary = summarize(rows, modes, budgets, args.bootstrap)
    result = {
        "command": "PYTHONPATH=src .venv/bin/python bench/quality.py " + " ".join(sys.argv[1:]),
        "settings": {**vars(args), "budgets": budgets, "modes": modes},
        "unseen_families": unseen,
        "wall_s": time.perf_counter() - started,
        "comparisons": comparisons(summary, modes, budgets, args.bootstrap),
        "summary": summary,
        "winners": winner_info,
        "notes": notes,
        "rows": rows,
        "machine": machine_info(load_at_start),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(RESULTS / "quality.md", result)
    plot(RESULTS / "quality.png", result)
    for c in result["comparisons"]:
        print(f"{c['mode']:>15} @ {c['budget']:g}: winner {ci_text(c['winner_score'], c['winner_ci'])}; "
              f"{verdict_text(c['vs_best_preset'])}; kvpress: {verdict_text(c['vs_best_kvpress'])}")
    log(f"results: {RESULTS / 'quality.md'} ({result['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
