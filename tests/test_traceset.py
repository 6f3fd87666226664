"""The TraceSet store: resuming, verifying, and refusing damaged or mismatched folders."""

from __future__ import annotations

import polars as pl
import pytest

from kvsim.errors import KvsimError
from kvsim.traces.capture import CaptureSettings, capture_traceset
from kvsim.traces.store import TraceSet
from kvsim.traces.workloads import build_workload

SETTINGS = CaptureSettings(window=8, max_new_tokens=3, storage_dtype="float16")


def samples(tokenizer, n):
    count = lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    return build_workload("passkey,multikey", n, seed=3, context_tokens=120, count_tokens=count)


def run_capture(loaded, out, n=2, settings=SETTINGS):
    events = []
    traceset = capture_traceset(
        loaded, samples(loaded.tokenizer, n), out, settings, {"spec": "passkey,multikey", "seed": 3},
        report=lambda event, sample: events.append((event, sample.sample_id)),
    )
    return traceset, [e for e in events if e[0] in ("captured", "skipped")]


def flip_byte(path, offset=-100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def loaded(tiny_llama):
    return tiny_llama


def test_rerun_skips_finished_samples_and_recaptures_damaged_ones(loaded, tmp_path):
    out = tmp_path / "traces"
    first, events = run_capture(loaded, out)
    assert events == [("captured", "passkey-0000"), ("captured", "multikey-0001")]
    assert first.verify() == []

    _, events = run_capture(loaded, out)
    assert events == [("skipped", "passkey-0000"), ("skipped", "multikey-0001")]

    flip_byte(out / first.sample("multikey-0001", "query-aware").row["file"])
    again, events = run_capture(loaded, out, n=3)
    assert events == [("skipped", "passkey-0000"), ("captured", "multikey-0001"), ("captured", "passkey-0002")]
    assert again.verify() == [] and len(again) == 3
    assert TraceSet.open(out).manifest["sample_id"].to_list() == ["passkey-0000", "multikey-0001", "passkey-0002"]


def test_verify_names_flipped_truncated_and_missing_files(loaded, tmp_path):
    traceset, _ = run_capture(loaded, tmp_path / "traces", n=2)
    files = [tmp_path / "traces" / f for f in traceset.manifest["file"]]
    flip_byte(files[0])
    files[1].write_bytes(files[1].read_bytes()[:-10])
    problems = traceset.verify()
    assert len(problems) == 2
    assert problems[0].startswith(traceset.manifest["file"][0]) and "sha256" in problems[0]
    files[1].unlink()
    assert traceset.verify()[1].endswith("missing")


def test_verify_checks_shapes_against_the_format(loaded, tmp_path):
    traceset, _ = run_capture(loaded, tmp_path / "traces", n=1)
    # A manifest that claims another length makes every shape wrong even with a good checksum.
    traceset.manifest = traceset.manifest.with_columns(pl.col("total_len") + 1)
    (problem,) = traceset.verify()
    assert "input_ids" in problem and "expected" in problem


def test_resume_with_other_settings_is_refused_without_touching_files(loaded, tmp_path):
    out = tmp_path / "traces"
    run_capture(loaded, out, n=1)
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(KvsimError, match="another window"):
        run_capture(loaded, out, n=1, settings=CaptureSettings(window=4, max_new_tokens=3))
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_window_longer_than_a_prompt_fails_before_anything_is_written(loaded, tmp_path):
    with pytest.raises(KvsimError, match="--window 4000 is longer than sample passkey-0000"):
        run_capture(loaded, tmp_path / "traces", settings=CaptureSettings(window=4000))
    assert not (tmp_path / "traces").exists()


def test_open_refuses_folders_that_are_not_tracesets(tmp_path):
    with pytest.raises(KvsimError, match="is not a TraceSet"):
        TraceSet.open(tmp_path)
    (tmp_path / "manifest.parquet").write_text("not parquet")
    with pytest.raises(KvsimError, match="damaged"):
        TraceSet.open(tmp_path)


def test_damaged_sample_file_is_a_clear_error_when_read(loaded, tmp_path):
    traceset, _ = run_capture(loaded, tmp_path / "traces", n=1)
    (sample,) = traceset
    sample.path.write_bytes(b"\x00" * 4)
    with pytest.raises(KvsimError, match="unreadable"):
        sample.layer(0)
