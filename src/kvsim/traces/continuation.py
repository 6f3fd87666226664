"""The full-cache attention of a sample's continuation: fixed per sample, so capture stores it.

Every replay compares a compressed cache's attention with the full cache's on the continuation's
queries, and that reference depends on the sample alone. Capture (TraceSet format 4) stores it, per
full-attention layer and query head: each continuation row's attention output, the log-sum-exp of
the row's scaled logits, and the attention mass each prompt token receives from the continuation
(the oracle's weights). With the log-sum-exp, the full-cache probability of any column is
exp(logit − lse) (the softmax identity), so a replay computes logits only at the columns it keeps,
never the whole [rows, T] matrix. Older sets recompute the same three tensors with the same
function (`continuation_reference`) from the stored queries, keys and values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsim.shape import ModelShape


@dataclass(frozen=True)
class ContinuationReference:
    """Full-cache attention of C continuation rows over T positions, for any leading layer axes.

    output: [..., heads, C, d] float32; lse: [..., heads, C] float32, log Σ_j exp(scaled logit)
    over the positions each row sees; prompt_mass: [..., heads, P] float32, Σ over rows of each
    prompt token's full-cache probability.
    """

    output: torch.Tensor
    lse: torch.Tensor
    prompt_mass: torch.Tensor

    def layer(self, index: int) -> ContinuationReference:
        """One layer of a reference stacked along a first layer axis (views, no copy)."""
        return ContinuationReference(self.output[index], self.lse[index], self.prompt_mass[index])


def grouped_matmul(per_query_head: torch.Tensor, per_kv_head: torch.Tensor) -> torch.Tensor:
    """[kv, group, r, a] @ [kv, a, b] -> [kv, group, r, b] as one batched matmul per KV head,
    without broadcasting the KV operand over the group (which copies it on CPU)."""
    kv_heads, group, rows, inner = per_query_head.shape
    flat = torch.matmul(per_query_head.reshape(kv_heads, group * rows, inner), per_kv_head)
    return flat.reshape(kv_heads, group, rows, per_kv_head.shape[-1])


def causal_logits(queries: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, columns: torch.Tensor, scaling: float) -> torch.Tensor:
    """Scaled logits [kv, group, r, m] of queries [kv, group, r, d] at query `positions` [r] over
    keys [kv, m, d] at `columns` ([m], or [kv, m] per head), later positions at −inf (causal)."""
    logits = grouped_matmul(queries.float(), keys.float().transpose(-1, -2)) * scaling
    future = columns[..., None, :] > positions[:, None]  # [r, m] or [kv, r, m]
    return logits.masked_fill(future if future.dim() == 2 else future[:, None], float("-inf"))


def continuation_reference(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, prompt_len: int, scaling: float
) -> ContinuationReference:
    """The reference of one full-attention layer (or of several stacked along the first axis).

    queries: [..., heads, C, d], the continuation's (positions T − C … T − 1); keys, values:
    [..., kv_heads, T, d]; any dtype (computed in float32). Memory: one [heads, C, T] float32 tile
    per layer of the leading axes.
    """
    *layers, heads, rows, head_dim = queries.shape
    kv_heads, total = keys.shape[-3], keys.shape[-2]
    flat_queries = queries.reshape(-1, heads // kv_heads, rows, head_dim)
    flat_keys, flat_values = keys.reshape(-1, total, head_dim), values.reshape(-1, total, head_dim)
    positions = torch.arange(total - rows, total)
    logits = causal_logits(flat_queries, flat_keys, positions, torch.arange(total), scaling)
    lse = logits.logsumexp(-1)
    probs = (logits - lse[..., None]).exp()
    output = grouped_matmul(probs, flat_values.float())
    prompt_mass = probs[..., :prompt_len].sum(2)
    return ContinuationReference(
        output.reshape(*layers, heads, rows, head_dim),
        lse.reshape(*layers, heads, rows),
        prompt_mass.reshape(*layers, heads, prompt_len),
    )


def reference_tensors(tensors: dict[str, torch.Tensor], prompt_len: int, window: int, shape: ModelShape) -> dict[str, torch.Tensor]:
    """The format-4 tensors of a sample file's other `tensors` (`prompt_len`: the mode's, `window`:
    the observation window): the full-attention layers' references stacked along a first axis.
    Computed from the stored, storage-dtype tensors, as a simulator recomputing it for an older
    set does, so both give the same numbers."""
    references = [
        continuation_reference(
            tensors[f"layers.{i}.q"][:, window:], tensors[f"layers.{i}.k"], tensors[f"layers.{i}.v"], prompt_len, shape.scaling
        )
        for i in shape.policy_layers
    ]
    if not references:  # every layer slides: nothing is replayed
        return {}
    return {
        f"continuation.{part}": torch.stack([getattr(reference, part) for reference in references]).contiguous()
        for part in ("output", "lse", "prompt_mass")
    }
