"""Triton kernel for `masked_attention_sums`: the metrics of many retained sets in one pass over K, V.

One program takes a block of (query head, row) pairs of one KV head and a few retained sets, and
streams that head's keys and values once. The full-cache softmax runs online (flash-attention
style); every set's kept mass and kept output are accumulated against the same running maximum,
so one rescale factor per row serves the full cache and all sets alike. The sets of a program share
the Q·Kᵀ tile, and their masked P·V products are stacked into one [SETS · rows, keys] @ [keys, d]
matrix product. Per-row results go to small buffers; PyTorch sums them (deterministically).

All arithmetic is float32 whatever the input dtype (products at tf32x3 precision on a GPU), for
the reasons given in `column_stats_triton`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvsim.kernels.masked_attention import DEFAULT_CHUNK_BYTES, MaskedAttentionSums, check_masked_inputs

BLOCK_ROWS = 32
BLOCK_KEYS = 64
SETS_PER_PROGRAM = 4


@triton.jit
def _masked_sums(
    q_ptr, k_ptr, v_ptr, readable_ptr, evidence_ptr,
    recall_ptr, error_ptr, evidence_kept_ptr, evidence_total_ptr,
    sets, kv_heads, rows, context, total, head_dim, scaling,
    SETS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (row block, KV head, set block): per-row recall, output error and evidence mass."""
    row_block, kv_head, set_block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows_here = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    set_ids = set_block * SETS + tl.arange(0, SETS)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows_here < rows
    set_ok = set_ids < sets
    dim_ok = dims < head_dim
    positions = total - context + rows_here % context  # rows are (query head of the group, row) pairs
    q = tl.load(q_ptr + (kv_head * rows + rows_here)[:, None] * head_dim + dims[None, :], row_ok[:, None] & dim_ok[None, :],
                other=0.0).to(tl.float32) * scaling
    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    full_mass = tl.zeros([BLOCK_M], tl.float32)
    full_acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    evidence_mass = tl.zeros([BLOCK_M], tl.float32)
    kept_mass = tl.zeros([SETS, BLOCK_M], tl.float32)
    kept_evidence = tl.zeros([SETS, BLOCK_M], tl.float32)
    kept_acc = tl.zeros([SETS * BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, total, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < total
        tile = (kv_head * total + keys)[:, None] * head_dim + dims[None, :]
        k = tl.load(k_ptr + tile, key_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + tile, key_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
        masks = tl.load(readable_ptr + (set_ids * kv_heads + kv_head)[:, None] * total + keys[None, :],
                        set_ok[:, None] & key_ok[None, :], other=0).to(tl.float32)
        evidence = tl.load(evidence_ptr + keys, key_ok, other=0).to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision="tf32x3")
        visible = (keys[None, :] <= positions[:, None]) & row_ok[:, None]
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        probs = tl.exp(scores - shift[:, None])
        rescale = tl.exp(running_max - shift)
        running_max = new_max
        full_mass = full_mass * rescale + tl.sum(probs, axis=1)
        full_acc = full_acc * rescale[:, None] + tl.dot(probs, v, input_precision="tf32x3")
        evidence_mass = evidence_mass * rescale + tl.sum(probs * evidence[None, :], axis=1)
        weighted = probs[None, :, :] * masks[:, None, :]  # [SETS, BLOCK_M, BLOCK_N]
        kept_mass = kept_mass * rescale[None, :] + tl.sum(weighted, axis=2)
        kept_evidence = kept_evidence * rescale[None, :] + tl.sum(weighted * evidence[None, None, :], axis=2)
        stacked_rescale = tl.reshape(tl.broadcast_to(rescale[None, :], (SETS, BLOCK_M)), (SETS * BLOCK_M,))
        kept_acc = kept_acc * stacked_rescale[:, None] + tl.dot(
            tl.reshape(weighted, (SETS * BLOCK_M, BLOCK_N)), v, input_precision="tf32x3"
        )
    full_mass = tl.where(full_mass > 0, full_mass, 1.0)  # padding rows only: every real row sees itself
    reference = full_acc / full_mass[:, None]
    kept_out = tl.reshape(kept_acc, (SETS, BLOCK_M, BLOCK_D))
    kept_out = tl.where(kept_mass[:, :, None] > 0, kept_out / tl.where(kept_mass > 0, kept_mass, 1.0)[:, :, None], 0.0)
    difference = kept_out - reference[None, :, :]
    reference_norm = tl.maximum(tl.sqrt(tl.sum(reference * reference, axis=1)), 1e-12)
    error = tl.sqrt(tl.sum(difference * difference, axis=2)) / reference_norm[None, :]
    out = (set_ids * kv_heads + kv_head)[:, None] * rows + rows_here[None, :]
    out_ok = set_ok[:, None] & row_ok[None, :]
    tl.store(recall_ptr + out, kept_mass / full_mass[None, :], out_ok)
    tl.store(error_ptr + out, error, out_ok)
    tl.store(evidence_kept_ptr + out, kept_evidence / full_mass[None, :], out_ok)
    if set_block == 0:
        tl.store(evidence_total_ptr + kv_head * rows + rows_here, evidence_mass / full_mass, row_ok)


def masked_attention_sums_triton(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    readable: torch.Tensor,
    evidence: torch.Tensor | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> MaskedAttentionSums:
    """Same inputs and outputs as `masked_attention_sums_torch` (chunk_bytes is unused: tiles have a
    fixed size)."""
    evidence = check_masked_inputs(queries, keys, values, readable, evidence)
    kv_heads, group, context, head_dim = queries.shape
    sets, _, total = readable.shape
    rows = group * context
    per_row = torch.empty(3, sets, kv_heads, rows, dtype=torch.float32, device=keys.device)
    evidence_rows = torch.empty(kv_heads, rows, dtype=torch.float32, device=keys.device)
    # At least one set block, so the evidence totals are written even for zero sets.
    grid = (triton.cdiv(rows, BLOCK_ROWS), kv_heads, max(1, triton.cdiv(sets, SETS_PER_PROGRAM)))
    _masked_sums[grid](
        queries.contiguous(), keys.contiguous(), values.contiguous(), readable.contiguous().view(torch.uint8), evidence,
        per_row[0], per_row[1], per_row[2], evidence_rows,
        sets, kv_heads, rows, context, total, head_dim, scaling,
        SETS=SETS_PER_PROGRAM, BLOCK_M=BLOCK_ROWS, BLOCK_N=BLOCK_KEYS, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
    )
    recall, error, evidence_kept = per_row.sum(-1)
    return MaskedAttentionSums(recall, error, evidence_kept, evidence_rows.sum(-1), rows)
