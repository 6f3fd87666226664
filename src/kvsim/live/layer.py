"""One layer of the policy cache: the transformers cache-layer interface over kvsim's engine.

Before the decision (the prefill) the layer holds the prompt's keys and values as a plain cache
would, runs full causal attention, and records what the policy needs to decide (the observation
window's queries and the column statistics, computed in the same kernel as capture) in a
`CacheView`, the object the simulator builds from traces. It keeps keys and values at the model's
dtype there (the view does not copy them to float32), so the prefill holds little more than a plain
cache. The cache then decides for all layers at once and hands each layer its `HeldLayer`
(`kvsim.policies.held`): from then on the engine the simulator runs stores the tokens, attends,
and evicts on the schedule's steps. This layer knows nothing of its cache: it is given what it needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvsim.errors import KvsimError
from kvsim.kernels import causal_attention_column_stats
from kvsim.live.layer_base import SeenTokensLayer
from kvsim.policies.held import KV_ELEMENT_BYTES, HeldLayer
from kvsim.policies.rope import Rotary
from kvsim.policies.view import CacheView


class PolicyLayer(SeenTokensLayer):
    is_sliding = False

    def __init__(self, index: int, n_layers: int, window: int, row_splits: Sequence[int] = (), rope: Rotary | None = None) -> None:
        super().__init__()
        self.index, self.n_layers, self.window, self.row_splits = index, n_layers, window, tuple(row_splits)
        self.rope = rope  # the model's RoPE, for scorers that rotate queries
        self.reconstruction: torch.Tensor | None = None  # KVzip's [heads, prefix] scores, when a policy reads them
        self.seen = 0  # tokens this layer has been given, kept or not: the next token's position
        self.prefill_view: CacheView | None = None
        self.held: HeldLayer | None = None  # set once the cache has decided

    # --- the transformers cache-layer interface -------------------------------------------------

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.held is not None:
            self.held.append(key_states[0], value_states[0])
            self._expose_held()
        else:
            if self.seen:
                raise KvsimError("a policy cache must start empty: pass a new cache (policy.cache(model)) to each generate call")
            self.keys, self.values = key_states, value_states
        self.seen += key_states.shape[2]
        return self.keys, self.values

    def adopt_prefill(self, recorded: PolicyLayer) -> None:
        """Start from another layer's recorded prefill (its tensors are shared, never written in place)."""
        self.dtype, self.device = recorded.dtype, recorded.device
        self.keys, self.values = recorded.keys, recorded.values
        self.seen, self.prefill_view = recorded.seen, recorded.prefill_view
        self.is_initialized = True

    # --- attention ------------------------------------------------------------------------------

    def attend(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """[1, n, heads, d] attention output for query [1, heads, n, d] of the newest n tokens."""
        if self.held is not None:
            return self.held.attend(query[0]).transpose(0, 1).unsqueeze(0)
        return self._attend_prefill(query, scaling)

    def _attend_prefill(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        q, keys, values = query[0], self.keys[0], self.values[0]
        n = q.shape[1]
        stats = causal_attention_column_stats(q, keys, values, scaling, self.row_splits)
        window = min(self.window, n)
        self.prefill_view = CacheView(
            layer=self.index,
            n_layers=self.n_layers,
            keys=keys,
            values=values,
            positions=torch.arange(n, device=self.device),
            queries=q[:, n - window :].float(),
            query_positions=torch.arange(n - window, n, device=self.device),
            scaling=scaling,
            colsum=stats.colsum.sum(0),
            colsq=stats.colsq.sum(0),
            cache_windows=False,
            rope=self.rope,
            reconstruction=self.reconstruction,
        )
        return stats.output.to(query.dtype).transpose(0, 1).unsqueeze(0)

    def hold(self, held: HeldLayer) -> None:
        """From now on, store and evict with `held` (the prompt's view is no longer needed)."""
        self.held, self.prefill_view = held, None
        self._expose_held()

    def _expose_held(self) -> None:
        """What `update` returns and the attention function checks it was given: the ragged tokens as
        a [1, 1, N, d] view (4-D like every transformers cache's, so wrappers that read key shapes,
        such as kvpress's attention patch, pass it through untouched)."""
        self.keys, self.values = self.held.full.keys[None, None], self.held.full.values[None, None]

    # --- accounting -----------------------------------------------------------------------------

    def held_bytes(self) -> int:
        """Bytes of keys and values held at the serving dtype (see `kvsim.policies.held`)."""
        if self.held is not None:
            return self.held.held_bytes()
        return (self.keys.numel() + self.values.numel()) * KV_ELEMENT_BYTES

    def held_tokens(self) -> tuple[int, int]:
        """(full-precision tokens, low-precision tokens) held over all KV heads."""
        if self.held is not None:
            return self.held.held_tokens()
        return self.keys.shape[1] * self.keys.shape[2], 0

    def kept_positions(self) -> list[torch.Tensor]:
        """Per KV head, the positions held at full precision, in order."""
        if self.held is not None:
            return self.held.kept_positions()
        return [torch.arange(self.keys.shape[2])] * self.keys.shape[1]

    def prefill_bytes(self) -> int:
        """Real bytes held while the prefill waits for the decision: keys and values at the model's
        dtype plus the decision's inputs (statistics and the window's queries)."""
        tensors = [self.keys, self.values]
        if self.prefill_view is not None:
            tensors += [self.prefill_view.colsum, self.prefill_view.colsq, self.prefill_view.queries]
        return sum(t.numel() * t.element_size() for t in tensors)
