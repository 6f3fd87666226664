"""The attention function `kvsim_live`: attention over a policy cache's padded per-head layout.

transformers calls a registered attention function with the layer's queries and whatever the
cache's `update` returned. A policy cache returns a padded layout that only it can read, so this
function hands the work to the cache layer that was just updated. Without a policy cache (a model
left in this mode, or a plain DynamicCache) it is ordinary causal attention (`kvsim.traces.recorder.causal_sdpa`).
"""

from __future__ import annotations

import weakref
from contextvars import ContextVar
from typing import TYPE_CHECKING

from transformers import AttentionInterface

from kvsim.traces.recorder import causal_sdpa

if TYPE_CHECKING:
    from kvsim.live.cache import PolicyCache

ATTENTION_NAME = "kvsim_live"

# The policy cache of the forward running now (a weak reference, so a finished generation's cache is freed).
_current: ContextVar[weakref.ref | None] = ContextVar("kvsim_policy_cache", default=None)


def activate(cache: PolicyCache) -> None:
    """Called by the cache on every update, right before the layer's attention."""
    _current.set(weakref.ref(cache))


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, **kwargs):
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    reference = _current.get()
    cache = reference() if reference is not None else None
    if cache is not None:
        layer = cache.layers[module.layer_idx]
        if layer.keys is key:
            return layer.attend(query, scale), None
    return causal_sdpa(query, key, value, scale, sliding_window), None


AttentionInterface.register(ATTENTION_NAME, _attention)
