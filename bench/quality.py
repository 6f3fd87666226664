"""Benchmark: does the searched policy beat the published presets live, on a workload search never saw?

The evidence run of issue 11. A winner is searched per (mode, budget) with `kvsim.search.search`
(exact tier: the proxy screens, the real model ranks by answer log-likelihood; the best trials are
re-ranked on validation samples) on the search traces (default workload: passkey, multikey,
variable_tracking; seed 0). Everything is then run live on a held-out workload with another seed
and at least one task family the search never saw (default: passkey, multivalue; seed 1): the
full cache, every prefill-once preset and the searched winner at each budget (a fraction of the
prompt, the one budget rule of kvsim.policies.budget), in both evaluation modes. Where kvpress is
installed (`make test-kvpress` builds `.venv-kvpress`; run this script with its python) its
presses run at the same compression (compression_ratio = 1 − budget), query-agnostic only, the
way kvpress's pipeline runs them: press active during the context prefill, then the question with
the press inactive. So kvpress rows appear in the query-agnostic table alone (like with like).

Per (mode, budget, policy): the answer log-likelihood (mean log-probability of the reference
answer's tokens, teacher-forced after the question: task-linked and continuous), the task score of
a greedy answer (the workload's own rule, in [0, 1]), fidelity to the full cache on its stored
continuation (mean KL, nats, top-20 lower bound; top-1 agreement) and KV bytes held. The verdict
per (mode, budget) is `kvsim.search.compare`'s, the one the search report gives: the paired
bootstrap interval (same samples) of the winner's answer log-likelihood minus the best preset's
(the preset of the highest mean); "beats" when it lies above zero. Beside it: whether the
winner's task score falls below the best preset's 95 % interval. Query-agnostic rows also compare
the winner with the best kvpress press. Budgets are reported one by one, never pooled.

Cost on this 2-core machine: one live run of a prefill-once policy on a ~1.5K-token prompt takes
1-3 s (teacher-forced continuation and answer, then a greedy answer of up to --max-new-tokens),
after one prefill per sample shared by every policy; a kvpress press re-runs the context prefill.
--deadline-min stops starting samples in time (a sample in flight finishes; the results say which
samples were skipped). Samples alternate between modes so a deadline leaves both modes covered.
Captured traces and finished searches are kept under --workdir and reused by a re-run (the results
note what was reused). The committed run's exact command is in bench/results/quality.md.

Results: bench/results/quality.md, quality.json and quality.png (the --label is written into them).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import polars as pl
import torch
from transformers import DynamicCache

from machine import machine_info  # bench/machine.py (the script's folder is on sys.path)
from kvsim.live.runner import LiveSample, fidelity, reference_answer_ids
from kvsim.live.validate import check_model_matches
from kvsim.policies import PRESETS, Budget
from kvsim.policies.policy import Policy
from kvsim.policies.schedules import PrefillOnce
from kvsim.search import SearchSettings, search
from kvsim.search.compare import Comparison, against_best_preset, bootstrap_ci, compare_with_presets, summary_line
from kvsim.traces.capture import CaptureSettings, capture_traceset
from kvsim.traces.models import DEFAULT_MODEL, LoadedModel, eos_token_ids, load_model
from kvsim.traces.store import FORMAT_VERSION, TraceSample, TraceSet
from kvsim.traces.workloads import DEFAULT_MIX, Haystack, build_workload, score

RESULTS = Path(__file__).parent / "results"
SEARCHED = "searched"
FULL = "full"
KVPRESS = "kvpress:"
KVPRESS_PRESSES = ("snapkv", "knorm", "tova", "streaming_llm", "expected_attention", "adakv_expected_attention")
METRICS = ("answer_logprob", "score", "kl", "top1")


# ---------------------------------------------------------------------------------------------
# Traces and searches (cached under --workdir)


def capture(loaded: LoadedModel, spec: str, n: int, seed: int, out: Path, args, notes: list[str], kvzip: bool) -> TraceSet:
    """The TraceSet of `n` samples of `spec` in both modes (resumed when `out` already holds it)."""
    count = lambda text: len(loaded.tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    haystack = Haystack.default()
    samples = build_workload(spec, n, seed=seed, context_tokens=args.context_tokens, count_tokens=count, haystack=haystack)
    # The same workload record as `kvsim capture`, so a CLI capture into the same folder is resumed too.
    workload = {"spec": spec, "seed": seed, "context_tokens": args.context_tokens, "haystack": haystack.source, "haystack_sha256": haystack.sha256}
    settings = CaptureSettings(max_new_tokens=args.max_new_tokens, modes=("query-aware", "query-agnostic"), kvzip=kvzip)
    reused = []

    def report(event: str, sample) -> None:
        if event == "captured":
            log(f"captured {spec} {sample.sample_id}")
        elif event == "skipped":
            reused.append(sample.sample_id)

    earlier = TraceSet.open(out) if (out / "manifest.parquet").exists() else None
    if earlier is not None and earlier.meta["format_version"] < FORMAT_VERSION:
        # An earlier format's TraceSet (no stored continuation attention) serves the live runs as it
        # is: they read the prompt, the continuation and its stored top-k, which every format holds.
        if all(len(list(earlier.samples(mode))) >= n for mode in settings.modes):
            notes.append(f"{out} (format {earlier.meta['format_version']}) was captured earlier and reused as it is")
            return earlier
    traceset = capture_traceset(loaded, samples, out, settings, workload, report)
    if reused:
        notes.append(f"{len(reused)} of {n} samples of {spec} (seed {seed}) were already captured in {out} and reused: their capture time is not in the wall time")
    return traceset


def searched_winner(traces: Path, mode: str, budget: float, args, notes: list[str], loaded: LoadedModel) -> tuple[Policy, dict]:
    """The winner of a `kvsim search` at `budget` in `mode`, renamed `searched`. The search's own
    test split is empty: this bench's test is the held-out workload. Kept in RUNDIR/winner.json."""
    rundir = Path(args.workdir) / f"search-{mode}-{budget:g}-t{args.trials}"
    saved = rundir / "winner.json"
    if saved.exists():
        notes.append(f"search {rundir.name} was already complete and reused: its time is not in the wall time")
        info = json.loads(saved.read_text())
    else:
        shutil.rmtree(rundir, ignore_errors=True)  # an interrupted run: start its study over
        started = time.perf_counter()
        settings = SearchSettings(traces=traces, budget=Budget(budget), rundir=rundir, trials=args.trials, workers=args.workers, prefill_only=True,
                                  study=f"quality-{mode}-{budget:g}", mode=mode, validation=args.validation, test=0.0)
        summary = search(settings, loaded=loaded).summary()
        best = summary["top"][0]
        trials = pl.read_parquet(rundir / "trials.parquet")
        info = {"rundir": str(rundir), "name": best["name"], "spec": json.loads((rundir / best["spec"]).read_text())["policy"],
                "search_value": best["search_value"], "validation": best["validation"], "trials": summary["trials"],
                "scored_exactly": int((trials["tier"] == "exact").sum()), "seconds": round(time.perf_counter() - started),
                "search_samples": summary["samples"]["search"], "validation_samples": summary["samples"]["validation"],
                "best_preset_on_validation": max((p for p in summary["presets"] if p["name"] != FULL), key=lambda p: p["validation"]["answer_logprob"])["name"]}
        saved.write_text(json.dumps(info, indent=2) + "\n")
        log(f"searched {mode} at {budget:g}: {args.trials} trials in {info['seconds']} s, winner {info['name']}, "
            f"answer log-lik. {info['validation']['answer_logprob']:.3f} on validation samples")
        torch.set_num_threads(args.threads)  # the search sets one thread per process
    return replace(Policy.from_spec(info["spec"]), name=SEARCHED), info


