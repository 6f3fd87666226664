"""Teacher-forced replay of one sample's attention layers under one policy and budget.

The continuation is the full-cache one, so every layer's inputs are the captured ones; errors do
not propagate between layers (how well this predicts the live model is measured, not assumed).
Prefill-once policies are evaluated on all continuation rows in one block. Every-step and lagged
policies walk the rows in order: each new token joins the cache, its query reads the compressed
cache (that attention also feeds accumulated scores, as in the live model), and on the schedule's
steps each head is brought back to its budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from kvsim.policies.budget import Budget
from kvsim.policies.compress import compress_prefill, select
from kvsim.policies.policy import Policy
from kvsim.policies.retention import Drop, Retention
from kvsim.policies.view import CacheView
from kvsim.sim.continuation import ContinuationAttention, grouped_matmul
from kvsim.sim.metrics import MetricSums, block_metrics, compressed_probs

# Bytes per cached element: caches are served in fp16/bf16 whatever dtype the trace holds.
ELEMENT_BYTES = 2
# Low-precision tokens also store a scale and a zero point (fp16 each) per token and head.
QUANT_OVERHEAD_BYTES = 4


@dataclass
class LayerOutcome:
    layer: int
    metrics: MetricSums
    kept_tokens: int  # full-precision tokens held at the end, over all KV heads
    low_precision_tokens: int
    kv_bytes: int


def replay(
    policy: Policy, budget: Budget, views: Sequence[CacheView], fulls: Sequence[ContinuationAttention]
) -> list[LayerOutcome]:
    """Outcomes per layer of `policy` at `budget`."""
    keeps, budgets = compress_prefill(policy, views, budget, views[0].length)
    if policy.schedule.interval is None:
        return replay_selection(keeps, views, fulls, policy.retention)
    return [
        _stepwise(policy, view, full, keep, layer_budgets)
        for view, full, keep, layer_budgets in zip(views, fulls, keeps, budgets)
    ]


def replay_selection(
    keeps: Sequence[torch.Tensor],
    views: Sequence[CacheView],
    fulls: Sequence[ContinuationAttention],
    retention: Retention | None = None,
) -> list[LayerOutcome]:
    """Outcomes of a fixed prefill selection per layer ([kv_heads, prompt_len] masks)."""
    retention = retention or Drop()
    return [_prefill_once(retention, view, full, keep) for view, full, keep in zip(views, fulls, keeps)]


def _prefill_once(retention: Retention, view: CacheView, full: ContinuationAttention, keep: torch.Tensor) -> LayerOutcome:
    retained = retention.retain(view.keys, view.values, keep, ~keep)
    readable = keep | retained.low_precision
    # Each head's readable prompt positions first (in order), padding after; then the continuation.
    counts = readable.sum(dim=1)
    width = int(counts.max())
    prompt_columns = torch.sort(readable.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :width]
    prompt_readable = torch.arange(width)[None, :] < counts[:, None]
    continuation = torch.arange(view.length, full.total).expand(view.kv_heads, -1)
    columns = torch.cat([prompt_columns, continuation], dim=1)
    readable_columns = torch.cat([prompt_readable, torch.ones_like(continuation, dtype=torch.bool)], dim=1)
    keys = values = None
    if retained.keys is not view.keys or retained.values is not view.values:
        keys = _at(torch.cat([retained.keys, full.keys[:, view.length :]], dim=1), columns)
        values = _at(torch.cat([retained.values, full.values[:, view.length :]], dim=1), columns)
    sums, _ = block_metrics(full, slice(None), columns, readable_columns, keys, values)
    kept = int(keep.sum()) + continuation.numel()
    return _outcome(retention, view, sums, kept, int(retained.low_precision.sum()))


def _at(tensor: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """[kv_heads, T, d] -> [kv_heads, m, d] at each head's columns."""
    return tensor.gather(1, columns[..., None].expand(-1, -1, tensor.shape[-1]))


def _stepwise(
    policy: Policy, view: CacheView, full: ContinuationAttention, keep: torch.Tensor, budgets: torch.Tensor
) -> LayerOutcome:
    prompt, total, kv_heads = view.length, full.total, view.kv_heads
    retained = policy.retention.retain(view.keys, view.values, keep, ~keep)
    keys = torch.cat([retained.keys, full.keys[:, prompt:]], dim=1)
    values = torch.cat([retained.values, full.values[:, prompt:]], dim=1)
    held = torch.zeros(kv_heads, total, dtype=torch.bool)  # full precision
    held[:, :prompt] = keep
    low = torch.zeros_like(held)
    low[:, :prompt] = retained.low_precision
    colsum = torch.zeros(view.heads, total)
    if view.colsum is not None:
        colsum[:, :prompt] = view.colsum
    window = view.queries.shape[1]
    all_queries = torch.cat([view.queries, full.queries.reshape(view.heads, full.rows, -1)], dim=1)
    # Scores of every window a rescoring step will see, computed once (valid while kept keys stay unchanged).
    all_logits = None
    if not policy.retention.rewrites_kept:
        grouped = all_queries.reshape(kv_heads, -1, all_queries.shape[1], all_queries.shape[2])
        all_logits = (grouped_matmul(grouped, keys.transpose(-1, -2)) * view.scaling).reshape(view.heads, -1, total)
    # Plain dropping never changes a key or value, so the metrics of all rows can be computed in one
    # batch at the end from each row's readable mask; the loop only needs each row's attention.
    deferred = policy.retention.bits() is None and not policy.retention.rewrites_kept
    readable_rows = torch.zeros(kv_heads, full.rows, total, dtype=torch.bool) if deferred else None
    sums = MetricSums()
    for row in range(full.rows):
        position = prompt + row
        held[:, position] = True
        if deferred:
            readable_rows[:, row] = held
            probs = compressed_probs(full.logits[:, :, row : row + 1], held)
        else:
            rewritten = low.any() or policy.retention.rewrites_kept
            block, probs = block_metrics(
                full, slice(row, row + 1), None, held | low, keys if rewritten else None, values if rewritten else None
            )
            sums.add(block)
        colsum += probs.reshape(view.heads, total)
        if (row + 1) % policy.schedule.interval:
            continue
        end = position + 1
        current = replace(
            view,
            keys=keys[:, :end],
            values=values[:, :end],
            positions=torch.arange(end),
            queries=all_queries[:, row + 1 : row + 1 + window],
            query_positions=torch.arange(end - window, end),
            colsum=colsum[:, :end],
            colsq=None,
            present=held[:, :end],
            window_logits=None if all_logits is None else all_logits[:, row + 1 : row + 1 + window, :end],
        )
        kept = select(policy, current, policy.scorer.score(current), budgets)
        evicted = held[:, :end] & ~kept
        step = policy.retention.retain(keys[:, :end], values[:, :end], kept, evicted)
        keys[:, :end], values[:, :end] = step.keys, step.values
        held[:, :end] = kept
        low[:, :end] |= step.low_precision
    if deferred:
        sums, _ = block_metrics(full, slice(None), None, readable_rows)
    return _outcome(policy.retention, view, sums, int(held.sum()), int(low.sum()))


def _outcome(retention: Retention, view: CacheView, sums: MetricSums, kept: int, low: int) -> LayerOutcome:
    head_dim = view.keys.shape[-1]
    full_bytes = 2 * head_dim * ELEMENT_BYTES
    bits = retention.bits() or 0
    low_bytes = 2 * (head_dim * bits // 8 + QUANT_OVERHEAD_BYTES)
    return LayerOutcome(view.layer, sums, kept, low, kept * full_bytes + low * low_bytes)
