"""The exact tier: the real model teacher-forced over the compressed cache gives exactly what live
validation measures, and an exact-tier search runs the presets first and ranks by the answer's
log-likelihood."""

from __future__ import annotations

import polars as pl
import pytest
import torch

from kvsim.live.runner import reference_answer_ids
from kvsim.live.validate import validate
from kvsim.policies import PRESETS, Budget
from kvsim.search import SearchSettings, search
from kvsim.sim.exact import ExactEvaluator
from kvsim.traces.capture import CaptureSettings, capture_traceset
from kvsim.traces.workloads import build_workload


@pytest.fixture(scope="module")
def tiny_traces(tiny_llama, tmp_path_factory):
    count = lambda text: len(tiny_llama.tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    samples = build_workload("passkey,multikey", 6, seed=5, context_tokens=160, count_tokens=count)
    settings = CaptureSettings(window=32, max_new_tokens=4, storage_dtype="float32", modes=("query-aware",))
    return capture_traceset(tiny_llama, samples, tmp_path_factory.mktemp("exact") / "traces", settings, {"spec": "passkey,multikey"})


def test_the_reference_answer_is_tokenized_as_the_model_would_write_it(tiny_llama, tiny_traces):
    sample = next(tiny_traces.samples("query-aware"))
    text = tiny_llama.tokenizer.decode(reference_answer_ids(tiny_llama.tokenizer, sample))
    assert text.strip() == sample.answers[0] and text.startswith(" ")


@torch.inference_mode()
def test_the_exact_tier_equals_live_teacher_forced_validation(tiny_llama, tiny_traces):
    sample = next(tiny_traces.samples("query-aware"))
    runnable = [policy for policy in PRESETS.values() if not policy.requirements()]  # kvzip needs `capture --kvzip`
    pairs = [(policy, Budget(value)) for policy in runnable for value in (0.1, 0.3)]
    live = validate(tiny_llama, tiny_traces, pairs, [sample])
    exact = ExactEvaluator(tiny_llama, tiny_traces, "query-aware")
    for (policy, budget), row in zip(pairs, live.iter_rows(named=True)):
        result = exact.evaluate(policy, budget, sample.sample_id)
        for metric in ("kl", "top1", "answer_logprob", "answer_match"):
            assert getattr(result, metric) == pytest.approx(row[metric], abs=1e-4), (policy.name, budget.value, metric)
    assert exact.mean(PRESETS["full"], Budget(0.1), [sample.sample_id]).kl < 1e-4


@torch.inference_mode()
def test_the_exact_tier_reads_kvzips_stored_scores_and_still_equals_live_validation(tiny_llama, tmp_path):
    # The exact tier takes KVzip's scores from the trace; live validation runs the reconstruction pass again.
    count = lambda text: len(tiny_llama.tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    samples = build_workload("passkey", 1, seed=7, context_tokens=160, count_tokens=count)
    settings = CaptureSettings(window=32, max_new_tokens=4, storage_dtype="float32", modes=("query-aware",), kvzip=True)
    traces = capture_traceset(tiny_llama, samples, tmp_path / "traces", settings, {"spec": "passkey"})
    sample = next(traces.samples("query-aware"))
    pairs = [(PRESETS["kvzip"], Budget(value)) for value in (0.1, 0.3)]
    live = validate(tiny_llama, traces, pairs, [sample])
    exact = ExactEvaluator(tiny_llama, traces, "query-aware")
    for (policy, budget), row in zip(pairs, live.iter_rows(named=True)):
        result = exact.evaluate(policy, budget, sample.sample_id)
        for metric in ("kl", "top1", "answer_logprob", "answer_match"):
            assert getattr(result, metric) == pytest.approx(row[metric], abs=1e-4), (budget.value, metric)


def test_an_exact_tier_search_runs_the_presets_first_and_ranks_by_answer_likelihood(tiny_llama, tiny_traces, tmp_path):
    settings = SearchSettings(traces=tiny_traces.root, budget=Budget(0.3), rundir=tmp_path, trials=len(PRESETS) + 8, validation=0.34, test=0.34)
    summary = search(settings, loaded=tiny_llama).summary()
    trials = pl.read_parquet(tmp_path / "trials.parquet")
    presets = [name for name in PRESETS if name != "full"]
    assert trials["preset"].to_list()[: len(presets)] == presets
    baseline = trials.head(len(presets)).filter(pl.col("infeasible").is_null())  # mikv holds more bytes; kvzip needs --kvzip
    assert (baseline["state"] == "COMPLETE").all() and (baseline["tier"] == "exact").all()  # never pruned
    exact = trials.filter(pl.col("tier") == "exact")
    assert exact.height > 0 and (exact["value"] == exact["answer_logprob"]).all()
    # After the baselines every trial is sampled, and named as a composition even where it draws a preset's parts.
    assert trials.slice(len(presets))["preset"].is_null().all()
    # Trials judged by the proxy alone say why; none of them is scored by the model.
    assert trials.filter(pl.col("tier") == "proxy")["answer_logprob"].is_null().all()
    ranked = [entry["validation"]["answer_logprob"] for entry in summary["top"]]
    assert ranked == sorted(ranked, reverse=True) and len(summary["samples"]["validation"]) == 2
    assert {p["name"] for p in summary["presets"]} == {name for name, policy in PRESETS.items() if not policy.requirements()}
