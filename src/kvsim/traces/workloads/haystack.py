"""Real English filler text, and fitting generated contexts to a token budget.

Eviction policies score tokens by the attention they receive, and attention over natural prose
looks nothing like attention over a repeated "The grass is green" line or lorem ipsum; so the
filler around needles must be real text. The default source is the Python documentation that
ships with CPython (`pydoc_data.topics`): always present, offline, and versioned with the
interpreter. Only its prose is kept (code, grammar, tables and headings are dropped) and split
into sentences, so filler can be cut to a budget at sentence boundaries.
"""

from __future__ import annotations

import functools
import hashlib
import math
import platform
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from kvsim.errors import KvsimError
from kvsim.traces.workloads.sample import Segment, read_user_text

CountTokens = Callable[[str], int]

# The haystack must be long enough that a sample is not mostly the same few sentences repeated,
# and rich enough in words to build keys and the common-words lists.
MIN_SENTENCES = 20
MIN_VOCABULARY = 50

# Needle depths, as in RULER: 40 evenly spaced positions from the start (0%) to the end (100%).
DEPTHS = tuple(100 * i / 39 for i in range(40))

# How many sentences `draw` may pass over, near the end of its budget, looking for one that fits.
_MAX_SKIPS = 64
# Secant steps `fit_to_target` may take; it usually lands within two.
_MAX_FIT_ROUNDS = 6

_SENTENCE_WORDS = (5, 60)
_VOCABULARY_LETTERS = (4, 10)

_SENTENCE_END = re.compile(r"(?<=[.?!])\s+(?=[A-Z\"“(])")
_RULE_LINE = re.compile(r"^\s*[*=\-~^+|#_]{3,}[\s*=\-~^+|#_]*$")
_CODE_MARKERS = ("::=", ">>>", "+--", "|")
_LIST_MARKER = re.compile(r"^(?:\d+\.|[*\-•])\s+")
_FOOTNOTE = re.compile(r"\s*\[\d+\]")


class Haystack:
    """An ordered list of prose sentences that filler is drawn from.

    `source` names where the text came from and `sha256` fingerprints the cleaned sentences, so a
    trace can record exactly which filler it was captured on.
    """

    def __init__(self, sentences: Sequence[str], source: str) -> None:
        self.sentences = tuple(sentences)
        self.source = source
        self.sha256 = hashlib.sha256("\n".join(self.sentences).encode()).hexdigest()

    @classmethod
    def default(cls) -> Haystack:
        """The prose of the Python documentation bundled with this interpreter (built once)."""
        return _python_docs()

    @classmethod
    def from_file(cls, path: str | Path) -> Haystack:
        """The prose of a user's UTF-8 text file, cleaned the same way as the default source."""
        path = Path(path)
        text = read_user_text(path, "haystack")
        return cls.from_text(text, source=f"file:{path}")

    @classmethod
    def from_text(cls, text: str, source: str) -> Haystack:
        """The prose of `text`; KvsimError when too little of it is usable as filler."""
        haystack = cls(prose_sentences(text), source)
        if len(haystack.sentences) < MIN_SENTENCES:
            raise KvsimError(
                f"haystack {source} has only {len(haystack.sentences)} usable prose sentences: "
                f"give a text with at least {MIN_SENTENCES} sentences of ordinary prose"
            )
        if len(haystack.vocabulary) < MIN_VOCABULARY:
            raise KvsimError(
                f"haystack {source} has only {len(haystack.vocabulary)} distinct recurring words: "
                f"give a longer text (at least {MIN_VOCABULARY} are needed for keys and word lists)"
            )
        return haystack

    @functools.cached_property
    def vocabulary(self) -> tuple[str, ...]:
        """Lowercase alphabetic words of 4-10 letters that occur at least twice, sorted.

        Used for needle keys and the common-words lists. Requiring two occurrences drops most
        identifiers and typos; sorting makes a seeded draw from it reproducible.
        """
        low, high = _VOCABULARY_LETTERS
        counts = Counter(
            word
            for sentence in self.sentences
            for token in sentence.split()
            if low <= len(word := token.strip(".,;:!?()\"'“”‘’")) <= high and word.isalpha() and word.islower()
        )
        return tuple(sorted(word for word, count in counts.items() if count >= 2))

    def draw(self, start: int, budget: int, count_tokens: CountTokens) -> list[str]:
        """Consecutive sentences from `start` (wrapping around) whose token counts sum to <= `budget`.

        A sentence is counted with the space that will precede it in the context. Near the end of
        the budget, sentences that would overshoot are skipped in favour of later ones that fit, so
        the run lands within a few tokens of the budget rather than within a sentence.
        """
        taken: list[str] = []
        used = skipped = 0
        index = start
        while used < budget and skipped < _MAX_SKIPS:
            sentence = self.sentences[index % len(self.sentences)]
            cost = count_tokens(" " + sentence)
            if used + cost <= budget:
                taken.append(sentence)
                used += cost
            else:
                skipped += 1
            index += 1
        return taken


def prose_sentences(text: str) -> list[str]:
    """The sentences of `text`'s prose paragraphs, whitespace-normalized, in order."""
    sentences = []
    low, high = _SENTENCE_WORDS
    for paragraph in _prose_paragraphs(text):
        for sentence in _SENTENCE_END.split(paragraph):
            if low <= len(sentence.split()) <= high and sentence[0].isupper() and sentence[-1] in ".?!":
                sentences.append(sentence)
    return sentences


