"""Causal attention that also returns per-key column statistics, without a T×T matrix in memory:
the PyTorch twin of the Triton kernel in `column_stats_triton` (same signature, same outputs).

Scorers such as H2O (accumulated attention) and the CAKE/SnapKV family need, for every key, how
much attention the prompt's queries gave it. Summing softmax probabilities column-wise while the
attention itself is computed costs one extra reduction per chunk of query rows, instead of a
second pass over the prompt. Rows are processed in chunks sized to a memory budget, so peak memory
is O(chunk · T) rather than O(T²).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvsim.errors import KvsimError

# Measured on a 2-core CPU at T = 1600: 8 MiB score tiles run 3x faster than 64 MiB ones (the
# elementwise passes stay in cache) and 2x faster than 512 KiB ones (fewer, larger matmuls).
DEFAULT_CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class ColumnStats:
    """Outputs of `causal_attention_column_stats`.

    output: [heads, n, head_dim] attention output, in the query's dtype.
    colsum: [groups, heads, T] float32, per row group, Σ_rows p(row, key).
    colsq:  [groups, heads, T] float32, per row group, Σ_rows p(row, key)².
    lse:    [heads, n] float32, log-sum-exp of each row's scaled scores.
    """

    output: torch.Tensor
    colsum: torch.Tensor
    colsq: torch.Tensor
    lse: torch.Tensor


def causal_attention_column_stats_torch(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    row_splits: Sequence[int] = (),
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    window: int | None = None,
) -> ColumnStats:
    """Causal softmax attention of `n` queries over `T` keys with column sums per row group.

    query: [heads, n, head_dim], the queries of positions T−n … T−1 (RoPE applied).
    key, value: [kv_heads, T, head_dim]; heads must be a multiple of kv_heads (grouped-query
        attention: query head h reads KV head h // (heads // kv_heads)).
    row_splits: increasing row indices in (0, n) that cut the rows into groups; statistics are
        kept per group, e.g. split at the end of the context to get both evaluation modes' sums
        from one forward pass (they are additive over rows).
    window: a sliding layer's window (`kvsim.shape`): each query sees only the last `window`
        positions, itself included; None for full attention.
    """
    bounds = row_group_bounds(query, key, value, row_splits)
    heads, n, head_dim = query.shape
    kv_heads, total, _ = key.shape
    group = heads // kv_heads
    offset = total - n
    device = query.device

    q = query.float().reshape(kv_heads, group, n, head_dim)
    k = key.float()
    v = value.float()
    whole_prompt = n == total and window is None and query.device.type == "cpu"
    known = _cpu_flash_attention(q, k, v, scaling) if whole_prompt else None
    if known is not None:
        output, lse = known
    else:
        output = torch.empty(kv_heads, group, n, head_dim, dtype=torch.float32, device=device)
        lse = torch.empty(kv_heads, group, n, dtype=torch.float32, device=device)
    colsum = torch.zeros(len(bounds) - 1, kv_heads, group, total, dtype=torch.float32, device=device)
    colsq = torch.zeros_like(colsum)
    rows_per_chunk = max(1, chunk_bytes // (4 * heads * total))

    for index, (start, stop) in enumerate(zip(bounds, bounds[1:])):
        for row0 in range(start, stop, rows_per_chunk):
            row1 = min(row0 + rows_per_chunk, stop)
            visible = offset + row1  # keys beyond the chunk's last position are masked for every row
            scores = torch.matmul(q[:, :, row0:row1], k[:, None, :visible].transpose(-1, -2)).mul_(scaling)
            positions = torch.arange(offset + row0, offset + row1, device=device)
            columns = torch.arange(visible, device=device)[None, :]
            hidden = columns > positions[:, None]
            if window is not None:
                hidden |= columns <= positions[:, None] - window
            scores.masked_fill_(hidden, float("-inf"))
            if known is not None:
                probs = scores.sub_(lse[:, :, row0:row1, None]).exp_()
            else:
                row_lse = torch.logsumexp(scores, dim=-1, keepdim=True)
                probs = scores.sub_(row_lse).exp_()
                output[:, :, row0:row1] = torch.matmul(probs, v[:, None, :visible])
                lse[:, :, row0:row1] = row_lse.squeeze(-1)
            colsum[index, :, :, :visible] += probs.sum(dim=2)
            colsq[index, :, :, :visible] += probs.square_().sum(dim=2)

    return ColumnStats(
        output=output.reshape(heads, n, head_dim).to(query.dtype),
        colsum=colsum.reshape(-1, heads, total),
        colsq=colsq.reshape(-1, heads, total),
        lse=lse.reshape(heads, n),
    )


def row_group_bounds(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, row_splits: Sequence[int]
) -> list[int]:
    """[0, *row_splits, n] after checking the shapes both implementations rely on."""
    if query.dim() != 3 or key.dim() != 3 or key.shape != value.shape or query.shape[-1] != key.shape[-1]:
        raise KvsimError(
            f"expected query [heads, n, d] and key, value [kv_heads, T, d]; got {list(query.shape)}, "
            f"{list(key.shape)}, {list(value.shape)}"
        )
    heads, n, _ = query.shape
    kv_heads, total, _ = key.shape
    if heads % kv_heads:
        raise KvsimError(f"{heads} query heads are not a multiple of {kv_heads} KV heads")
    if n > total:
        raise KvsimError(f"{n} queries cannot be the last positions of {total} keys")
    bounds = [0, *row_splits, n]
    if any(a >= b for a, b in zip(bounds, bounds[1:])):
        raise KvsimError(f"row_splits {list(row_splits)} must increase strictly inside (0, {n})")
    return bounds


def _cpu_flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float):
    """Output and row log-sum-exp from PyTorch's CPU flash-attention kernel, or None if absent.

    For a whole-prompt forward (n == T) this is the kernel transformers' SDPA path runs, so the
    attention output, and with it every later layer's keys and values, match a plain forward bit for
    bit; knowing each row's log-sum-exp, the statistics pass needs neither a max/sum pass nor the
    P·V product. q: [kv, group, n, d]; k, v: [kv, T, d]. Returns ([kv, group, n, d], [kv, group, n]).
    """
    flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if flash is None:
        return None
    kv_heads, group, n, head_dim = q.shape
    heads = kv_heads * group
    expand = lambda t: t[:, None].expand(kv_heads, group, *t.shape[1:]).reshape(1, heads, *t.shape[1:])  # noqa: E731
    output, lse = flash(q.reshape(1, heads, n, head_dim), expand(k), expand(v), 0.0, True, scale=scaling)[:2]
    return output.reshape(kv_heads, group, n, head_dim), lse.reshape(kv_heads, group, n)
