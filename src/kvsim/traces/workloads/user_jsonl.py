"""User-supplied samples from a JSON Lines file, used as they are (no length fitting).

Each line is an object with either "context", "question" and "answers", or "prompt" and
"answers"; optional "scoring" ("all" or "any", default "all") and "id". A "prompt" row has no
separate question, so it can only be captured query-aware (the capture code checks). Every
problem is reported with the file and line number, since a hand-made file is where typos live.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvsim.errors import KvsimError
from kvsim.traces.store import check_sample_id
from kvsim.traces.workloads.sample import SCORINGS, Sample, Segment, read_user_text, sample_id

TASK = "jsonl"


def read_jsonl(path: str | Path, limit: int | None = None) -> list[Sample]:
    """The samples in `path`, at most `limit` of them (all when `limit` is None or larger)."""
    path = Path(path)
    lines = read_user_text(path, "workload").splitlines()
    samples: list[Sample] = []
    seen_ids: set[str] = set()
    for number, line in enumerate(lines, 1):
        if limit is not None and len(samples) >= limit:
            break
        if not line.strip():
            continue
        sample = _parse_row(line, default_id=sample_id(TASK, len(samples)), where=f"{path} line {number}")
        if sample.sample_id in seen_ids:
            raise KvsimError(f"{path} line {number}: id {sample.sample_id!r} is used twice: give each row its own id")
        seen_ids.add(sample.sample_id)
        samples.append(sample)
    if not samples:
        raise KvsimError(f"workload file {path} has no rows: add one JSON object per line")
    return samples


def _parse_row(line: str, *, default_id: str, where: str) -> Sample:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise KvsimError(f"{where}: not valid JSON ({exc.msg}): write one JSON object per line") from None
    except RecursionError:
        raise KvsimError(f"{where}: nested too deeply to read: write one flat JSON object per line") from None
    if not isinstance(row, dict):
        raise KvsimError(f"{where}: expected a JSON object, got {type(row).__name__}: write one object per line")
    if "prompt" in row and ("context" in row or "question" in row):
        raise KvsimError(f"{where}: has both 'prompt' and 'context'/'question': give one form or the other")
    if "prompt" in row:
        context = (Segment("text", _text(row, "prompt", where)),)
        question: tuple[Segment, ...] = ()
    elif "context" in row and "question" in row:
        context = (Segment("text", _text(row, "context", where)),)
        text = _text(row, "question", where)
        question = (Segment("question", text if text[0].isspace() else "\n" + text),)
    else:
        raise KvsimError(f"{where}: needs 'context' and 'question', or 'prompt': add the missing key")
    scoring = row.get("scoring", "all")
    if scoring not in SCORINGS:
        raise KvsimError(f"{where}: 'scoring' is {scoring!r}: use 'all' or 'any'")
    row_id = row.get("id", default_id)
    if not isinstance(row_id, (str, int)) or isinstance(row_id, bool) or row_id == "":
        raise KvsimError(f"{where}: 'id' must be a non-empty string or an integer")
    try:
        check_sample_id(str(row_id))  # ids name the sample files: never a path
    except KvsimError as err:
        raise KvsimError(f"{where}: {err}") from None
    return Sample(
        sample_id=str(row_id),
        task=TASK,
        context=context,
        question=question,
        answer_prefix="",
        answers=_answers(row.get("answers"), where),
        scoring=scoring,
    )


def _text(row: dict[str, Any], key: str, where: str) -> str:
    value = row[key]
    if not isinstance(value, str) or not value.strip():
        raise KvsimError(f"{where}: {key!r} must be a non-empty string")
    return value


def _answers(value: Any, where: str) -> tuple[str, ...]:
    answers = [value] if isinstance(value, str) else value
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise KvsimError(f"{where}: 'answers' must be a non-empty string or a list of non-empty strings")
    return tuple(answers)
