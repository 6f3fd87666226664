"""Retention by hand: what merging and low precision do to the kept keys and values, and which
tokens a retention that spends the budget's bytes keeps at low precision."""

from dataclasses import replace

import pytest
import torch

from kvsim.errors import KvsimError
from kvsim.policies import Policy
from kvsim.policies.allocators.uniform import Uniform
from kvsim.policies.held import handed_to_retention, kv_bytes, low_bytes, low_tokens_bought, token_bytes
from kvsim.policies.retention import Drop, LowBits, Merge, MixedPrecision, Quantize, fake_quantize, fake_quantize_channels
from kvsim.policies.schedules import PrefillOnce
from kvsim.policies.scorers.recency import Recency
from kvsim.policies.view import CacheView


def test_merge_folds_an_evicted_token_into_its_nearest_kept_one():
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]])
    values = torch.tensor([[[1.0], [2.0], [4.0], [8.0]]])
    keep = torch.tensor([[True, True, False, False]])
    evicted = torch.tensor([[False, False, True, True]])
    out = Merge(threshold=0.5).retain(keys, values, keep, evicted)
    similarity = 1 / 2**0.5  # token 2 is equally close to 0 and 1; the first wins; token 3 is below 0.5
    torch.testing.assert_close(out.keys[0, 0], (keys[0, 0] + similarity * keys[0, 2]) / 2)
    torch.testing.assert_close(out.values[0, 0], (values[0, 0] + similarity * values[0, 2]) / 2)
    torch.testing.assert_close(out.keys[0, 1], keys[0, 1])  # nothing merged into token 1
    assert not out.low_precision.any()


def test_merge_ignores_tokens_evicted_earlier():
    keys = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [1.0, 0.2]]])
    keep = torch.tensor([[True, False, False]])
    only_new = torch.tensor([[False, False, True]])  # token 1 left the cache at an earlier step
    out = Merge(threshold=0.0).retain(keys, keys.clone(), keep, only_new)
    similarity = float(torch.nn.functional.cosine_similarity(keys[0, 0], keys[0, 2], dim=0))
    torch.testing.assert_close(out.keys[0, 0], (keys[0, 0] + similarity * keys[0, 2]) / 2)


@pytest.mark.parametrize("seed", range(5))
def test_merge_matches_a_token_by_token_reference_when_heads_keep_different_tokens(seed):
    generator = torch.Generator().manual_seed(seed)
    heads, n, threshold = 3, 20, 0.2
    keys, values = torch.randn(heads, n, 4, generator=generator), torch.randn(heads, n, 4, generator=generator)
    keep = torch.rand(heads, n, generator=generator) < torch.tensor([[0.2], [0.5], [0.8]])  # unequal counts, scattered
    evicted = ~keep & (torch.rand(heads, n, generator=generator) < 0.7)
    out = Merge(threshold=threshold).retain(keys, values, keep, evicted)
    expected_keys, expected_values = keys.clone(), values.clone()
    for h in range(heads):
        kept = keep[h].nonzero().flatten().tolist()
        folded = {t: ([keys[h, t]], [values[h, t]]) for t in kept}
        for e in evicted[h].nonzero().flatten().tolist():
            similarity = [float(torch.nn.functional.cosine_similarity(keys[h, e], keys[h, t], dim=0)) for t in kept]
            best = max(similarity)
            if best >= threshold:
                target = kept[similarity.index(best)]
                folded[target][0].append(best * keys[h, e])
                folded[target][1].append(best * values[h, e])
        for t, (k, v) in folded.items():
            expected_keys[h, t], expected_values[h, t] = sum(k) / len(k), sum(v) / len(v)
    torch.testing.assert_close(out.keys, expected_keys)
    torch.testing.assert_close(out.values, expected_values)


