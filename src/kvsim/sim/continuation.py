"""The policy-independent half of a replay: full-cache attention of the continuation's queries.

Computed once per (sample, layer) and shared by every policy and budget evaluated on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsim.policies.rope import Rotary
from kvsim.policies.view import CacheView
from kvsim.shape import ModelShape
from kvsim.traces.store import TraceSample


@dataclass
class ContinuationAttention:
    """Teacher-forced continuation queries of one layer against its full cache.

    queries: [kv_heads, group, C, d]; keys, values: [kv_heads, T, d] (float32);
    logits: [kv_heads, group, C, T] scaled scores with future positions at -inf;
    probs, output: the full-cache softmax and attention output [kv_heads, group, C, d].
    evidence: [T] bool, the annotated needle tokens.
    """

    prompt_len: int
    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    logits: torch.Tensor
    probs: torch.Tensor
    output: torch.Tensor
    evidence: torch.Tensor
    scaling: float

    @property
    def rows(self) -> int:
        return self.queries.shape[2]

    @property
    def total(self) -> int:
        return self.keys.shape[1]


def grouped_matmul(per_query_head: torch.Tensor, per_kv_head: torch.Tensor) -> torch.Tensor:
    """[kv, group, r, a] @ [kv, a, b] -> [kv, group, r, b] as one batched matmul per KV head,
    without broadcasting the KV operand over the group (which copies it on CPU)."""
    kv_heads, group, rows, inner = per_query_head.shape
    flat = torch.matmul(per_query_head.reshape(kv_heads, group * rows, inner), per_kv_head)
    return flat.reshape(kv_heads, group, rows, per_kv_head.shape[-1])


def continuation_attention(sample: TraceSample, layer: int, window: int, scaling: float) -> ContinuationAttention:
    """`scaling`: the model's attention scale (`ModelShape.scaling`)."""
    trace = sample.layer(layer)
    keys, values = trace.k.float(), trace.v.float()
    kv_heads, total, head_dim = keys.shape
    queries = trace.q[:, window:].float()
    heads, rows, _ = queries.shape
    queries = queries.reshape(kv_heads, heads // kv_heads, rows, head_dim)
    logits = grouped_matmul(queries, keys.transpose(-1, -2)) * scaling
    positions = torch.arange(sample.prompt_len, total)
    logits.masked_fill_(torch.arange(total)[None, :] > positions[:, None], float("-inf"))
    probs = logits.softmax(-1)
    evidence = torch.zeros(total, dtype=torch.bool)
    for start, end in sample.needle_spans:
        evidence[start:end] = True
    return ContinuationAttention(
        sample.prompt_len, queries, keys, values, logits, probs, grouped_matmul(probs, values), evidence, scaling
    )


def prefill_view(sample: TraceSample, layer: int, shape: ModelShape, window: int, rope: Rotary | None = None) -> CacheView:
    """The cache a policy sees at the end of the prompt: all prompt tokens, the window's queries,
    the column statistics over every prompt query, and KVzip's scores when captured."""
    trace = sample.layer(layer)
    prompt = sample.prompt_len
    return CacheView(
        layer=layer,
        n_layers=shape.n_layers,
        keys=trace.k[:, :prompt].float(),
        values=trace.v[:, :prompt].float(),
        positions=torch.arange(prompt),
        queries=trace.q[:, :window].float(),
        query_positions=torch.arange(prompt - window, prompt),
        scaling=shape.scaling,
        colsum=trace.colsum,
        colsq=trace.colsq,
        rope=rope,
        reconstruction=trace.kvzip,
    )
