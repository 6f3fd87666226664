"""The part of transformers' cache-layer interface that kvsim's layers share, across the
transformers releases kvsim supports (5.2 to the newest 5.x).

Both kvsim layers report every token they were given as their sequence length (`seen`), kept or
not, so new tokens get their true positions; attention masks are rebuilt by kvsim's attention
functions, so the sizes given to transformers' mask code only need to be consistent.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from kvsim.errors import KvsimError


class SeenTokensLayer(CacheLayerMixin):
    """A kvsim cache layer (batch size 1) whose length is the count of tokens it has seen; subclasses keep `seen` up to date."""

    seen = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Empty keys and values of the incoming dtype and device (kvsim's caches run batch size 1)."""
        if key_states.shape[0] != 1:
            raise KvsimError(f"the policy cache runs batch size 1, got {key_states.shape[0]}: generate one prompt at a time")
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys, self.values = key_states[:, :, :0], value_states[:, :, :0]
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query: torch.Tensor | int) -> tuple[int, int]:
        # transformers 5.2 passes the new tokens' cache positions, 5.3+ their count.
        return self.seen + (query if isinstance(query, int) else query.shape[0]), 0

    def get_max_length(self) -> int:
        """No maximum (5.3+ name; 5.2 calls `get_max_cache_shape`)."""
        return -1

    def get_max_cache_shape(self) -> int:
        return self.get_max_length()