def test_quantize_rounds_evicted_tokens_to_the_grid_and_leaves_kept_ones():
    torch.manual_seed(0)
    keys, values = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    keep = torch.zeros(2, 6, dtype=torch.bool)
    keep[:, :2] = True
    out = Quantize(nbits=2).retain(keys, values, keep, ~keep)
    assert torch.equal(out.keys[:, :2], keys[:, :2]) and torch.equal(out.low_precision, ~keep)
    # 2 bits: at most 4 distinct values per token and head, error at most half a step.
    assert all(len(torch.unique(out.keys[h, t])) <= 4 for h in range(2) for t in range(2, 6))
    step = (keys.amax(-1) - keys.amin(-1)) / 3
    assert ((out.keys - keys).abs().amax(-1) <= step / 2 + 1e-6).all()
    assert torch.equal(fake_quantize(torch.tensor([[0.0, 1.0, 3.0]]), 8)[0, [0, 2]], torch.tensor([0.0, 3.0]))


def test_drop_changes_nothing():
    keys = torch.randn(1, 3, 2)
    out = Drop().retain(keys, keys, torch.ones(1, 3, dtype=torch.bool), torch.zeros(1, 3, dtype=torch.bool))
    assert out.keys is keys and not out.low_precision.any()


def test_mixed_precision_spends_the_leftover_bytes_on_the_next_best_tokens():
    # head_dim 16 at 2 bits: 64 bytes a full token, 2 · (4 + 4) = 16 a low one, so each full token
    # given up buys four low ones.
    retention = MixedPrecision(nbits=2, full_share=0.5)
    assert (token_bytes(16), token_bytes(16, LowBits(2, 2))) == (64, 16)
    budgets = torch.tensor([10, 3])
    assert retention.full_budgets(budgets).tolist() == [5, 2]  # round half to even: 1.5 -> 2
    buy = lambda spare: low_tokens_bought(spare, 16, LowBits(2, 2))  # noqa: E731
    assert retention.low_budgets(budgets, retention.full_budgets(budgets), 64, buy).tolist() == [20, 4]
    assert Quantize(nbits=2).low_budgets(budgets, budgets, 64, buy) is None  # plain quantize: on top of the budget

    n = 40
    view = CacheView(0, 1, torch.randn(2, n, 16), torch.randn(2, n, 16), torch.arange(n), torch.randn(2, 4, 16), torch.arange(n - 4, n), 0.25)
    policy = Policy("mixed", Recency(), Uniform(), PrefillOnce(sinks=2), retention)
    kept = torch.zeros(2, n, dtype=torch.bool)
    kept[:, :2] = True  # the sinks
    kept[0, n - 3 :] = True  # head 0: 5 full tokens (sinks + the 3 newest), head 1: 2
    low = handed_to_retention(policy, view, kept, budgets)
    # The next-best by recency: head 0 the 20 positions before its newest 3, head 1 the newest 4.
    assert low[0].nonzero().flatten().tolist() == list(range(n - 23, n - 3))
    assert low[1].nonzero().flatten().tolist() == list(range(n - 4, n))
    held = kv_bytes(int(kept.sum()), low.sum(1), 16, LowBits(2, 2))
    assert held <= kv_bytes(int(budgets.sum()), torch.zeros(2, dtype=torch.long), 16, None)
    assert not (low & kept).any()
    # Dropping, merging and plain quantizing receive every evicted token.
    assert torch.equal(handed_to_retention(replace(policy, retention=Drop()), view, kept, budgets), ~kept)


