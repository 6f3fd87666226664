"""Attention recall, output error and evidence recall of a compressed cache, for a block of rows.

Definitions (per query head and continuation row, then averaged):
- attention recall: the full-cache attention mass that falls on readable tokens;
- output error: ‖o_compressed − o_full‖ / ‖o_full‖, where o_compressed is softmax over the
  readable tokens (with their possibly merged or low-precision keys and values) times values;
- evidence recall: of the full-cache attention mass on annotated needle tokens, the share on
  readable ones (undefined when the sample has no needles).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsim.sim.continuation import ContinuationAttention, grouped_matmul


@dataclass
class MetricSums:
    """Sums over (query head, row) pairs, so blocks of rows add up exactly."""

    recall: float = 0.0
    error: float = 0.0
    evidence_kept: float = 0.0
    evidence_total: float = 0.0
    count: int = 0

    def add(self, other: MetricSums) -> None:
        self.recall += other.recall
        self.error += other.error
        self.evidence_kept += other.evidence_kept
        self.evidence_total += other.evidence_total
        self.count += other.count

    def means(self) -> dict[str, float | None]:
        return {
            "attn_recall": self.recall / self.count,
            "out_err": self.error / self.count,
            "evidence_recall": self.evidence_kept / self.evidence_total if self.evidence_total > 0 else None,
        }


def block_metrics(
    full: ContinuationAttention,
    rows: slice,
    columns: torch.Tensor | None,
    readable: torch.Tensor,
    keys: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
) -> tuple[MetricSums, torch.Tensor]:
    """Metrics of continuation rows `rows` when attention reads only some tokens.

    columns: [kv_heads, m] positions per KV head that attention may read (padding allowed), or
        None for every position (m = T, no gathering);
    readable: [kv_heads, m] bool marking the real ones, or [kv_heads, r, m] when it differs by row
        (future positions are masked regardless).
    keys, values: [kv_heads, m, d] at those columns when retention rewrote them, else None.
    Work grows with m, not with the sequence: a prefill-once policy at a 10% budget passes only
    its kept prompt tokens and the continuation.
    Returns the sums and the compressed attention probabilities [kv_heads, group, r, m], which
    every-step replays feed back into accumulated scores.
    """
    kv_heads, group, _, head_dim = full.queries.shape
    queries = full.queries[:, :, rows]
    at_columns = _gatherer(columns, kv_heads, group, queries.shape[2])
    full_logits = at_columns(full.logits[:, :, rows])
    logits = full_logits
    if keys is not None:
        logits = grouped_matmul(queries, keys.transpose(-1, -2)) * full.scaling
        logits = logits.masked_fill(torch.isinf(full_logits), float("-inf"))
    visible = _visible(readable)
    probs = compressed_probs(logits, readable)
    if values is None:
        values = full.values if columns is None else full.values.gather(1, columns[..., None].expand(-1, -1, head_dim))
    output = grouped_matmul(probs, values)
    kept_mass = at_columns(full.probs[:, :, rows]) * visible
    evidence = full.evidence if columns is None else full.evidence[columns][:, None, None, :]
    return _sums(full, rows, output, kept_mass, evidence), probs


def row_metrics(full: ContinuationAttention, row: int, output: torch.Tensor, readable: torch.Tensor) -> MetricSums:
    """Metrics of one continuation row whose compressed attention output [kv_heads, group, 1, d]
    was computed elsewhere (by the decode engine), with `readable` [kv_heads, T] what it could read."""
    rows = slice(row, row + 1)
    kept_mass = full.probs[:, :, rows] * readable[:, None, None, :]
    return _sums(full, rows, output.float(), kept_mass, full.evidence)


def _sums(full: ContinuationAttention, rows: slice, output: torch.Tensor, kept_mass: torch.Tensor, evidence: torch.Tensor) -> MetricSums:
    reference = full.output[:, :, rows]
    error = (output - reference).norm(dim=-1) / reference.norm(dim=-1).clamp(min=1e-12)
    return MetricSums(
        recall=float(kept_mass.sum()),
        error=float(error.sum()),
        evidence_kept=float((kept_mass * evidence).sum()),
        evidence_total=float(full.probs[:, :, rows][..., full.evidence].sum()),
        count=error.numel(),
    )


def _gatherer(columns: torch.Tensor | None, kv_heads: int, group: int, rows: int):
    """A function taking [kv_heads, group, rows, T] to the chosen columns (identity for None)."""
    if columns is None:
        return lambda tensor: tensor
    index = columns[:, None, None, :].expand(kv_heads, group, rows, columns.shape[1])
    return lambda tensor: tensor.gather(-1, index)


def compressed_probs(logits: torch.Tensor, readable: torch.Tensor) -> torch.Tensor:
    """Softmax of [kv_heads, group, r, m] logits over the readable positions only ([kv_heads, m] or
    [kv_heads, r, m]); a row with nothing readable gets zeros."""
    hidden = ~_visible(readable)
    return torch.nan_to_num(logits.masked_fill(hidden, float("-inf")).softmax(-1), nan=0.0)


def _visible(readable: torch.Tensor) -> torch.Tensor:
    """Readable masks broadcast against [kv_heads, group, rows, m]."""
    return readable[:, None, None, :] if readable.dim() == 2 else readable[:, None]
