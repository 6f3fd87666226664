"""A sliding-window layer of the policy cache: it keeps the last `window` − 1 tokens, which is all
the next query can read, and no policy touches it.

In a sliding layer (Gemma 3, Mistral, `kvsim.shape`) the query at position p reads the keys of
positions p − window + 1 … p, itself included, so a layer that keeps the last window − 1 tokens
holds exactly what attention needs: its memory is bounded by construction and a policy has
nothing to decide there. Attention runs the code capture runs (`causal_attention_column_stats`
with the window for the prefill, `decode_attention` for single steps) on the same keys, so a
policy cache reproduces the traced forward bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvsim.kernels import causal_attention_column_stats
from kvsim.live.layer_base import SeenTokensLayer
from kvsim.policies.held import KV_ELEMENT_BYTES
from kvsim.traces.recorder import causal_sdpa, decode_attention


class SlidingLayer(SeenTokensLayer):
    is_sliding = True
    prefill_view = None  # nothing for a policy to decide on

    def __init__(self, index: int, window: int, row_splits: Sequence[int] = ()) -> None:
        super().__init__()
        self.index = index
        self.window = window
        self.row_splits = tuple(row_splits)
        self.seen = 0  # tokens this layer has been given: the next token's position

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=2)
        self.values = torch.cat([self.values, value_states], dim=2)
        self.seen += key_states.shape[2]
        return self.keys, self.values

    def get_max_length(self) -> int:
        return self.window

    def adopt_prefill(self, recorded: SlidingLayer) -> None:
        """Start from another cache's layer after its prefill (tensors are shared, never written in place)."""
        self.dtype, self.device = recorded.dtype, recorded.device
        self.keys, self.values, self.seen = recorded.keys, recorded.values, recorded.seen
        self.is_initialized = True

    def attend(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """[1, n, heads, d] attention of the newest n tokens over the window, then drop what no later query reads."""
        n, held = query.shape[2], self.keys.shape[2]
        if n == held:  # the prefill, as capture computes it
            stats = causal_attention_column_stats(
                query[0], self.keys[0], self.values[0], scaling, self.row_splits, window=self.window
            )
            output = stats.output.to(query.dtype).transpose(0, 1).unsqueeze(0)
        elif n == 1:
            output = decode_attention(query, self.keys, self.values, scaling, self.window).transpose(1, 2)
        else:
            output = causal_sdpa(query, self.keys, self.values, scaling, self.window)
        self.keys = self.keys[:, :, -(self.window - 1) :] if self.window > 1 else self.keys[:, :, :0]
        self.values = self.values[:, :, -(self.window - 1) :] if self.window > 1 else self.values[:, :, :0]
        return output

    # --- accounting, as `PolicyLayer` reports it -------------------------------------------------

    def kept_positions(self) -> list[torch.Tensor]:
        """Per KV head, the positions held (the same for every head)."""
        held = self.keys.shape[2]
        return [torch.arange(self.seen - held, self.seen, device=self.device)] * self.keys.shape[1]

    def held_bytes(self) -> int:
        """Bytes of keys and values held at the serving dtype (see `kvsim.policies.held`)."""
        return (self.keys.numel() + self.values.numel()) * KV_ELEMENT_BYTES

    def held_tokens(self) -> tuple[int, int]:
        """(full-precision tokens, low-precision tokens) held over all KV heads."""
        return self.keys.shape[1] * self.keys.shape[2], 0

    def prefill_bytes(self) -> int:
        """Real bytes held once the prefill's attention is done: the window, at the model's dtype."""
        return (self.keys.numel() + self.values.numel()) * self.keys.element_size()