def test_per_channel_keys_keep_the_other_channels_sharp_beside_an_outlier_channel():
    """KIVI's reason for per-channel keys: one channel 50x larger stretches every per-token range,
    so at 2 bits per token the other channels round to almost nothing; per channel they keep theirs."""
    keys = torch.randn(64, 16)
    keys[:, 3] *= 50
    rest = [c for c in range(16) if c != 3]
    per_token = (fake_quantize(keys, 2) - keys)[:, rest].abs().mean()
    per_channel = (fake_quantize_channels(keys, 2, 32) - keys)[:, rest].abs().mean()
    assert per_channel < per_token / 4
    retention = MixedPrecision(nbits=2, full_share=0.5, key_group=32)
    evicted = torch.zeros(1, 64, dtype=torch.bool)
    evicted[0, 10:50] = True  # 40 tokens: a group of 32 and a short one of 8
    retained = retention.retain(keys[None], keys[None], ~evicted, evicted)
    expected = fake_quantize_channels(keys[10:50], 2, 32)
    torch.testing.assert_close(retained.keys[0, 10:50], expected, atol=0, rtol=0)
    assert torch.equal(retained.keys[0, ~evicted[0]], keys[~evicted[0]])
    with pytest.raises(KvsimError, match="key_group must be 0"):
        MixedPrecision(key_group=1)


@pytest.mark.parametrize("key_group", (0, 32))
def test_low_precision_tokens_bought_are_the_most_the_spare_bytes_pay_for(key_group):
    """`low_tokens_bought` inverts `low_bytes`, per-channel groups' scales (a short group costs a
    whole one) included: m tokens fit in the spare bytes and m + 1 do not."""
    bits, head_dim = LowBits(2, 3, key_group), 64
    spare = torch.arange(0, 20000, 37)
    bought = low_tokens_bought(spare, head_dim, bits)
    for s, m in zip(spare.tolist(), bought.tolist()):
        assert low_bytes(torch.tensor([m]), head_dim, bits) <= s < low_bytes(torch.tensor([m + 1]), head_dim, bits)
    # Per channel, 32 keys share 64 scale and zero pairs (256 bytes) instead of 32 (128 bytes).
    per_token, per_channel = (low_bytes(torch.tensor([32]), head_dim, LowBits(2, 3, g)) for g in (0, 32))
    assert per_channel - per_token == 2 * head_dim * 2 - 32 * 2 * 2


def test_mixed_precision_gives_keys_and_values_their_own_bit_widths_per_depth_group():
    """KVTuner-style widths: two depth groups of a 30-layer model, keys wider than values in the
    shallow half; a wider layer's low-precision token costs more, so the same bytes buy fewer."""
    retention = MixedPrecision(full_share=0.5, key_bits=(8, 2), value_bits=(4, 2))
    assert [retention.bits(layer, 30) for layer in (0, 14, 15, 29)] == [LowBits(8, 4), LowBits(8, 4), LowBits(2, 2), LowBits(2, 2)]
    assert MixedPrecision(nbits=3).bits(7, 30) == LowBits(3, 3)
    # head_dim 64: 64 + 32 code bytes + 4 scale/zero pairs' bytes (8) = 104, against 2·(16 + 4) = 40 at 2 bits.
    shallow, deep = token_bytes(64, retention.bits(0, 30)), token_bytes(64, retention.bits(29, 30))
    assert (shallow, deep) == (104, 40)
    budgets = torch.tensor([40])
    full = retention.full_budgets(budgets)
    bought = [retention.low_budgets(budgets, full, token_bytes(64), lambda spare, layer=layer: low_tokens_bought(spare, 64, retention.bits(layer, 30))) for layer in (0, 29)]
    assert bought[0].item() < bought[1].item()
    keys = torch.randn(1, 6, 64)
    evicted = torch.tensor([[False, False, True, True, True, True]])
    shallow_keys = retention.retain(keys, keys, ~evicted, evicted, 0, 30).keys
    deep_keys = retention.retain(keys, keys, ~evicted, evicted, 29, 30).keys
    assert (shallow_keys - keys).abs().max() < (deep_keys - keys).abs().max()  # 8 bits rounds finer than 2
    with pytest.raises(KvsimError, match="key_bits and value_bits go together"):
        MixedPrecision(key_bits=(4,))
    with pytest.raises(KvsimError, match=r"value_bits must be bit widths in \[1, 8\]"):
        MixedPrecision(key_bits=(4,), value_bits=(9,))
