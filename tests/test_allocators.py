"""Allocators: exact totals and caps for any shape, each method's characteristic shape, and clear
errors for bad parameters."""

from __future__ import annotations

import optuna
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsim.errors import KvsimError
from kvsim.policies import REGISTRY, CacheView, Policy, part_from_spec
from kvsim.policies.allocators.all_tokens import AllTokens
from kvsim.policies.allocators.base import Protected
from kvsim.policies.allocators.cake_preference import CakePreference
from kvsim.policies.allocators.free_vector import FreeVector
from kvsim.policies.allocators.head_adaptive import HeadAdaptive
from kvsim.policies.allocators.knots import Knots
from kvsim.policies.allocators.prefix_mass import PrefixMass
from kvsim.policies.allocators.pyramid import Pyramid
from kvsim.policies.allocators.retrieval_heads import RetrievalHeads
from kvsim.policies.allocators.uniform import Uniform
from kvsim.policies.allocators.variance_softmax import VarianceSoftmax
from kvsim.policies.scorers.recency import Recency

HEAD_DIM = 4
QUERY_WINDOW = 8


def make_views(lengths: list[int], kv_heads: int, group: int, seed: int, sharpness: float = 1.0) -> list[CacheView]:
    """Random layers of the given cached lengths; column sums from a real causal softmax."""
    generator = torch.Generator().manual_seed(seed)
    heads = kv_heads * group
    views = []
    for layer, length in enumerate(lengths):
        queries = torch.randn(heads, length, HEAD_DIM, generator=generator) * sharpness
        keys = torch.randn(kv_heads, length, HEAD_DIM, generator=generator)
        logits = queries.reshape(kv_heads, group, length, HEAD_DIM) @ keys[:, None].transpose(-1, -2) * HEAD_DIM**-0.5
        logits = logits.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
        attention = logits.softmax(-1).reshape(heads, length, length)
        window = min(QUERY_WINDOW, length)
        views.append(
            CacheView(
                layer=layer,
                n_layers=len(lengths),
                keys=keys,
                values=torch.randn(kv_heads, length, HEAD_DIM, generator=generator),
                positions=torch.arange(length),
                queries=queries[:, -window:],
                query_positions=torch.arange(length - window, length),
                scaling=HEAD_DIM**-0.5,
                colsum=attention.sum(1),
                colsq=(attention**2).sum(1),
            )
        )
    return views


@st.composite
def caches(draw, equal_lengths: bool = False):
    """(views, scores, per_head) for a random shape; per_head fits every layer."""
    n_layers = draw(st.integers(1, 6))
    kv_heads = draw(st.integers(1, 3))
    group = draw(st.integers(1, 3))
    if equal_lengths:
        lengths = [draw(st.integers(QUERY_WINDOW, 60))] * n_layers
    else:
        lengths = draw(st.lists(st.integers(QUERY_WINDOW, 60), min_size=n_layers, max_size=n_layers))
    per_head = draw(st.integers(1, min(lengths)))
    seed = draw(st.integers(0, 2**16))
    views = make_views(lengths, kv_heads, group, seed, sharpness=draw(st.sampled_from([0.5, 1.0, 3.0])))
    generator = torch.Generator().manual_seed(seed + 1)
    scores = [torch.randn(kv_heads, length, generator=generator) for length in lengths]
    return views, scores, per_head


def allocators_for(draw, n_layers: int) -> list:
    return [
        Uniform(),
        Pyramid(beta=draw(st.integers(1, 40))),
        HeadAdaptive(alpha=draw(st.floats(0.0, 1.0))),
        CakePreference(window=draw(st.integers(2, QUERY_WINDOW)), tau1=draw(st.floats(0.2, 5.0)), tau2=draw(st.floats(0.2, 5.0))),
        PrefixMass(),
        VarianceSoftmax(),
        FreeVector(weights=tuple(draw(st.lists(st.floats(0.01, 100.0), min_size=n_layers, max_size=n_layers)))),
        RetrievalHeads(retrieval_ratio=draw(st.floats(0.0, 1.0)), window=draw(st.integers(1, QUERY_WINDOW))),
        Knots(knots=tuple(draw(st.lists(st.floats(0.1, 10.0), min_size=1, max_size=5))), head_strength=draw(st.floats(0.0, 1.0))),
    ]


