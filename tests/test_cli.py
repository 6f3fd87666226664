"""The `kvsim` command as a user runs it: help with examples, a capture from a local model folder,
and one clear line with a non-zero exit for each kind of bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import kvsim as kvsim_api
from kvsim.cli.main import app
from kvsim.traces.capture import CaptureSettings
from kvsim.traces.store import TraceSet

runner = CliRunner()


def kvsim(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("command", [["capture"], ["traces", "info"], ["traces", "verify"]])
def test_every_subcommand_has_help_with_an_example(command):
    result = kvsim(*command, "--help")
    assert result.exit_code == 0
    assert "Example" in result.output and "kvsim " + " ".join(command) in result.output


def test_capture_info_verify_from_a_local_model_folder(tiny_folder, tmp_path):
    out = tmp_path / "traces"
    args = ["capture", "--model", tiny_folder, "--workload", "passkey,variable_tracking", "--samples", 2,
            "--context-tokens", 300, "--window", 8, "--max-new-tokens", 4, "--mode", "both", "--out", out]
    result = kvsim(*args)
    assert result.exit_code == 0, result.output
    assert "captured 2 samples, skipped 0" in result.output
    traceset = TraceSet.open(out)
    assert sorted(set(traceset.manifest["mode"])) == ["query-agnostic", "query-aware"] and len(traceset) == 4
    assert traceset.meta["window"] == 8 and traceset.meta["workload"]["context_tokens"] == 300

    again = kvsim(*args)
    assert "captured 0 samples, skipped 2" in again.output

    info = kvsim("traces", "info", out)
    assert info.exit_code == 0 and "variable_tracking" in info.output and "4 sample files" in info.output
    assert kvsim("traces", "verify", out).exit_code == 0

    bad = out / traceset.manifest["file"][1]
    bad.write_bytes(bad.read_bytes()[:-1] + b"?")
    result = kvsim("traces", "verify", out)
    assert result.exit_code == 1 and traceset.manifest["file"][1] in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["--model", "missing.gguf"], "GGUF file missing.gguf does not exist"),
        (["--workload", "needle_soup"], "unknown workload 'needle_soup'"),
        (["--workload", "missing.jsonl"], "missing.jsonl"),
        (["--dtype", "int4"], "unknown dtype 'int4'"),
    ],
)
def test_bad_capture_input_is_one_line_and_exit_2(args, message, tmp_path):
    result = kvsim("capture", "--out", tmp_path / "out", "--samples", 1, *args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_window_longer_than_prompt_and_unwritable_out(tiny_folder, tmp_path):
    result = kvsim("capture", "--model", tiny_folder, "--context-tokens", 100, "--window", 900,
                   "--samples", 1, "--out", tmp_path / "t")
    assert result.exit_code == 2 and "--window 900 is longer than" in result.output
    assert not (tmp_path / "t" / "manifest.parquet").exists()
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    result = kvsim("capture", "--model", tiny_folder, "--samples", 1, "--out", a_file)
    assert result.exit_code == 2 and "is not a folder" in result.output
    assert a_file.read_text() == "keep me"


def test_info_on_a_folder_that_is_not_a_traceset(tmp_path):
    result = kvsim("traces", "info", tmp_path)
    assert result.exit_code == 2 and "is not a TraceSet" in result.output


def test_console_script_exit_status(tmp_path):
    """The installed entry point (not only the in-process runner) exits non-zero on bad input."""
    result = subprocess.run(
        [sys.executable, "-m", "kvsim.cli.main", "traces", "verify", str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 2 and "error:" in result.stderr


def test_python_capture_writes_what_the_cli_writes(tiny_folder, tmp_path):
    options = {"workload": "passkey", "samples": 1, "context_tokens": 200}
    result = kvsim("capture", "--model", tiny_folder, "--workload", "passkey", "--samples", 1, "--context-tokens", 200,
                   "--window", 8, "--max-new-tokens", 3, "--out", tmp_path / "cli")
    assert result.exit_code == 0, result.output
    traceset = kvsim_api.capture(tmp_path / "api", model=str(tiny_folder), settings=CaptureSettings(window=8, max_new_tokens=3), **options)
    from_cli = TraceSet.open(tmp_path / "cli")
    assert traceset.meta == from_cli.meta and traceset.shape.model_type == "llama"
    (sample,), (cli_sample,) = traceset, from_cli
    assert sample.tensors.keys() == cli_sample.tensors.keys()
    assert all(torch.equal(tensor, cli_sample.tensors[name]) for name, tensor in sample.tensors.items())