def _prose_paragraphs(text: str) -> list[str]:
    """Paragraphs that are running prose, joined onto one line.

    Code and grammar in reStructuredText-rendered docs are literal blocks: a paragraph ending in
    ":" followed by one indented deeper, lasting until the indentation falls back. Those are
    dropped, as are headings (underlined), tables and interactive sessions.
    """
    kept = []
    literal_indent: int | None = None
    previous_indent, previous_opens_block = 0, False
    for block in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        lines = [line for line in block.split("\n") if line.strip()]
        if not lines:
            continue
        indent = min(len(line) - len(line.lstrip()) for line in lines)
        if literal_indent is not None and indent >= literal_indent:
            continue
        literal_indent = None
        if previous_opens_block and indent > previous_indent:
            literal_indent = indent
            continue
        previous_indent, previous_opens_block = indent, lines[-1].rstrip().endswith(":")
        if any(_RULE_LINE.match(line) or any(m in line for m in _CODE_MARKERS) for line in lines):
            continue
        paragraph = " ".join(" ".join(lines).split())
        paragraph = _FOOTNOTE.sub("", _LIST_MARKER.sub("", paragraph)).replace("*", "")
        kept.append(" ".join(paragraph.split()))
    return kept


@functools.cache
def _python_docs() -> Haystack:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics))
    return Haystack.from_text(text, source=f"python-docs:{platform.python_version()}")


def memoize(count_tokens: CountTokens) -> CountTokens:
    """Cache a token counter, so each haystack sentence is tokenized once per workload."""
    if hasattr(count_tokens, "cache_info"):
        return count_tokens
    return functools.lru_cache(maxsize=1 << 16)(count_tokens)


def tolerance(context_tokens: int) -> int:
    """How far a generated context may miss its target length: 2% or 40 tokens, whichever is more."""
    return max(math.ceil(0.02 * context_tokens), 40)


def fit_to_target(
    build: Callable[[int], tuple[Segment, ...]],
    context_tokens: int,
    count_tokens: CountTokens,
    task: str,
) -> tuple[Segment, ...]:
    """Call `build(budget)` with budgets chosen so its segments total about `context_tokens` tokens.

    `build(0)` must give the smallest context the task can have (instruction and needles only);
    larger budgets add roughly that many tokens of filler. Lengths are measured exactly on the
    built segments and the budget corrected by the secant method, so tokenizer quirks at piece
    boundaries and rough per-unit estimates in `build` do not matter.
    """
    def measure(segments: tuple[Segment, ...]) -> int:
        return sum(count_tokens(segment.text) for segment in segments)

    best = build(0)
    best_total = floor = measure(best)
    if floor > context_tokens:
        suggestion = math.ceil(floor * 1.2 / 100) * 100
        raise KvsimError(
            f"context_tokens={context_tokens} is too small for {task}: its smallest context (instruction and "
            f"needles or shortest word list) takes {floor} tokens; use context_tokens >= {suggestion}"
        )
    previous = (0, floor)
    budget = context_tokens - floor
    for _ in range(_MAX_FIT_ROUNDS):
        if abs(best_total - context_tokens) <= tolerance(context_tokens) // 4:
            break
        segments = build(budget)
        total = measure(segments)
        if abs(total - context_tokens) < abs(best_total - context_tokens):
            best, best_total = segments, total
        slope = 1.0
        if budget != previous[0] and total != previous[1]:
            slope = min(max((total - previous[1]) / (budget - previous[0]), 0.25), 4.0)
        previous = (budget, total)
        budget = max(0, budget + round((context_tokens - total) / slope))
    return best


def fill_around(
    haystack: Haystack,
    start: int,
    instruction: str,
    inserts: Sequence[tuple[float, Segment]],
    context_tokens: int,
    count_tokens: CountTokens,
    task: str,
) -> tuple[Segment, ...]:
    """The context: `instruction`, then haystack filler from `start` with `inserts` placed in it.

    Each insert is (depth in percent, segment) and goes between the sentences at that fraction of
    the filler; inserts at equal depth keep their given order. Filler between two inserts is one
    "filler" segment. Segment texts get the single space that separates them from what precedes,
    except right after the instruction's closing newline.
    """
    ordered = sorted(inserts, key=lambda insert: insert[0])

    def build(budget: int) -> tuple[Segment, ...]:
        sentences = haystack.draw(start, budget, count_tokens)
        pieces: list[Segment] = []
        position = 0
        for depth, segment in [*ordered, (math.inf, None)]:
            cut = len(sentences) if segment is None else round(depth / 100 * len(sentences))
            if cut > position:
                pieces.append(Segment("filler", " ".join(sentences[position:cut])))
                position = cut
            if segment is not None:
                pieces.append(segment)
        segments = [Segment("instruction", instruction)]
        for piece in pieces:
            separator = "" if segments[-1].text[-1:].isspace() else " "
            segments.append(Segment(piece.kind, separator + piece.text))
        return tuple(segments)

    return fit_to_target(build, context_tokens, count_tokens, task)
