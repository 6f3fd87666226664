"""Teacher-forced replay of one sample's attention layers under one policy and budget.

The continuation is the full-cache one, so every layer's inputs are the captured ones; errors do
not propagate between layers (how well this predicts the live model is measured, not assumed).
Prefill-once policies are evaluated on all continuation rows in one block. Every-step and lagged
policies walk the rows in order through `kvsim.policies.held.HeldLayer`, the engine the live cache
runs: each new token joins the cache, its query reads the compressed cache (that attention also
feeds accumulated scores, as in the live model), and on the schedule's steps each head is brought
back to its budget. Layers are independent here, so policies that decide per KV head step many
layers at once, as one stack of heads (`replay_stacked`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kvsim.policies.budget import Budget
from kvsim.policies.compress import compress_prefill
from kvsim.policies.held import HeldLayer, handed_to_retention, kv_bytes, stacks_layers
from kvsim.policies.policy import Policy
from kvsim.policies.retention import Drop, Retention
from kvsim.policies.view import CacheView
from kvsim.sim.continuation import ContinuationAttention
from kvsim.sim.metrics import MetricSums, block_metrics, readable_columns

@dataclass
class LayerOutcome:
    layer: int
    metrics: MetricSums
    kept_tokens: int  # full-precision prompt tokens held after the prompt's decision, over all KV heads
    low_precision_tokens: int
    kv_bytes: int  # what the live cache holds then (`kvsim.policies.held.kv_bytes`)


def replay(
    policy: Policy, budget: Budget, views: Sequence[CacheView], fulls: Sequence[ContinuationAttention]
) -> list[LayerOutcome]:
    """Outcomes per layer of `policy` at `budget`."""
    keeps, budgets = compress_prefill(policy, views, budget, views[0].length)
    if policy.schedule.interval is None:
        return [
            _prefill_once(policy.retention, view, full, keep, handed_to_retention(policy, view, keep, layer_budgets))
            for view, full, keep, layer_budgets in zip(views, fulls, keeps, budgets)
        ]
    if stacks_layers(policy, views):
        return replay_stacked(policy, views, fulls, keeps, budgets)
    return [
        replay_stepwise(policy, view, full, keep, layer_budgets)
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
    return [_prefill_once(retention, view, full, keep, ~keep) for view, full, keep in zip(views, fulls, keeps)]


def _prefill_once(retention: Retention, view: CacheView, full: ContinuationAttention, keep: torch.Tensor, evicted: torch.Tensor) -> LayerOutcome:
    retained = retention.retain(view.keys, view.values, keep, evicted, view.layer, view.n_layers)
    # Each head's readable prompt positions first (in order), padding after; then the continuation.
    prompt_columns, prompt_readable = readable_columns(keep | retained.low_precision)
    continuation = torch.arange(view.length, full.total).expand(view.kv_heads, -1)
    columns = torch.cat([prompt_columns, continuation], dim=1)
    readable = torch.cat([prompt_readable, torch.ones_like(continuation, dtype=torch.bool)], dim=1)
    keys = values = None
    if retained.keys is not view.keys or retained.values is not view.values:
        keys = _at(torch.cat([retained.keys, full.keys[:, view.length :]], dim=1), columns)
        values = _at(torch.cat([retained.values, full.values[:, view.length :]], dim=1), columns)
    sums = block_metrics(full, columns, readable, keys=keys, values=values)
    return _outcome(retention, view, sums, int(keep.sum()), retained.low_precision.sum(1))


def _at(tensor: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """[kv_heads, T, d] -> [kv_heads, m, d] at each head's columns."""
    return tensor.gather(1, columns[..., None].expand(-1, -1, tensor.shape[-1]))


def replay_stepwise(
    policy: Policy,
    view: CacheView,
    full: ContinuationAttention,
    keep: torch.Tensor,
    budgets: torch.Tensor,
    on_row: Callable[[int, HeldLayer], None] = lambda row, layer: None,
) -> LayerOutcome:
    """Drive the engine the live cache runs (`HeldLayer`) with the captured continuation: each row's
    key and value join the cache, its query attends over what is held (that attention feeds the
    accumulated scores), and on the schedule's steps every head is brought back to its budget.
    `on_row` sees the layer after each row (the sim-equals-live tests compare it step by step)."""
    layer = HeldLayer.after_prefill(policy, view, keep, budgets, max(policy.observation_window, 1), torch.float32)
    held_after_prefill = layer.held_tokens()[0], layer.low_counts()
    outputs, readable = _step_rows(layer, [full], on_row)
    return _stepwise_outcome(policy, view, full, outputs, readable, *held_after_prefill)


