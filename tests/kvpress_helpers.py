"""Which tokens a kvpress press keeps, per layer and KV head, beside the ones kvsim's live cache keeps,
on the same model and prompt (the faithfulness tests of test_kvpress_agreement.py)."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from kvsim.live.cache import PolicyCache
from kvsim.policies.budget import Budget
from kvsim.policies.policy import Policy
from kvsim.traces.kvzip import reconstruction_scores
from kvsim.traces.models import LoadedModel


@torch.inference_mode()
def kvpress_kept(loaded: LoadedModel, press, ids: torch.Tensor) -> list[list[torch.Tensor]]:
    """Per layer, per KV head, the sorted positions the press keeps after prefilling `ids` [1, n].

    Presses that gather (ScorerPress) leave fewer keys in the cache: their positions are found by
    matching each kept key to the uncompressed keys. Head-wise presses (AdaKV, KVzip) keep every key
    and record the pruned ones in `masked_key_indices`.
    """
    model = loaded.model
    model.set_attn_implementation("sdpa")
    full = DynamicCache(config=model.config)
    model(input_ids=ids, past_key_values=full)
    cache = DynamicCache(config=model.config)
    with press(model):
        model(input_ids=ids, past_key_values=cache)
    kept = []
    for index, layer in enumerate(model.model.layers):
        attention = layer.self_attn
        keys, reference = cache.layers[index].keys[0], full.layers[index].keys[0]
        masked = getattr(attention, "masked_key_indices", None)
        if masked is not None:
            alive = torch.ones(reference.shape[:2], dtype=torch.bool)
            alive[masked[1], masked[2]] = False
            kept.append([row.nonzero().flatten() for row in alive])
            del attention.masked_key_indices
        else:
            matches = (keys[:, :, None, :] == reference[:, None, :, :]).all(-1)  # [kv, kept, n]
            kept.append([match.nonzero()[:, 1].sort().values for match in matches])
    return kept


@torch.inference_mode()
def kvsim_kept(loaded: LoadedModel, policy: Policy, budget: Budget, ids: torch.Tensor, kvzip: bool = False) -> list[list[torch.Tensor]]:
    """The same for kvsim's live cache under `policy` at `budget`."""
    cache = PolicyCache.for_model(policy, budget, loaded.model)
    if kvzip:
        cache.set_reconstruction(reconstruction_scores(loaded.model, loaded.tokenizer, ids[0].tolist()))
    loaded.model(input_ids=ids, past_key_values=cache)
    return [cache.kept_positions(layer) for layer in range(len(cache.layers))]


def agreement(ours: list[list[torch.Tensor]], theirs: list[list[torch.Tensor]]) -> float:
    """Share of kvpress's kept (layer, head, token) triples that kvsim keeps too (1.0: identical sets,
    since both keep the same number)."""
    shared = total = 0
    for our_layer, their_layer in zip(ours, theirs):
        for our_head, their_head in zip(our_layer, their_layer):
            shared += len(set(our_head.tolist()) & set(their_head.tolist()))
            total += their_head.numel()
    return shared / total
