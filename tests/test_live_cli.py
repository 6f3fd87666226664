"""Validate and export on the bundled model with two short samples, the exported file applied to a
model in three lines, and the kvpress export run for real."""

from __future__ import annotations

import json

import polars as pl
import pytest
import torch
from transformers import DynamicCache
from typer.testing import CliRunner

import kvsim
from kvsim.cli.main import app
from kvsim.errors import KvsimError
from kvsim.live.kvpress_export import build_press, write_press_script
from kvsim.policies.allocators.free_vector import FreeVector
from kvsim.policies.allocators.uniform import Uniform
from kvsim.policies.budget import Budget
from kvsim.policies.policy import Policy
from kvsim.policies.presets import PRESETS
from kvsim.policies.scorers.key_diff import KeyDiff
from kvsim.policies.scorers.lag_kv import LagKV
from kvsim.policies.scorers.window_attention import WindowAttention
from kvsim.search.rundir import SearchRun
from kvsim.traces.store import TraceSet

runner = CliRunner()


def kvsim_cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def bundled_traces(tmp_path_factory, bundled_model):
    out = tmp_path_factory.mktemp("bundled") / "traces"
    result = kvsim_cli("capture", "--samples", 2, "--workload", "passkey", "--context-tokens", 300, "--window", 32,
                       "--max-new-tokens", 8, "--mode", "both", "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def validation(bundled_traces, tmp_path_factory):
    out = tmp_path_factory.mktemp("validation")
    result = kvsim_cli("validate", "--traces", bundled_traces, "--policy", "full,snapkv,streaming_llm", "--budget", "0.3",
                       "--out", out)
    assert result.exit_code == 0, result.output
    return out / "validation.parquet", result.output


def test_validate_reports_live_metrics_beside_the_simulators(validation):
    path, output = validation
    table = pl.read_parquet(path)
    assert table.height == 2 * 3
    assert {"sim_score", "score", "kl", "top1", "kv_bytes", "decode_ms_per_token"} <= set(table.columns)
    full = table.filter(pl.col("policy") == "full")
    # The full cache reproduces the traced continuation and its answer.
    assert full["top1"].min() == 1.0 and full["kl"].max() < 1e-3
    assert full["score"].to_list() == full["full_cache_score"].to_list()
    compressed = table.filter(pl.col("policy") == "snapkv")
    assert (compressed["kv_bytes"] < full["kv_bytes"]).all()
    assert "snapkv" in output and "ms/token" in output


def test_validate_runs_query_agnostic_traces(bundled_traces, tmp_path):
    result = kvsim_cli("validate", "--traces", bundled_traces, "--policy", "snapkv", "--budget", "0.5", "--samples", 1,
                       "--mode", "query-agnostic", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    row = pl.read_parquet(tmp_path / "validation.parquet").row(0, named=True)
    assert row["mode"] == "query-agnostic" and 0 <= row["top1"] <= 1


def test_validate_refuses_a_model_that_did_not_capture_the_traces(bundled_traces, tmp_path, tiny_llama):
    folder = tmp_path / "tiny"
    tiny_llama.model.save_pretrained(folder)
    tiny_llama.tokenizer.save_pretrained(folder)
    result = kvsim_cli("validate", "--traces", bundled_traces, "--policy", "snapkv", "--model", folder, "--out", tmp_path / "v")
    assert result.exit_code == 2 and "validate with the model that captured them" in result.output


@torch.inference_mode()
def test_exported_policy_applies_in_three_lines(bundled_traces, validation, bundled_model, tmp_path):
    winner = tmp_path / "winner.json"
    result = kvsim_cli("export", "--policy", "snapkv", "--budget", "0.3", "--traces", bundled_traces,
                       "--validation", validation[0], "--study", "demo", "--trial", 7, "--out", winner)
    assert result.exit_code == 0, result.output
    data = json.loads(winner.read_text())
    assert data["provenance"]["traceset"]["hash"] == TraceSet.open(bundled_traces).content_hash
    assert data["provenance"]["trial"] == 7 and data["model"]["shape"]["n_layers"] == 30
    assert 0 < data["metrics"]["simulated"]["sim_score"] <= 1 and data["metrics"]["validated"]["samples"] == 2

    model, tokenizer = bundled_model.model, bundled_model.tokenizer
    ids = tokenizer("The quick brown fox " * 40, return_tensors="pt").input_ids
    policy = kvsim.load_policy(winner)
    with policy.apply(model):
        inside = model.generate(ids, max_new_tokens=6, do_sample=False)
    explicit_cache = policy.cache(model)
    explicit = model.generate(ids, max_new_tokens=6, do_sample=False, past_key_values=explicit_cache)
    assert torch.equal(inside, explicit)
    assert explicit_cache.compressed and explicit_cache.held_tokens()[0] < 30 * 3 * ids.shape[1]


def test_an_exported_policy_refuses_another_architecture(bundled_traces, tmp_path, tiny_llama):
    winner = tmp_path / "winner.json"
    assert kvsim_cli("export", "--policy", "snapkv", "--traces", bundled_traces, "--out", winner).exit_code == 0
    with pytest.raises(KvsimError, match="tuned for smollm2-135m"):
        kvsim.load_policy(winner).cache(tiny_llama.model)


def test_export_errors_are_one_clear_line(tmp_path):
    result = kvsim_cli("export", "--policy", "snapkv", "--out", tmp_path / "w.json")
    assert result.exit_code == 2 and "give --model or --traces" in result.output
    not_export = tmp_path / "spec.json"
    not_export.write_text(json.dumps(PRESETS["snapkv"].to_spec()))
    with pytest.raises(KvsimError, match="not a kvsim export"):
        kvsim.load_policy(not_export)


KVPRESS_POLICIES = {
    "snapkv": PRESETS["snapkv"],
    "pyramidkv": PRESETS["pyramidkv"],
    "adakv": PRESETS["adakv"],
    "knorm": PRESETS["knorm"],
    "keydiff": PRESETS["keydiff"],
    "lagkv": Policy("lagkv", LagKV(lag=16), Uniform()),
    "expected_attention": PRESETS["expected_attention"],
    "adakv_expected_attention": PRESETS["adakv_expected_attention"],
    # (kvpress 0.5.5's ChunkKVPress around SnapKVPress fails on its own reshape, so KeyDiff is chunked.)
    "chunkkv": Policy("chunkkv", KeyDiff(pool="chunk", kernel=8), Uniform()),
    "streaming_prefill": Policy("streaming_prefill", PRESETS["streaming_llm"].scorer, PRESETS["streaming_llm"].allocator),
    "free_vector": Policy("vector", WindowAttention(window=8), FreeVector(weights=(1.0, 2.0, 3.0))),
}


@torch.inference_mode()
@pytest.mark.kvpress
@pytest.mark.parametrize("name", sorted(KVPRESS_POLICIES))
def test_kvpress_export_runs_as_a_press(name, tiny_llama, tmp_path):
    from kvpress.presses.base_press import BasePress

    policy, budget = KVPRESS_POLICIES[name], Budget(0.25)
    model = tiny_llama.model
    model.set_attn_implementation("sdpa")
    ids = torch.randint(0, model.config.vocab_size, (1, 96), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=model.config)
    with build_press(policy, budget)(model):
        model(ids, past_key_values=cache)
        pressed = model(ids[:, :1], past_key_values=cache).logits
    full_cache = DynamicCache(config=model.config)
    model(ids, past_key_values=full_cache)
    assert not torch.allclose(pressed, model(ids[:, :1], past_key_values=full_cache).logits)
    if "adakv" not in name:  # kvpress's Ada-KV masks evicted entries instead of removing them
        assert sum(layer.keys.shape[2] for layer in cache.layers) < 3 * 97 * 0.5
    namespace = {}
    exec(write_press_script(policy, budget, tmp_path / "press.py").read_text(), namespace)
    assert isinstance(namespace["press"], BasePress)


def test_policies_without_a_kvpress_counterpart_say_why():
    with pytest.raises(KvsimError, match="evicts during decoding"):
        build_press(PRESETS["h2o"], Budget(0.2))
    with pytest.raises(KvsimError, match="compression ratio"):
        build_press(PRESETS["snapkv"], Budget(64))


def test_a_search_runs_winners_are_validated_on_its_test_samples_and_exported(bundled_traces, tmp_path):
    run = tmp_path / "run"
    searched = kvsim_cli("search", "--traces", bundled_traces, "--mode", "query-aware", "--budget", "0.3", "--trials", 3,
                         "--validation", 0, "--test", "0.5", "--out", run)
    assert searched.exit_code == 0, searched.output
    summary = json.loads((run / "search.json").read_text())
    test = summary["samples"]["test"]
    assert summary["tier"] == "exact" and len(test) == 1 and not set(test) & set(summary["samples"]["search"])
    trials = pl.read_parquet(run / "trials.parquet")
    # The presets run first (enqueued), and the first trials are scored by the real model.
    assert trials["preset"].to_list()[:3] == ["random", "streaming_llm", "h2o"]
    assert trials.filter(pl.col("state") == "COMPLETE")["tier"].to_list() == ["exact"] * 3
    assert summary["top"][0]["validation"]["answer_logprob"] < 0
    validated = kvsim_cli("validate", "--run", run, "--top", 1, "--policy", "snapkv")
    assert validated.exit_code == 0, validated.output
    table = pl.read_parquet(run / "validation.parquet")
    assert set(table["sample_id"]) == set(test)
    policies = set(table["policy"])
    assert len(policies) == 2 and "snapkv" in policies and any(name.startswith("top1-") for name in policies)
    report = (run / "report.html").read_text()
    assert "against 1 preset run live" in report and "the best preset (snapkv)" in report
    exported = kvsim_cli("export", "--run", run, "--out", run / "winner.json")
    assert exported.exit_code == 0, exported.output
    data = json.loads((run / "winner.json").read_text())
    assert data["provenance"]["study"] == "kvsim" and data["metrics"]["validated"]["samples"] == len(test)
    assert "winner: top1-" in exported.output and "the best preset (snapkv)" in exported.output
    missing = kvsim_cli("validate", "--run", tmp_path / "nothing")
    assert missing.exit_code == 2 and "is not a search run" in missing.output


def test_a_run_without_test_samples_is_refused_instead_of_validated_on_search_samples(tmp_path):
    run = SearchRun(tmp_path)
    run.write_top_spec(1, {"policy": PRESETS["snapkv"].to_spec(), "budget": 0.2})
    run.write_summary({"study": "s", "traces": "t", "mode": "query-aware", "samples": {"search": ["a", "b"], "validation": [], "test": []},
                       "top": [{"rank": 1, "name": "snapkv", "spec": "top/1.json", "budget": 0.2}]})
    assert run.winners(1)[0][0].name == "top1-snapkv"
    with pytest.raises(KvsimError, match="no test samples"):
        run.test_samples()
