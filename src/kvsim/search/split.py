"""Search and held-out samples: a seeded split, stratified by task, in an order pruning can use.

The held-out samples are never seen by a trial; they only score the winners in the report (and
`kvsim validate` runs them live), so a policy that overfits the search samples shows it there.

Within each task, sample ids are shuffled with the seed and the first `round(fraction × n)` go to
the held-out set (at least one and at most n − 1 when the task has two or more samples, none when
it has one, so every task is searched). The
search samples are then interleaved task by task, so every prefix of the order, the growing
subsets the pruner judges trials on, covers the tasks in proportion.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import polars as pl

from kvsim.errors import KvsimError


@dataclass(frozen=True)
class Split:
    search: tuple[str, ...]  # in evaluation order
    held_out: tuple[str, ...]


def split_samples(manifest: pl.DataFrame, mode: str, held_out_fraction: float, seed: int) -> Split:
    if not 0 <= held_out_fraction < 1:
        raise KvsimError(f"held-out fraction {held_out_fraction} is outside [0, 1): give e.g. 0.25")
    rows = manifest.filter(pl.col("mode") == mode).select("sample_id", "task").unique(maintain_order=True)
    if rows.is_empty():
        modes = sorted(set(manifest["mode"]))
        raise KvsimError(f"the traces hold no {mode} samples (they hold {', '.join(modes) or 'none'}): pass --mode accordingly")
    rng = random.Random(seed)
    search_by_task, held_out = [], []
    for task in sorted(set(rows["task"])):
        ids = sorted(rows.filter(pl.col("task") == task)["sample_id"])
        rng.shuffle(ids)
        count = 0 if len(ids) < 2 or held_out_fraction == 0 else min(len(ids) - 1, max(1, round(held_out_fraction * len(ids))))
        held_out += ids[:count]
        search_by_task.append(ids[count:])
    order = [ids[i] for i in range(max(map(len, search_by_task))) for ids in search_by_task if i < len(ids)]
    return Split(tuple(order), tuple(sorted(held_out)))