# ---------------------------------------------------------------------------------------------
# Live runs


def live_rows(loaded: LoadedModel, traceset: TraceSet, sample: TraceSample, presets: list[Policy], winners: dict, budgets: list[float],
              earlier: list[dict], recheck: bool) -> list[dict]:
    """One prefill of `sample`, then the full cache once and every preset and the winner per budget.

    `earlier`: this sample's rows from an earlier run of this script (--reuse-rows). Its preset and
    kvpress rows are kept instead of re-run, since they do not depend on the search; the full cache
    and the winners always run. The full cache must reproduce its earlier row, and with `recheck`
    every preset must too, so a change of code since the earlier run stops the bench instead of
    mixing two versions in one table."""
    policies = [PRESETS[FULL], *presets, *(winners[(sample.mode, b)] for b in budgets)]
    kvzip = any(policy.requirements() for policy in policies)
    live = LiveSample(loaded, traceset, sample, max(max(p.observation_window for p in policies), 1), kvzip)
    kept = {(r["policy"], r["budget"]): r for r in earlier if r["kind"] != SEARCHED}
    runs = [(PRESETS[FULL], None)] + [(policy, b) for b in budgets for policy in [*presets, winners[(sample.mode, b)]]]
    rows = [r for r in earlier if r["kind"] == "kvpress"]
    for policy, budget in runs:
        kind = FULL if budget is None else SEARCHED if policy.name == SEARCHED else "preset"
        before = kept.get((policy.name, budget))
        if before is not None and kind == "preset" and not recheck:
            rows.append(before)
            continue
        started = time.perf_counter()
        outcome = live.run(policy, Budget(budget if budget is not None else budgets[0]))
        rows.append(row(sample, policy.name, kind, budget, outcome.prediction, outcome.score, outcome.answer_logprob,
                        outcome.kl, outcome.top1, outcome.kv_bytes, time.perf_counter() - started))
        if before is not None and not same_outcome(before, rows[-1]):
            raise SystemExit(f"error: {policy.name} at budget {budget} on {sample.mode} {sample.sample_id} no longer reproduces the rows passed to "
                             "--reuse-rows (the code changed since): run without --reuse-rows")
    return rows


