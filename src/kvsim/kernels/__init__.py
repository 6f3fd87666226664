"""Compute kernels: PyTorch reference twins now, Triton versions with the same signatures later."""

from kvsim.kernels.column_stats import ColumnStats, causal_attention_column_stats

__all__ = ["ColumnStats", "causal_attention_column_stats"]