def replay_stacked(
    policy: Policy, views: Sequence[CacheView], fulls: Sequence[ContinuationAttention], keeps: Sequence[torch.Tensor], budgets: torch.Tensor
) -> list[LayerOutcome]:
    """`replay_stepwise` of many layers at once, for policies whose decode-time decisions are per KV
    head (`stacks_layers`): consecutive layers' `HeldLayer`s after the prompt's decision are stacked
    into one (`HeldLayer.stack`), so a continuation row costs one set of tensor operations instead of
    one per layer, and every layer's outcome is read back from its own heads. A stack holds at most
    `STACK_ROWS` tokens (`stack_groups`). The tests hold it to `replay_stepwise` layer by layer."""
    window = max(policy.observation_window, 1)
    outcomes = []
    tokens = [int(keep.sum()) + view.kv_heads * full.rows for view, keep, full in zip(views, keeps, fulls)]
    for group in stack_groups(tokens, STACK_ROWS):
        layers = [HeldLayer.after_prefill(policy, views[i], keeps[i], budgets[i], window, torch.float32) for i in group]
        held = [(layer.held_tokens()[0], layer.low_counts()) for layer in layers]
        outputs, readable = _step_rows(HeldLayer.stack(layers), [fulls[i] for i in group])
        for at, i in enumerate(group):
            heads = slice(at * views[i].kv_heads, (at + 1) * views[i].kv_heads)
            outcomes.append(_stepwise_outcome(policy, views[i], fulls[i], outputs[heads], readable[heads], *held[at]))
    return outcomes


# Tokens one stack may hold. Every continuation row copies the stack's keys and values (appending,
# then shrinking), so this bounds those copies, and the memory they take while both exist, to about
# 4 MiB a tensor at head_dim 64 in float32; a 1.5K-token prompt of a 30-layer model with 3 KV heads
# at budget 0.1 still steps as one stack, an 8K-token one in five.
STACK_ROWS = 1 << 14


def stack_groups(tokens: Sequence[int], limit: int) -> list[list[int]]:
    """Consecutive layers in groups of at most `limit` held tokens (a layer above it alone)."""
    groups: list[list[int]] = []
    total = 0
    for layer, count in enumerate(tokens):
        if not groups or total + count > limit:
            groups.append([])
            total = 0
        groups[-1].append(layer)
        total += count
    return groups


def _step_rows(
    layer: HeldLayer, fulls: Sequence[ContinuationAttention], on_row: Callable[[int, HeldLayer], None] = lambda row, layer: None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed the continuation rows of `fulls` (one per layer `layer` stacks) through it in order:
    (outputs [kv, group, C, d], readable [kv, C, T] what each row's query read), over the stack's heads."""
    first = fulls[0]
    start, rows, total = first.prompt_len, first.rows, first.total
    keys = torch.cat([full.keys[:, start:] for full in fulls])
    values = torch.cat([full.values[:, start:] for full in fulls])
    queries = torch.cat([full.queries for full in fulls])  # [kv, group, C, d]
    kv_heads, group, _, head_dim = queries.shape
    readable = torch.zeros(kv_heads, rows, total, dtype=torch.bool)
    outputs = []
    for row in range(rows):
        layer.append(keys[:, row : row + 1], values[:, row : row + 1])
        head, _, _, _, positions = layer.readable_rows(unpack=False)
        readable[head, row, positions] = True
        outputs.append(layer.attend(queries[:, :, row : row + 1].reshape(kv_heads * group, 1, head_dim)))
        on_row(row, layer)
    return torch.cat(outputs, dim=1).reshape(kv_heads, group, rows, head_dim), readable


def _stepwise_outcome(
    policy: Policy, view: CacheView, full: ContinuationAttention, outputs: torch.Tensor, readable: torch.Tensor, kept: int, low: torch.Tensor
) -> LayerOutcome:
    """One layer's outcome from its rows' outputs and what each row read: the metrics of all rows at
    once, over every position some row could read."""
    columns, real = readable_columns(readable.any(1))
    per_row = readable.gather(2, columns[:, None, :].expand(-1, full.rows, -1)) & real[:, None, :]
    sums = block_metrics(full, columns, per_row, outputs=outputs)
    return _outcome(policy.retention, view, sums, kept, low)


def _outcome(retention: Retention, view: CacheView, sums: MetricSums, kept: int, low: torch.Tensor) -> LayerOutcome:
    """kept (in all) and low ([kv] per head) are the tokens held right after the prompt's decision:
    what kv_bytes counts."""
    bits = retention.bits(view.layer, view.n_layers)
    return LayerOutcome(view.layer, sums, kept, int(low.sum()), kv_bytes(kept, low, view.keys.shape[-1], bits))
