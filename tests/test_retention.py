"""Retention by hand: what merging and low precision do to the kept keys and values."""

import torch

from kvsim.policies.retention import Drop, Merge, Quantize, fake_quantize


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
