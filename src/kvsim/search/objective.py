"""What a trial measures: a policy's sim_score (and KV bytes) on the search samples.

`Evaluator` prepares each sample's policy-independent work (prefill views, full-cache attention)
once per process, on first use, and keeps it for the whole study: a trial then pays only for its
own replay. It also remembers every (policy, budget, sample) result, so a preset or a composition
the sampler draws again costs nothing.

`Objective` is the function Optuna calls:
- `quality`: maximize the mean sim_score over the search samples at the fixed budget. The samples
  are scored in the split's stratified order and the running mean is reported after 2, 4, 8, ...
  of them (growing subsets), so the pruner can stop a weak trial after a few samples.
- `pareto`: maximize the mean sim_score and minimize the mean KV MiB per sample, with the budget
  itself a parameter over the given range. Optuna's pruners are single-objective, so every trial
  sees every search sample.

`quality` compares policies at equal memory: a policy holding more KV bytes than a drop-only
policy at the same budget (`BYTE_REFERENCE`, measured on the first search sample) is infeasible.
Without this, quantize retention, which keeps every evicted token at low precision on top of the
budgeted full-precision ones, wins by holding several times the memory.

A policy the traces cannot run (an observation window longer than the captured one, a part
refusing its inputs) or over the byte limit is pruned with the reason in the trial's `infeasible` attribute, so the
study goes on and the sampler learns to avoid it.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

import optuna

from kvsim.errors import KvsimError
from kvsim.policies import PRESETS, Budget, Policy
from kvsim.policies.parts import KINDS
from kvsim.search.space import suggest_policy
from kvsim.sim.simulate import PreparedSample, policy_layer_count, prepare_sample, sim_score
from kvsim.traces.store import TraceSet

OBJECTIVES = ("quality", "pareto")
# The memory a budget means in quality searches: what plain dropping at that budget holds.
BYTE_REFERENCE = PRESETS["snapkv"]
BYTE_TOLERANCE = 1.01
# Written on every trial so a dead worker's running trials can be found (see kvsim.search.run).
WORKER_ATTR = "worker"


def worker_tag() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class SampleResult:
    sim_score: float
    kv_bytes: int


@dataclass
class Evaluator:
    """Scores policies on the samples of one TraceSet in one evaluation mode."""

    traceset: TraceSet
    mode: str
    _prepared: dict[str, PreparedSample] = field(default_factory=dict, init=False, repr=False)
    _results: dict[tuple[str, str, str], SampleResult] = field(default_factory=dict, init=False, repr=False)

    def prepared(self, sample_id: str) -> PreparedSample:
        if sample_id not in self._prepared:
            self._prepared[sample_id] = prepare_sample(self.traceset, self.traceset.sample(sample_id, self.mode))
        return self._prepared[sample_id]

    def evaluate(self, policy: Policy, budget: Budget, sample_id: str) -> SampleResult:
        key = (policy_key(policy), budget.label, sample_id)
        if key not in self._results:
            outcomes = self.prepared(sample_id).replay(policy, budget)
            self._results[key] = SampleResult(sim_score(outcomes), sum(outcome.kv_bytes for outcome in outcomes))
        return self._results[key]

    def mean(self, policy: Policy, budget: Budget, sample_ids: Sequence[str]) -> SampleResult:
        results = [self.evaluate(policy, budget, sample_id) for sample_id in sample_ids]
        return SampleResult(sum(r.sim_score for r in results) / len(results), round(sum(r.kv_bytes for r in results) / len(results)))


def policy_key(policy: Policy) -> str:
    """What a policy decides, without its name: two trials of the same composition share results."""
    spec = policy.to_spec()
    return json.dumps({kind: spec[kind] for kind in KINDS}, sort_keys=True)


@dataclass(frozen=True)
class BudgetRange:
    """The budgets a Pareto study explores: both fractions of the prompt, or both token counts."""

    low: Budget
    high: Budget

    def __post_init__(self) -> None:
        if type(self.low.value) is not type(self.high.value) or self.low.value >= self.high.value:
            raise KvsimError(
                f"budget range {self.low.label}..{self.high.label} is not increasing, or mixes fractions and token "
                "counts: give e.g. --budget 0.02,0.2"
            )

    def suggest(self, trial) -> Budget:
        # Log scale: 2% → 4% matters as much as 10% → 20%.
        if isinstance(self.low.value, int):
            return Budget(trial.suggest_int("budget", self.low.value, self.high.value, log=True))
        return Budget(trial.suggest_float("budget", self.low.value, self.high.value, log=True))


def checkpoints(n_samples: int) -> list[int]:
    """Sample counts after which a trial reports its running mean: 2, 4, 8, ... and finally all."""
    steps, count = [], 2
    while count < n_samples:
        steps.append(count)
        count *= 2
    return [*steps, n_samples]


@dataclass
class Objective:
    evaluator: Evaluator
    samples: Sequence[str]
    budget: Budget | BudgetRange
    objective: str = "quality"
    space: str = "full"

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        trial.set_user_attr(WORKER_ATTR, worker_tag())
        policy = suggest_policy(trial, policy_layer_count(self.evaluator.traceset), self.space)
        budget = self.budget.suggest(trial) if isinstance(self.budget, BudgetRange) else self.budget
        trial.set_user_attr("policy", policy.to_spec())
        trial.set_user_attr("budget", budget.value)
        try:
            policy.check_traces(policy_layer_count(self.evaluator.traceset), self.evaluator.traceset.meta["window"])
            result = self._score(trial, policy, budget)
        except KvsimError as err:
            trial.set_user_attr("infeasible", str(err))
            raise optuna.TrialPruned(str(err)) from None
        trial.set_user_attr("kv_mib", result.kv_bytes / 2**20)
        if self.objective == "pareto":
            return result.sim_score, result.kv_bytes / 2**20
        return result.sim_score

    def _score(self, trial: optuna.Trial, policy: Policy, budget: Budget) -> SampleResult:
        if self.objective == "pareto":
            return self.evaluator.mean(policy, budget, self.samples)
        first = self.samples[:1]
        held, allowed = self.evaluator.mean(policy, budget, first).kv_bytes, self.evaluator.mean(BYTE_REFERENCE, budget, first).kv_bytes
        if held > BYTE_TOLERANCE * allowed:
            raise KvsimError(
                f"holds {held / 2**20:.2f} MiB per sample, above the {allowed / 2**20:.2f} MiB that dropping holds at budget {budget.label}"
            )
        steps = checkpoints(len(self.samples))
        for step in steps[:-1]:
            trial.report(self.evaluator.mean(policy, budget, self.samples[:step]).sim_score, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after {step} samples")
        final = self.evaluator.mean(policy, budget, self.samples)
        trial.report(final.sim_score, steps[-1])
        return final
