"""KVzip (Kim et al., 2025, arXiv 2505.23416; kvpress KVzipPress): keep what the model needs to
repeat the context.

After the prefix is cached, the model is asked to reconstruct it ("Repeat the previous context
exactly." followed by the prefix itself, teacher-forced); a token's score is the most attention it
receives from any reconstruction query (per query head here, then reduced over the GQA group, max
as in KVzip). The reconstruction pass is run once per sample by `kvsim.traces.kvzip` (capture
--kvzip; the live cache runs it before deciding) and arrives as `view.reconstruction`. The scores
depend on the prefix only, never on the question, which is why KVzip holds up query-agnostic.
The first `sinks` tokens are always kept; KVzip pairs with the `global_top` allocator (layers and
heads compete for the whole cache's budget, kvpress's default `layerwise=False`).

Parameters: sinks (4), gqa ("max"), pool ("none"), kernel (1).
Returns [kv_heads, n] float32. Prefill-once only: decoded tokens have no reconstruction scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsim.errors import KvsimError
from kvsim.policies.parts import check, register
from kvsim.policies.scorers.base import GQA_REDUCTIONS, Scorer, check_pooling, pool_scores, protect_sinks, suggest_pool
from kvsim.policies.view import CacheView, reduce_group

# What a TraceSet must have recorded for this scorer, and the capture option that records it.
RECONSTRUCTION = "kvzip"


@register
@dataclass(frozen=True)
class KVzip(Scorer):
    name = "kvzip"
    sinks: int = 4
    gqa: str = "max"
    pool: str = "none"
    kernel: int = 1

    def validate(self) -> None:
        check(self.sinks >= 0, self, f"sinks must be >= 0, got {self.sinks}")
        check_pooling(self, self.pool, self.kernel, self.gqa)

    @classmethod
    def suggest(cls, trial, prefix: str) -> KVzip:
        return cls(gqa=trial.suggest_categorical(f"{prefix}gqa", list(GQA_REDUCTIONS)), **suggest_pool(trial, prefix))

    def requirements(self) -> frozenset[str]:
        return frozenset({RECONSTRUCTION})

    def score(self, view: CacheView) -> torch.Tensor:
        reconstruction = view.reconstruction
        if reconstruction is None or reconstruction.shape[-1] != view.length:
            raise KvsimError(
                "kvzip needs the reconstruction scores of the prompt (capture with --kvzip), and has none "
                "for decoded tokens: run it with the prefill schedule"
            )
        per_query_head = pool_scores(reconstruction.float(), self.pool, self.kernel)
        return protect_sinks(reduce_group(per_query_head, view.kv_heads, self.gqa), view.positions, self.sinks)
