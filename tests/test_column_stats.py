"""The chunked attention + column statistics twin against a dense T×T softmax."""

import pytest
import torch

from kvsim.errors import KvsimError
from kvsim.kernels import causal_attention_column_stats


def dense_reference(query, key, value, scaling):
    heads, n, _ = query.shape
    kv_heads, total, _ = key.shape
    k = key.repeat_interleave(heads // kv_heads, dim=0).double()
    v = value.repeat_interleave(heads // kv_heads, dim=0).double()
    scores = query.double() @ k.transpose(-1, -2) * scaling
    positions = torch.arange(total - n, total)
    scores = scores.masked_fill(torch.arange(total)[None, :] > positions[:, None], float("-inf"))
    probs = scores.softmax(-1)
    return probs @ v, probs, torch.logsumexp(scores, -1)


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("n,total", [(37, 37), (5, 37), (1, 9)])
def test_matches_dense_softmax(group, n, total):
    torch.manual_seed(group * 100 + n)
    kv_heads, head_dim = 2, 8
    query = torch.randn(kv_heads * group, n, head_dim)
    key, value = torch.randn(2, kv_heads, total, head_dim).unbind(0)
    # A tiny chunk budget forces many chunks, including ones that do not divide n.
    stats = causal_attention_column_stats(query, key, value, 0.35, chunk_bytes=4 * kv_heads * group * total * 4)
    output, probs, lse = dense_reference(query, key, value, 0.35)
    torch.testing.assert_close(stats.output.double(), output, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.colsum[0].double(), probs.sum(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.colsq[0].double(), probs.square().sum(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.lse.double(), lse, atol=1e-5, rtol=1e-5)


def test_row_groups_split_the_sums():
    torch.manual_seed(1)
    query, key, value = torch.randn(4, 20, 8), torch.randn(2, 20, 8), torch.randn(2, 20, 8)
    whole = causal_attention_column_stats(query, key, value, 0.3)
    split = causal_attention_column_stats(query, key, value, 0.3, row_splits=[12])
    _, probs, _ = dense_reference(query, key, value, 0.3)
    torch.testing.assert_close(split.colsum[0].double(), probs[:, :12].sum(1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(split.colsum[1].double(), probs[:, 12:].sum(1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(split.colsum.sum(0), whole.colsum[0], atol=1e-6, rtol=1e-5)
    # Keys after the context get nothing from context rows (causality).
    assert split.colsum[0][:, 12:].abs().max() == 0


def test_rejects_bad_splits_and_groups():
    query, key = torch.randn(4, 6, 8), torch.randn(3, 6, 8)
    with pytest.raises(KvsimError, match="multiple"):
        causal_attention_column_stats(query, key, key, 1.0)
    with pytest.raises(KvsimError, match="increase"):
        causal_attention_column_stats(query, key[:2], key[:2], 1.0, row_splits=[6])