@settings(max_examples=60, deadline=None)
@given(cache=caches(), data=st.data())
def test_every_allocator_meets_the_total_exactly_within_caps(cache, data):
    views, scores, per_head = cache
    lengths = torch.tensor([view.length for view in views])
    protected = Protected(sinks=data.draw(st.integers(0, 6)), recent=data.draw(st.integers(0, 12)))
    for allocator in allocators_for(data.draw, len(views)):
        budgets = allocator.allocate(views, scores, per_head, protected)
        assert budgets.dtype == torch.int64, allocator.name
        assert budgets.shape == (len(views), views[0].kv_heads), allocator.name
        assert int(budgets.sum()) == len(views) * views[0].kv_heads * per_head, allocator.name
        assert bool((budgets >= 0).all()) and bool((budgets <= lengths[:, None]).all()), allocator.name


@settings(max_examples=30, deadline=None)
@given(cache=caches())
def test_layerwise_allocators_give_every_head_of_a_layer_the_same_budget(cache):
    views, scores, per_head = cache
    layerwise = (Pyramid(), CakePreference(window=4), PrefixMass(), VarianceSoftmax(), FreeVector(weights=(1.0,) * len(views)), Knots(knots=(3.0, 1.0, 2.0)))
    for allocator in layerwise:
        budgets = allocator.allocate(views, scores, per_head, Protected(recent=4))
        assert bool((budgets == budgets[:, :1]).all()), allocator.name


@settings(max_examples=60, deadline=None)
@given(cache=caches(equal_lengths=True), beta=st.integers(1, 40), sinks=st.integers(0, 4), recent=st.integers(0, 12))
def test_pyramid_budgets_never_grow_with_depth(cache, beta, sinks, recent):
    views, scores, per_head = cache
    budgets = Pyramid(beta=beta).allocate(views, scores, per_head, Protected(sinks, recent))[:, 0]
    assert all(budgets[i] >= budgets[i + 1] for i in range(len(budgets) - 1)), budgets.tolist()


def test_pyramid_is_a_real_pyramid_for_a_small_budget():
    views = make_views([200] * 8, 1, 1, seed=0)
    budgets = Pyramid(beta=20).allocate(views, [None] * 8, 40, Protected(recent=8))[:, 0]
    assert budgets[0] > 2 * budgets[-1]
    assert budgets[-1] >= 8  # the window is added back to every layer, as in the reference


def test_knots_interpolate_a_depth_profile_over_the_unprotected_budget():
    views = make_views([200] * 5, 2, 1, seed=0)
    profile = Knots(knots=(4.0, 1.0, 2.0)).profile(5)
    assert profile.tolist() == [4.0, 2.5, 1.0, 1.5, 2.0]  # knots at depths 0, 1/2, 1
    # 8 protected tokens per layer, the other 5 · 22 = 110 split 4 : 2.5 : 1 : 1.5 : 2 (of 11).
    budgets = Knots(knots=(4.0, 1.0, 2.0)).allocate(views, [None] * 5, 30, Protected(sinks=2, recent=6))[:, 0]
    assert budgets.tolist() == [8 + 40, 8 + 25, 8 + 10, 8 + 15, 8 + 20]
    assert Knots(knots=(5.0,)).allocate(views, [None] * 5, 40).tolist() == [[40, 40]] * 5  # one knot: flat


@settings(max_examples=30, deadline=None)
@given(cache=caches(equal_lengths=True), alpha=st.floats(0.0, 1.0), sinks=st.integers(0, 4), recent=st.integers(0, 12))
def test_knots_head_strength_is_ada_kv_head_competition(cache, alpha, sinks, recent):
    # A flat profile over equal layers gives every layer the per-head budget; the heads then compete
    # exactly as in head_adaptive with alpha = 1 − head_strength.
    views, scores, per_head = cache
    protected = Protected(sinks, recent)
    knots = Knots(knots=(1.0, 1.0), head_strength=1.0 - alpha).allocate(views, scores, per_head, protected)
    assert knots.tolist() == HeadAdaptive(alpha=alpha).allocate(views, scores, per_head, protected).tolist()


def test_all_tokens_ignores_the_budget():
    views = make_views([30, 20], 2, 2, seed=0)
    assert AllTokens().allocate(views, [None, None], 5).tolist() == [[30, 30], [20, 20]]


