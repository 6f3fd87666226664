"""Variable tracking (RULER "vt"): follow a chain of assignments scattered through the context.

One chain of five variables with distinct random 5-letter uppercase names: "VAR ABCDE = 12345."
then "VAR FGHIJ = VAR ABCDE." and so on for four hops. Each line is its own "needle" segment,
placed in chain order at sorted random depths in prose filler. Unlike a single needle, every hop
must survive eviction for the answer to be complete, so this measures whether a policy keeps
several far-apart pieces of evidence at once.

Instead of RULER's full-length one-shot example (a second context of ~500 tokens), the
instruction carries a one-line example with its own names and value, re-drawn per sample: it
shows a small model the answer format at a cost of a few dozen tokens.
"""

from __future__ import annotations

import string

from kvsim.traces.workloads.haystack import DEPTHS, CountTokens, Haystack, fill_around, memoize
from kvsim.traces.workloads.sample import Sample, Segment, draw_distinct, sample_id, sample_rng

TASK = "variable_tracking"
CHAIN_LENGTH = 5


def variable_tracking(
    index: int, *, seed: int, context_tokens: int, count_tokens: CountTokens, haystack: Haystack
) -> Sample:
    """Sample `index`: a five-variable chain in prose filler; the answer is all five names."""
    rng = sample_rng(seed, TASK, index)
    names = draw_distinct(lambda: "".join(rng.choices(string.ascii_uppercase, k=5)), CHAIN_LENGTH + 3)
    chain, example = names[:CHAIN_LENGTH], names[CHAIN_LENGTH:]
    value, example_value = draw_distinct(lambda: str(rng.randint(10_000, 99_999)), 2)
    instruction = (
        "Memorize and track the chain(s) of variable assignment hidden in the following text. "
        f'For example, in "... VAR {example[0]} = {example_value}. ... VAR {example[1]} = VAR {example[0]}. '
        f'... VAR {example[2]} = VAR {example[1]}. ..." the variables assigned the value {example_value} are '
        f"{example[0]}, {example[1]} and {example[2]}.\n"
    )
    lines = [f"VAR {chain[0]} = {value}."] + [f"VAR {new} = VAR {old}." for old, new in zip(chain, chain[1:])]
    depths = sorted(rng.sample(DEPTHS, CHAIN_LENGTH))
    inserts = [(depth, Segment("needle", line)) for depth, line in zip(depths, lines)]
    start = rng.randrange(len(haystack.sentences))
    context = fill_around(haystack, start, instruction, inserts, context_tokens, memoize(count_tokens), TASK)
    question = f"\nQuestion: Find all variables that are assigned the value {value} in the text above."
    return Sample(
        sample_id=sample_id(TASK, index),
        task=TASK,
        context=context,
        question=(Segment("question", question),),
        answer_prefix=(
            " Answer: According to the chain(s) of variable assignment in the text above, "
            f"{CHAIN_LENGTH} variables are assigned the value {value}, they are:"
        ),
        answers=tuple(chain),
        scoring="all",
    )
