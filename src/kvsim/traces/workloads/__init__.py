"""Long-context workloads: RULER-style synthetic tasks built offline, or the user's own JSONL.

A workload is a list of `Sample`s whose contexts are sized in the target model's tokens. The
synthetic tasks are deterministic in (seed, task, sample index), so growing a workload only
appends samples and a trace can always be regenerated from its recorded spec.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from kvsim.errors import KvsimError
from kvsim.traces.workloads.haystack import CountTokens, Haystack, memoize, tolerance
from kvsim.traces.workloads.needles import multikey, multiquery, multivalue, passkey
from kvsim.traces.workloads.sample import Sample, Segment, score
from kvsim.traces.workloads.user_jsonl import read_jsonl
from kvsim.traces.workloads.variable_tracking import variable_tracking
from kvsim.traces.workloads.word_counts import common_words, frequent_words

__all__ = [
    "DEFAULT_MIX",
    "TASKS",
    "CountTokens",
    "Haystack",
    "Sample",
    "Segment",
    "TaskGenerator",
    "build_workload",
    "read_jsonl",
    "score",
    "tolerance",
]


class TaskGenerator(Protocol):
    """Builds sample `index` of a task; the same arguments always give the same sample."""

    def __call__(
        self, index: int, *, seed: int, context_tokens: int, count_tokens: CountTokens, haystack: Haystack
    ) -> Sample: ...


TASKS: dict[str, TaskGenerator] = {
    "passkey": passkey,
    "multikey": multikey,
    "multivalue": multivalue,
    "multiquery": multiquery,
    "variable_tracking": variable_tracking,
    "common_words": common_words,
    "frequent_words": frequent_words,
}

# The bundled model is a weak 135M model; these are the families it can sometimes solve, so
# eviction damage shows up as a drop in score rather than being lost in a floor of zeros.
DEFAULT_MIX = ("passkey", "multikey", "variable_tracking")


def build_workload(
    spec: str,
    n: int,
    *,
    seed: int,
    context_tokens: int,
    count_tokens: CountTokens,
    haystack: Haystack | None = None,
) -> list[Sample]:
    """`n` samples for `spec`: "default", a task name, a comma-separated mix, or a .jsonl path.

    In a mix, sample i belongs to task i % k, so every task is represented from the first k
    samples on. For a .jsonl file, `n` caps the rows read and `context_tokens` is ignored.
    """
    if n < 1:
        raise KvsimError(f"number of samples is {n}: ask for at least 1")
    if spec.strip().endswith(".jsonl"):
        return read_jsonl(Path(spec.strip()), limit=n)
    tasks = DEFAULT_MIX if spec.strip() == "default" else tuple(name.strip() for name in spec.split(","))
    for name in tasks:
        if name not in TASKS:
            raise KvsimError(
                f"unknown workload {name!r}: choose one of {', '.join(TASKS)}, default, "
                "a comma-separated mix of these, or a path to a .jsonl file"
            )
    if context_tokens < 1:
        raise KvsimError(f"context_tokens is {context_tokens}: give a positive number of tokens")
    haystack = haystack if haystack is not None else Haystack.default()
    count = memoize(count_tokens)
    return [
        TASKS[tasks[i % len(tasks)]](i, seed=seed, context_tokens=context_tokens, count_tokens=count, haystack=haystack)
        for i in range(n)
    ]
