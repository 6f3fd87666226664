"""The second bundled model, Gemma 3 270M (a hybrid of sliding-window and full-attention layers),
through the Python capture API and `kvsim validate`, as a user runs them. Slow: the first run
assembles and dequantizes the GGUF (minutes on 2 cores; cached after)."""

from __future__ import annotations

import polars as pl
import pytest
from typer.testing import CliRunner

import kvsim
from kvsim.cli.main import app
from kvsim.traces.capture import CaptureSettings


@pytest.mark.bundled
def test_gemma3_270m_captures_past_its_window_and_validates(tmp_path):
    traceset = kvsim.capture(
        tmp_path / "traces", model="gemma3-270m", workload="passkey", samples=1, context_tokens=600,
        settings=CaptureSettings(window=32, max_new_tokens=6),
    )
    shape = traceset.shape
    assert shape.model_type == "gemma3_text" and shape.policy_layers == (5, 11, 17)
    assert set(shape.windows) == {512, None} and shape.scaling == 256**-0.5
    (sample,) = traceset
    assert sample.prompt_len > 512  # the sliding layers really slide

    out = tmp_path / "val"
    result = CliRunner().invoke(app, ["validate", "--traces", str(tmp_path / "traces"), "--policy", "full,snapkv",
                                      "--budget", "0.2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = pl.read_parquet(out / "validation.parquet")
    full = table.filter(pl.col("policy") == "full").row(0, named=True)
    snapkv = table.filter(pl.col("policy") == "snapkv").row(0, named=True)
    assert full["top1"] == 1.0 and full["kl"] < 1e-3  # the live cache reproduces the traced forward
    assert snapkv["kv_bytes"] < full["kv_bytes"]
