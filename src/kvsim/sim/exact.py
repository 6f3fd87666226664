"""The simulator's exact tier: the real model runs only the continuation, teacher-forced, over the
compressed cache.

The proxy (`kvsim.sim.simulate`) replays attention layers on captured inputs, so its errors never
compound across layers and it can misrank close candidates: it screens. This tier ranks. Each
sample is prefilled once per process with a recording cache (`kvsim.live.runner.LiveSample`); a
(policy, budget) then decides on that prefill with the live cache's own code and feeds the stored
continuation and the reference answer through it. Its KL, top-1 and answer log-likelihood are
therefore exactly what `kvsim validate` measures teacher-forced (a test checks it), at the cost of
a short forward per sample instead of a prefill and a generation.

Why a prefill per sample rather than the trace's keys and values: the trace stores them at the
storage dtype (fp16 by default), so a cache built from them would differ from live validation in
the last bits, and the exact tier's promise is to equal it. The prefill is paid once per sample and
worker and shared by every trial.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kvsim.live.runner import LiveSample, TeacherForced
from kvsim.policies.budget import Budget
from kvsim.policies.policy import Policy
from kvsim.policies.scorers.kvzip import RECONSTRUCTION
from kvsim.traces.models import LoadedModel
from kvsim.traces.store import TraceSet


@dataclass(frozen=True)
class ExactResult:
    """Means over samples."""

    answer_logprob: float
    answer_match: float
    kl: float
    top1: float


@dataclass
class ExactEvaluator:
    """Teacher-forced scores of policies on the samples of one TraceSet in one evaluation mode.

    Every (policy, budget, sample) result is remembered, keyed by what the policy decides (not its
    name), so a composition drawn again, or a winner re-ranked on samples it was scored on, is free.
    """

    loaded: LoadedModel
    traceset: TraceSet
    mode: str
    _samples: dict[str, LiveSample] = field(default_factory=dict, init=False, repr=False)
    _results: dict[tuple[str, str, str], TeacherForced] = field(default_factory=dict, init=False, repr=False)

    def live_sample(self, sample_id: str) -> LiveSample:
        if sample_id not in self._samples:
            sample = self.traceset.sample(sample_id, self.mode)
            # KVzip's scores are the ones capture stored (its reconstruction pass on this prefix): the
            # simulator's, and no second pass per sample in every worker.
            stored = None
            if RECONSTRUCTION in self.traceset.statistics:
                stored = [sample.layer(index).kvzip for index in range(self.traceset.n_layers)]
            self._samples[sample_id] = LiveSample(self.loaded, self.traceset, sample, self.traceset.meta["window"], reconstruction=stored)
        return self._samples[sample_id]

    def evaluate(self, policy: Policy, budget: Budget, sample_id: str) -> TeacherForced:
        key = (policy.decision_key(), budget.label, sample_id)
        if key not in self._results:
            self._results[key] = self.live_sample(sample_id).teacher_forced(policy, budget)
        return self._results[key]

    def mean(self, policy: Policy, budget: Budget, sample_ids: Sequence[str]) -> ExactResult:
        results = [self.evaluate(policy, budget, sample_id) for sample_id in sample_ids]
        count = len(results)
        return ExactResult(
            answer_logprob=sum(r.answer_logprob for r in results) / count,
            answer_match=sum(r.answer_match for r in results) / count,
            kl=sum(r.kl for r in results) / count,
            top1=sum(r.top1 for r in results) / count,
        )
