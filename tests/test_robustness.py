"""kvsim against damaged files, crafted manifests and specs, and careless arguments.

Every case is one user command: it must exit 2 (or 1 for `traces verify` finding bad files) with
one `error:` line and no traceback, and leave everything outside its `--out` as it was. The damaged
TraceSets are built from one tiny capture; the crafted ones rewrite its manifest the way an
adversary would, checksums included.
"""

from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import optuna
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from kvsim.cli.main import app
from kvsim.errors import KvsimError
from kvsim.paths import sha256_file
from kvsim.policies import PRESETS, Policy, resolve_policies
from kvsim.search.storage import retry_orphaned_trials
from kvsim.traces.store import MANIFEST, METADATA_KEY, SAMPLE_ID, TraceSet
from kvsim.traces.workloads import read_jsonl

CAPTURE = ["--workload", "passkey", "--samples", 2, "--context-tokens", 200, "--window", 32, "--max-new-tokens", 4]


def kvsim(*args):
    return CliRunner().invoke(app, [str(arg) for arg in args])


def snapshot(root: Path, out: Path | None = None) -> dict[str, tuple[int, int]]:
    """Every path under `root` (outside `out`) with its size and modification time."""
    return {
        str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(root.rglob("*"))
        if out is None or not path.is_relative_to(out)
    }


def refused(result, message: str, exit_code: int = 2) -> None:
    """One `error:` line holding `message`, exit code 2, no traceback."""
    assert result.exit_code == exit_code, (result.output, result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output


def fails_unchanged(root: Path, *args, message: str, out: Path | None = None) -> None:
    """Run the command under `root`; it is refused and nothing outside `out` changes."""
    before = snapshot(root, out)
    refused(kvsim(*args), message)
    assert snapshot(root, out) == before


@pytest.fixture(scope="module")
def captured(tmp_path_factory, tiny_folder) -> Path:
    out = tmp_path_factory.mktemp("captured") / "traces"
    result = kvsim("capture", "--model", tiny_folder, *CAPTURE, "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def traces(captured, tmp_path) -> Path:
    """A private copy of the tiny capture, free to damage."""
    return Path(shutil.copytree(captured, tmp_path / "traces"))


def sample_path(traces: Path, index: int = 0) -> Path:
    return traces / TraceSet.open(traces).manifest["file"][index]


def header_of(path: Path) -> tuple[dict, int]:
    (length,) = struct.unpack("<Q", path.read_bytes()[:8])
    return json.loads(path.read_bytes()[8 : 8 + length]), 8 + length


def rewrite_header(path: Path, edit) -> None:
    """Apply `edit` to the file's JSON header, keeping the data bytes."""
    header, data_start = header_of(path)
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + path.read_bytes()[data_start:])


def rewrite_manifest(traces: Path, table=lambda df: df, meta=lambda m: m) -> None:
    manifest_path = traces / MANIFEST
    old_meta = json.loads(pl.read_parquet_metadata(manifest_path)[METADATA_KEY])
    table(pl.read_parquet(manifest_path)).write_parquet(manifest_path, metadata={METADATA_KEY: json.dumps(meta(old_meta))})


def reseal(traces: Path) -> None:
    """Record the files' current checksums in the manifest, as an adversary covering edits would."""
    rewrite_manifest(traces, lambda df: df.with_columns(sha256=pl.Series([sha256_file(traces / f) for f in df["file"]])))


def simulate(traces: Path, out: Path, *args):
    return kvsim("simulate", "--traces", traces, "--policy", "snapkv", "--budget", "0.5", "--out", out, *args)


# --- 1. damaged traces are never read silently --------------------------------------------------


def test_the_intact_capture_simulates(traces, tmp_path):
    assert simulate(traces, tmp_path / "sim.parquet").exit_code == 0


def test_flipped_data_bytes_are_an_error_naming_the_file_and_verify(traces, tmp_path):
    path = sample_path(traces)
    header, data_start = header_of(path)
    begin, _ = header["layers.0.k"]["data_offsets"]
    data = bytearray(path.read_bytes())
    for offset in range(data_start + begin, data_start + begin + 100):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    result = simulate(traces, tmp_path / "sim.parquet")
    refused(result, "kvsim traces verify")
    assert path.name in result.output and not (tmp_path / "sim.parquet").exists()
    refused(kvsim("export", "--policy", "snapkv", "--traces", traces, "--out", tmp_path / "x.json"), "sha256 differs")
    refused(kvsim("search", "--traces", traces, "--trials", 2, "--tier", "proxy", "--out", tmp_path / "run"), "sha256 differs")


def test_a_header_pointing_one_tensor_at_anothers_bytes_is_refused(traces, tmp_path):
    path = sample_path(traces)

    def alias(header):
        header["layers.0.k"]["data_offsets"] = header["layers.0.v"]["data_offsets"]

    rewrite_header(path, alias)
    refused(simulate(traces, tmp_path / "a.parquet"), "tensors layers.0.k and layers.0.v overlap")
    reseal(traces)  # with the checksum covered too
    refused(simulate(traces, tmp_path / "b.parquet"), "tensors layers.0.k and layers.0.v overlap")
    assert kvsim("traces", "verify", traces).exit_code == 1


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda h: h["layers.0.q"].update(data_offsetz=h["layers.0.q"].pop("data_offsets")), "header entry"),
        (lambda h: h["layers.0.k"].update(shape=[1, 2, 3]), "does not match"),
        (lambda h: h["layers.1.colsq"].update(dtype="F8_E4M3"), "unsupported dtype"),
        (lambda h: h.pop("layers.1.colsum"), "no tensor layers.1.colsum"),
    ],
)
def test_a_resealed_header_with_a_renamed_key_or_wrong_shape_is_one_line(traces, tmp_path, edit, message):
    rewrite_header(sample_path(traces), edit)
    reseal(traces)
    refused(simulate(traces, tmp_path / "sim.parquet"), message)


