"""One evaluation sample: its context split into typed segments, the question, and how to score it.

Segments exist so the capture code can tokenize each piece on its own and know exactly which
tokens are needles, distractors or filler; that is what lets kvsim ask "did the eviction policy
keep the evidence?" rather than only "did the model answer?". The small helpers at the end are
shared by the task generators and the user-file readers.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvsim.errors import KvsimError

SEGMENT_KINDS = frozenset({"instruction", "filler", "needle", "distractor", "question", "text"})
SCORINGS = ("all", "any")

# RULER maps every control character to a newline before matching, so a model that ends its
# answer with e.g. a stray "\x0c" is scored like one that ends it with "\n".
_CONTROL_CHARS = re.compile(r"[\x00-\x1f]")


@dataclass(frozen=True)
class Segment:
    """A piece of prompt text with its role; `text` carries its own leading whitespace."""

    kind: str
    text: str

    def __post_init__(self) -> None:
        if self.kind not in SEGMENT_KINDS:
            raise KvsimError(
                f"unknown segment kind {self.kind!r}: use one of {', '.join(sorted(SEGMENT_KINDS))}"
            )


@dataclass(frozen=True)
class Sample:
    """A prompt split into context (what query-agnostic eviction compresses) and question.

    `answers` are reference strings matched as case-insensitive substrings of the model's output;
    `scoring` says whether all of them count ("all", RULER string_match_all) or any one ("any",
    RULER string_match_part).
    """

    sample_id: str
    task: str
    context: tuple[Segment, ...]
    question: tuple[Segment, ...]
    answer_prefix: str
    answers: tuple[str, ...]
    scoring: str

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise KvsimError(f"unknown scoring {self.scoring!r} in {self.sample_id}: use 'all' or 'any'")
        if not self.answers or not all(self.answers):
            raise KvsimError(f"sample {self.sample_id} has an empty answer: give at least one non-empty answer")

    def evidence(self) -> tuple[int, ...]:
        """Indices into `context` of the segments that hold the answer (needles, VAR chain lines)."""
        return tuple(i for i, segment in enumerate(self.context) if segment.kind == "needle")


def score(prediction: str, answers: Sequence[str], scoring: str) -> float:
    """Score `prediction` against `answers` the way RULER does; the result is in [0, 1]."""
    if scoring not in SCORINGS:
        raise KvsimError(f"unknown scoring {scoring!r}: use 'all' or 'any'")
    if not answers:
        raise KvsimError("no reference answers to score against: give at least one answer")
    text = _CONTROL_CHARS.sub("\n", prediction.strip()).strip().lower()
    found = [answer.lower() in text for answer in answers]
    if scoring == "any":
        return float(any(found))
    return sum(found) / len(found)


def sample_id(task: str, index: int) -> str:
    """The id of the `index`-th sample of a workload, e.g. "passkey-0003"."""
    return f"{task}-{index:04d}"


def sample_rng(seed: int, task: str, index: int) -> random.Random:
    """A generator private to one sample, so a sample stays the same when the workload grows.

    Seeding with a string hashes it with SHA-512 (not Python's salted `hash`), so it is stable
    across processes.
    """
    return random.Random(f"kvsim:{seed}:{task}:{index}")


def draw_distinct(draw: Callable[[], str], count: int) -> list[str]:
    """`count` different results of `draw()`, in the order first drawn (keys, values, names)."""
    seen: dict[str, None] = {}
    while len(seen) < count:
        seen.setdefault(draw(), None)
    return list(seen)


def read_user_text(path: Path, what: str) -> str:
    """The UTF-8 text of a user-supplied `what` file ("haystack", "workload"), or a KvsimError."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KvsimError(f"{what} file {path} does not exist: check the path") from None
    except UnicodeDecodeError:
        raise KvsimError(f"{what} file {path} is not UTF-8 text: convert it to UTF-8") from None
    except OSError as exc:
        raise KvsimError(f"cannot read {what} file {path} ({exc.strerror}): give a readable file") from None
