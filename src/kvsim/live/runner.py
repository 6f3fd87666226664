"""Run one captured sample live under many policies: one prefill, then each policy's decode.

For a sample of a TraceSet, in the trace's evaluation mode:
- the prefill (the whole prompt query-aware, the context alone query-agnostic) runs once with a
  recording cache, and each (policy, budget) decides on it (`PolicyCache.with_policy`);
- teacher-forced (`LiveSample.teacher_forced`, also the simulator's exact tier, `kvsim.sim.exact`):
  the full-cache continuation stored in the trace is fed, and each position's next-token
  distribution is compared with the stored full-cache one (KL, top-1); and the reference answer is
  fed right after the question, giving its mean token log-probability (a task-linked, continuous
  score, defined even where the full cache answered wrong) and whether every answer token is the
  model's argmax (a teacher-forced exact match);
- task score: the model generates greedily from the compressed cache (query-agnostic runs first
  read the question through it), and the answer is scored with the workload's own rule.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvsim.live.cache import PolicyCache
from kvsim.policies.budget import Budget
from kvsim.policies.policy import Policy
from kvsim.traces.kvzip import reconstruction_scores
from kvsim.traces.models import LoadedModel, eos_token_ids
from kvsim.traces.store import TraceSample, TraceSet
from kvsim.traces.workloads import score


@dataclass
class TeacherForced:
    kl: float  # mean over continuation positions, nats
    top1: float  # share of positions whose argmax matches the full cache's
    answer_logprob: float  # mean log-probability of the reference answer's tokens, fed after the question
    answer_match: float  # 1.0 when every reference answer token is the argmax, else 0.0


@dataclass
class LiveOutcome:
    prediction: str
    score: float
    kl: float
    top1: float
    answer_logprob: float
    answer_match: float
    kv_bytes: int  # keys and values held right after the prompt's decision, at the serving dtype (`kvsim.policies.held`)
    kept_tokens: int
    low_precision_tokens: int
    decode_ms_per_token: float


class LiveSample:
    """One trace sample, prefilled once on the live model, ready to be run under any policy."""

    def __init__(
        self, loaded: LoadedModel, traceset: TraceSet, sample: TraceSample, window: int, kvzip: bool = False,
        reconstruction: Sequence[torch.Tensor] | None = None,
    ) -> None:
        """kvzip: run KVzip's reconstruction pass on the prefix first, for policies that read it;
        or give its per-layer scores as `reconstruction` (the exact tier reads the trace's)."""
        self.loaded, self.sample = loaded, sample
        self.model = loaded.model
        self.ids = sample.input_ids
        self.start = sample.prompt_len
        self.eos = eos_token_ids(loaded)
        self.max_new_tokens = traceset.meta["max_new_tokens"]
        self.reference_ids = sample.tensors["continuation.topk_ids"]
        self.reference_logprobs = sample.tensors["continuation.topk_logprobs"].float()
        self.answer_ids = reference_answer_ids(loaded.tokenizer, sample)
        with torch.inference_mode():
            self.recording = PolicyCache.recording(self.model, window, capture_row_splits(traceset, sample))
            if kvzip and reconstruction is None:
                reconstruction = reconstruction_scores(self.model, loaded.tokenizer, self.ids[: self.start].tolist())
            if reconstruction is not None:
                self.recording.set_reconstruction(reconstruction)
            self.first_logits = self.model(self.ids[None, : self.start], past_key_values=self.recording, logits_to_keep=1).logits[0]

    @torch.inference_mode()
    def teacher_forced(self, policy: Policy, budget: Budget, cache: PolicyCache | None = None) -> TeacherForced:
        """KL and top-1 on the stored continuation and the reference answer's log-likelihood, each fed
        through its own copy of the compressed cache (`cache`, or a new decision)."""
        cache = cache or self.recording.with_policy(policy, budget)
        teacher = feed(self.model, copy.deepcopy(cache), self.ids[self.start : self.sample.total_len - 1])
        kl, top1 = fidelity(torch.cat([self.first_logits, teacher]), self.reference_ids, self.reference_logprobs)
        question = self.ids[self.start : self.sample.full_prompt_len]
        forced = torch.cat([question, self.answer_ids])
        logits = torch.cat([self.first_logits, feed(self.model, copy.deepcopy(cache), forced[:-1])])
        answer_logits = logits[-self.answer_ids.numel() :].float()
        logprobs = torch.log_softmax(answer_logits, -1).gather(1, self.answer_ids[:, None])
        match = bool((answer_logits.argmax(-1) == self.answer_ids).all())
        return TeacherForced(kl, top1, float(logprobs.mean()), float(match))

    @torch.inference_mode()
    def run(self, policy: Policy, budget: Budget) -> LiveOutcome:
        cache = self.recording.with_policy(policy, budget)
        kv_bytes = cache.held_bytes()
        kept, low = cache.held_tokens()
        forced = self.teacher_forced(policy, budget, cache)
        generated, seconds = self._generate(cache)
        prediction = self.loaded.tokenizer.decode(generated, skip_special_tokens=True)
        return LiveOutcome(
            prediction=prediction,
            score=score(prediction, self.sample.answers, self.sample.scoring),
            kl=forced.kl,
            top1=forced.top1,
            answer_logprob=forced.answer_logprob,
            answer_match=forced.answer_match,
            kv_bytes=kv_bytes,
            kept_tokens=kept,
            low_precision_tokens=low,
            decode_ms_per_token=1000 * seconds / max(1, len(generated) - 1),
        )

    def _generate(self, cache: PolicyCache) -> tuple[list[int], float]:
        """Greedy tokens after the prompt, and the seconds spent on decode steps (prefill excluded)."""
        question = self.ids[self.start : self.sample.full_prompt_len]
        logits = feed(self.model, cache, question)[-1:] if question.numel() else self.first_logits
        generated = [int(logits[-1].argmax())]
        started = time.perf_counter()
        while generated[-1] not in self.eos and len(generated) < self.max_new_tokens:
            logits = self.model(input_ids=torch.tensor([[generated[-1]]]), past_key_values=cache).logits[0]
            generated.append(int(logits[-1].argmax()))
        return generated, time.perf_counter() - started


def feed(model, cache: PolicyCache, tokens: torch.Tensor) -> torch.Tensor:
    """[len(tokens), vocab] logits after each token, in as few forwards as the schedule allows.

    Prefill-once caches only grow, so one forward is exact. Every-step and lagged schedules evict
    every `interval` tokens and nothing in between, so the tokens up to the next eviction are read
    in one forward (causal inside it, as token by token) and the eviction runs after its last
    token: one token per forward for every-step, `interval` for lagged.
    """
    if tokens.numel() == 0:
        return torch.empty(0, model.config.vocab_size)
    logits, start = [], 0
    while start < tokens.numel():
        size = cache.tokens_until_eviction() or tokens.numel()
        logits.append(model(tokens[None, start : start + size], past_key_values=cache).logits[0])
        start += size
    return torch.cat(logits)


def fidelity(logits: torch.Tensor, reference_ids: torch.Tensor, reference_logprobs: torch.Tensor) -> tuple[float, float]:
    """(mean KL(full ‖ compressed), top-1 agreement) over positions.

    The trace stores the full cache's top-k log-probabilities, so KL is taken over those k tokens
    plus one bucket for the rest of the vocabulary. Merging outcomes can only lower KL (the log-sum
    inequality), so this is a lower bound of the exact KL, tight when the top k hold most mass.
    """
    rows = reference_ids.shape[0]
    logprobs = torch.log_softmax(logits[:rows].float(), dim=-1)
    live = logprobs.gather(1, reference_ids)
    full = reference_logprobs
    rest_full = torch.log1p(-full.exp().sum(1).clamp(max=1 - 1e-7))
    rest_live = torch.log1p(-live.exp().sum(1).clamp(max=1 - 1e-7))
    kl = (full.exp() * (full - live)).sum(1) + rest_full.exp() * (rest_full - rest_live)
    top1 = (logprobs.argmax(-1) == reference_ids[:, 0]).float()
    return float(kl.mean()), float(top1.mean())


def reference_answer_ids(tokenizer, sample: TraceSample) -> torch.Tensor:
    """[m] token ids of the reference answer as the model would write it right after the prompt:
    every answer joined by ", " when all are scored, the first otherwise, after a space unless the
    prompt's answer prefix already ends in white space."""
    text = ", ".join(sample.answers) if sample.scoring == "all" else sample.answers[0]
    last = tokenizer.decode(sample.input_ids[sample.full_prompt_len - 1 : sample.full_prompt_len])
    if not last[-1:].isspace():
        text = " " + text
    return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.int64)


def capture_row_splits(traceset: TraceSet, sample: TraceSample) -> tuple[int, ...]:
    """The row groups capture summed column statistics in, so live statistics match them bit for bit:
    a query-aware sample captured alongside its query-agnostic twin was split at the context's end."""
    if sample.mode != "query-aware" or sample.context_len >= sample.prompt_len:
        return ()
    twins = traceset.manifest.filter((traceset.manifest["sample_id"] == sample.sample_id) & (traceset.manifest["mode"] == "query-agnostic"))
    return (sample.context_len,) if twins.height else ()