def same_outcome(before: dict, now: dict) -> bool:
    """Whether a re-run reproduces a row: same answer, metrics within 1e-4 (the CPU runs are deterministic)."""
    close = all(abs(before[m] - now[m]) <= 1e-4 for m in ("answer_logprob", "kl", "top1", "score"))
    return close and before["prediction"] == now["prediction"] and before["kv_bytes"] == now["kv_bytes"]


def row(sample: TraceSample, policy: str, kind: str, budget: float | None, prediction: str, task_score: float,
        answer_logprob: float, kl: float, top1: float, kv_bytes: int, seconds: float) -> dict:
    return {
        "sample_id": sample.sample_id, "task": sample.task, "mode": sample.mode, "policy": policy, "kind": kind, "budget": budget,
        "score": task_score, "answer_logprob": answer_logprob, "kl": kl, "top1": top1, "kv_bytes": kv_bytes,
        "prediction": prediction, "seconds": round(seconds, 2),
    }


def kvpress_press(name: str, budget: float, window: int):
    """A kvpress press removing 1 − budget of the context: its reference defaults, SnapKV's window
    set to kvsim's presets' 32 and StreamingLLM's 4 sinks so the two libraries' rows compare."""
    import kvpress

    ratio = round(1.0 - budget, 6)
    presses = {
        "snapkv": lambda: kvpress.SnapKVPress(compression_ratio=ratio, window_size=window),
        "knorm": lambda: kvpress.KnormPress(compression_ratio=ratio),
        "streaming_llm": lambda: kvpress.StreamingLLMPress(compression_ratio=ratio, n_sink=4),
        "tova": lambda: kvpress.TOVAPress(compression_ratio=ratio),
        "expected_attention": lambda: kvpress.ExpectedAttentionPress(compression_ratio=ratio),
        "adakv_expected_attention": lambda: kvpress.AdaKVPress(kvpress.ExpectedAttentionPress(compression_ratio=ratio)),
        "keydiff": lambda: kvpress.KeyDiffPress(compression_ratio=ratio),
    }
    return presses[name]()