def test_head_adaptive_gives_concentrated_attention_more_budget_and_keeps_the_alpha_floor():
    # Head 0 attends to 30 tokens only, head 1 spreads over all 200: with b = 20 per head, the global
    # top-40 takes head 0's 30 peaks and 10 of head 1's flat scores.
    peaky = torch.zeros(200)
    peaky[torch.arange(0, 200, 6)[:30]] = 1 / 30
    flat = torch.full((200,), 1 / 200)
    views = make_views([200], 2, 1, seed=0)
    scores = [torch.stack([peaky, flat])]
    assert HeadAdaptive(alpha=0.0).allocate(views, scores, 20).tolist() == [[30, 10]]
    # alpha mixes in the uniform share: 0.8 · 30 + 0.2 · 20 = 28, 0.8 · 10 + 4 = 12.
    assert HeadAdaptive(alpha=0.2).allocate(views, scores, 20).tolist() == [[28, 12]]
    assert HeadAdaptive(alpha=1.0).allocate(views, scores, 20).tolist() == [[20, 20]]
    # The protected window is given to every head and kept out of the competition: b = 10, all ten
    # competition slots per head go to head 0's peaks, and each head keeps its 10 window tokens...
    assert HeadAdaptive(alpha=0.0).allocate(views, scores, 20, Protected(recent=10)).tolist() == [[30, 10]]
    # ...while peaks inside the window, or on the sinks, win nothing.
    late = torch.zeros(200)
    late[-10:] = 1.0
    assert HeadAdaptive(alpha=0.0).allocate(views, [torch.stack([late, flat])], 20, Protected(recent=10)).tolist() == [[10, 30]]
    early = torch.zeros(200)
    early[:10] = 1.0
    assert HeadAdaptive(alpha=0.0).allocate(views, [torch.stack([early, flat])], 20, Protected(sinks=10)).tolist() == [[10, 30]]


def test_prefix_mass_gives_diffuse_layers_more_than_concentrated_ones():
    views = make_views([100, 100], 1, 1, seed=0)
    concentrated = torch.zeros(1, 100)
    concentrated[0, :5] = 1.0
    diffuse = torch.ones(1, 100) + 0.01 * torch.rand(1, 100)
    budgets = PrefixMass().allocate(views, [concentrated, diffuse], 30)[:, 0]
    assert budgets[1] > 2 * budgets[0], budgets.tolist()


def test_variance_softmax_favours_layers_whose_heads_are_more_alike():
    # Layer 0: four identical heads (σ = 0); layer 1: heads of very different variance (σ > 0).
    views = make_views([50, 50], 4, 1, seed=0)
    views[0].colsum = views[0].colsum[:1].expand(4, -1).clone()
    views[1].colsum = views[1].colsum * torch.tensor([1.0, 2.0, 5.0, 10.0])[:, None]
    budgets = VarianceSoftmax().allocate(views, [None, None], 10)[:, 0]
    assert budgets[0] > budgets[1], budgets.tolist()


def test_cake_preference_weighs_dispersion_against_shift():
    # Sharp queries: concentrated (low-entropy) but shifting (high-variance) attention; diffuse
    # queries: the opposite. tau flattens one term, so the other decides.
    diffuse = make_views([80], 2, 2, seed=0, sharpness=0.3)[0]
    sharp = make_views([80], 2, 2, seed=1, sharpness=6.0)[0]
    sharp.layer = 1
    by_entropy = CakePreference(window=8, tau1=1.0, tau2=1000.0).allocate([diffuse, sharp], [None, None], 20)[:, 0]
    assert by_entropy[0] > by_entropy[1], by_entropy.tolist()
    by_variance = CakePreference(window=8, tau1=1000.0, tau2=1.0).allocate([diffuse, sharp], [None, None], 20)[:, 0]
    assert by_variance[1] > by_variance[0], by_variance.tolist()


def test_retrieval_heads_keep_everything_and_streaming_heads_share_the_rest():
    views = make_views([64, 64], 2, 1, seed=0, sharpness=0.1)
    # Make KV head 1 of layer 1 attend from the window to tokens 10..19, far outside the local window.
    direction = torch.ones(HEAD_DIM) * 3
    views[1].keys[1, 10:20] = direction
    views[1].queries[1] = direction
    allocator = RetrievalHeads(retrieval_ratio=0.25, window=8)
    protected = Protected(sinks=4, recent=8)  # the schedule's sinks and local window
    budgets = allocator.allocate(views, [None, None], 32, protected)
    assert budgets.tolist() == [[22, 21], [21, 64]]
    # Too small a budget for a full retrieval head: streaming heads keep sinks + local (12) each,
    # the retrieval head gets what is left.
    assert allocator.allocate(views, [None, None], 16, protected).tolist() == [[12, 12], [12, 28]]


