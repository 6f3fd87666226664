"""Compute kernels: a Triton kernel and a plain PyTorch twin with the same signature for each, and
a dispatching function (the name without suffix) that picks Triton for CUDA tensors when triton
imports and the twin otherwise.

- `causal_attention_column_stats`: causal attention with per-key Σp and Σp² (capture's statistics).
- `masked_attention_sums`: recall, output error and evidence mass of many retained sets at once.
"""

from kvsim.kernels.column_stats import ColumnStats, causal_attention_column_stats_torch
from kvsim.kernels.dispatch import causal_attention_column_stats, masked_attention_sums, uses_triton
from kvsim.kernels.masked_attention import MaskedAttentionSums, masked_attention_sums_torch

__all__ = [
    "ColumnStats",
    "MaskedAttentionSums",
    "causal_attention_column_stats",
    "causal_attention_column_stats_torch",
    "masked_attention_sums",
    "masked_attention_sums_torch",
    "uses_triton",
]
