"""Search, validation and test samples: a seeded split, stratified by task, in an order pruning can use.

Three splits, each with one job, so no number in the report is measured on the samples that chose it:
- search: every trial is scored on these (the proxy prunes, the exact tier ranks);
- validation: the best trials are re-ranked on these and the winner chosen;
- test: only the report's live comparison of the winner with the presets runs on these.

Within each task, sample ids are shuffled with the seed; the first `round(test × n)` go to test and
the next `round(validation × n)` to validation, each at least one when its fraction is above 0 and
the task has samples to spare, and never taking a task's last search sample. The search samples
are then interleaved task by task, so every prefix of the order, the growing subsets the pruner
judges trials on, covers the tasks in proportion.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import polars as pl

from kvsim.errors import KvsimError


@dataclass(frozen=True)
class Split:
    search: tuple[str, ...]  # in evaluation order
    validation: tuple[str, ...]
    test: tuple[str, ...]


def split_samples(manifest: pl.DataFrame, mode: str, validation: float, test: float, seed: int) -> Split:
    for name, fraction in (("validation", validation), ("test", test)):
        if not 0 <= fraction < 1:
            raise KvsimError(f"{name} fraction {fraction} is outside [0, 1): give e.g. 0.25")
    if validation + test >= 1:
        raise KvsimError(f"validation {validation} + test {test} leave no search samples: keep their sum below 1")
    rows = manifest.filter(pl.col("mode") == mode).select("sample_id", "task").unique(maintain_order=True)
    if rows.is_empty():
        modes = sorted(set(manifest["mode"]))
        raise KvsimError(f"the traces hold no {mode} samples (they hold {', '.join(modes) or 'none'}): pass --mode accordingly")
    rng = random.Random(seed)
    search_by_task, validation_ids, test_ids = [], [], []
    for task in sorted(set(rows["task"])):
        ids = sorted(rows.filter(pl.col("task") == task)["sample_id"])
        rng.shuffle(ids)
        n_test = _share(test, len(ids), spare=len(ids) - 1)
        n_validation = _share(validation, len(ids), spare=len(ids) - 1 - n_test)
        test_ids += ids[:n_test]
        validation_ids += ids[n_test : n_test + n_validation]
        search_by_task.append(ids[n_test + n_validation :])
    order = [ids[i] for i in range(max(map(len, search_by_task))) for ids in search_by_task if i < len(ids)]
    return Split(tuple(order), tuple(sorted(validation_ids)), tuple(sorted(test_ids)))


def _share(fraction: float, n: int, spare: int) -> int:
    """round(fraction × n), at least 1 when the fraction is above 0, at most `spare`."""
    if fraction == 0 or spare <= 0:
        return 0
    return min(spare, max(1, round(fraction * n)))
