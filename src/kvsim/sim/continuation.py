"""The policy-independent half of a replay: full-cache attention of the continuation's queries.

Read from the TraceSet (format 4) or computed once per (sample, layer), and shared by every policy
and budget evaluated on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from kvsim.policies.rope import Rotary
from kvsim.policies.view import CacheView
from kvsim.shape import ModelShape
from kvsim.traces.continuation import ContinuationReference, causal_logits, continuation_reference
from kvsim.traces.store import TraceSample


@dataclass
class ContinuationAttention:
    """Teacher-forced continuation queries of one layer against its full cache.

    queries: [kv_heads, group, C, d]; keys, values: [kv_heads, T, d] (float32);
    output: [kv_heads, group, C, d] the full-cache attention output; lse: [kv_heads, group, C] the
    log-sum-exp of each row's scaled logits over the positions it sees, so the full-cache
    probability of a column is exp(logit − lse) (`probs_at`) and no [C, T] matrix is needed;
    prompt_mass: [kv_heads, group, P] Σ over rows of each prompt token's full-cache probability;
    evidence: [T] bool, the annotated needle tokens.
    """

    prompt_len: int
    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    output: torch.Tensor
    lse: torch.Tensor
    prompt_mass: torch.Tensor
    evidence: torch.Tensor
    scaling: float

    @classmethod
    def of(
        cls,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        evidence: torch.Tensor,
        scaling: float,
        reference: ContinuationReference | None = None,
    ) -> ContinuationAttention:
        """From the continuation's queries [kv, group, C, d], the layer's keys and values [kv, T, d]
        and its stored `reference` ([heads, ...], `kvsim.traces.continuation`), or computed here
        when the TraceSet predates it."""
        kv_heads, group, rows, head_dim = queries.shape
        prompt_len = keys.shape[1] - rows
        if reference is None:
            reference = continuation_reference(queries.reshape(-1, rows, head_dim), keys, values, prompt_len, scaling)
        return cls(
            prompt_len, queries, keys, values,
            reference.output.reshape(kv_heads, group, rows, head_dim),
            reference.lse.reshape(kv_heads, group, rows),
            reference.prompt_mass.reshape(kv_heads, group, prompt_len),
            evidence, scaling,
        )

    @property
    def rows(self) -> int:
        return self.queries.shape[2]

    @property
    def total(self) -> int:
        return self.keys.shape[1]

    def logits_at(self, columns: torch.Tensor) -> torch.Tensor:
        """[kv, group, C, m] full-cache scaled logits at each head's `columns` [kv, m], −inf where a
        row's position comes before the column's."""
        keys = self.keys.gather(1, columns[..., None].expand(-1, -1, self.keys.shape[-1]))
        return causal_logits(self.queries, keys, torch.arange(self.prompt_len, self.total), columns, self.scaling)

    def probs_at(self, logits: torch.Tensor) -> torch.Tensor:
        """Full-cache probabilities from `logits_at`'s logits [kv, group, C, m]."""
        return (logits - self.lse[..., None]).exp()

    @cached_property
    def evidence_mass(self) -> torch.Tensor:
        """[kv, group, C] the full-cache probability mass each row puts on the evidence tokens."""
        columns = self.evidence.nonzero().flatten().expand(self.keys.shape[0], -1)
        return self.probs_at(self.logits_at(columns)).sum(-1)


def continuation_attention(
    sample: TraceSample, layer: int, window: int, scaling: float, reference: ContinuationReference | None = None
) -> ContinuationAttention:
    """`scaling`: the model's attention scale (`ModelShape.scaling`); `reference`: the layer's stored
    full-cache attention (`TraceSample.stored_reference`), None to compute it."""
    trace = sample.layer(layer)
    keys, values = trace.k.float(), trace.v.float()
    kv_heads, _, head_dim = keys.shape
    queries = trace.q[:, window:].float()
    queries = queries.reshape(kv_heads, -1, queries.shape[1], head_dim)
    evidence = torch.zeros(keys.shape[1], dtype=torch.bool)
    for start, end in sample.needle_spans:
        evidence[start:end] = True
    return ContinuationAttention.of(queries, keys, values, evidence, scaling, reference)


def prefill_view(
    sample: TraceSample, layer: int, shape: ModelShape, window: int, rope: Rotary | None = None, full: ContinuationAttention | None = None
) -> CacheView:
    """The cache a policy sees at the end of the prompt: all prompt tokens, the window's queries,
    the column statistics over every prompt query, and KVzip's scores when captured. Given the
    layer's `full` attention, the view's keys and values are its float32 ones (one copy, not two)."""
    trace = sample.layer(layer)
    prompt = sample.prompt_len
    keys, values = (trace.k, trace.v) if full is None else (full.keys, full.values)
    return CacheView(
        layer=layer,
        n_layers=shape.n_layers,
        keys=keys[:, :prompt].float(),
        values=values[:, :prompt].float(),
        positions=torch.arange(prompt),
        queries=trace.q[:, :window].float(),
        query_positions=torch.arange(prompt - window, prompt),
        scaling=shape.scaling,
        colsum=trace.colsum,
        colsq=trace.colsq,
        rope=rope,
        reconstruction=trace.kvzip,
    )
