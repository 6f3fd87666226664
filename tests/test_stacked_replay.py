"""The simulator's fast paths decide exactly what the engine decides the slow way: the layer-stacked
replay (`replay_stacked`) against `replay_stepwise` layer by layer, the one-pass drop of a decode
step (`drop_lowest`) against the sorted selection (`keep_mask`), a decode view's window attention
over each head's own rows against the union layout, and the vectorized `interleave`."""

from __future__ import annotations

from dataclasses import fields, replace

import pytest
import torch

from kvsim.policies.allocators.head_adaptive import HeadAdaptive
from kvsim.policies.allocators.pyramid import Pyramid
from kvsim.policies.budget import Budget
from kvsim.policies.compress import compress_prefill
from kvsim.policies.held import HeldLayer, interleave, stacks_layers
from kvsim.policies.policy import Policy
from kvsim.policies.presets import PRESETS
from kvsim.policies.retention import Merge, MixedPrecision, Quantize
from kvsim.policies.schedules import EveryStep, Lagged
from kvsim.policies.scorers.accumulated_attention import AccumulatedAttention
from kvsim.policies.scorers.expected_attention import ExpectedAttention
from kvsim.policies.scorers.global_local import GlobalLocal
from kvsim.policies.scorers.key_diff import KeyDiff
from kvsim.policies.scorers.key_norm import KeyNorm
from kvsim.policies.scorers.last_query import LastQuery
from kvsim.policies.scorers.mixture import Mixture
from kvsim.policies.scorers.recency import Recency
from kvsim.policies.scorers.window_attention import WindowAttention
from kvsim.policies.selection import drop_lowest, keep_mask
from kvsim.policies.view import CacheView
import kvsim.sim.replay as replay_module
from kvsim.sim.replay import replay, replay_stacked, replay_stepwise, stack_groups
from kvsim.sim.simulate import prepare_sample
from kvsim.traces.synthetic import synthetic_traceset

PROMPT, CONTINUATION, LAYERS, KV_HEADS = 96, 12, 4, 2

