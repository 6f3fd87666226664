"""Needle-in-a-haystack retrieval tasks: passkey, multikey, multivalue and multiquery.

These follow RULER's niah generator and templates, with two local substitutions: the haystack is
prose from the Python docs (RULER uses Paul Graham essays, which need a download) and keys are
"word-word" pairs from the haystack's vocabulary (RULER pairs wonderwords adjectives and nouns).
Each needle reads "One of the special magic numbers for <key> is: <7-digit number>."; needles
go at depths sampled without replacement from 40 evenly spaced depths, so depth varies from
sample to sample and an eviction policy that only keeps recent or early tokens is found out.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvsim.traces.workloads.haystack import DEPTHS, CountTokens, Haystack, fill_around, memoize
from kvsim.traces.workloads.sample import Sample, Segment, draw_distinct, sample_id, sample_rng

INSTRUCTION = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards.\n"
)


@dataclass(frozen=True)
class NeedleTask:
    """A RULER NIAH variant: `keys` keys with `values` needles each; the first `queries` are asked.

    Needles of keys that are not asked about are "distractor" segments, so evidence() points only
    at the needles that hold the answer.
    """

    name: str
    keys: int
    values: int
    queries: int

    def __call__(
        self, index: int, *, seed: int, context_tokens: int, count_tokens: CountTokens, haystack: Haystack
    ) -> Sample:
        rng = sample_rng(seed, self.name, index)
        keys = draw_distinct(lambda: "-".join(rng.sample(haystack.vocabulary, 2)), self.keys)
        values = draw_distinct(lambda: str(rng.randint(1_000_000, 9_999_999)), self.keys * self.values)
        queried = keys[: self.queries]
        needles = [
            Segment(
                "needle" if key in queried else "distractor",
                f"One of the special magic numbers for {key} is: {value}.",
            )
            for k, key in enumerate(keys)
            for value in values[k * self.values : (k + 1) * self.values]
        ]
        depths = rng.sample(DEPTHS, len(needles))
        start = rng.randrange(len(haystack.sentences))
        context = fill_around(
            haystack, start, INSTRUCTION, list(zip(depths, needles)), context_tokens, memoize(count_tokens), self.name
        )
        query = queried[0] if len(queried) == 1 else ", ".join(queried[:-1]) + ", and " + queried[-1]
        answers = tuple(values[: self.queries * self.values])
        if len(answers) == 1:
            question = f"\nWhat is the special magic number for {query} mentioned in the provided text?"
            prefix = f" The special magic number for {query} mentioned in the provided text is"
        else:
            question = f"\nWhat are all the special magic numbers for {query} mentioned in the provided text?"
            prefix = f" The special magic numbers for {query} mentioned in the provided text are"
        return Sample(
            sample_id=sample_id(self.name, index),
            task=self.name,
            context=context,
            question=(Segment("question", question),),
            answer_prefix=prefix,
            answers=answers,
            scoring="all",
        )


passkey = NeedleTask("passkey", keys=1, values=1, queries=1)
multikey = NeedleTask("multikey", keys=4, values=1, queries=1)
multivalue = NeedleTask("multivalue", keys=1, values=4, queries=1)
multiquery = NeedleTask("multiquery", keys=4, values=1, queries=4)
