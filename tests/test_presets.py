"""Every preset against an independent reference written from the method's definition.

A small synthetic cache (4 layers, 2 KV heads, GQA group 3, 192 prompt tokens) is built from random
queries and keys; the column statistics come from a real causal softmax over every prompt query. For
each preset, plain numpy code below recomputes what the method keeps — scores, per-layer/per-head
budgets, and the selection (sinks, then the recent window, then the top scores, ties to the earlier
position) — and the kept positions of `compress_prefill` must match exactly.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from kvsim.errors import KvsimError
from kvsim.policies import PRESETS, Budget, CacheView, Policy, resolve_policy
from kvsim.policies.allocators.uniform import Uniform
from kvsim.policies.compress import compress_prefill
from kvsim.policies.rope import Rotary
from kvsim.policies.schedules import PrefillOnce
from kvsim.policies.scorers.accumulated_attention import AccumulatedAttention
from kvsim.policies.scorers.random_scores import RandomScores

LAYERS, KV_HEADS, GROUP, LENGTH, HEAD_DIM, WINDOW = 4, 2, 3, 192, 8, 32
HEADS = KV_HEADS * GROUP
BUDGET = Budget(0.25)
PER_HEAD = 48  # round(0.25 * 192)


# ---------------------------------------------------------------------------------------------
# The synthetic cache and its plain float64 attention
# ---------------------------------------------------------------------------------------------


class Layer:
    """One layer's raw tensors (float32, as a trace holds them) and its full causal attention."""

    def __init__(self, layer: int, generator: torch.Generator):
        # Query scale grows with depth so layers differ in how peaky their attention is.
        self.queries = torch.randn(HEADS, LENGTH, HEAD_DIM, generator=generator) * (1.0 + 0.6 * layer)
        self.keys = torch.randn(KV_HEADS, LENGTH, HEAD_DIM, generator=generator)
        self.values = torch.randn(KV_HEADS, LENGTH, HEAD_DIM, generator=generator)
        q, k = self.queries.double().numpy(), self.keys.double().numpy()
        self.attention = np.zeros((HEADS, LENGTH, LENGTH))  # [heads, query, key]
        for h in range(HEADS):
            logits = q[h] @ k[h // GROUP].T / math.sqrt(HEAD_DIM)
            logits[np.triu_indices(LENGTH, 1)] = -np.inf
            logits -= logits.max(1, keepdims=True)
            probs = np.exp(logits)
            self.attention[h] = probs / probs.sum(1, keepdims=True)
        self.colsum = torch.tensor(self.attention.sum(1), dtype=torch.float32)
        self.colsq = torch.tensor((self.attention**2).sum(1), dtype=torch.float32)

    def view(self, layer: int) -> CacheView:
        return CacheView(
            layer=layer,
            n_layers=LAYERS,
            keys=self.keys,
            values=self.values,
            positions=torch.arange(LENGTH),
            queries=self.queries[:, -WINDOW:],
            query_positions=torch.arange(LENGTH - WINDOW, LENGTH),
            scaling=HEAD_DIM**-0.5,
            colsum=self.colsum,
            colsq=self.colsq,
            rope=Rotary(tuple(10000.0 ** (-2 * i / HEAD_DIM) for i in range(HEAD_DIM // 2))),
            reconstruction=self.colsum / LENGTH,  # any [heads, n] scores serve the budget checks
        )

    @property
    def window_rows(self) -> np.ndarray:
        """[heads, WINDOW, n] attention of the last WINDOW prompt queries."""
        return self.attention[:, -WINDOW:, :]

    @property
    def accumulated(self) -> np.ndarray:
        """[heads, n] column sums, as stored in the view (float32 values)."""
        return self.colsum.double().numpy()


@pytest.fixture(scope="module")
def layers() -> list[Layer]:
    generator = torch.Generator().manual_seed(0)
    return [Layer(layer, generator) for layer in range(LAYERS)]


@pytest.fixture
def views(layers) -> list[CacheView]:
    return [layer.view(i) for i, layer in enumerate(layers)]


# ---------------------------------------------------------------------------------------------
# Plain reference pieces
# ---------------------------------------------------------------------------------------------


def group_mean(per_query_head: np.ndarray) -> np.ndarray:
    return np.stack([per_query_head[g * GROUP : (g + 1) * GROUP].mean(0) for g in range(KV_HEADS)])


def group_max(per_query_head: np.ndarray) -> np.ndarray:
    return np.stack([per_query_head[g * GROUP : (g + 1) * GROUP].max(0) for g in range(KV_HEADS)])


def shared(row: np.ndarray) -> np.ndarray:
    return np.stack([row] * KV_HEADS)


def select(scores: list[float], budget: int, sinks: int, recent: int) -> set[int]:
    """Sinks first, then the recent window, then the highest scores; ties to the earlier position."""
    n = len(scores)

    def priority(j):
        return 2 if j < sinks else 1 if j >= n - recent else 0

    ranked = sorted(range(n), key=lambda j: (-priority(j), -scores[j], j))
    return set(ranked[:budget])


def apportion(weights, total, caps, floor=1):
    """Budgets: `floor` each, the rest split in proportion to the weights, largest remainders
    first (ties to the lower index), shares over a cap given back and split again."""
    weights = [max(float(w), 0.0) for w in weights]
    caps = [int(c) for c in caps]
    total = min(total, sum(caps))
    budgets = [min(floor, c) for c in caps]
    while (remaining := total - sum(budgets)) > 0:
        open_ = [i for i in range(len(caps)) if budgets[i] < caps[i]]
        share = {i: weights[i] for i in open_}
        if sum(share.values()) <= 0:
            share = {i: 1.0 for i in open_}
        mass = sum(share.values())
        ideal = {i: share[i] / mass * remaining for i in open_}
        grant = {i: min(math.floor(ideal[i]), caps[i] - budgets[i]) for i in open_}
        leftover = remaining - sum(grant.values())
        fillable = [i for i in open_ if budgets[i] + grant[i] < caps[i]]
        for i in sorted(fillable, key=lambda i: (-(ideal[i] - math.floor(ideal[i])), i))[:leftover]:
            grant[i] += 1
        if sum(grant.values()) == 0:
            break
        for i in open_:
            budgets[i] += grant[i]
    return budgets


def share(weights, total, caps, floor=1):
    """Budgets as close as possible to total · w / Σw: entries whose share is under `floor` are
    raised to it and the others give back in proportion to what they hold above it."""
    mass = sum(weights)
    ideal = [w / mass * total for w in weights]
    return apportion([max(x - floor, 0.0) for x in ideal], total, caps, floor)


def per_layer(budgets: list[int]) -> list[list[int]]:
    return [[b] * KV_HEADS for b in budgets]


def uniform_budgets() -> list[list[int]]:
    return [[PER_HEAD] * KV_HEADS for _ in range(LAYERS)]


def snapkv_scores(layer: Layer) -> np.ndarray:
    """Window mean per query head, max pooling (kernel 7, -inf padding), then GQA mean."""
    mean = layer.window_rows.mean(1)
    pooled = np.stack([[mean[h, max(0, j - 3) : j + 4].max() for j in range(LENGTH)] for h in range(HEADS)])
    return group_mean(pooled)


def h2o_scores(layer: Layer) -> np.ndarray:
    return group_mean(layer.accumulated)


def adakv_budgets(layer_scores: np.ndarray, alpha: float = 0.2) -> list[int]:
    base = PER_HEAD - WINDOW
    flat = [(-layer_scores[h, j], h * (LENGTH - WINDOW) + j, h) for h in range(KV_HEADS) for j in range(LENGTH - WINDOW)]
    counts = [0] * KV_HEADS
    for _, _, head in sorted(flat)[: KV_HEADS * base]:
        counts[head] += 1
    weights = [(1 - alpha) * c + alpha * base + WINDOW for c in counts]
    return share(weights, KV_HEADS * PER_HEAD, [LENGTH] * KV_HEADS)


# ---------------------------------------------------------------------------------------------
# The references: preset name -> (scores [L][kv][n], budgets [L][kv], sinks, recent)
# ---------------------------------------------------------------------------------------------


def ref_streaming_llm(layers):
    return [shared(np.arange(LENGTH, dtype=float)) for _ in layers], uniform_budgets(), 4, 0


def ref_h2o(layers):
    return [h2o_scores(layer) for layer in layers], uniform_budgets(), 0, WINDOW


def ref_mikv(layers):
    return [h2o_scores(layer) for layer in layers], uniform_budgets(), 0, WINDOW


def ref_tova(layers):
    return [shared(layer.attention[:, -1, :].mean(0)) for layer in layers], uniform_budgets(), 0, 0


def ref_snapkv(layers):
    return [snapkv_scores(layer) for layer in layers], uniform_budgets(), 0, WINDOW


def ref_pyramidkv(layers):
    base, prefix, beta = PER_HEAD - WINDOW, LENGTH - WINDOW, 20
    smallest = base // beta
    largest = 2 * base - smallest
    if largest >= prefix:
        largest, smallest = prefix, 2 * base - prefix
    step = (largest - smallest) // (LAYERS - 1)
    sizes = [largest - layer * step + WINDOW for layer in range(LAYERS)]
    budgets = share(sizes, LAYERS * PER_HEAD, [LENGTH] * LAYERS)
    return [snapkv_scores(layer) for layer in layers], per_layer(budgets), 0, WINDOW


def ref_adakv(layers):
    scores = [snapkv_scores(layer) for layer in layers]
    return scores, [adakv_budgets(s) for s in scores], 0, WINDOW


def ref_cake(layers):
    prefix = LENGTH - WINDOW
    scores, preference = [], []
    for layer in layers:
        rows = layer.window_rows
        indicator = rows.mean(1) + 200.0 * rows.var(1, ddof=1)  # [heads, n]
        pooled = indicator.copy()
        for h in range(HEADS):
            for j in range(prefix):  # avg pool 5 over the prefix only, zero padding counted
                pooled[h, j] = indicator[h, max(0, j - 2) : min(prefix, j + 3)].sum() / 5
        scores.append(group_mean(pooled))
        head = rows[:, :, :prefix]
        entropy = -(head * np.log(head + 1e-10)).sum()
        shift = head.var(1, ddof=1).sum()
        preference.append(entropy * shift)
    weights = [p / sum(preference) * LAYERS * (PER_HEAD - WINDOW) + WINDOW for p in preference]
    return scores, per_layer(share(weights, LAYERS * PER_HEAD, [LENGTH] * LAYERS)), 0, WINDOW


def ref_prefixkv(layers):
    scores = [layer.accumulated.mean(0) for layer in layers]  # head-averaged, one set per layer
    curves = []
    for s in scores:
        ranked = sorted(s, reverse=True)
        curves.append(np.cumsum(ranked) / sum(ranked))

    def keep(curve, p):  # shortest top-k prefix reaching mass p
        return min(LENGTH, sum(1 for c in curve if c < p) + 1)

    target = LAYERS * PER_HEAD
    best = min(sorted({c for curve in curves for c in curve}), key=lambda p: abs(sum(keep(c, p) for c in curves) - target))
    weights = [keep(curve, best) for curve in curves]
    return [shared(s) for s in scores], per_layer(share(weights, target, [LENGTH] * LAYERS)), 1, 1


def ref_d2o(layers):
    sigma = []
    for layer in layers:
        variance = layer.accumulated.var(1, ddof=1)
        sigma.append(((variance - variance.min()) / (variance.max() - variance.min() + 1e-6)).mean())
    softmax = np.exp(-np.array(sigma)) / np.exp(-np.array(sigma)).sum()
    floor = min(max(1, math.ceil(0.01 * LENGTH)), PER_HEAD)
    budgets = share(list(softmax), LAYERS * PER_HEAD, [LENGTH] * LAYERS, floor=floor)
    return [h2o_scores(layer) for layer in layers], per_layer(budgets), 4, WINDOW


def ref_ems(layers):
    scores = []
    for layer in layers:
        seen = LENGTH - np.arange(LENGTH)
        global_ = layer.accumulated / seen
        global_ /= global_.sum(1, keepdims=True)
        local = layer.window_rows.mean(1)
        local /= local.sum(1, keepdims=True)
        scores.append(group_mean(0.5 * global_ + 0.5 * local))
    return scores, [adakv_budgets(s) for s in scores], 0, WINDOW


def ref_razor(layers):
    sinks, local = 4, WINDOW
    far = []
    for layer in layers:
        mass = np.zeros(HEADS)
        for h in range(HEADS):
            for i, row in enumerate(layer.window_rows[h]):
                query = LENGTH - WINDOW + i
                mass[h] += sum(row[j] for j in range(sinks, LENGTH) if query - j >= local) / WINDOW
        far.extend(group_max(mass[:, None])[:, 0])
    count = math.floor(0.15 * len(far) + 0.5)
    retrieval = set(sorted(range(len(far)), key=lambda i: (-far[i], i))[:count])
    others = [i for i in range(len(far)) if i not in retrieval]
    total = PER_HEAD * len(far)
    retrieval_total = min(LENGTH * count, total - min(PER_HEAD, sinks + local) * len(others))
    flat = [0] * len(far)
    for i, b in zip(sorted(retrieval), apportion([1] * count, retrieval_total, [LENGTH] * count)):
        flat[i] = b
    for i, b in zip(others, apportion([1] * len(others), total - retrieval_total, [LENGTH] * len(others))):
        flat[i] = b
    budgets = [flat[layer * KV_HEADS : (layer + 1) * KV_HEADS] for layer in range(LAYERS)]
    # The local window is protected by the schedule; under the recency score that keeps the same
    # tokens as sinks + the most recent ones.
    return [shared(np.arange(LENGTH, dtype=float)) for _ in layers], budgets, 4, local


def ref_lazy(layers):
    return [group_max(layer.window_rows.max(1)) for layer in layers], uniform_budgets(), 0, WINDOW


def ref_knorm(layers):
    return [-np.linalg.norm(layer.keys.double().numpy(), axis=-1) for layer in layers], uniform_budgets(), 0, 0


REFERENCES = {
    "streaming_llm": ref_streaming_llm,
    "h2o": ref_h2o,
    "tova": ref_tova,
    "snapkv": ref_snapkv,
    "pyramidkv": ref_pyramidkv,
    "adakv": ref_adakv,
    "cake": ref_cake,
    "cake_prefill": ref_cake,  # CAKE's prefill decision; it only stops evicting while decoding
    "prefixkv": ref_prefixkv,
    "d2o": ref_d2o,
    "ems": ref_ems,
    "razor": ref_razor,
    "lazy": ref_lazy,
    "mikv": ref_mikv,
    "knorm": ref_knorm,
}


def kept_positions(keep: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(row).flatten().tolist()) for row in keep]


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


# Presets checked against kvpress itself, token for token (test_kvpress_agreement.py).
KVPRESS_CHECKED = {"kvzip", "expected_attention", "adakv_expected_attention", "keydiff", "lagkv", "chunkkv"}


def test_every_preset_has_a_check():
    assert set(PRESETS) == set(REFERENCES) | KVPRESS_CHECKED | {"full", "random"}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_preset_keeps_what_the_method_defines(name, layers, views):
    policy = PRESETS[name]
    keeps, budgets = compress_prefill(policy, views, BUDGET, LENGTH)

    scores, expected_budgets, sinks, recent = REFERENCES[name](layers)
    for view, expected_scores in zip(views, scores):
        np.testing.assert_allclose(policy.scorer.score(view).double().numpy(), expected_scores, rtol=1e-4, atol=1e-7)
    assert (policy.schedule.sinks, policy.schedule.recent) == (sinks, recent)
    assert budgets.tolist() == expected_budgets
    for layer in range(LAYERS):
        expected = [select(list(scores[layer][h]), expected_budgets[layer][h], sinks, recent) for h in range(KV_HEADS)]
        assert kept_positions(keeps[layer]) == expected, f"{name}: layer {layer} keeps other tokens"


@pytest.mark.parametrize("name", sorted(set(PRESETS) - {"full"}))
def test_preset_meets_the_budget_exactly(name, views):
    keeps, budgets = compress_prefill(PRESETS[name], views, BUDGET, LENGTH)
    total = LAYERS * KV_HEADS * PER_HEAD
    assert int(budgets.sum()) == total
    assert sum(int(keep.sum()) for keep in keeps) == total
    assert all(keep.sum(1).tolist() == row.tolist() for keep, row in zip(keeps, budgets))


def test_full_keeps_every_token_whatever_the_budget(views):
    for budget in (Budget(0.05), Budget(1.0), Budget(7)):
        keeps, budgets = compress_prefill(PRESETS["full"], views, budget, LENGTH)
        assert all(bool(keep.all()) for keep in keeps)
        assert budgets.tolist() == [[LENGTH] * KV_HEADS] * LAYERS


def test_random_is_reproducible_and_differs_between_layers_and_seeds(views):
    first, _ = compress_prefill(PRESETS["random"], views, BUDGET, LENGTH)
    again, _ = compress_prefill(PRESETS["random"], views, BUDGET, LENGTH)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])
    other = Policy("random1", RandomScores(seed=1), Uniform())
    assert not torch.equal(compress_prefill(other, views, BUDGET, LENGTH)[0][0], first[0])
    # Neither recency nor any other order: kept tokens spread over the whole prompt.
    kept = torch.nonzero(first[0][0]).flatten()
    assert kept.min() < LENGTH // 4 and kept.max() >= 3 * LENGTH // 4


def test_random_score_of_a_token_does_not_change_as_the_cache_grows(views):
    scorer = RandomScores(seed=3)
    longer = scorer.score(views[0])
    shorter = replace(views[0], keys=views[0].keys[:, :100], values=views[0].values[:, :100], positions=torch.arange(100))
    assert torch.equal(scorer.score(shorter), longer[:, :100])


def test_normalized_accumulated_attention_is_mean_attention_received(layers, views):
    """kvpress ObservedAttention: each key's sum divided by the N − j queries that saw it."""
    policy = Policy("observed", AccumulatedAttention(normalize=True), Uniform(), PrefillOnce())
    keeps, _ = compress_prefill(policy, views, BUDGET, LENGTH)
    for layer, keep in zip(layers, keeps):
        seen = LENGTH - np.arange(LENGTH)
        scores = group_mean(layer.accumulated / seen)
        assert kept_positions(keep) == [select(list(scores[h]), PER_HEAD, 0, 0) for h in range(KV_HEADS)]
    # Unnormalized, the causal bias favours early tokens; normalized, it does not.
    raw, _ = compress_prefill(PRESETS["h2o"], views, BUDGET, LENGTH)
    assert torch.nonzero(keeps[0][0]).float().mean() > torch.nonzero(raw[0][0] & ~_recent()).float().mean()


def _recent() -> torch.Tensor:
    recent = torch.zeros(LENGTH, dtype=torch.bool)
    recent[-WINDOW:] = True
    return recent


def test_accumulated_scorers_need_column_statistics(views):
    bare = [replace(view, colsum=None, colsq=None) for view in views]
    with pytest.raises(KvsimError, match="colsum"):
        compress_prefill(PRESETS["h2o"], bare, BUDGET, LENGTH)
    with pytest.raises(KvsimError, match="colsum"):
        compress_prefill(PRESETS["d2o"], bare, BUDGET, LENGTH)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_spec_round_trips_through_json(name):
    policy = PRESETS[name]
    text = json.dumps(policy.to_spec())
    assert Policy.from_spec(json.loads(text)) == policy
    assert resolve_policy(name) is policy


def test_presets_are_named_by_their_key():
    assert all(policy.name == name for name, policy in PRESETS.items())