@torch.inference_mode()
def kvpress_row(loaded: LoadedModel, traceset: TraceSet, sample: TraceSample, name: str, press, budget: float) -> dict:
    """kvpress's query-agnostic pipeline on one sample: the press compresses the context prefill; the
    question, the reference answer (teacher-forced) and a greedy answer follow with explicit
    positions (the cache is shorter than the sequence); fidelity is measured on the stored
    full-cache continuation like kvsim's rows."""
    started = time.perf_counter()
    model, ids, start = loaded.model, sample.input_ids, sample.prompt_len
    previous = model.config._attn_implementation
    model.set_attn_implementation("sdpa")

    def forward(tokens: torch.Tensor, at: int, cache: DynamicCache) -> torch.Tensor:
        return model(tokens[None], past_key_values=cache, position_ids=torch.arange(at, at + tokens.numel())[None]).logits[0]

    try:
        cache = DynamicCache(config=model.config)
        with press(model):
            first = model(ids[None, :start], past_key_values=cache, logits_to_keep=1).logits[0]
        kv_bytes = sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size() for layer in cache.layers)
        teacher = forward(ids[start : sample.total_len - 1], start, copy.deepcopy(cache))
        reference = sample.tensors["continuation.topk_ids"], sample.tensors["continuation.topk_logprobs"].float()
        kl, top1 = fidelity(torch.cat([first, teacher]), *reference)
        question, answer = ids[start : sample.full_prompt_len], reference_answer_ids(loaded.tokenizer, sample)
        forced = forward(torch.cat([question, answer[:-1]]), start, copy.deepcopy(cache))[-answer.numel() :].float()
        answer_logprob = float(torch.log_softmax(forced, -1).gather(1, answer[:, None]).mean())
        logits = forward(question, start, cache)
        position = start + question.numel()
        generated, eos = [int(logits[-1].argmax())], eos_token_ids(loaded)
        while generated[-1] not in eos and len(generated) < traceset.meta["max_new_tokens"]:
            logits = forward(torch.tensor([generated[-1]]), position, cache)
            generated.append(int(logits[-1].argmax()))
            position += 1
    finally:
        model.set_attn_implementation(previous)
        for module in model.modules():  # head-wise presses (AdaKV) leave their masks for the next decode: clear them
            if getattr(module, "masked_key_indices", None) is not None:
                module.masked_key_indices = None
    prediction = loaded.tokenizer.decode(generated, skip_special_tokens=True)
    task_score = score(prediction, sample.answers, sample.scoring)
    return row(sample, KVPRESS + name, "kvpress", budget, prediction, task_score, answer_logprob, kl, top1, kv_bytes, time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------
# Statistics: per (mode, budget), never pooled


def at_budgets(rows: list[dict], mode: str, budgets: list[float]) -> pl.DataFrame:
    """The mode's rows with a `budget` label per budget; the full cache, run once per sample, is
    repeated at every budget."""
    out = []
    for r in rows:
        if r["mode"] == mode:
            out += [{**r, "budget": f"{b:g}"} for b in budgets] if r["kind"] == FULL else [{**r, "budget": f"{r['budget']:g}"}]
    return pl.DataFrame(out)


def summarize(table: pl.DataFrame) -> list[dict]:
    """Per (budget, policy): n, mean and 95 % bootstrap interval of the answer log-likelihood and
    task score, mean KL, top-1 and KV MiB."""
    out = []
    for (budget, policy), group in table.group_by(["budget", "policy"], maintain_order=True):
        entry = {"budget": budget, "policy": policy, "kind": group["kind"][0], "samples": group.height,
                 "kl": group["kl"].mean(), "top1": group["top1"].mean(), "kv_mib": group["kv_bytes"].mean() / 2**20}
        for metric in ("answer_logprob", "score"):
            entry[metric], low, high = bootstrap_ci(group[metric].to_list())
            entry[f"{metric}_ci"] = [low, high]
        out.append(entry)
    return out


def verdicts(table: pl.DataFrame, summary: list[dict]) -> list[dict]:
    """Per budget: the winner against the best kvsim preset and the best kvpress press."""
    comparisons = compare_with_presets(table.filter(pl.col("kind") != FULL), SEARCHED)
    presets = against_best_preset([c for c in comparisons if not c.preset.startswith(KVPRESS)])
    presses = against_best_preset([c for c in comparisons if c.preset.startswith(KVPRESS)])
    out = []
    for budget, versus in presets.items():
        rival = next(s for s in summary if s["budget"] == budget and s["policy"] == versus.preset)
        out.append({
            "budget": budget, "vs_best_preset": comparison_json(versus), "summary_line": summary_line(versus),
            # The task-score part of the target: the winner's mean not below the best preset's interval.
            "score_below_best_preset_ci": versus.winner_means["score"] < rival["score_ci"][0],
            "vs_best_kvpress": comparison_json(presses[budget]) if budget in presses else None,
        })
    return out


def comparison_json(c: Comparison) -> dict:
    return {"rival": c.preset, "verdict": c.verdict, "samples": c.samples, "differences": c.differences,
            "winner_means": c.winner_means, "rival_means": c.preset_means}


# ---------------------------------------------------------------------------------------------
# Outputs


def ci_text(mean: float, ci: list[float], digits: int = 2) -> str:
    return f"{mean:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def verdict_text(v: dict | None) -> str:
    if v is None:
        return "–"
    mean, low, high = v["differences"]["answer_logprob"]
    return f"{v['verdict']} {v['rival']}: Δ {mean:+.3f} [{low:+.3f}, {high:+.3f}]"


def write_markdown(path: Path, result: dict) -> None:
    s = result["settings"]
    lines = [
        f"# Searched policy vs presets, live, on a held-out workload — {s['label']} run",
        "",
        f"**{s['label']} run** with exactly: `{result['command']}`. Wall time {result['wall_s'] / 60:.1f} min; load average at "
        f"start/end {result['machine']['load_average']['start'][0]:.2f} / {result['machine']['load_average']['end'][0]:.2f} on "
        f"{result['machine']['cpu_count']} cores.",
        "",
        f"Search: workload `{s['search_workload']}` seed {s['search_seed']}, {s['search_samples']} samples "
        f"({1 - s['validation']:.0%} search, {s['validation']:.0%} validation), {s['trials']} trials per (mode, budget), "
        "the exact tier's answer log-likelihood (the proxy screens within a scorer family), the best re-ranked on the "
        f"validation samples. Held-out (live): workload `{s['heldout_workload']}` seed {s['heldout_seed']}, up to "
        f"{s['heldout_samples']} samples per mode (families never searched: {', '.join(result['unseen_families'])}), "
        f"~{s['context_tokens']}-token contexts, bundled model. Budgets: {', '.join(f'{b:g}' for b in s['budgets'])} of the "
        "compressed prompt. **Answer log-lik.**: mean log-probability of the reference answer's tokens, teacher-forced after "
        "the question (higher is better); score: task score of the greedy answer; both with 95 % bootstrap intervals over "
        "samples. KL: mean KL(full ‖ policy) over the stored full-cache continuation (nats, top-20 lower bound); top-1: "
        "agreement with the full cache's next token. kvpress presses (compression_ratio = 1 − budget) run query-agnostic only.",
        "",
        "## Does the searched winner beat the best preset?",
        "",
        "Δ: the paired mean difference winner − rival in answer log-likelihood over the same samples, with its 95 % bootstrap "
        "interval; **beats** when the interval lies above zero. Task score: winner vs the best preset's mean [95 % CI].",
        "",
        "| mode | budget | n | vs best preset | task score winner / best preset | vs best kvpress press |",
        "|---|---|---|---|---|---|",
    ]
    for mode, entries in result["verdicts"].items():
        for v in entries:
            best = v["vs_best_preset"]
            rival = next(x for x in result["summary"][mode] if x["budget"] == v["budget"] and x["policy"] == best["rival"])
            flag = " (below its CI)" if v["score_below_best_preset_ci"] else ""
            lines.append(f"| {mode} | {v['budget']} | {best['samples']} | {verdict_text(best)} | "
                         f"{best['winner_means']['score']:.2f} / {ci_text(rival['score'], rival['score_ci'])}{flag} | {verdict_text(v['vs_best_kvpress'])} |")
    lines += ["", "In words:", "", *(f"- {mode}, {v['summary_line']}" for mode, entries in result["verdicts"].items() for v in entries)]
    for mode in s["modes"]:
        lines += ["", f"## {mode}", "", "| budget | policy | kind | n | answer log-lik. [95 % CI] | score [95 % CI] | KL | top-1 | KV MiB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for st in sorted(result["summary"].get(mode, []), key=lambda x: (float(x["budget"]), x["kind"] != FULL, -x["answer_logprob"])):
            lines.append(f"| {st['budget']} | {st['policy']} | {st['kind']} | {st['samples']} | {ci_text(st['answer_logprob'], st['answer_logprob_ci'], 3)} | "
                         f"{ci_text(st['score'], st['score_ci'])} | {st['kl']:.3f} | {st['top1']:.2f} | {st['kv_mib']:.2f} |")
    lines += ["", "## Searched winners", ""]
    for key, w in result["winners"].items():
        same = [name for name, preset in PRESETS.items() if preset.decision_key() == Policy.from_spec(w["spec"]).decision_key()]
        twin = f" — the same policy as preset `{same[0]}`" if same else ""
        lines.append(f"- {key}: `{w['name']}`{twin}; answer log-lik. {w['validation']['answer_logprob']:.3f} on {len(w['validation_samples'])} "
                     f"validation samples (best preset there: {w['best_preset_on_validation']}); {w['scored_exactly']} of the trials scored "
                     f"by the model, {w['seconds']} s; spec `{json.dumps(w['spec'], separators=(',', ':'))}`")
    if result["notes"]:
        lines += ["", "## Notes", "", *(f"- {note}" for note in result["notes"])]
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, result: dict) -> None:
    """Answer log-likelihood and task score against budget per mode: winner, best presets and full
    cache bold with their intervals shaded, the rest thin; kvpress dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = result["settings"]["modes"]
    fig, axes = plt.subplots(2, len(modes), figsize=(6.2 * len(modes), 7.5), squeeze=False)
    # One colour per policy across every panel (kvpress's presses appear in one mode only).
    palette = [*matplotlib.colormaps["tab10"].colors[1:], *matplotlib.colormaps["Dark2"].colors, *matplotlib.colormaps["Set1"].colors]
    names = sorted({s["policy"] for stats in result["summary"].values() for s in stats} - {SEARCHED, FULL})
    colors = {SEARCHED: matplotlib.colormaps["tab10"].colors[0], FULL: "black"} | {name: palette[i % len(palette)] for i, name in enumerate(names)}
    for col, mode in enumerate(modes):
        stats = result["summary"].get(mode, [])
        highlighted = {SEARCHED, FULL} | {v["vs_best_preset"]["rival"] for v in result["verdicts"].get(mode, [])}
        for policy in sorted({s["policy"] for s in stats}):
            series = sorted((s for s in stats if s["policy"] == policy), key=lambda s: float(s["budget"]))
            budgets = [float(s["budget"]) for s in series]
            bold = policy in highlighted
            style = {"linewidth": 2.2 if bold else 0.8, "alpha": 1.0 if bold else 0.45, "label": policy, "color": colors[policy],
                     "linestyle": "--" if series[0]["kind"] == "kvpress" else "-", "marker": "o" if bold else None}
            for ax, metric in zip(axes[:, col], ("answer_logprob", "score")):
                ax.plot(budgets, [s[metric] for s in series], **style)
                if bold:
                    ax.fill_between(budgets, [s[f"{metric}_ci"][0] for s in series], [s[f"{metric}_ci"][1] for s in series], color=colors[policy], alpha=0.12)
        axes[0][col].set_title(f"{mode}: answer log-likelihood", fontsize=10)
        axes[1][col].set_title(f"{mode}: task score", fontsize=10)
        for ax in axes[:, col]:
            ax.set_xlabel("budget (fraction of the prompt)")
            ax.set_xticks(result["settings"]["budgets"])
        axes[0][col].legend(fontsize=6, ncol=2)
    fig.suptitle(f"kvsim quality ({result['settings']['label']} run): searched winner vs presets on a held-out workload (95 % CI shaded for bold lines)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)  # the plot is redrawn after every sample


# ---------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def interleaved(traceset: TraceSet, modes: list[str], count: int) -> list[TraceSample]:
    """Up to `count` samples per mode, alternating modes, so a deadline leaves both covered alike."""
    per_mode = [list(traceset.samples(mode))[:count] for mode in modes]
    return [sample for group in zip(*per_mode) for sample in group]


def write_results(result: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(RESULTS / "quality.md", result)
    plot(RESULTS / "quality.png", result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", default="full", help="written into the results: 'full', 'reduced', 'smoke'")
    parser.add_argument("--budgets", default="0.1,0.2,0.3")
    parser.add_argument("--modes", default="query-aware,query-agnostic")
    parser.add_argument("--search-workload", default="default")
    parser.add_argument("--search-samples", type=int, default=12)
    parser.add_argument("--search-seed", type=int, default=0)
    parser.add_argument("--validation", type=float, default=0.34, help="share of the search samples the best trials are re-ranked on")
    parser.add_argument("--trials", type=int, default=60, help="search trials per (mode, budget), after the enqueued presets")
    parser.add_argument("--workers", type=int, default=2, help="search worker processes")
    parser.add_argument("--heldout-workload", default="passkey,multivalue")
    parser.add_argument("--heldout-samples", type=int, default=24, help="held-out samples run live per mode")
    parser.add_argument("--heldout-seed", type=int, default=1)
    parser.add_argument("--context-tokens", type=int, default=1500)
    parser.add_argument("--max-new-tokens", type=int, default=16, help="answer cap (every live run decodes up to this)")
    parser.add_argument("--presets", default="prefill-once", help="'prefill-once' (every prefill-once preset) or a comma-separated list")
    parser.add_argument("--kvpress-presses", default=",".join(KVPRESS_PRESSES), help="empty to skip kvpress")
    parser.add_argument("--kvpress-samples", type=int, default=None, help="query-agnostic samples kvpress runs on (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default="runs/quality", help="captured traces and searches, reused by a re-run")
    parser.add_argument("--part", default="0/1",
                        help="K/N: run the held-out samples with index %% N == K; N processes share the live phase (start them once "
                             "part 0 has logged 'searches ready'); each writes the results from every part's rows found in --workdir")
    parser.add_argument("--reuse-rows", nargs="*", default=[],
                        help="rows files of an earlier run with the same held-out traces: their preset and kvpress rows are kept (the full "
                             "cache re-runs on every sample and must reproduce its row; every preset re-runs on each part's first reused sample)")
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
    if args.presets == "prefill-once":
        presets = [p for name, p in PRESETS.items() if name not in (FULL, "random") and isinstance(p.schedule, PrefillOnce)]
    else:
        presets = [PRESETS[name] for name in names(args.presets)]
    notes: list[str] = []

    loaded = load_model(DEFAULT_MODEL)
    work = Path(args.workdir)
    # KVzip's statistics in both TraceSets: the held-out runs need them for the kvzip preset, and the
    # search for KVzip's scorer to be part of its space (the committed run lacked them in the search).
    kvzip = any(p.requirements() for p in presets)
    search_traces = capture(loaded, args.search_workload, args.search_samples, args.search_seed, work / f"search-{args.search_workload}-s{args.search_seed}", args, notes, kvzip)
    heldout = capture(loaded, args.heldout_workload, args.heldout_samples, args.heldout_seed, work / f"heldout-{args.heldout_workload}-s{args.heldout_seed}", args, notes, kvzip)
    check_model_matches(loaded, heldout)
    log(f"traces ready ({time.perf_counter() - started:.0f} s)")

    winners, winner_info = {}, {}
    for mode in modes:
        for budget in budgets:
            winners[(mode, budget)], winner_info[f"{mode} @ {budget:g}"] = searched_winner(search_traces.root, mode, budget, args, notes, loaded)
    log(f"searches ready ({time.perf_counter() - started:.0f} s)")

    press_names = names(args.kvpress_presses)
    if press_names and importlib.util.find_spec("kvpress") is None:
        notes.append("kvpress is not installed here: no kvpress rows (run with .venv-kvpress/bin/python)")
        press_names = []
    part, parts = (int(x) for x in args.part.split("/"))
    rows_file = work / f"rows-{part}-of-{parts}.json"
    rows_file.write_text("[]")  # this part's rows of an earlier run are not this run's
    rows: list[dict] = []
    earlier: dict[tuple[str, str], list[dict]] = {}
    for path in args.reuse_rows:
        for r in json.loads(Path(path).read_text()):
            earlier.setdefault((r["mode"], r["sample_id"]), []).append(r)
    reused, rechecked = [], False
    pressed = 0
    result = {}
    for index, sample in enumerate(interleaved(heldout, modes, args.heldout_samples)):
        if index % parts != part:
            continue
        if args.deadline_min is not None and time.perf_counter() - started > 60 * args.deadline_min:
            notes.append(f"deadline of {args.deadline_min:g} min reached: {sample.mode} sample {sample.sample_id} and later ones not run")
            log(notes[-1])
            break
        before = earlier.get((sample.mode, sample.sample_id), [])
        rows += live_rows(loaded, heldout, sample, presets, winners, budgets, before, recheck=bool(before) and not rechecked)
        if before:
            reused.append(f"{sample.mode} {sample.sample_id}")
            rechecked = True
        if any(r["kind"] == "kvpress" for r in before):
            pressed += 1
        elif sample.mode == "query-agnostic" and press_names and (args.kvpress_samples is None or pressed < args.kvpress_samples):
            pressed += 1
            # Importing kvpress wraps every registered attention function (kvsim's too) with its head-wise
            # key masking, inert unless a press leaves masks on the modules, which kvpress_row clears.
            for budget in budgets:
                for name in press_names:
                    rows.append(kvpress_row(loaded, heldout, sample, name, kvpress_press(name, budget, 32), budget))
        log(f"{sample.mode} {sample.sample_id} done ({time.perf_counter() - started:.0f} s)")
        rows_file.write_text(json.dumps(rows))
        every_part = [r for other in sorted(work.glob(f"rows-*-of-{parts}.json")) for r in json.loads(other.read_text())]
        tables = {mode: at_budgets(every_part, mode, budgets) for mode in modes if any(r["mode"] == mode for r in every_part)}
        summary = {mode: summarize(table) for mode, table in tables.items()}
        result = {
            "command": "PYTHONPATH=src python bench/quality.py " + " ".join(sys.argv[1:]),
            "settings": {**vars(args), "budgets": budgets, "modes": modes},
            "unseen_families": unseen,
            "wall_s": time.perf_counter() - started,
            "verdicts": {mode: verdicts(tables[mode], summary[mode]) for mode in tables},
            "summary": summary,
            "winners": winner_info,
            "notes": notes + ([f"part {args.part}: {len(reused)} samples' preset and kvpress rows come from an earlier run of this script "
                               f"({', '.join(args.reuse_rows)}); on each the full cache re-ran and reproduced its row within 1e-4, and on the "
                               "part's first one every preset did too; the searched rows are this run's"] if reused else [])
                     + ([f"kvpress ran on {len({r['sample_id'] for r in every_part if r['kind'] == 'kvpress'})} query-agnostic samples"] if press_names else [])
                     + ([f"the live phase ran in {parts} processes side by side (--part), each on every {parts}th sample; wall time is this part's"] if parts > 1 else []),
            "rows": every_part,
            "machine": machine_info(load_at_start),
        }
        write_results(result)  # after every sample: a long run stopped early keeps what it measured
    for mode, entries in result["verdicts"].items():
        for v in entries:
            print(f"{mode}: {v['summary_line']}")
    log(f"results: {RESULTS / 'quality.md'} ({result['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
