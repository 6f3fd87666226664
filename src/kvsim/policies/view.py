"""What a policy sees of one layer's cache when it decides: the same object in the simulator and
in the live cache, so one policy makes the same decisions in both places."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from kvsim.errors import KvsimError
from kvsim.policies.rope import Rotary


@dataclass
class CacheView:
    """One layer's cache at a decision point.

    keys, values: [kv_heads, n, head_dim] post-RoPE, the tokens currently cached, at the cache's
        storage dtype (float32 in the simulator): parts compute in float32 (`.float()`), so the live
        cache needs no float32 copy of every layer while it waits for the last one to decide.
    positions: [n] int64 absolute positions of those tokens (increasing).
    queries: [heads, w, head_dim] float32, the observation window: the most recent w queries.
    query_positions: [w] absolute positions of those queries.
    colsum, colsq: [heads, n] float32, Σ and Σ² of the attention each cached token received from
        every query so far (all prompt queries at the end of prefill), or None when unknown.
    present: [kv_heads, n] bool, or None when every head holds every token. Heads evict
        independently, so after per-head eviction a view spans the union of what the heads hold
        and `present` says which head holds what; scorers' results are ignored where it is False.
    rope: the model's rotary embedding, for scorers that move queries to other positions; None
        when unknown.
    reconstruction: [heads, n] float32, KVzip's scores (the most attention each token received
        while the model repeated the compressed prefix, `kvsim.traces.kvzip`), or None when not
        recorded (capture --kvzip).
    layers: how many model layers the view stacks along its head axis, layer after layer (the
        simulator's layer-stacked replay, `kvsim.policies.held.stacks_layers`); 1 otherwise.
        Whatever a part computes "over the layer's heads" it computes per stacked layer
        (`layer_mean`), so a stack decides exactly what its layers would decide one by one.
    """

    layer: int
    n_layers: int
    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    queries: torch.Tensor
    query_positions: torch.Tensor
    scaling: float
    colsum: torch.Tensor | None = None
    colsq: torch.Tensor | None = None
    present: torch.Tensor | None = None
    window_logits: torch.Tensor | None = None  # [heads, w, n] scaled q·k, when already computed
    decoding: bool = False  # a decode-time rescoring (the engine's `HeldLayer.view`), not the prompt's decision
    # Keep each window's attention once computed: the simulator reuses one view for many policies;
    # the live cache, which holds every layer's view until the last layer decides, does not.
    cache_windows: bool = True
    rope: Rotary | None = None
    reconstruction: torch.Tensor | None = None
    layers: int = 1

    @property
    def kv_heads(self) -> int:
        return self.keys.shape[0]

    @property
    def heads(self) -> int:
        return self.queries.shape[0]

    @property
    def length(self) -> int:
        return self.positions.shape[0]

    def take(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values [m, d] at `mask` [kv, n], head after head, each head's in position order."""
        return self.keys[mask], self.values[mask]

    def window(self, size: int) -> torch.Tensor:
        """[heads, size, n]: causal softmax attention of the last `size` window queries.

        Computed for the rows asked for only and kept per size, so scorers of one policy (and the
        policies sharing a view) pay once, and a last-query scorer never pays for the whole window.
        """
        if size < 1:
            raise ValueError(f"window size must be at least 1, got {size}")
        if size > self.queries.shape[1]:
            raise KvsimError(
                f"a policy reads a {size}-query window but only {self.queries.shape[1]} queries were observed: "
                f"capture with --window {size} or more"
            )
        if size in self._windows:
            return self._windows[size]
        attention = self._attention_of_last(size)
        if self.cache_windows:
            self._windows[size] = attention
        return attention

    @cached_property
    def _windows(self) -> dict[int, torch.Tensor]:
        return {}

    def _attention_of_last(self, size: int) -> torch.Tensor:
        group = self.heads // self.kv_heads
        if self.window_logits is not None:
            logits = self.window_logits[:, -size:].reshape(self.kv_heads, group, size, self.length)
        else:
            logits = grouped_logits(self.queries[:, -size:].reshape(self.kv_heads, group, size, -1), self.keys, self.scaling)
        positions = self.positions
        if self.present is not None:  # a head never sees the tokens it does not hold
            positions = positions.expand(self.kv_heads, -1).masked_fill(~self.present, torch.iinfo(torch.int64).max)
        return causal_attention(logits, positions, self.query_positions[-size:]).reshape(self.heads, size, self.length)


def grouped_logits(queries: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """Scaled logits [kv, group, w, n] float32 of queries [kv, group, w, d] against keys [kv, n, d]:
    one matmul per KV head over its whole group (broadcasting the keys would copy them)."""
    kv_heads, group, rows, head_dim = queries.shape
    logits = torch.matmul(queries.float().reshape(kv_heads, group * rows, head_dim), keys.float().transpose(-1, -2))
    return (logits * scaling).reshape(kv_heads, group, rows, -1)


def causal_attention(logits: torch.Tensor, key_positions: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
    """Softmax of logits [kv, group, w, n] over the keys each query may see: those whose position
    (key_positions [n], or [kv, n] per head) is no later than the query's (query_positions [w])."""
    hidden = key_positions[..., None, None, :] > query_positions[:, None]
    return logits.masked_fill(hidden, float("-inf")).softmax(-1)


def layer_mean(per_query_head: torch.Tensor, view: CacheView) -> torch.Tensor:
    """[heads, n] -> [kv_heads, n]: the mean over each layer's query heads, the same row for every
    KV head of that layer (one shared set per layer). Per stacked layer when the view stacks several."""
    per_layer = per_query_head.reshape(view.layers, -1, per_query_head.shape[-1]).mean(1)
    return per_layer.repeat_interleave(view.kv_heads // view.layers, dim=0)


def reduce_group(per_query_head: torch.Tensor, kv_heads: int, how: str) -> torch.Tensor:
    """[heads, ...] -> [kv_heads, ...]: combine the query heads of each GQA group by mean or max."""
    grouped = per_query_head.reshape(kv_heads, -1, *per_query_head.shape[1:])
    return grouped.mean(1) if how == "mean" else grouped.amax(1)