def test_free_vector_is_sized_for_one_model():
    policy = Policy("vector", Recency(), FreeVector(weights=(1.0, 2.0, 3.0)))
    policy.check_model(3)
    with pytest.raises(KvsimError, match="length 3.*4 layers"):
        policy.check_model(4)
    with pytest.raises(KvsimError, match="3 weights.*2 layers"):
        policy.allocator.allocate(make_views([10, 10], 1, 1, seed=0), [None, None], 5)
    budgets = policy.allocator.allocate(make_views([40] * 3, 1, 1, seed=0), [None] * 3, 10)
    assert budgets[:, 0].tolist() == [5, 10, 15]


def test_free_vector_round_trips_and_is_searched_with_the_layer_count():
    policy = Policy("vector", Recency(), FreeVector(weights=(0.5, 2.0)))
    assert Policy.from_spec(policy.to_spec()) == policy
    trial = optuna.create_study().ask()
    with pytest.raises(KvsimError, match="suggest_for"):
        FreeVector.suggest(trial, "alloc_")
    vector = FreeVector.suggest_for(trial, "alloc_", 5)
    assert vector.n_layers == 5 and all(0.1 <= w <= 10 for w in vector.weights)


@pytest.mark.parametrize(
    ("kind", "spec", "message"),
    [
        ("allocator", {"name": "head_adaptive", "alpha": 1.5}, "alpha must be in \\[0, 1\\], got 1.5"),
        ("allocator", {"name": "head_adaptive", "alpha": "high"}, "parameter 'alpha' must be float"),
        ("allocator", {"name": "pyramid", "beta": 0}, "beta must be >= 1"),
        ("allocator", {"name": "pyramid", "recent": 32}, "no longer has parameter 'recent': .*schedule's sinks and recent"),
        ("allocator", {"name": "head_adaptive", "recent": 32}, "no longer has parameter 'recent'"),
        ("allocator", {"name": "retrieval_heads", "local": 32}, "no longer has parameter 'local'"),
        ("allocator", {"name": "cake_preference", "tau1": 0.0}, "tau1 must be > 0"),
        ("allocator", {"name": "cake_preference", "window": 1}, "window must be >= 2"),
        ("allocator", {"name": "free_vector"}, "non-empty"),
        ("allocator", {"name": "knots", "knots": []}, "knots must be a non-empty list"),
        ("allocator", {"name": "knots", "knots": [1.0, 0.0]}, "knots must all be positive"),
        ("allocator", {"name": "knots", "head_strength": 2.0}, "head_strength must be in \\[0, 1\\]"),
        ("allocator", {"name": "free_vector", "weights": [1.0, -2.0]}, "positive"),
        ("allocator", {"name": "free_vector", "weights": 3}, "must be a list"),
        ("allocator", {"name": "retrieval_heads", "retrieval_ratio": 2.0}, "retrieval_ratio must be in"),
        ("allocator", {"name": "prefix_mass", "beta": 2}, "has no parameter 'beta'"),
        ("allocator", {"name": "pyramids"}, "unknown allocator 'pyramids'"),
        ("scorer", {"name": "cake_indicator", "kernel": 4}, "kernel must be an odd number"),
        ("scorer", {"name": "cake_indicator", "gamma": -1.0}, "gamma must be >= 0"),
        ("scorer", {"name": "accumulated_attention", "gqa": "sum"}, "gqa must be one of mean, max, layer"),
        ("scorer", {"name": "global_local", "local_weight": 1.2}, "local_weight must be in"),
        ("scorer", {"name": "recurrence", "window": 0}, "window must be >= 1"),
        ("scorer", {"name": "random", "seed": -1}, "seed must be >= 0"),
    ],
)
def test_bad_parameters_are_one_line_errors_naming_the_part(kind, spec, message):
    with pytest.raises(KvsimError, match=message) as error:
        part_from_spec(kind, spec)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("kind", ["scorer", "allocator"])
def test_every_part_suggests_a_valid_instance(kind):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for name, cls in REGISTRY[kind].items():
        if cls is FreeVector:
            continue
        for _ in range(5):
            part = cls.suggest(study.ask(), f"{name}_")
            assert isinstance(part, cls)
            assert part_from_spec(kind, part.to_spec()) == part
