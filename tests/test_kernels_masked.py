"""The masked-attention twin: many retained sets scored at once, against a dense per-set softmax and
against the simulator's own `block_metrics`."""

from __future__ import annotations

import pytest
import torch

from kvsim.errors import KvsimError
from kvsim.kernels import masked_attention_sums, masked_attention_sums_torch, uses_triton
from kvsim.sim.continuation import continuation_attention
from kvsim.sim.metrics import block_metrics
from kvsim.traces.synthetic import synthetic_traceset


def dense_reference(queries, keys, values, scaling, readable, evidence):
    """Per set: softmax over its readable, visible tokens of the full T×T-style logits, in float64."""
    kv_heads, group, context, _ = queries.shape
    total = keys.shape[1]
    logits = torch.einsum("kgcd,ktd->kgct", queries.double(), keys.double()) * scaling
    future = torch.arange(total)[None, :] > torch.arange(total - context, total)[:, None]
    logits = logits.masked_fill(future, float("-inf"))
    probs = logits.softmax(-1)
    reference = torch.einsum("kgct,ktd->kgcd", probs, values.double())
    recall, error, kept_evidence = [], [], []
    for mask in readable:  # one set at a time: the plainest statement of the definitions
        visible = mask[:, None, None, :]
        compressed = torch.nan_to_num(logits.masked_fill(~visible, float("-inf")).softmax(-1), nan=0.0)
        output = torch.einsum("kgct,ktd->kgcd", compressed, values.double())
        recall.append((probs * visible).sum((1, 2, 3)))
        error.append(((output - reference).norm(dim=-1) / reference.norm(dim=-1)).sum((1, 2)))
        kept_evidence.append((probs * visible * evidence).sum((1, 2, 3)))
    return torch.stack(recall), torch.stack(error), torch.stack(kept_evidence), (probs * evidence).sum((1, 2, 3))


def retained_sets(kv_heads: int, total: int, generator: torch.Generator) -> torch.Tensor:
    """Empty, full, one token per head (a different one per head), and two random sets: [5, kv, T]."""
    one_token = torch.zeros(kv_heads, total, dtype=torch.bool)
    one_token[torch.arange(kv_heads), torch.arange(kv_heads) * 3 % total] = True
    random = torch.rand(2, kv_heads, total, generator=generator) < 0.3
    empty, full = torch.zeros(kv_heads, total, dtype=torch.bool), torch.ones(kv_heads, total, dtype=torch.bool)
    return torch.cat([empty[None], full[None], one_token[None], random])


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("context,total", [(5, 37), (1, 9), (9, 9)])
def test_twin_matches_a_dense_softmax_per_set(group, context, total):
    generator = torch.Generator().manual_seed(group * 10 + context)
    kv_heads, head_dim = 2, 8
    queries = torch.randn(kv_heads, group, context, head_dim, generator=generator)
    keys, values = torch.randn(2, kv_heads, total, head_dim, generator=generator) * 1.5
    readable = retained_sets(kv_heads, total, generator)
    evidence = torch.zeros(total, dtype=torch.bool)
    evidence[total // 3 : total // 2 + 1] = True
    # A chunk budget of one set at a time exercises the chunk loop.
    sums = masked_attention_sums_torch(queries, keys, values, 0.4, readable, evidence, chunk_bytes=1)
    recall, error, kept_evidence, evidence_total = dense_reference(queries, keys, values, 0.4, readable, evidence)
    for got, want in [(sums.recall, recall), (sums.error, error), (sums.evidence_kept, kept_evidence)]:
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sums.evidence_total.double(), evidence_total, atol=1e-5, rtol=1e-5)
    assert sums.rows == group * context
    assert torch.all(sums.recall[0] == 0) and torch.all(sums.error[0] == sums.rows)  # nothing readable: error 1 per row
    torch.testing.assert_close(sums.recall[1], torch.full((kv_heads,), float(sums.rows)))
    assert sums.error[1].max() < 1e-5


def test_twin_gives_block_metrics_numbers_for_prefill_selections(tmp_path):
    """What the simulator's prefill-once path computes per policy, for four selections in one call."""
    traceset = synthetic_traceset(tmp_path, kv_heads=3, group=3, prompt_len=50, continuation=6, window=4, needle=(10, 14))
    sample = next(iter(traceset))
    full = continuation_attention(sample, 0, window=4, scaling=traceset.shape.scaling)
    generator = torch.Generator().manual_seed(3)
    prompt_keeps = torch.rand(4, 3, 50, generator=generator) < torch.tensor([0.05, 0.2, 0.5, 0.9])[:, None, None]
    readable = torch.cat([prompt_keeps, torch.ones(4, 3, full.rows, dtype=torch.bool)], dim=2)
    sums = masked_attention_sums(full.queries, full.keys, full.values, full.scaling, readable, full.evidence)
    for index, keep in enumerate(readable):
        expected = block_metrics(full, torch.arange(full.total).expand(3, -1), keep)
        assert float(sums.recall[index].sum()) == pytest.approx(expected.recall, rel=1e-5, abs=1e-5)
        assert float(sums.error[index].sum()) == pytest.approx(expected.error, rel=1e-5, abs=1e-5)
        assert float(sums.evidence_kept[index].sum()) == pytest.approx(expected.evidence_kept, rel=1e-5, abs=1e-5)
        assert float(sums.evidence_total.sum()) == pytest.approx(expected.evidence_total, rel=1e-5, abs=1e-5)
        assert sums.rows * 3 == expected.count


def test_cpu_tensors_take_the_twin():
    assert not uses_triton(torch.zeros(1))


def test_bad_shapes_are_one_line_errors():
    queries, keys = torch.randn(2, 1, 3, 8), torch.randn(2, 10, 8)
    with pytest.raises(KvsimError, match="bool tensor"):
        masked_attention_sums(queries, keys, keys, 1.0, torch.ones(4, 2, 10))
    with pytest.raises(KvsimError, match="do not fit"):
        masked_attention_sums(queries, keys[:1], keys[:1], 1.0, torch.ones(4, 1, 10, dtype=torch.bool))
    with pytest.raises(KvsimError, match="evidence"):
        masked_attention_sums(queries, keys, keys, 1.0, torch.ones(4, 2, 10, dtype=torch.bool), torch.ones(9, dtype=torch.bool))
