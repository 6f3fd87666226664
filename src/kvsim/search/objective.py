"""What a trial measures: multi-fidelity, the proxy screening and the exact tier ranking.

`Evaluator` (the proxy tier) prepares each sample's policy-independent work (prefill views,
full-cache attention) once per process, on first use, and keeps it for the whole study: a trial
then pays only for its own replay. It remembers every (policy, budget, sample) result, so a preset
or a composition the sampler draws again costs nothing. `kvsim.sim.exact.ExactEvaluator` (the exact
tier) runs the real model teacher-forced over the compressed cache.

`Objective` is the function Optuna calls. Every trial first meets the proxy:
- at a fixed budget (`quality`), a policy holding more KV bytes than dropping at that budget
  (`BYTE_REFERENCE`, measured on the first search sample) is infeasible: equal memory, or quantize
  retention wins by holding several times the bytes;
- with `tier="proxy"` the proxy's mean `sim_score` is the value, reported after 2, 4, 8, ... search
  samples (growing subsets in the split's stratified order) so the pruner stops weak trials early.
With `tier="exact"` (the default of `kvsim search`) the proxy only screens: a trial whose proxy
mean falls below the `promote` quantile of earlier trials *with the same scorer* is pruned with the
reason recorded (the proxy misranks scorers against each other, see `promotion_threshold`). Every
other trial, and every preset (enqueued first, never pruned), is scored by the exact tier: its
value is the **mean answer log-likelihood** (the mean log-probability of the reference answer's
tokens, teacher-forced after the question; task-linked and continuous, unlike a 0/1 score on a
few samples), reported after 2, 4, 8, ... samples so the pruner stops a trial the real model
already judges weak. KL to the full cache and top-1 agreement are recorded beside it and break
ties when winners are ranked. An exact evaluation of a prefill-once policy costs about 6 proxy
replays (0.6 s against 0.1 s per 1.5K-token sample on the bundled model, one thread).
- `pareto`: the value above and the mean KV MiB per sample, with the budget a parameter over the
  given range. Optuna's pruners are single-objective, so every trial sees every search sample.

A policy the traces cannot run (an observation window longer than the captured one, a part
refusing its inputs) or over the byte limit is pruned with the reason in the trial's `infeasible`
attribute, so the study goes on.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import optuna

from kvsim.errors import KvsimError
from kvsim.policies import PRESETS, Budget, Policy
from kvsim.search.neighbours import NEIGHBOURS_ATTR
from kvsim.search.space import PRESET_ATTR, suggest_policy
from kvsim.sim.exact import ExactEvaluator
from kvsim.sim.simulate import PreparedSample, policy_layer_count, prepare_sample, sim_score
from kvsim.traces.store import TraceSet

OBJECTIVES = ("quality", "pareto")
TIERS = ("exact", "proxy")
# Trials whose proxy mean is at or above this quantile of earlier trials' with the same scorer are
# scored exactly: lenient, since the proxy only roughly orders even one scorer's compositions.
DEFAULT_PROMOTE = 0.25
# Below this many earlier proxy means there is no quantile to judge by: every trial is promoted.
PROMOTE_STARTUP_TRIALS = 5
# The memory a budget means in quality searches: what plain dropping at that budget holds.
BYTE_REFERENCE = PRESETS["snapkv"]
BYTE_TOLERANCE = 1.01
# Written on every trial so a dead worker's running trials can be found (see kvsim.search.run).
WORKER_ATTR = "worker"
# The trial attribute naming the complete trial whose policy a trial redrew (its value is reused).
DUPLICATE_ATTR = "duplicate_of"
# A twin's attributes that describe that trial, not the policy's evaluation.
NOT_COPIED = frozenset({"policy", WORKER_ATTR, PRESET_ATTR, NEIGHBOURS_ATTR})


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
        key = (policy.decision_key(), budget.label, sample_id)
        if key not in self._results:
            outcomes = self.prepared(sample_id).replay(policy, budget)
            self._results[key] = SampleResult(sim_score(outcomes), sum(outcome.kv_bytes for outcome in outcomes))
        return self._results[key]

    def mean(self, policy: Policy, budget: Budget, sample_ids: Sequence[str]) -> SampleResult:
        results = [self.evaluate(policy, budget, sample_id) for sample_id in sample_ids]
        return SampleResult(sum(r.sim_score for r in results) / len(results), round(sum(r.kv_bytes for r in results) / len(results)))


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
    exact: ExactEvaluator | None = None  # None: the proxy tier alone decides
    promote: float = DEFAULT_PROMOTE
    base: Policy | None = None  # the `allocation` space's other parts (None: SnapKV's)
    _decision_keys: dict[int, str] = field(default_factory=dict, init=False, repr=False)  # complete trials' policies, by number

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        trial.set_user_attr(WORKER_ATTR, worker_tag())
        policy = suggest_policy(trial, policy_layer_count(self.evaluator.traceset), self.space, self.base)
        budget = self.budget.suggest(trial) if isinstance(self.budget, BudgetRange) else self.budget
        trial.set_user_attr("policy", policy.to_spec())
        trial.set_user_attr("budget", budget.value)
        twin = self._evaluated_twin(trial, policy) if self.objective == "quality" else None
        if twin is not None:
            # TPE redraws a good policy often (four of 50 trials once); its value is known, so the
            # trial costs nothing and the sampler still sees the point it chose.
            for name, value in twin.user_attrs.items():
                if name not in NOT_COPIED:
                    trial.set_user_attr(name, value)
            trial.set_user_attr(DUPLICATE_ATTR, twin.number)
            return twin.value
        try:
            traceset = self.evaluator.traceset
            policy.check_traces(policy_layer_count(traceset), traceset.meta["window"], traceset.statistics)
            proxy = self._proxy(trial, policy, budget)
        except KvsimError as err:
            trial.set_user_attr("infeasible", str(err))
            raise optuna.TrialPruned(str(err)) from None
        trial.set_user_attr("kv_mib", proxy.kv_bytes / 2**20)
        trial.set_user_attr("sim_score", proxy.sim_score)
        value = proxy.sim_score if self.exact is None else self._exact(trial, policy, budget)
        if self.objective == "pareto":
            return value, proxy.kv_bytes / 2**20
        return value

    def _evaluated_twin(self, trial: optuna.Trial, policy: Policy) -> optuna.trial.FrozenTrial | None:
        """A complete trial of the study that evaluated the same policy (by decision), if any."""
        key = policy.decision_key()
        for other in trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if other.number not in self._decision_keys:
                self._decision_keys[other.number] = Policy.from_spec(other.user_attrs["policy"]).decision_key()
            if self._decision_keys[other.number] == key:
                return other
        return None

    def _proxy(self, trial: optuna.Trial, policy: Policy, budget: Budget) -> SampleResult:
        if self.objective == "pareto":
            return self.evaluator.mean(policy, budget, self.samples)
        first = self.samples[:1]
        held, allowed = self.evaluator.mean(policy, budget, first).kv_bytes, self.evaluator.mean(BYTE_REFERENCE, budget, first).kv_bytes
        if held > BYTE_TOLERANCE * allowed:
            raise KvsimError(
                f"holds {held / 2**20:.2f} MiB per sample, above the {allowed / 2**20:.2f} MiB that dropping holds at budget {budget.label}"
            )
        if self.exact is not None:  # the pruner judges the exact tier's values, not the proxy's
            return self.evaluator.mean(policy, budget, self.samples)
        return self._growing_mean(trial, lambda step: self.evaluator.mean(policy, budget, self.samples[:step]), "sim_score")

    def _exact(self, trial: optuna.Trial, policy: Policy, budget: Budget) -> float:
        threshold = promotion_threshold(trial, self.promote)
        sim = trial.user_attrs["sim_score"]
        # Presets and the local step's neighbours are deliberate points: the proxy does not screen them.
        if not is_preset(trial) and NEIGHBOURS_ATTR not in trial.user_attrs and threshold is not None and sim < threshold:
            trial.set_user_attr("tier", "proxy")
            raise optuna.TrialPruned(f"proxy sim_score {sim:.4f} below the promotion threshold {threshold:.4f} of its scorer family")
        trial.set_user_attr("tier", "exact")
        result = self._growing_mean(trial, lambda step: self.exact.mean(policy, budget, self.samples[:step]), "answer_logprob")
        for name, value in asdict(result).items():
            trial.set_user_attr(name, value)
        return result.answer_logprob

    def _growing_mean(self, trial: optuna.Trial, mean_over, metric: str):
        """`mean_over(k)`, the mean over the first k search samples, reported after 2, 4, 8, ... of
        them (the split's stratified order) so the pruner stops a weak trial early; presets, the
        baselines, always see every sample."""
        steps = checkpoints(len(self.samples))
        for step in steps[:-1]:
            trial.report(getattr(mean_over(step), metric), step)
            if trial.should_prune() and not is_preset(trial):
                raise optuna.TrialPruned(f"pruned after {step} samples")
        final = mean_over(steps[-1])
        trial.report(getattr(final, metric), steps[-1])
        return final


def is_preset(trial: optuna.Trial | optuna.trial.FrozenTrial) -> bool:
    return PRESET_ATTR in trial.user_attrs


def scorer_family(trial: optuna.Trial | optuna.trial.FrozenTrial) -> str | None:
    """What a trial is compared with for promotion: trials of the same scorer (None in the
    `allocation` space, which has one)."""
    return trial.params.get("scorer")


def promotion_threshold(trial: optuna.Trial, quantile: float) -> float | None:
    """The `quantile` of the final proxy means of the study's other trials with the same scorer, or
    None while there are too few of them to judge by.

    Within a scorer family, not across: the proxy replays layers on full-cache inputs and ranks
    scorers against each other poorly (on the bundled model it ranks KeyDiff, the presets' best
    answer log-likelihood, near the bottom: bench/results/budget_signal.md), so a study-wide
    quantile would never promote the compositions that matter. Within one scorer it orders
    allocations, windows and retention well enough to skip the hopeless ones."""
    family = scorer_family(trial)
    scores = sorted(
        other.user_attrs["sim_score"]
        for other in trial.study.get_trials(deepcopy=False)
        if other.number != trial.number and "sim_score" in other.user_attrs and scorer_family(other) == family
    )
    if len(scores) < PROMOTE_STARTUP_TRIALS:
        return None
    return scores[min(len(scores) - 1, int(quantile * len(scores)))]