STACKED = {
    **{name: PRESETS[name] for name in ("streaming_llm", "h2o", "tova", "lazy")},
    # Unequal budgets across layers and across heads: the stack's heads hold different counts.
    "h2o_pyramid": replace(PRESETS["h2o"], allocator=Pyramid(beta=4)),
    "h2o_head_adaptive": replace(PRESETS["h2o"], allocator=HeadAdaptive(alpha=0.2)),
    # Scores shared by a layer's heads (`layer_mean`), normalized by the queries that saw a key.
    "layer_shared": Policy("layer_shared", AccumulatedAttention(gqa="layer", normalize=True), HeadAdaptive(alpha=0.5), EveryStep(sinks=2, recent=4)),
    "window_unpooled": Policy("window_unpooled", WindowAttention(window=8, pool="none"), HeadAdaptive(alpha=0.3), Lagged(recent=4, every=3)),
    "key_norm": Policy("key_norm", KeyNorm(), Pyramid(beta=4), EveryStep(sinks=1)),
    "mixture": Policy("mixture", Mixture(scorers=(Recency(), LastQuery()), weights=(0.3, 0.7), normalize="z"), HeadAdaptive(alpha=0.2), EveryStep(recent=2)),
    "keydiff": Policy("keydiff", KeyDiff(), HeadAdaptive(alpha=0.3), EveryStep(sinks=2)),
    "expected_attention": Policy("expected_attention", ExpectedAttention(window=8, future=64, sinks=2), HeadAdaptive(alpha=0.3), Lagged(every=4)),
    "global_local": Policy("global_local", GlobalLocal(local_weight=0.4, window=8), Pyramid(beta=4), EveryStep(recent=4)),
    # Low-precision tokens chosen at the prompt's decision and read at every step, per token and per channel.
    "mixed_precision": replace(PRESETS["h2o"], allocator=HeadAdaptive(alpha=0.3), retention=MixedPrecision(nbits=4, full_share=0.4)),
    "mixed_precision_kivi": Policy(
        "mixed_precision_kivi", LastQuery(), Pyramid(beta=4), Lagged(recent=2, every=3), MixedPrecision(nbits=2, full_share=0.6, key_group=4)
    ),
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    traceset = synthetic_traceset(
        tmp_path_factory.mktemp("t"), n_layers=LAYERS, kv_heads=KV_HEADS, prompt_len=PROMPT, continuation=CONTINUATION, window=32
    )
    return prepare_sample(traceset, next(iter(traceset)))


def layer_by_layer(policy, prepared, budget):
    keeps, budgets = compress_prefill(policy, prepared.views, budget, PROMPT)
    return [replay_stepwise(policy, *args) for args in zip(prepared.views, prepared.fulls, keeps, budgets)], (keeps, budgets)


def assert_same_outcomes(got, expected):
    for a, b in zip(got, expected, strict=True):
        assert (a.layer, a.kept_tokens, a.low_precision_tokens, a.kv_bytes) == (b.layer, b.kept_tokens, b.low_precision_tokens, b.kv_bytes)
        for field in fields(a.metrics):
            assert getattr(a.metrics, field.name) == pytest.approx(getattr(b.metrics, field.name), rel=1e-6, abs=1e-6), field.name


@pytest.mark.parametrize("name", sorted(STACKED))
@pytest.mark.parametrize("budget", [0.15, 0.4])
def test_stacked_replay_equals_the_engine_layer_by_layer(prepared, name, budget):
    policy = STACKED[name]
    assert stacks_layers(policy, prepared.views)
    expected, (keeps, budgets) = layer_by_layer(policy, prepared, Budget(budget))
    if policy.retention.bits() is not None:
        assert all(outcome.low_precision_tokens for outcome in expected)  # every layer reads low-precision tokens
    assert_same_outcomes(replay_stacked(policy, prepared.views, prepared.fulls, keeps, budgets), expected)
    assert_same_outcomes(replay(policy, Budget(budget), prepared.views, prepared.fulls), expected)  # the simulator's entry stacks it


def test_stacks_of_a_few_layers_decide_as_one(prepared, monkeypatch):
    assert stack_groups([5, 5, 5, 20, 1], 10) == [[0, 1], [2], [3], [4]]
    policy = STACKED["h2o_pyramid"]
    expected, _ = layer_by_layer(policy, prepared, Budget(0.4))
    # Layers hold 108, 102, 98 and 92 tokens with the continuation: limit 1 stacks none, 200 stacks layers 1 and 2.
    for limit in (1, 200):
        monkeypatch.setattr(replay_module, "STACK_ROWS", limit)
        assert_same_outcomes(replay(policy, Budget(0.4), prepared.views, prepared.fulls), expected)


def test_policies_whose_heads_depend_on_each_other_are_not_stacked(prepared):
    pooled = Policy("pooled", WindowAttention(window=8, pool="max", kernel=7), HeadAdaptive(alpha=0.2), EveryStep(recent=4))
    pooled_keydiff = replace(STACKED["keydiff"], scorer=KeyDiff(pool="max", kernel=3))
    per_layer_bits = replace(STACKED["mixed_precision"], retention=MixedPrecision(full_share=0.4, key_bits=(4, 8), value_bits=(2, 4)))
    for policy in (pooled, pooled_keydiff, per_layer_bits, PRESETS["cake"], PRESETS["d2o"], replace(PRESETS["h2o"], retention=Quantize(nbits=4)),
                   replace(PRESETS["h2o"], retention=Merge(threshold=0.3)), replace(PRESETS["h2o"], scorer=PRESETS["random"].scorer)):
        assert not stacks_layers(policy, prepared.views), policy.name
    # Why: pooling runs along the union of held positions, which a stack of every layer's heads widens.
    expected, (keeps, budgets) = layer_by_layer(pooled, prepared, Budget(0.15))
    stacked = replay_stacked(pooled, prepared.views, prepared.fulls, keeps, budgets)
    assert any(a.metrics.recall != pytest.approx(b.metrics.recall, rel=1e-6) for a, b in zip(stacked, expected))
    assert_same_outcomes(replay(pooled, Budget(0.15), prepared.views, prepared.fulls), expected)


def sorted_selection(scores, budgets, priority, present):
    """`kvsim.policies.compress.select`'s general path for a decode view."""
    return keep_mask(scores.masked_fill(~present, float("-inf")), budgets, priority * present) & present


@pytest.mark.parametrize("seed", range(40))
def test_drop_lowest_drops_what_the_sorted_selection_drops(seed):
    generator = torch.Generator().manual_seed(seed)
    heads, n = 3, 24
    # Few distinct values, so ties (broken by position) are common; +inf marks always-kept tokens.
    scores = torch.randint(0, 4, (heads, n), generator=generator).float()
    scores[torch.rand(heads, n, generator=generator) < 0.1] = float("inf")
    priority = torch.randint(0, 3, (n,), generator=generator) * (torch.rand(n, generator=generator) < 0.3)
    present = torch.rand(heads, n, generator=generator) < 0.7
    present[:, -1] = True  # the newest token, which every head holds
    over = torch.randint(0, 2, (heads,), generator=generator)
    budgets = present.sum(1) - over
    fast = drop_lowest(scores, priority, present, over > 0)
    assert torch.equal(fast, sorted_selection(scores, budgets, priority, present))
    assert torch.equal(fast.sum(1), budgets)


def test_a_decode_views_window_attention_equals_the_union_layouts(prepared):
    policy = STACKED["window_unpooled"]
    keeps, budgets = compress_prefill(policy, prepared.views, Budget(0.15), PROMPT)
    layers = [HeldLayer.after_prefill(policy, *args, 32, torch.float32) for args in zip(prepared.views, keeps, budgets)]
    layer = next(layer for layer in layers if len(set(layer.full.counts)) > 1)  # heads hold different numbers of tokens
    held = layer.view()
    union = CacheView(
        layer=held.layer, n_layers=held.n_layers, keys=held.keys, values=held.values, positions=held.positions, queries=held.queries,
        query_positions=held.query_positions, scaling=held.scaling, present=held.present,
    )
    for size in (1, 8):
        assert torch.allclose(held.window(size), union.window(size), atol=1e-6)
    kept = held.present & (torch.rand(held.present.shape) < 0.5)
    assert all(torch.equal(a, b) for a, b in zip(held.take(kept), union.take(kept)))


def test_interleave_appends_at_the_end_of_every_heads_segment():
    counts = [2, 0, 3]
    old = torch.arange(5.0)[:, None]
    new = torch.tensor([[10.0, 11.0], [20.0, 21.0], [30.0, 31.0]])[..., None]  # [kv, n=2, 1]
    assert interleave(old, counts, new).flatten().tolist() == [0, 1, 10, 11, 20, 21, 2, 3, 4, 30, 31]
    assert interleave(old[:4], [2, 2], new[:2]).flatten().tolist() == [0, 1, 10, 11, 2, 3, 20, 21]
