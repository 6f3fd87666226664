"""Policy search as a user runs it: the study finds a known best allocation, resumes, shares one
journal file between two workers without losing or duplicating a trial, and refuses bad input
with one line."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import optuna
import polars as pl
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from search_helpers import BROAD_LAYERS, constructed_traceset, kvsim

from kvsim.errors import KvsimError
from kvsim.policies import PRESETS, Budget, load_policy_spec
from kvsim.search import SearchSettings, search
from kvsim.search.objective import Evaluator, Objective, checkpoints
from kvsim.search.space import preset_trials
from kvsim.search.split import split_samples
from kvsim.sim import simulate
from kvsim.sim.simulate import prepare_sample, sim_score
from kvsim.traces.store import TraceSet
from kvsim.traces.synthetic import synthetic_traceset


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    root = tmp_path_factory.mktemp("constructed")
    constructed_traceset(root)
    return root


def test_split_is_seeded_stratified_and_interleaved():
    manifest = pl.DataFrame({
        "sample_id": [f"a-{i}" for i in range(8)] + [f"b-{i}" for i in range(4)] + ["c-0"],
        "task": ["a"] * 8 + ["b"] * 4 + ["c"],
        "mode": ["query-aware"] * 13,
    })
    split = split_samples(manifest, "query-aware", 0.25, 0.25, seed=0)
    assert sorted(split.search + split.validation + split.test) == sorted(manifest["sample_id"])
    assert not set(split.search) & set(split.validation + split.test) and not set(split.validation) & set(split.test)
    for chosen in (split.validation, split.test):
        assert [s[0] for s in chosen].count("a") == 2 and [s[0] for s in chosen].count("b") == 1
    assert "c-0" in split.search  # a task with one sample is searched, not held out
    assert {s[0] for s in split.search[:3]} == {"a", "b", "c"}  # every prefix covers the tasks
    assert split == split_samples(manifest, "query-aware", 0.25, 0.25, seed=0)
    assert split != split_samples(manifest, "query-aware", 0.25, 0.25, seed=1)
    with pytest.raises(KvsimError, match="leave no search samples"):
        split_samples(manifest, "query-aware", 0.5, 0.5, seed=0)
    assert checkpoints(12) == [2, 4, 8, 12] and checkpoints(1) == [1]


def test_sim_score_of_a_replay_is_the_simulators(tmp_path):
    traceset = synthetic_traceset(tmp_path, samples=1, prompt_len=48, continuation=4, window=32)
    table = simulate(traceset, [PRESETS["snapkv"]], [0.25], oracle=False).samples
    prepared = prepare_sample(traceset, next(iter(traceset)))
    assert sim_score(prepared.replay(PRESETS["snapkv"], Budget(0.25))) == pytest.approx(table["sim_score"][0])


def test_study_finds_the_known_best_allocation(traces, tmp_path):
    # CMA-ES on the per-layer vector (SnapKV's scorer otherwise): the broad layers must get the budget.
    run = search(SearchSettings(traces=traces, budget=Budget(0.1), rundir=tmp_path, trials=30, sampler="cmaes", top=1, tier="proxy"))
    summary = run.summary()
    winner = load_policy_spec(run.rundir / summary["top"][0]["spec"])
    weights = winner.allocator.weights
    assert sum(weights[layer] for layer in BROAD_LAYERS) / sum(weights) > 0.75
    evaluator = Evaluator(TraceSet.open(traces), "query-aware")
    uniform = evaluator.mean(PRESETS["snapkv"], Budget(0.1), summary["samples"]["search"]).sim_score
    assert summary["top"][0]["search_value"] > uniform + 0.01
    assert summary["top"][0]["validation"]["sim_score"] > 0


def test_cmaes_tunes_the_per_layer_budgets_of_a_chosen_base_policy(traces, tmp_path):
    """--base keeps that policy's scorer, schedule and retention; the first trial is its flat profile."""
    result = kvsim("search", "--traces", traces, "--budget", "0.1", "--sampler", "cmaes", "--base", "knorm", "--trials", 4,
                   "--validation", 0, "--test", 0, "--tier", "proxy", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    trials = pl.read_parquet(tmp_path / "trials.parquet")
    policies = [json.loads(policy) for policy in trials["policy"]]
    assert {policy["scorer"]["name"] for policy in policies} == {"key_norm"}
    assert {policy["allocator"]["name"] for policy in policies} == {"free_vector"}
    assert set(policies[0]["allocator"]["weights"]) == {1.0}
    assert "were not searched" not in result.output  # no presets run in the allocation space
    refused = kvsim("search", "--traces", traces, "--budget", "0.1", "--sampler", "cmaes", "--base", "nonesuch", "--trials", 1,
                    "--tier", "proxy", "--out", tmp_path / "other")
    assert refused.exit_code == 2 and "unknown policy 'nonesuch'" in refused.output


def test_a_prefill_only_search_runs_its_presets_first_and_names_those_it_cannot_run(tmp_path):
    traces = synthetic_traceset(tmp_path / "traces", kvzip=False, prompt_len=128, window=32).root  # no KVzip statistics
    result = kvsim("search", "--traces", traces, "--budget", "0.5", "--prefill-only", "--trials", 3, "--validation", 0, "--test", 0,
                   "--tier", "proxy", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    trials = pl.read_parquet(tmp_path / "run" / "trials.parquet")
    assert trials.filter(pl.col("state") != "WAITING")["preset"].to_list() == ["random", "snapkv", "pyramidkv"]
    output = " ".join(result.output.split())  # rich wraps lines at the terminal width
    assert "warning: preset kvzip and its scorer were not searched" in output and "kvsim capture --kvzip" in output
    assert "[yellow]" not in output  # the CLI console prints no markup
    summary = json.loads((tmp_path / "run" / "search.json").read_text())
    assert {p["name"] for p in summary["presets"]} >= {"full", "keydiff"} and "tova" not in {p["name"] for p in summary["presets"]}
    # Without validation samples the search samples stand in: the presets' trials are reused, with the numbers a re-run gives.
    evaluator = Evaluator(TraceSet.open(traces), summary["mode"])
    for preset in summary["presets"]:
        again = evaluator.mean(PRESETS[preset["name"]], Budget(0.5), summary["samples"]["search"])
        assert preset["validation"]["sim_score"] == pytest.approx(again.sim_score, abs=1e-12), preset["name"]
        assert preset["validation"]["kv_mib"] == pytest.approx(again.kv_bytes / 2**20, abs=1e-12)
    assert sum(p["trial"] is not None for p in summary["presets"]) == 3


def test_resuming_a_study_adds_trials(traces, tmp_path):
    args = ["search", "--traces", traces, "--budget", "0.1", "--sampler", "cmaes", "--study", "again", "--validation", 0, "--test", 0, "--tier", "proxy", "--out", tmp_path]
    first = kvsim(*args, "--trials", 4)
    assert first.exit_code == 0, first.output
    before = pl.read_parquet(tmp_path / "trials.parquet")
    second = kvsim(*args, "--trials", 3)
    assert second.exit_code == 0, second.output
    after = pl.read_parquet(tmp_path / "trials.parquet")
    assert after["number"].to_list() == list(range(7))
    assert after.head(4).select("number", "params", "sim_score").equals(before.select("number", "params", "sim_score"))
    assert sum(json.loads((tmp_path / "search.json").read_text())["trials"].values()) == 7
    assert "report.html" in second.output and (tmp_path / "report.html").stat().st_size > 10_000


def test_a_time_limit_stops_the_search_before_its_trial_count(traces, tmp_path):
    # 6 s of trials cannot run 10,000 (a proxy trial here takes milliseconds, so some do run).
    result = kvsim("search", "--traces", traces, "--budget", "0.1", "--sampler", "cmaes", "--trials", 10_000, "--time-limit", 0.1,
                   "--validation", 0, "--test", 0, "--tier", "proxy", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    finished = len(pl.read_parquet(tmp_path / "trials.parquet"))
    assert 1 < finished < 10_000
    assert kvsim("search", "--traces", traces, "--budget", "0.1", "--time-limit", 0, "--out", tmp_path / "x").exit_code != 0


def test_two_workers_on_one_journal_file_lose_and_duplicate_no_trial(traces, tmp_path):
    result = kvsim("search", "--traces", traces, "--budget", "0.1", "--sampler", "cmaes", "--workers", 2,
                   "--trials", 10, "--validation", 0, "--test", 0, "--tier", "proxy", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "study.journal").exists() and not (tmp_path / "study.db").exists()
    study = optuna.load_study(study_name="kvsim", storage=JournalStorage(JournalFileBackend(str(tmp_path / "study.journal"))))
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == list(range(10))
    assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}  # none left running, failed or waiting
    # Each worker ran its share: the trials are split 5 + 5, none run twice.
    assert sorted(pl.Series([t.user_attrs["worker"] for t in trials]).value_counts()["count"].to_list()) == [5, 5]
    assert pl.read_parquet(tmp_path / "trials.parquet")["number"].to_list() == list(range(10))


def test_a_trial_left_running_by_a_dead_process_is_run_again(traces, tmp_path):
    args = ["search", "--traces", traces, "--budget", "0.1", "--sampler", "cmaes", "--trials", 1, "--validation", 0, "--test", 0, "--tier", "proxy", "--out", tmp_path]
    assert kvsim(*args).exit_code == 0
    # What a killed worker leaves behind: a RUNNING trial tagged with a process that is gone.
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    study = optuna.load_study(study_name="kvsim", storage=f"sqlite:///{tmp_path / 'study.db'}")
    orphan = study.ask()
    for layer in range(4):
        orphan.suggest_float(f"allocator.free_vector.layer{layer}", 0.1, 10.0, log=True)
    orphan.set_user_attr("worker", f"{socket.gethostname()}:{int(gone.stdout)}")
    orphan.set_user_attr("policy", "drawn in full")  # what Objective records after the last draw

    result = kvsim(*args)
    assert result.exit_code == 0, result.output
    trials = optuna.load_study(study_name="kvsim", storage=f"sqlite:///{tmp_path / 'study.db'}").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert trials[2].params == trials[1].params and trials[2].system_attrs["failed_trial"] == 1


def test_search_help_has_an_example():
    result = kvsim("search", "--help")
    assert result.exit_code == 0 and "Example" in result.output and "kvsim search --traces" in result.output


def test_pareto_study_writes_its_front(tmp_path):
    traces = tmp_path / "traces"
    synthetic_traceset(traces, samples=3, n_layers=2, prompt_len=64, continuation=4, window=64)
    result = kvsim("search", "--traces", traces, "--objective", "pareto", "--budget", "0.1,0.5", "--sampler", "nsga2",
                   "--trials", 6, "--tier", "proxy", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "search.json").read_text())
    assert summary["objective"] == "pareto" and summary["budget"] == [0.1, 0.5]
    for entry in summary["top"]:
        assert 0.1 <= entry["budget"] <= 0.5
        load_policy_spec(tmp_path / "run" / entry["spec"])
    assert "Pareto front" in (tmp_path / "run" / "report.html").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--storage", "mongodb://localhost/x"], "storage URL 'mongodb://localhost/x' is not supported"),
        (["--storage", "postgresql://kvsim@127.0.0.1:9/none"], "cannot open storage postgresql://kvsim@127.0.0.1:9/none"),
        (["--budget", "100000"], "budget 100000 tokens is above the prompt length 256"),
        (["--budget", "0.1", "--workers", "2", "--storage", "sqlite:///x.db"], "serves one worker"),
        (["--mode", "query-agnostic"], "the traces hold no query-agnostic samples"),
        (["--objective", "pareto"], "explores a budget range"),
        (["--tier", "oracle"], "unknown tier 'oracle'"),
        (["--validation", "0.6", "--test", "0.5"], "leave no search samples"),
    ],
)
def test_bad_input_is_one_clear_line(traces, tmp_path, args, message):
    result = kvsim("search", "--traces", traces, "--trials", 2, "--tier", "proxy", "--out", tmp_path / "run", *args)
    assert result.exit_code == 2
    assert message in result.output and result.output.count("error:") == 1
    assert "Traceback" not in result.output


def test_quality_search_compares_policies_at_equal_memory(traces):
    """Quantize retention holds the budget at full precision plus every evicted token: infeasible."""
    traceset = TraceSet.open(traces)
    evaluator = Evaluator(traceset, "query-aware")
    samples = [s.sample_id for s in traceset.samples("query-aware")]
    objective = Objective(evaluator, samples, Budget(0.1))
    study = optuna.create_study(direction="maximize")
    for params, user_attrs in preset_trials():
        if user_attrs["preset"] in ("mikv", "snapkv"):
            study.enqueue_trial(params, user_attrs=user_attrs)
    study.optimize(objective, n_trials=2)
    snapkv, mikv = study.trials
    assert mikv.state.name == "PRUNED" and "above the" in mikv.user_attrs["infeasible"]
    assert snapkv.state.name == "COMPLETE"
