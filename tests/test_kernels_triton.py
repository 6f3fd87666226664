"""Every Triton kernel against its PyTorch twin. Without a GPU the kernels run in Triton's CPU
interpreter (TRITON_INTERPRET=1, set in conftest.py), so the shapes stay small; with one they run
compiled on CUDA tensors."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'kvsim[gpu]')")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("no GPU, and TRITON_INTERPRET=1 was not set before triton was imported", allow_module_level=True)
DEVICE = "cpu" if INTERPRETED else "cuda"
from kvsim.kernels import causal_attention_column_stats_torch, masked_attention_sums_torch  # noqa: E402
from kvsim.kernels.column_stats_triton import BLOCK_KEYS, causal_attention_column_stats_triton  # noqa: E402
from kvsim.kernels.masked_attention_triton import BLOCK_ROWS, SETS_PER_PROGRAM, masked_attention_sums_triton  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def random(*shape, dtype, generator, scale=1.0):
    return (torch.randn(*shape, generator=generator) * scale).to(dtype).to(DEVICE)


def assert_output_close(got, want, dtype):
    """Outputs are stored in the input dtype: equal up to one rounding of that dtype."""
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 3, 4])
# Whole prompts and a last-rows-only case, none a multiple of the block sizes.
@pytest.mark.parametrize("n,total,splits", [(BLOCK_KEYS + 6, BLOCK_KEYS + 6, [29]), (5, 2 * BLOCK_KEYS + 3, [])])
def test_column_stats_kernel_matches_twin(dtype, group, n, total, splits):
    generator = torch.Generator().manual_seed(group + n)
    kv_heads, head_dim = 2, 24  # head_dim below its power-of-two block
    query = random(kv_heads * group, n, head_dim, dtype=dtype, generator=generator)
    key, value = (random(kv_heads, total, head_dim, dtype=dtype, generator=generator, scale=2.0) for _ in range(2))
    got = causal_attention_column_stats_triton(query, key, value, 0.3, splits)
    want = causal_attention_column_stats_torch(query, key, value, 0.3, splits)
    assert got.output.dtype == dtype
    assert_output_close(got.output, want.output, dtype)
    # Statistics are float32 from the same rounded inputs: tight whatever the dtype.
    for name in ("colsum", "colsq", "lse"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), atol=1e-5, rtol=1e-5)


def test_column_stats_kernel_single_query_row():
    generator = torch.Generator().manual_seed(7)
    query = random(3, 1, 16, dtype=torch.float32, generator=generator)
    key, value = (random(3, 9, 16, dtype=torch.float32, generator=generator) for _ in range(2))
    got = causal_attention_column_stats_triton(query, key, value, 0.25)
    want = causal_attention_column_stats_torch(query, key, value, 0.25)
    torch.testing.assert_close(got.colsum, want.colsum, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.colsum.sum(-1), torch.ones(1, 3, device=DEVICE))  # one row: its probabilities


def retained_sets(kv_heads: int, total: int, generator: torch.Generator) -> torch.Tensor:
    """Empty, full, a one-token budget per head, and random sets: a count that does not fill the last
    program's block of sets."""
    count = SETS_PER_PROGRAM + 2
    readable = torch.rand(count, kv_heads, total, generator=generator) < 0.4
    readable[0] = False
    readable[1] = True
    readable[2] = False
    readable[2, torch.arange(kv_heads), torch.arange(kv_heads) * 5 % total] = True
    return readable.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 3, 4])
def test_masked_sums_kernel_matches_twin(dtype, group):
    generator = torch.Generator().manual_seed(group)
    kv_heads, head_dim, total = 2, 24, 2 * BLOCK_ROWS + 37
    context = BLOCK_ROWS // 2 + 3  # group · context rows: never a multiple of the row block
    queries = random(kv_heads, group, context, head_dim, dtype=dtype, generator=generator)
    keys, values = (random(kv_heads, total, head_dim, dtype=dtype, generator=generator, scale=2.0) for _ in range(2))
    readable = retained_sets(kv_heads, total, generator)
    evidence = torch.zeros(total, dtype=torch.bool, device=DEVICE)
    evidence[10:20] = True
    got = masked_attention_sums_triton(queries, keys, values, 0.3, readable, evidence)
    want = masked_attention_sums_torch(queries, keys, values, 0.3, readable, evidence)
    assert got.rows == want.rows
    for name in ("recall", "error", "evidence_kept", "evidence_total"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), atol=1e-4, rtol=1e-5)
    assert torch.all(got.recall[0] == 0) and torch.all(got.error[0] == got.rows)


def test_masked_sums_kernel_without_evidence():
    generator = torch.Generator().manual_seed(11)
    queries = random(1, 2, 3, 16, dtype=torch.float32, generator=generator)
    keys, values = (random(1, 20, 16, dtype=torch.float32, generator=generator) for _ in range(2))
    readable = retained_sets(1, 20, generator)
    got = masked_attention_sums_triton(queries, keys, values, 0.5, readable)
    want = masked_attention_sums_torch(queries, keys, values, 0.5, readable)
    torch.testing.assert_close(got.error, want.error, atol=1e-5, rtol=1e-5)
    assert torch.all(got.evidence_total == 0) and torch.all(got.evidence_kept == 0)
