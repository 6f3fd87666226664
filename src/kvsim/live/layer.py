"""One layer of the policy cache: what it stores, how attention reads it, and how it shrinks.

Layout. Heads may keep different tokens (per-head budgets, per-head scores), so full-precision
tokens sit in a padded `[1, kv_heads, width, head_dim]` tensor, each head's tokens first in
position order, with `positions[h, slot]` the token's absolute position and -1 marking padding;
width is the largest head's count, so padding is what the other heads lack (it is counted as held
bytes). Low-precision tokens (quantize retention) live beside them as packed codes in the same
padded way. Keys keep the RoPE rotation of their true position, and new tokens are rotated at
their true position because the layer reports every token it has seen as its sequence length.

Decisions. The first forward is the prefill: attention is full and causal, and the layer keeps
what the policy needs to decide (keys, values, the observation window's queries, the column
statistics) in a `CacheView`, the object the simulator builds from traces. The cache decides for
all layers at once after the last layer (allocators share budget across layers) through
`kvsim.policies.compress`, the simulator's code. Every-step and lagged schedules then accumulate
each new query's attention and re-select through the same `select` on their steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kvsim.errors import KvsimError
from kvsim.kernels import causal_attention_column_stats
from kvsim.live.layer_base import SeenTokensLayer
from kvsim.live.lowbit import PackedTokens
from kvsim.policies.compress import select
from kvsim.policies.view import CacheView
from kvsim.sim.continuation import grouped_matmul

if TYPE_CHECKING:
    from kvsim.live.cache import PolicyCache

PADDING = -1


class PolicyLayer(SeenTokensLayer):
    is_sliding = False

    def __init__(self, index: int, cache: PolicyCache) -> None:
        super().__init__()
        self.index = index
        self.cache = cache
        self.seen = 0  # tokens this layer has been given, kept or not: the next token's position
        self.positions: torch.Tensor | None = None  # [kv_heads, width] int64, PADDING where empty
        self.low_keys: PackedTokens | None = None
        self.low_values: PackedTokens | None = None
        self.low_positions: torch.Tensor | None = None  # [kv_heads, m]
        self.colsum: torch.Tensor | None = None  # [heads, width] accumulated attention (stepwise schedules)
        self.window_queries: torch.Tensor | None = None  # [heads, w, head_dim] the most recent queries
        self.prefill_view: CacheView | None = None
        self.rows_since_decision = 0

    # --- the transformers cache-layer interface -------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.shape[0] != 1:
            raise KvsimError(f"the policy cache runs batch size 1, got {key_states.shape[0]}: generate one prompt at a time")
        self.dtype, self.device = key_states.dtype, key_states.device
        empty = key_states[:, :, :0]
        self.keys, self.values = empty.clone(), value_states[:, :, :0].clone()
        self.positions = torch.empty(key_states.shape[1], 0, dtype=torch.int64, device=self.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[2]
        new_positions = torch.arange(self.seen, self.seen + n, device=self.device)
        self.keys = torch.cat([self.keys, key_states], dim=2)
        self.values = torch.cat([self.values, value_states], dim=2)
        self.positions = torch.cat([self.positions, new_positions.expand(self.positions.shape[0], n)], dim=1)
        if self.colsum is not None:
            self.colsum = torch.cat([self.colsum, self.colsum.new_zeros(self.colsum.shape[0], n)], dim=1)
        self.seen += n
        return self.keys, self.values

    def adopt_prefill(self, recorded: PolicyLayer) -> None:
        """Start from another layer's recorded prefill (its tensors are shared, never written in place)."""
        self.dtype, self.device = recorded.dtype, recorded.device
        self.keys, self.values, self.positions = recorded.keys, recorded.values, recorded.positions
        self.seen, self.prefill_view = recorded.seen, recorded.prefill_view
        self.is_initialized = True

    # --- attention ------------------------------------------------------------------------------

    def attend(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """[1, n, heads, d] attention output for query [1, heads, n, d] of the newest n tokens."""
        if self.cache.decided:
            return self._attend_kept(query, scaling)
        return self._attend_prefill(query, scaling)

    def _attend_prefill(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        q, keys, values = query[0], self.keys[0], self.values[0]
        n = q.shape[1]
        if n != keys.shape[1]:
            raise KvsimError("a policy cache must start empty: pass a new cache (policy.cache(model)) to each generate call")
        stats = causal_attention_column_stats(q, keys, values, scaling, self.cache.row_splits)
        window = min(self.cache.window, n)
        self.prefill_view = CacheView(
            layer=self.index,
            n_layers=len(self.cache.layers),
            keys=keys.float(),
            values=values.float(),
            positions=torch.arange(n, device=self.device),
            queries=q[:, n - window :].float(),
            query_positions=torch.arange(n - window, n, device=self.device),
            scaling=scaling,
            colsum=stats.colsum.sum(0),
            colsq=stats.colsq.sum(0),
        )
        output = stats.output.to(query.dtype).transpose(0, 1).unsqueeze(0)
        if self.index == self.cache.shape.policy_layers[-1]:
            self.cache.decide()
        return output

    def _attend_kept(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        keys, values, positions = self._readable()
        heads, n, head_dim = query.shape[1:]
        kv_heads = keys.shape[0]
        stepwise = self.cache.policy.schedule.interval is not None and self.colsum is not None
        if n == 1 and not stepwise and bool((positions >= 0).all()):
            output = F.scaled_dot_product_attention(query, keys[None], values[None], scale=scaling, enable_gqa=True)
            return output.transpose(1, 2)
        query_positions = torch.arange(self.seen - n, self.seen, device=self.device)
        visible = (positions >= 0)[:, None, :] & (positions[:, None, :] <= query_positions[None, :, None])  # [kv, n, L]
        if not stepwise:
            mask = visible.repeat_interleave(heads // kv_heads, dim=0)[None]
            output = F.scaled_dot_product_attention(query, keys[None], values[None], attn_mask=mask, scale=scaling, enable_gqa=True)
            return output.transpose(1, 2)
        grouped = query[0].float().reshape(kv_heads, heads // kv_heads, n, head_dim)
        logits = grouped_matmul(grouped, keys.float().transpose(-1, -2)) * scaling
        probs = logits.masked_fill(~visible[:, None], float("-inf")).softmax(-1)  # [kv, group, n, L]
        output = grouped_matmul(probs, values.float()).reshape(heads, n, head_dim).to(query.dtype)
        self._observe(query[0], probs)
        return output.transpose(0, 1).unsqueeze(0)

    def _readable(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """keys, values [kv, L, d] and positions [kv, L]: full-precision slots, then low-precision ones."""
        keys, values, positions = self.keys[0], self.values[0], self.positions
        if self.low_keys is None:
            return keys, values, positions
        return (
            torch.cat([keys, self.low_keys.unpack()], dim=1),
            torch.cat([values, self.low_values.unpack()], dim=1),
            torch.cat([positions, self.low_positions], dim=1),
        )

    # --- every-step and lagged schedules --------------------------------------------------------

    def _observe(self, queries: torch.Tensor, probs: torch.Tensor) -> None:
        """Accumulate the new rows' attention, slide the query window, and re-select on schedule."""
        width = self.positions.shape[1]
        self.colsum += probs[..., :width].sum(2).reshape(self.colsum.shape[0], width)
        window = self.window_queries.shape[1]
        self.window_queries = torch.cat([self.window_queries, queries.float()], dim=1)[:, -window:]
        before = self.rows_since_decision
        self.rows_since_decision += queries.shape[1]
        interval = self.cache.policy.schedule.interval
        if self.rows_since_decision // interval > before // interval:
            view = self.current_view()
            kept = select(self.cache.policy, view, self.cache.policy.scorer.score(view), self.cache.budgets[self.index])
            self.shrink(view, kept, view.present & ~kept)

    def current_view(self) -> CacheView:
        """The view over every position some head holds at full precision (`present` says which)."""
        if bool((self.positions == self.positions[:1]).all()):  # heads share one set (no padding): read it as is
            return self._view(self.keys[0].float(), self.values[0].float(), self.positions[0], self.colsum, torch.ones_like(self.positions, dtype=torch.bool))
        held = self.positions >= 0
        head, slot = held.nonzero(as_tuple=True)
        position = self.positions[head, slot]
        # A bitmap over every position seen gives the union and each position's index in it
        # without sorting (positions are below `seen`).
        in_union = torch.zeros(self.seen, dtype=torch.bool, device=self.device)
        in_union[position] = True
        union = in_union.nonzero().flatten()
        at = (torch.cumsum(in_union, 0) - 1)[position]
        kv_heads, _, head_dim = self.keys.shape[1:]
        keys = self.keys.new_zeros(kv_heads, union.numel(), head_dim, dtype=torch.float32)
        values = torch.zeros_like(keys)
        keys[head, at] = self.keys[0, head, slot].float()
        values[head, at] = self.values[0, head, slot].float()
        present = torch.zeros(kv_heads, union.numel(), dtype=torch.bool, device=self.device)
        present[head, at] = True
        group = self.colsum.shape[0] // kv_heads
        colsum = self.colsum.new_zeros(kv_heads, group, union.numel())
        colsum[head, :, at] = self.colsum.reshape(kv_heads, group, -1)[head, :, slot]
        return self._view(keys, values, union, colsum.reshape(-1, union.numel()), present)

    def _view(self, keys, values, positions, colsum, present) -> CacheView:
        window = self.window_queries.shape[1]
        return CacheView(
            layer=self.index,
            n_layers=len(self.cache.layers),
            keys=keys,
            values=values,
            positions=positions,
            queries=self.window_queries,
            query_positions=torch.arange(self.seen - window, self.seen, device=self.device),
            scaling=self.cache.scaling,
            colsum=colsum,
            present=present,
        )

    # --- shrinking ------------------------------------------------------------------------------

    def shrink(self, view: CacheView, kept: torch.Tensor, evicted: torch.Tensor) -> None:
        """Keep `kept` [kv, n] of `view`'s tokens at full precision, apply the retention to `evicted`."""
        retention = self.cache.policy.retention
        retained = retention.retain(view.keys, view.values, kept, evicted)
        order, valid = _packed_order(kept)
        self.keys = _gather(retained.keys, order).to(self.dtype)[None]
        self.values = _gather(retained.values, order).to(self.dtype)[None]
        self.positions = view.positions[order].masked_fill(~valid, PADDING)
        if self.cache.policy.schedule.interval is not None:
            group = view.heads // view.kv_heads
            colsum = view.colsum.reshape(view.kv_heads, group, -1).gather(2, order[:, None].expand(-1, group, -1))
            self.colsum = colsum.masked_fill(~valid[:, None], 0.0).reshape(view.heads, -1)
            self.window_queries = view.queries[:, -self.cache.window :]
        low = retained.low_precision
        if bool(low.any()):
            self._keep_low_precision(view, low, retention.bits())
        self.prefill_view = None

    def _keep_low_precision(self, view: CacheView, low: torch.Tensor, bits: int) -> None:
        order, valid = _packed_order(low)
        keys = PackedTokens.pack(_gather(view.keys, order).to(self.dtype), bits)
        values = PackedTokens.pack(_gather(view.values, order).to(self.dtype), bits)
        positions = view.positions[order].masked_fill(~valid, PADDING)
        if self.low_keys is None:
            self.low_keys, self.low_values, self.low_positions = keys, values, positions
        else:
            self.low_keys = self.low_keys.append(keys)
            self.low_values = self.low_values.append(values)
            self.low_positions = torch.cat([self.low_positions, positions], dim=1)

    # --- accounting -----------------------------------------------------------------------------

    def held_bytes(self) -> tuple[int, int]:
        """(bytes of keys and values held, of which padding)."""
        full = self.keys.numel() * self.keys.element_size() * 2
        per_slot = full // max(1, self.positions.numel())
        padding = int((self.positions < 0).sum()) * per_slot
        if self.low_keys is None:
            return full, padding
        low = self.low_keys.nbytes + self.low_values.nbytes
        per_low = low // max(1, self.low_positions.numel())
        return full + low, padding + int((self.low_positions < 0).sum()) * per_low

    def held_tokens(self) -> tuple[int, int]:
        """(full-precision tokens, low-precision tokens) held over all KV heads, padding excluded."""
        low = 0 if self.low_positions is None else int((self.low_positions >= 0).sum())
        return int((self.positions >= 0).sum()), low


def _packed_order(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head, the indices of `mask`'s True entries first (in order), padded to the largest count."""
    counts = mask.sum(dim=1)
    width = int(counts.max()) if mask.numel() else 0
    order = torch.sort(mask.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :width]
    return order, torch.arange(width, device=mask.device)[None, :] < counts[:, None]


def _gather(tensor: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    return tensor.gather(1, order[..., None].expand(-1, -1, tensor.shape[-1]))
