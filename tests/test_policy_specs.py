"""Policy specs round-trip through JSON, and every kind of bad spec or budget is one clear error."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kvsim.cli.main import app
from kvsim.errors import KvsimError
from kvsim.policies import PRESETS, Budget, Policy, load_policy_spec, resolve_policy
from kvsim.traces.synthetic import synthetic_traceset


def snapkv_spec(**changes):
    spec = PRESETS["snapkv"].to_spec()
    for path, value in changes.items():
        kind, key = path.split("__")
        spec[kind][key] = value
    return spec


def test_spec_files_round_trip(tmp_path):
    for policy in PRESETS.values():
        path = tmp_path / f"{policy.name}.json"
        path.write_text(json.dumps(policy.to_spec()))
        assert load_policy_spec(path) == policy == resolve_policy(str(path))


@pytest.mark.parametrize(
    "spec, message",
    [
        (snapkv_spec(scorer__name="snapkvv"), "unknown scorer 'snapkvv'"),
        (snapkv_spec(scorer__windw=8), "has no parameter 'windw'"),
        (snapkv_spec(scorer__window="32"), "must be int, got '32'"),
        (snapkv_spec(scorer__kernel=4), "kernel must be an odd number"),
        (snapkv_spec(schedule__recent=-1), "recent must be >= 0"),
        (snapkv_spec(retention__name="zip"), "unknown retention 'zip'"),
        ({"name": "x", "scorer": "key_norm"}, "missing allocator"),
        ({"scorer": "key_norm", "allocator": "uniform", "budget": 0.1}, "unknown keys ['budget']"),
        ({"scorer": "key_norm", "allocator": {"name": "free_vector", "weights": [1, "a"]}}, "must be float"),
    ],
)
def test_bad_specs_name_the_problem(spec, message):
    with pytest.raises(KvsimError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Policy.from_spec(spec)


MIXTURE = {
    "name": "mixture",
    "scorers": [{"name": "window_attention", "window": 48}, {"name": "key_norm"}, {"name": "recency"}],
    "weights": [0.6, 0.3, 0.1],
    "normalize": "z",
}


def test_a_mixture_nests_its_scorers_specs_and_round_trips(tmp_path):
    spec = snapkv_spec()
    spec["scorer"] = MIXTURE
    policy = Policy.from_spec(spec)
    assert [part.name for part in policy.scorer.scorers] == ["window_attention", "key_norm", "recency"]
    assert policy.observation_window == 48  # a component's window is the policy's: traces must hold it
    path = tmp_path / "mixture.json"
    path.write_text(json.dumps(policy.to_spec()))
    assert load_policy_spec(path) == policy


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"weights": [0.6, 0.4]}, "one weight per scorer: 3 scorers, 2 weights"),
        ({"scorers": [{"name": "key_norm"}], "weights": [1.0]}, "at least two scorers"),
        ({"weights": [0.6, 0.0, 0.1]}, "weights must all be positive"),
        ({"normalize": "minmax"}, "normalize must be one of rank, z"),
        ({"scorers": [{"name": "key_nrm"}, {"name": "recency"}, {"name": "recency"}]}, "unknown scorer 'key_nrm'"),
        ({"scorers": [{"name": "window_attention", "kernel": 4}, {"name": "recency"}, {"name": "recency"}]}, "kernel must be an odd number"),
        ({"scorers": "key_norm"}, "must be a list of specs"),
    ],
)
def test_bad_mixtures_name_the_problem(changes, message):
    spec = snapkv_spec()
    spec["scorer"] = {**MIXTURE, **changes}
    with pytest.raises(KvsimError, match=message) as error:
        Policy.from_spec(spec)
    assert "\n" not in str(error.value)


def test_an_old_spec_with_the_window_on_its_allocator_is_refused_with_the_fix():
    spec = PRESETS["pyramidkv"].to_spec()
    spec["allocator"]["recent"] = 32
    with pytest.raises(KvsimError, match="allocator 'pyramid' no longer has parameter 'recent': the protected tokens are the schedule's"):
        Policy.from_spec(spec)


@pytest.mark.parametrize("value", [0.0, 1.5, -3, 0, True, "a"])
def test_budgets_outside_the_rule_are_refused(value):
    with pytest.raises(KvsimError, match="budget"):
        Budget(value)


def test_budget_parse_and_rounding():
    assert Budget.parse("0.1").per_head(1234) == 123 and Budget.parse("256").per_head(1234) == 256
    assert Budget(0.001).per_head(100) == 1  # never zero tokens
    with pytest.raises(KvsimError, match="not a number"):
        Budget.parse("ten percent")


def test_a_per_layer_vector_must_match_the_model(tmp_path):
    traceset = synthetic_traceset(tmp_path, n_layers=2, prompt_len=40, window=32)
    spec = {"name": "vec", "scorer": "key_norm", "allocator": {"name": "free_vector", "weights": [1.0, 2.0, 3.0]}}
    from kvsim.sim import simulate

    with pytest.raises(KvsimError, match="length 3, but the model has 2 layers"):
        simulate(traceset, [Policy.from_spec(spec)], [0.5])


def test_simulate_cli_writes_both_tables_and_refuses_bad_input(tmp_path):
    traces = synthetic_traceset(tmp_path / "t", prompt_len=40, continuation=4, window=32).root
    runner = CliRunner()
    out = tmp_path / "sim" / "r.parquet"
    report = tmp_path / "report" / "sim.md"
    result = runner.invoke(app, ["simulate", "--traces", str(traces), "--policy", "snapkv,knorm", "--budget", "0.25",
                                 "--budget", "8", "--out", str(out), "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert out.exists() and out.with_name("r.samples.parquet").exists() and "oracle" in result.output
    text = report.read_text()
    assert "## query-aware, budget 0.25" in text and "## query-aware, budget 8tok" in text and "| knorm |" in text
    for figure in ("sim.sim_score.png", "sim.layer_recall.png"):
        assert (report.parent / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure in text
    for args, message in [
        (["--policy", "snapk"], "unknown policy 'snapk'"),
        (["--budget", "1.5"], "outside (0, 1]"),
        (["--budget", "400"], "above the prompt length 40"),
        (["--mode", "aware"], "unknown mode 'aware'"),
    ]:
        bad = runner.invoke(app, ["simulate", "--traces", str(traces), "--out", str(tmp_path / "x.parquet"), *args])
        assert bad.exit_code == 2 and message in bad.output, bad.output
    assert not (tmp_path / "x.parquet").exists()


def test_kvzip_refuses_traces_captured_without_its_statistics(tmp_path):
    from kvsim.sim import simulate

    traces = synthetic_traceset(tmp_path / "t", prompt_len=40, continuation=4, window=32, kvzip=False)
    with pytest.raises(KvsimError, match="capture them with `kvsim capture --kvzip`"):
        simulate(traces, [resolve_policy("kvzip")], [0.5])
    result = CliRunner().invoke(app, ["simulate", "--traces", str(traces.root), "--policy", "kvzip,snapkv", "--out", str(tmp_path / "r.parquet")])
    assert result.exit_code == 2 and result.output.count("\n") <= 2 and "--kvzip" in result.output, result.output
    everything = CliRunner().invoke(app, ["simulate", "--traces", str(traces.root), "--budget", "0.5", "--out", str(tmp_path / "all.parquet")])
    assert everything.exit_code == 0 and "expected_attention" in everything.output and " kvzip " not in everything.output
