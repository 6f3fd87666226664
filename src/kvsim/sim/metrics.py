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

from kvsim.sim.continuation import ContinuationAttention
from kvsim.traces.continuation import grouped_matmul


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
    columns: torch.Tensor,
    readable: torch.Tensor,
    outputs: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
) -> MetricSums:
    """Metrics of all continuation rows when attention reads only some tokens.

    columns: [kv_heads, m] positions per KV head that attention may read (padding allowed);
    readable: [kv_heads, m] bool marking the real ones, or [kv_heads, C, m] when it differs by row
        (future positions are masked regardless).
    outputs: [kv_heads, group, C, d] the compressed attention outputs when computed elsewhere (by
        the decode engine, which read `readable`), else computed here over the columns, with
    keys, values: [kv_heads, m, d] at those columns when retention rewrote them, else None.
    Work grows with m, not with the sequence: a prefill-once policy at a 10% budget passes only
    its kept prompt tokens and the continuation; the full cache enters through its stored output
    and log-sum-exp.
    """
    full_logits = full.logits_at(columns)
    visible = _visible(readable)
    if outputs is None:
        logits = full_logits
        if keys is not None:
            logits = grouped_matmul(full.queries, keys.transpose(-1, -2)) * full.scaling
            logits = logits.masked_fill(torch.isinf(full_logits), float("-inf"))
        if values is None:
            values = full.values.gather(1, columns[..., None].expand(-1, -1, full.values.shape[-1]))
        outputs = grouped_matmul(compressed_probs(logits, readable), values)
    kept_mass = full.probs_at(full_logits) * visible
    return _sums(full, outputs.float(), kept_mass, full.evidence[columns][:, None, None, :])


def _sums(full: ContinuationAttention, output: torch.Tensor, kept_mass: torch.Tensor, evidence: torch.Tensor) -> MetricSums:
    reference = full.output
    error = (output - reference).norm(dim=-1) / reference.norm(dim=-1).clamp(min=1e-12)
    return MetricSums(
        recall=float(kept_mass.sum()),
        error=float(error.sum()),
        evidence_kept=float((kept_mass * evidence).sum()),
        evidence_total=float(full.evidence_mass.sum()),
        count=error.numel(),
    )


def readable_columns(readable: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each head's readable positions of a [kv_heads, T] mask, in order, padded to the widest head:
    (columns [kv_heads, m] int64, real [kv_heads, m] bool marking the non-padding ones)."""
    counts = readable.sum(dim=1)
    width = int(counts.max())
    columns = torch.sort(readable.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :width]
    return columns, torch.arange(width)[None, :] < counts[:, None]


def compressed_probs(logits: torch.Tensor, readable: torch.Tensor) -> torch.Tensor:
    """Softmax of [kv_heads, group, r, m] logits over the readable positions only ([kv_heads, m] or
    [kv_heads, r, m]); a row with nothing readable gets zeros."""
    hidden = ~_visible(readable)
    return torch.nan_to_num(logits.masked_fill(hidden, float("-inf")).softmax(-1), nan=0.0)


def _visible(readable: torch.Tensor) -> torch.Tensor:
    """Readable masks broadcast against [kv_heads, group, rows, m]."""
    return readable[:, None, None, :] if readable.dim() == 2 else readable[:, None]