def test_an_export_records_the_fingerprint_of_the_data(traces, tmp_path):
    assert kvsim("export", "--policy", "snapkv", "--traces", traces, "--out", tmp_path / "a.json").exit_code == 0
    recorded = json.loads((tmp_path / "a.json").read_text())["provenance"]["traceset"]["hash"]
    assert recorded == TraceSet.open(traces).content_hash
    path = sample_path(traces, 1)
    path.write_bytes(path.read_bytes()[:-1] + bytes([path.read_bytes()[-1] ^ 1]))
    with pytest.raises(KvsimError, match="sha256 differs"):
        TraceSet.open(traces).content_hash  # noqa: B018


# --- 2. names are data, never paths --------------------------------------------------------------


@pytest.mark.parametrize("sample_id", ["../../escaped", "a/b", ".hidden", "x" * 200, "tab\there"])
def test_a_workload_id_that_is_not_a_plain_name_is_refused_before_anything_is_written(tiny_folder, tmp_path, sample_id):
    workload = tmp_path / "w.jsonl"
    workload.write_text(json.dumps({"id": sample_id, "context": "The sky is blue. " * 20, "question": "Color?", "answers": "blue"}) + "\n")
    out = tmp_path / "deep" / "out"
    args = ["capture", "--model", tiny_folder, "--workload", workload, "--window", 8, "--max-new-tokens", 2, "--out", out]
    fails_unchanged(tmp_path, *args, message="is not allowed")
    assert not out.exists()


def test_a_manifest_row_whose_file_leaves_the_folder_is_refused_by_every_command(captured, traces, tmp_path):
    other = Path(shutil.copytree(captured, tmp_path / "other"))
    row = TraceSet.open(other).manifest.row(0, named=True)
    outside = f"../other/{row['file']}"
    rewrite_manifest(traces, lambda df: df.with_columns(file=pl.when(pl.int_range(pl.len()) == 0).then(pl.lit(outside)).otherwise("file")))
    for command in (["traces", "verify", traces], ["traces", "info", traces], ["search", "--traces", traces, "--out", tmp_path / "r"]):
        fails_unchanged(tmp_path, *command, message="names file '../other/", out=tmp_path / "r")
    refused(simulate(traces, tmp_path / "sim.parquet"), "names file")


def test_verify_cross_checks_a_files_own_sample_id_and_mode(traces):
    first, second = (sample_path(traces, i) for i in (0, 1))
    shutil.copyfile(second, first)  # the right name and a matching checksum, but another sample's data
    reseal(traces)
    result = kvsim("traces", "verify", traces)
    assert result.exit_code == 1 and "the file says it holds sample_id" in result.output


def test_verify_lists_temporary_files_a_killed_capture_left(traces):
    leftover = traces / "samples" / ".passkey-0001.aware.safetensors.abc123.tmp"
    leftover.write_bytes(b"half")
    result = kvsim("traces", "verify", traces)
    assert result.exit_code == 0 and "note:" in result.output and leftover.name in result.output


# --- 3. policy names are unique -----------------------------------------------------------------


def write_spec(path: Path, name: str, scorer: str = "random") -> Path:
    path.write_text(json.dumps({"name": name, "scorer": scorer, "allocator": "uniform"}))
    return path


