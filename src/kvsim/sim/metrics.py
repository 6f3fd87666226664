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
    readable: torch.Tensor,
    keys: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
) -> tuple[MetricSums, torch.Tensor]:
    """Metrics of continuation rows `rows` when attention reads only `readable` tokens.

    readable: [kv_heads, T] or [kv_heads, r, T] bool (future positions are masked regardless).
    keys, values: [kv_heads, T, d] rewritten by retention, or None when unchanged.
    Returns the sums and the compressed attention probabilities [kv_heads, group, r, T], which
    every-step replays feed back into accumulated scores.
    """
    if readable.dim() == 2:
        readable = readable[:, None, :]
    probs_full = full.probs[:, :, rows]
    logits = full.logits[:, :, rows]
    if keys is not None:
        logits = torch.matmul(full.queries[:, :, rows], keys[:, None].transpose(-1, -2)) * full.scaling
        logits = logits.masked_fill(torch.isinf(full.logits[:, :, rows]), float("-inf"))
    logits = logits.masked_fill(~readable[:, None], float("-inf"))
    probs = torch.nan_to_num(logits.softmax(-1), nan=0.0)
    output = torch.matmul(probs, (values if values is not None else full.values)[:, None])
    reference = full.output[:, :, rows]
    error = (output - reference).norm(dim=-1) / reference.norm(dim=-1).clamp(min=1e-12)
    kept_mass = probs_full * readable[:, None]
    evidence = full.evidence[: readable.shape[-1]]
    sums = MetricSums(
        recall=float(kept_mass.sum()),
        error=float(error.sum()),
        evidence_kept=float(kept_mass[..., evidence].sum()),
        evidence_total=float(probs_full[..., evidence].sum()),
        count=error.numel(),
    )
    return sums, probs
