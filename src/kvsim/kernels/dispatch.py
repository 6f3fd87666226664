"""Which implementation of a kernel runs: Triton for CUDA tensors when triton imports, else the
PyTorch twin. The CPU path is the default and never imports triton."""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence

import torch

from kvsim.kernels.column_stats import DEFAULT_CHUNK_BYTES, ColumnStats, causal_attention_column_stats_torch
from kvsim.kernels.masked_attention import DEFAULT_CHUNK_BYTES as MASKED_CHUNK_BYTES
from kvsim.kernels.masked_attention import MaskedAttentionSums, masked_attention_sums_torch


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def uses_triton(tensor: torch.Tensor) -> bool:
    """True when the Triton kernel would run on `tensor` (CUDA, triton installed)."""
    return tensor.is_cuda and triton_importable()


def causal_attention_column_stats(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    row_splits: Sequence[int] = (),
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    window: int | None = None,
) -> ColumnStats:
    """Attention output, row lse and column sums; see `causal_attention_column_stats_torch`.
    Sliding windows run on the PyTorch twin (the Triton kernel masks causally only)."""
    if uses_triton(query) and window is None:
        from kvsim.kernels.column_stats_triton import causal_attention_column_stats_triton

        return causal_attention_column_stats_triton(query, key, value, scaling, row_splits, chunk_bytes)
    return causal_attention_column_stats_torch(query, key, value, scaling, row_splits, chunk_bytes, window)


def masked_attention_sums(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    readable: torch.Tensor,
    evidence: torch.Tensor | None = None,
    chunk_bytes: int = MASKED_CHUNK_BYTES,
) -> MaskedAttentionSums:
    """Recall, output error and evidence sums of many retained sets; see `masked_attention_sums_torch`."""
    if uses_triton(keys):
        from kvsim.kernels.masked_attention_triton import masked_attention_sums_triton

        return masked_attention_sums_triton(queries, keys, values, scaling, readable, evidence, chunk_bytes)
    return masked_attention_sums_torch(queries, keys, values, scaling, readable, evidence, chunk_bytes)
