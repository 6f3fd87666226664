"""Triton kernel for `causal_attention_column_stats`: attention output, row log-sum-exp and per-key
column sums of softmax probabilities, in two tiled passes with O(T·d) memory.

Pass 1 is a causal flash-attention forward (one program per block of query rows and query head,
online softmax over key blocks) that writes the output and each row's log-sum-exp. Pass 2 gives
each program one block of keys and walks the query rows that can see it: knowing the row's
log-sum-exp, p = exp(s − lse) is final, so Σp and Σp² per key need no atomics and no second
normalization. Splitting the work by keys in pass 2 (instead of adding to shared column sums from
pass 1) keeps the result deterministic.

All arithmetic is float32 whatever the input dtype (products at tf32x3 precision on a GPU): the
statistics feed scorers that rank tokens by small differences, and Triton's CPU interpreter, which
the tests run, computes bfloat16 arithmetic wrongly (3.9), so one float32 path is the tested path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kvsim.kernels.column_stats import DEFAULT_CHUNK_BYTES, ColumnStats, row_group_bounds

BLOCK_ROWS = 64
BLOCK_KEYS = 64


@triton.jit
def _forward(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
    n, total, head_dim, group, scaling,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (row block, query head): causal attention output and lse of BLOCK_M query rows."""
    row_block, head = tl.program_id(0), tl.program_id(1)
    kv_head = head // group
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < n
    dim_ok = dims < head_dim
    positions = total - n + rows
    q = tl.load(q_ptr + (head * n + rows)[:, None] * head_dim + dims[None, :], row_ok[:, None] & dim_ok[None, :], other=0.0)
    q = q.to(tl.float32) * scaling
    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Keys after the block's last visible position are masked for every row: stop there.
    last = tl.minimum(total - n + row_block * BLOCK_M + BLOCK_M, total)
    for start in range(0, last, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        tile = (kv_head * total + keys)[:, None] * head_dim + dims[None, :]
        tile_ok = (keys < total)[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + tile, tile_ok, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + tile, tile_ok, other=0.0).to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision="tf32x3")
        visible = (keys[None, :] <= positions[:, None]) & row_ok[:, None]
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        # Rows with nothing visible yet keep a -inf max; shift them by 0 so no inf − inf appears.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        probs = tl.exp(scores - shift[:, None])
        rescale = tl.exp(running_max - shift)
        running_sum = running_sum * rescale + tl.sum(probs, axis=1)
        acc = acc * rescale[:, None] + tl.dot(probs, v, input_precision="tf32x3")
        running_max = new_max
    running_sum = tl.where(row_ok, running_sum, 1.0)  # padding rows see nothing; keep them finite
    out = acc / running_sum[:, None]
    tl.store(out_ptr + (head * n + rows)[:, None] * head_dim + dims[None, :], out.to(out_ptr.dtype.element_ty),
             row_ok[:, None] & dim_ok[None, :])
    tl.store(lse_ptr + head * n + rows, running_max + tl.log(running_sum), row_ok)


@triton.jit
def _column_sums(
    q_ptr, k_ptr, lse_ptr, bounds_ptr, colsum_ptr, colsq_ptr,
    n, total, head_dim, group, heads, scaling,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (key block, query head, row group): Σp and Σp² over the group's rows for BLOCK_N keys."""
    key_block, head, row_group = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kv_head = head // group
    keys = key_block * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    key_ok = keys < total
    dim_ok = dims < head_dim
    k = tl.load(k_ptr + (kv_head * total + keys)[:, None] * head_dim + dims[None, :], key_ok[:, None] & dim_ok[None, :],
                other=0.0).to(tl.float32)
    first_row = tl.load(bounds_ptr + row_group)
    stop_row = tl.load(bounds_ptr + row_group + 1)
    # Rows before position key_block * BLOCK_N see none of these keys (causality): skip them.
    first_row = tl.maximum(first_row, key_block * BLOCK_N - (total - n))
    colsum = tl.zeros([BLOCK_N], tl.float32)
    colsq = tl.zeros([BLOCK_N], tl.float32)
    for start in range(first_row, stop_row, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < stop_row
        q = tl.load(q_ptr + (head * n + rows)[:, None] * head_dim + dims[None, :], row_ok[:, None] & dim_ok[None, :],
                    other=0.0).to(tl.float32) * scaling
        lse = tl.load(lse_ptr + head * n + rows, row_ok, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision="tf32x3")
        visible = (keys[None, :] <= (total - n + rows)[:, None]) & row_ok[:, None] & key_ok[None, :]
        probs = tl.where(visible, tl.exp(scores - lse[:, None]), 0.0)
        colsum += tl.sum(probs, axis=0)
        colsq += tl.sum(probs * probs, axis=0)
    out = (row_group * heads + head) * total + keys
    tl.store(colsum_ptr + out, colsum, key_ok)
    tl.store(colsq_ptr + out, colsq, key_ok)


def causal_attention_column_stats_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    row_splits: Sequence[int] = (),
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> ColumnStats:
    """Same inputs and outputs as `causal_attention_column_stats_torch` (chunk_bytes is unused:
    tiles have a fixed size)."""
    bounds = row_group_bounds(query, key, value, row_splits)
    heads, n, head_dim = query.shape
    kv_heads, total, _ = key.shape
    query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    device = query.device
    output = torch.empty_like(query)
    lse = torch.empty(heads, n, dtype=torch.float32, device=device)
    colsum = torch.empty(len(bounds) - 1, heads, total, dtype=torch.float32, device=device)
    colsq = torch.empty_like(colsum)
    block_d = max(16, triton.next_power_of_2(head_dim))
    shape = (n, total, head_dim, heads // kv_heads)
    _forward[(triton.cdiv(n, BLOCK_ROWS), heads)](
        query, key, value, output, lse, *shape, scaling, BLOCK_M=BLOCK_ROWS, BLOCK_N=BLOCK_KEYS, BLOCK_D=block_d
    )
    _column_sums[(triton.cdiv(total, BLOCK_KEYS), heads, len(bounds) - 1)](
        query, key, lse, torch.tensor(bounds, dtype=torch.int32, device=device), colsum, colsq, *shape, heads, scaling,
        BLOCK_M=BLOCK_ROWS, BLOCK_N=BLOCK_KEYS, BLOCK_D=block_d,
    )
    return ColumnStats(output=output, colsum=colsum, colsq=colsq, lse=lse)
