"""Attention recall, output error and evidence mass of many retained sets at once: the PyTorch twin
of the Triton kernel in `masked_attention_triton` (same signature, same outputs).

A search evaluates many (policy, budget) candidates on the same layer. When eviction drops tokens
without rewriting the kept ones, the compressed softmax of a set S is the full softmax restricted to
S and renormalized: p_S(j) = p(j)·[j ∈ S] / Σ_{i∈S} p(i). So every set's metrics follow from the
one full-cache attention: its recall is Σ_{j∈S} p(j), its output Σ_{j∈S} p(j)·v_j divided by that
recall. One pass over the keys and values serves all sets, with no per-set copy of the cache.

The renormalization is exact as long as a set's kept mass is a normal float32 (above 1e-38 of the
full mass); a set below that counts as reading nothing (recall 0, output error 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsim.errors import KvsimError

# Bound on the [sets, kv_heads, rows, T] float32 tile of masked probabilities held at once.
DEFAULT_CHUNK_BYTES = 32 << 20


@dataclass(frozen=True)
class MaskedAttentionSums:
    """Outputs of `masked_attention_sums`: sums over the group · C (query head, row) pairs of each
    KV head, so callers that stack layers along the KV-head axis can still split them per layer.

    recall:         [sets, kv_heads] Σ full-attention mass on the set's readable tokens.
    error:          [sets, kv_heads] Σ ‖o_set − o_full‖ / ‖o_full‖ (1 for a row that reads nothing).
    evidence_kept:  [sets, kv_heads] Σ full-attention mass on readable evidence tokens.
    evidence_total: [kv_heads] Σ full-attention mass on evidence tokens.
    rows: (query head, row) pairs summed per KV head: group · C.
    """

    recall: torch.Tensor
    error: torch.Tensor
    evidence_kept: torch.Tensor
    evidence_total: torch.Tensor
    rows: int


def masked_attention_sums_torch(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    readable: torch.Tensor,
    evidence: torch.Tensor | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> MaskedAttentionSums:
    """Metric sums of each retained set for the last C positions' queries.

    queries: [kv_heads, group, C, d], the queries of positions T−C … T−1 (RoPE applied);
    keys, values: [kv_heads, T, d];
    readable: [sets, kv_heads, T] bool, the tokens each set lets attention read (positions after
        a row's own are masked regardless: causal);
    evidence: [T] bool, annotated needle tokens (None: no evidence sums, they come back as zeros).
    """
    evidence = check_masked_inputs(queries, keys, values, readable, evidence)
    kv_heads, group, context, head_dim = queries.shape
    sets, _, total = readable.shape
    rows = group * context
    probs = _full_probs(queries, keys, scaling)  # [kv, rows, T]
    values = values.float()
    reference = torch.matmul(probs, values)  # [kv, rows, d]
    masks = readable.to(torch.float32).transpose(0, 1)  # [kv, sets, T]
    kept = torch.matmul(probs, masks.transpose(1, 2))  # [kv, rows, sets]
    evidence_probs = probs * evidence
    evidence_kept = torch.matmul(evidence_probs, masks.transpose(1, 2))
    kept_outputs = torch.empty(kv_heads, sets, rows, head_dim, device=keys.device)
    per_chunk = max(1, chunk_bytes // (4 * kv_heads * rows * total))
    for first in range(0, sets, per_chunk):
        last = min(first + per_chunk, sets)
        # [kv, s, rows, T] masked probabilities, then one matmul per KV head for all sets of the chunk.
        weighted = probs[:, None] * masks[:, first:last, None, :]
        kept_outputs[:, first:last] = torch.matmul(weighted.reshape(kv_heads, -1, total), values).reshape(
            kv_heads, last - first, rows, head_dim
        )
    outputs = kept_outputs / kept.transpose(1, 2)[..., None]
    outputs = torch.where(kept.transpose(1, 2)[..., None] > 0, outputs, 0.0)
    error = (outputs - reference[:, None]).norm(dim=-1) / reference.norm(dim=-1).clamp(min=1e-12)[:, None]
    return MaskedAttentionSums(
        recall=kept.sum(1).T.contiguous(),
        error=error.sum(-1).T.contiguous(),
        evidence_kept=evidence_kept.sum(1).T.contiguous(),
        evidence_total=evidence_probs.sum((1, 2)),
        rows=rows,
    )


def _full_probs(queries: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal full-cache softmax [kv_heads, group · C, T] of queries at positions T−C … T−1."""
    kv_heads, group, context, head_dim = queries.shape
    total = keys.shape[1]
    flat = queries.float().reshape(kv_heads, group * context, head_dim)
    logits = torch.matmul(flat, keys.float().transpose(1, 2)).mul_(scaling)
    positions = torch.arange(total - context, total, device=queries.device).repeat(group)
    logits.masked_fill_(torch.arange(total, device=queries.device)[None, :] > positions[:, None], float("-inf"))
    return logits.softmax(-1)


def check_masked_inputs(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    readable: torch.Tensor,
    evidence: torch.Tensor | None,
) -> torch.Tensor:
    """The evidence mask as a [T] float32 tensor, after checking the shapes both implementations rely on."""
    if queries.dim() != 4 or keys.dim() != 3 or keys.shape != values.shape or queries.shape[-1] != keys.shape[-1]:
        raise KvsimError(
            f"expected queries [kv_heads, group, C, d] and keys, values [kv_heads, T, d]; got "
            f"{list(queries.shape)}, {list(keys.shape)}, {list(values.shape)}"
        )
    kv_heads, _, context, _ = queries.shape
    total = keys.shape[1]
    if keys.shape[0] != kv_heads or context > total:
        raise KvsimError(f"queries {list(queries.shape)} do not fit keys {list(keys.shape)}")
    if readable.dtype != torch.bool or readable.dim() != 3 or readable.shape[1:] != (kv_heads, total):
        raise KvsimError(f"readable must be a bool tensor [sets, {kv_heads}, {total}]; got {readable.dtype} {list(readable.shape)}")
    if evidence is None:
        return torch.zeros(total, device=keys.device)
    if evidence.shape != (total,):
        raise KvsimError(f"evidence must be a [{total}] mask; got {list(evidence.shape)}")
    return evidence.to(torch.float32)
