"""Aggregation tasks: common-words (RULER "cwe") and frequent-words (RULER "fwe") extraction.

Here the answer is not in any one place: the model must count words spread over the whole
context, so an eviction policy is tested on keeping a representative sample of a long list
rather than a few needles. The list is the context (one "text" segment after the instruction);
evidence() is empty for these tasks.
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Callable

from kvsim.traces.workloads.haystack import CountTokens, Haystack, fit_to_target, memoize
from kvsim.traces.workloads.sample import Sample, Segment, draw_distinct, sample_id, sample_rng

COMMON_WORDS = 10
# RULER's repeat counts (common, uncommon): 30 and 3 from 4K tokens up, 6 and 1 below.
LONG_REPEATS, SHORT_REPEATS, LONG_FROM = (30, 3), (6, 1), 4096

ZIPF_ALPHA = 2.0
ZETA_ALPHA = math.pi**2 / 6  # zeta(2), the normalizer of Zipf(2) frequencies
# Fewest words for which Zipf counts floor(N k^-2 / zeta) of ranks 4 and 5 differ by at least
# one, so that ranks 2-4 (the answer) are strictly more frequent than everything below them.
MIN_FREQUENT_WORDS = math.ceil(ZETA_ALPHA / (4**-ZIPF_ALPHA - 5**-ZIPF_ALPHA))
CODED_WORD_LETTERS = 6

# First guesses of tokens per list item; fit_to_target measures the real ratio and corrects.
_TOKENS_PER_ENTRY = 5
_MIN_TOKENS_PER_ENTRY = 2
_TOKENS_PER_CODED_WORD = 3


def common_words(
    index: int, *, seed: int, context_tokens: int, count_tokens: CountTokens, haystack: Haystack
) -> Sample:
    """A numbered list where 10 words are repeated more often than all others; name those 10.

    Words come from the haystack vocabulary. The number of uncommon words grows to fill the
    budget; when the vocabulary could run out, all repeat counts are scaled up together, keeping
    the common words strictly ahead.
    """
    task = "common_words"
    rng = sample_rng(seed, task, index)
    words = rng.sample(haystack.vocabulary, len(haystack.vocabulary))
    common, pool = words[:COMMON_WORDS], words[COMMON_WORDS:]
    common_repeats, uncommon_repeats = LONG_REPEATS if context_tokens >= LONG_FROM else SHORT_REPEATS
    # Scaled once, up front: scaling inside the fit would make the list length jump and the fit
    # oscillate. The bound assumes 2 tokens per "N. word" entry, fewer than any tokenizer spends.
    scale = max(1, math.ceil(context_tokens / _MIN_TOKENS_PER_ENTRY / (uncommon_repeats * len(pool))))
    common_repeats, uncommon_repeats = common_repeats * scale, uncommon_repeats * scale
    order_seed = rng.getrandbits(64)

    def listing(entries: int) -> str:
        uncommon = pool[: entries // uncommon_repeats]
        listed = common * common_repeats + uncommon * uncommon_repeats
        random.Random(order_seed).shuffle(listed)
        return " ".join(f"{number}. {word}" for number, word in enumerate(listed, 1))

    return _word_list_sample(
        task,
        index,
        instruction=(
            "Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often.\n"
        ),
        listing=listing,
        tokens_per_item=_TOKENS_PER_ENTRY,
        question=f"\nQuestion: What are the {COMMON_WORDS} most common words in the above list?",
        answer_prefix=f" Answer: The top {COMMON_WORDS} words that appear most often in the list are:",
        answers=tuple(common),
        context_tokens=context_tokens,
        count_tokens=count_tokens,
    )


def frequent_words(
    index: int, *, seed: int, context_tokens: int, count_tokens: CountTokens, haystack: Haystack
) -> Sample:
    """Random 6-letter "coded words" with Zipf(2) frequencies; name the 2nd-4th most frequent.

    As in RULER the vocabulary has context_tokens // 50 words, and every occurrence of the most
    frequent word is replaced by "..." (noise the model is told to ignore). `haystack` is unused:
    coded words are random letters by design.
    """
    task = "frequent_words"
    rng = sample_rng(seed, task, index)
    vocabulary = draw_distinct(
        lambda: "".join(rng.choices(string.ascii_lowercase, k=CODED_WORD_LETTERS)), max(context_tokens // 50, 5)
    )
    order_seed = rng.getrandbits(64)

    def listing(extra_words: int) -> str:
        total = MIN_FREQUENT_WORDS + extra_words
        listed = [
            "..." if rank == 1 else word
            for rank, word in enumerate(vocabulary, 1)
            for _ in range(int(total * rank**-ZIPF_ALPHA / ZETA_ALPHA))
        ]
        random.Random(order_seed).shuffle(listed)
        return " ".join(listed)

    return _word_list_sample(
        task,
        index,
        instruction=(
            "Read the following coded text and track the frequency of each coded word. "
            "Find the three most frequently appeared coded words.\n"
        ),
        listing=listing,
        tokens_per_item=_TOKENS_PER_CODED_WORD,
        question=(
            "\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
            "What are the three most frequently appeared words in the above coded text?"
        ),
        answer_prefix=" Answer: According to the coded text above, the three most frequently appeared words are:",
        answers=tuple(vocabulary[1:4]),
        context_tokens=context_tokens,
        count_tokens=count_tokens,
    )


def _word_list_sample(
    task: str,
    index: int,
    *,
    instruction: str,
    listing: Callable[[int], str],
    tokens_per_item: int,
    question: str,
    answer_prefix: str,
    answers: tuple[str, ...],
    context_tokens: int,
    count_tokens: CountTokens,
) -> Sample:
    """A sample whose context is `instruction` plus `listing(items)`, sized to `context_tokens`."""

    def build(budget: int) -> tuple[Segment, ...]:
        return Segment("instruction", instruction), Segment("text", listing(budget // tokens_per_item))

    return Sample(
        sample_id=sample_id(task, index),
        task=task,
        context=fit_to_target(build, context_tokens, memoize(count_tokens), task),
        question=(Segment("question", question),),
        answer_prefix=answer_prefix,
        answers=answers,
        scoring="all",
    )