@pytest.mark.parametrize("name, message", [("snapkv", "like the preset"), ("oracle", "hindsight bound")])
def test_a_user_spec_named_like_a_preset_or_the_oracle_is_refused(traces, tmp_path, name, message):
    spec = write_spec(tmp_path / "fake.json", name)
    before = snapshot(tmp_path)
    refused(kvsim("simulate", "--traces", traces, "--policy", f"snapkv,{spec}", "--out", tmp_path / "s.parquet"), message)
    assert snapshot(tmp_path) == before


def test_two_specs_of_one_name_are_refused_and_the_same_policy_twice_is_kept_once(tmp_path):
    a, b = write_spec(tmp_path / "a.json", "mine"), write_spec(tmp_path / "b.json", "mine", scorer="key_norm")
    with pytest.raises(KvsimError, match="like .*a.json"):
        resolve_policies([str(a), str(b)])
    copy = tmp_path / "snapkv.json"
    copy.write_text(json.dumps(PRESETS["snapkv"].to_spec()))  # `kvsim policies snapkv > snapkv.json`
    assert resolve_policies(["snapkv", str(copy), str(a), str(a)]) == [PRESETS["snapkv"], Policy.from_spec(json.loads(a.read_text()))]


# --- 4. messages are plain text -----------------------------------------------------------------


def test_markup_in_a_policy_name_or_a_path_is_printed_as_it_is(tmp_path):
    refused(kvsim("policies", "snap[/x]kv"), "unknown policy 'snap[/x]kv'")
    old = tmp_path / "runs[old]"
    old.mkdir()
    refused(kvsim("traces", "info", old), "runs[old] is not a TraceSet")


# --- 5. length limits ---------------------------------------------------------------------------


def test_a_sample_longer_than_the_models_context_is_refused_before_the_model_loads(tiny_folder, tmp_path):
    workload = tmp_path / "long.jsonl"
    workload.write_text(json.dumps({"context": "lorem ipsum dolor " * 11_000, "question": "Which?", "answers": "lorem"}) + "\n")
    out = tmp_path / "out"
    fails_unchanged(tmp_path, "capture", "--model", tiny_folder, "--workload", workload, "--out", out, message="more than the model's 4096")
    assert not out.exists()


def test_a_ten_megabyte_value_is_not_echoed_in_full():
    result = kvsim("policies", "x" * 10_000_000)
    refused(result, "characters cut")
    assert len(result.output) < 2_000


# --- 6. one error boundary: one line and exit 2, checks before the work ---------------------------


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"name": "\xff\xfe", "scorer": "recency", "allocator": "uniform"}', "not UTF-8"),
        (b"[" * 10_000 + b"]" * 10_000, "nested too deeply"),
        (b'{"scorer": {"name": ["recency"]}, "allocator": "uniform"}', "unknown scorer ['recency']"),
        (b'{"name": "bad\\udc80name", "scorer": "recency", "allocator": "uniform"}', "unencodable"),
        (b'{"name": ["a"], "scorer": "recency", "allocator": "uniform"}', "policy name must be a string"),
    ],
)
def test_a_broken_policy_spec_is_one_line_before_any_simulation(traces, tmp_path, content, message):
    spec = tmp_path / "p.json"
    spec.write_bytes(content)
    fails_unchanged(tmp_path, "simulate", "--traces", traces, "--policy", spec, "--out", tmp_path / "s.parquet", message=message)


def test_a_deeply_nested_workload_row_is_one_line(tiny_folder, tmp_path):
    workload = tmp_path / "w.jsonl"
    workload.write_text("[" * 10_000 + "]" * 10_000 + "\n")
    fails_unchanged(tmp_path, "capture", "--model", tiny_folder, "--workload", workload, "--out", tmp_path / "o", message="line 1: nested too deeply")


@pytest.mark.parametrize(
    "table, meta, message",
    [
        (lambda df: df.drop("file"), lambda m: m, "no 'file' column"),
        (lambda df: df, lambda m: {k: v for k, v in m.items() if k != "model"}, "metadata model is missing"),
        (lambda df: df, lambda m: {**m, "model": {**m["model"], "n_layers": "3"}}, "model.n_layers is missing or not a valid int"),
        (lambda df: df.with_columns(mode=pl.lit("sideways")), lambda m: m, "unknown mode 'sideways'"),
        (lambda df: pl.concat([df, df]), lambda m: m, "appears twice"),
    ],
)
def test_a_crafted_manifest_is_one_line_for_every_command(traces, tmp_path, table, meta, message):
    rewrite_manifest(traces, table, meta)
    for command in (["traces", "info", traces], ["traces", "verify", traces]):
        refused(kvsim(*command), message)
    refused(simulate(traces, tmp_path / "sim.parquet"), message)


