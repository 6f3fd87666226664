"""The attention function `kvsim_live`: attention over a policy cache's padded per-head layout.

transformers calls a registered attention function with the layer's queries and whatever the
cache's `update` returned. A policy cache returns a ragged per-head layout that only it can read, so
this function hands the work to the cache layer that was just updated, and refuses keys that layer
did not return (attending them as a plain cache would read the wrong tokens). Without a policy
cache (a model left in this mode, or a plain DynamicCache) it is ordinary causal attention
(`kvsim.traces.recorder.causal_sdpa`). Padding masks are refused, never silently ignored.
"""

from __future__ import annotations

import weakref
from contextvars import ContextVar
from typing import TYPE_CHECKING

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvsim.errors import KvsimError
from kvsim.traces.recorder import causal_sdpa, check_no_padding

if TYPE_CHECKING:
    from kvsim.live.cache import PolicyCache

ATTENTION_NAME = "kvsim_live"

# The policy cache layer just updated, for the attention call that follows it: (a weak reference to
# the cache, the layer index, the keys its update returned). Each attention call consumes it, so a
# stale entry can never be read by a later forward.
_pending: ContextVar[tuple[weakref.ref, int, torch.Tensor] | None] = ContextVar("kvsim_policy_cache", default=None)


def activate(cache: PolicyCache, layer_idx: int, keys: torch.Tensor) -> None:
    """Called by the cache on every update, right before the layer's attention."""
    _pending.set((weakref.ref(cache), layer_idx, keys))


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, **kwargs):
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    pending = _pending.get()
    _pending.set(None)
    if pending is None:
        # No policy cache in this forward (a plain DynamicCache, or none): ordinary causal attention.
        check_no_padding(attention_mask, sliding_window)
        return causal_sdpa(query, key, value, scale, sliding_window), None
    reference, layer_idx, keys = pending
    cache = reference()
    if cache is None or layer_idx != module.layer_idx or keys is not key:
        raise KvsimError(
            f"attention of layer {module.layer_idx} was given keys that its policy cache did not return: "
            "run the model with the cache from policy.cache(model), one cache per generation"
        )
    check_no_padding(attention_mask, sliding_window)
    output = cache.layers[layer_idx].attend(query, scale)
    cache.after_attention(layer_idx)
    return output, None


AttentionInterface.register(ATTENTION_NAME, _attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # so padding reaches `check_no_padding`