def test_out_that_is_a_folder_or_another_kind_of_file_is_refused_before_the_work(traces, tmp_path):
    folder = tmp_path / "taken.parquet"
    folder.mkdir()
    fails_unchanged(tmp_path, "simulate", "--traces", traces, "--policy", "snapkv", "--out", folder, message="is a folder")
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    fails_unchanged(tmp_path, "simulate", "--traces", traces, "--policy", "snapkv", "--out", notes, message="is not a file kvsim writes")
    assert notes.read_text() == "my notes"
    assert simulate(traces, tmp_path / "sim.parquet").exit_code == 0
    assert simulate(traces, tmp_path / "sim.parquet").exit_code == 0  # its own earlier output is replaced


def test_an_empty_budget_is_refused(traces, tmp_path):
    fails_unchanged(tmp_path, "simulate", "--traces", traces, "--budget", "", "--out", tmp_path / "s.parquet", message="--budget is empty")


def test_capture_checks_the_workload_before_creating_out(tiny_folder, tmp_path):
    out = tmp_path / "out"
    fails_unchanged(tmp_path, "capture", "--model", tiny_folder, "--workload", tmp_path / "missing.jsonl", "--out", out,
                    message="does not exist")
    assert not out.exists()


# --- 7. a search trial killed while drawing is not retried as another configuration --------------


def test_a_trial_killed_while_drawing_is_failed_not_requeued_and_a_drawn_one_keeps_its_parameters(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_worker = f"{socket.gethostname()}:{int(gone.stdout)}"
    half = study.ask()
    half.set_user_attr("worker", dead_worker)
    half.suggest_float("scorer.x", 0.0, 1.0)  # killed here, before the rest of the draw
    full = study.ask()
    full.set_user_attr("worker", dead_worker)
    full.suggest_float("scorer.x", 0.0, 1.0)
    full.suggest_int("allocator.y", 1, 9)
    full.set_user_attr("policy", {"drawn": "in full"})

    assert retry_orphaned_trials(study) == [half.number, full.number]
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "FAIL", "WAITING"]
    assert trials[2].params == trials[1].params and trials[2].system_attrs["failed_trial"] == full.number


# --- hypothesis: any JSON as a spec or a workload row is a policy, a sample, or one KvsimError -----

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
# Names as a careless or hostile user writes them: markup, a lone surrogate, control characters, paths.
ODD_NAMES = st.sampled_from(["snap[/x]kv", "bad\udc80name", "two\nlines", "../../x", "a/b", ".hidden", "C:\\x", "x" * 200])
PART_NAMES = st.sampled_from(["recency", "uniform", "window_attention", "every_step", "drop", "merge", "x"])
PART = PART_NAMES | JSON | st.fixed_dictionaries({"name": PART_NAMES | JSON}, optional={"window": JSON, "gqa": JSON, "recent": JSON})
SPEC = st.fixed_dictionaries(
    {"scorer": PART, "allocator": PART},
    optional={"name": ODD_NAMES | st.text(max_size=120) | JSON, "schedule": PART, "retention": PART},
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=SPEC | JSON)
def test_any_json_spec_is_a_policy_or_one_kvsim_error(spec):
    try:
        policy = Policy.from_spec(spec)
    except KvsimError as err:
        assert "\n" not in str(err)
        return
    assert Policy.from_spec(json.loads(json.dumps(policy.to_spec()))) == policy
    assert policy.name.isprintable()


TEXT = st.text(min_size=1, max_size=20).filter(str.strip)
ROW = st.fixed_dictionaries(
    {"context": TEXT, "question": TEXT, "answers": st.lists(TEXT, min_size=1, max_size=3)},
    optional={"id": ODD_NAMES | st.text(max_size=20) | st.integers() | JSON, "scoring": st.sampled_from(["all", "any", "most"]) | JSON},
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(row=ROW | st.dictionaries(st.sampled_from(["id", "context", "question", "prompt", "answers", "scoring"]), JSON) | JSON)
def test_any_jsonl_row_is_a_sample_with_a_plain_id_or_one_kvsim_error(row, tmp_path):
    path = tmp_path / "w.jsonl"
    path.write_text(json.dumps(row) + "\n")
    try:
        (sample,) = read_jsonl(path)
    except KvsimError as err:
        assert "\n" not in str(err)
        return
    assert SAMPLE_ID.fullmatch(sample.sample_id)
