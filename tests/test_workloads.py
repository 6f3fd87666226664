"""Workloads: determinism, answers really present, exact lengths, real filler, scoring, inputs."""

from __future__ import annotations

import json
import re
import time
from collections import Counter

import pytest
from pydoc_data.topics import topics

from kvsim.errors import KvsimError
from kvsim.traces.workloads import DEFAULT_MIX, TASKS, Haystack, Segment, build_workload, score, tolerance

NEEDLE_TASKS = ("passkey", "multikey", "multivalue", "multiquery", "variable_tracking")
EVIDENCE_COUNT = {"passkey": 1, "multikey": 1, "multivalue": 4, "multiquery": 4, "variable_tracking": 5}
ALL_TASKS = ",".join(TASKS)


@pytest.fixture(scope="module")
def count_tokens(bundled_tokenizer):
    return lambda text: len(bundled_tokenizer(text, add_special_tokens=False).input_ids)


def context_length(sample, count_tokens) -> int:
    return sum(count_tokens(segment.text) for segment in sample.context)


# --- determinism --------------------------------------------------------------------------------


def test_same_seed_gives_identical_samples_and_other_seed_differs(count_tokens):
    first = build_workload(ALL_TASKS, 7, seed=3, context_tokens=1000, count_tokens=count_tokens)
    again = build_workload(ALL_TASKS, 7, seed=3, context_tokens=1000, count_tokens=count_tokens)
    other = build_workload(ALL_TASKS, 7, seed=4, context_tokens=1000, count_tokens=count_tokens)
    assert first == again
    for a, b in zip(first, other):
        assert a.sample_id == b.sample_id
        assert a.context != b.context
        assert a.answers != b.answers


def test_growing_a_workload_keeps_its_first_samples(count_tokens):
    small = build_workload("default", 3, seed=0, context_tokens=1000, count_tokens=count_tokens)
    large = build_workload("default", 6, seed=0, context_tokens=1000, count_tokens=count_tokens)
    assert large[:3] == small


# --- answers and evidence -----------------------------------------------------------------------


@pytest.mark.parametrize("task", NEEDLE_TASKS)
def test_every_answer_is_in_an_evidence_segment(task, count_tokens):
    for sample in build_workload(task, 4, seed=1, context_tokens=1000, count_tokens=count_tokens):
        evidence = sample.evidence()
        assert len(evidence) == EVIDENCE_COUNT[task]
        assert all(sample.context[i].kind == "needle" for i in evidence)
        for answer in sample.answers:
            assert any(answer in sample.context[i].text for i in evidence), (answer, sample.sample_id)
        others = [s.text for i, s in enumerate(sample.context) if i not in evidence]
        assert not any(answer in text for answer in sample.answers for text in others)


def test_multikey_has_three_distractors_about_other_keys(count_tokens):
    (sample,) = build_workload("multikey", 1, seed=2, context_tokens=1000, count_tokens=count_tokens)
    distractors = [s.text for s in sample.context if s.kind == "distractor"]
    assert len(distractors) == 3
    key = re.search(r"for (\S+) is:", sample.context[sample.evidence()[0]].text).group(1)
    assert key in sample.question[0].text
    assert not any(key in text for text in distractors)


def test_variable_tracking_chain_is_in_order_and_resolves_to_the_answers(count_tokens):
    for sample in build_workload("variable_tracking", 3, seed=5, context_tokens=1000, count_tokens=count_tokens):
        lines = [sample.context[i].text.strip() for i in sample.evidence()]
        names = list(sample.answers)
        value = re.fullmatch(r"VAR (\w{5}) = (\d{5})\.", lines[0]).group(2)
        assert lines[0] == f"VAR {names[0]} = {value}."
        assert lines[1:] == [f"VAR {new} = VAR {old}." for old, new in zip(names, names[1:])]
        assert len(set(names)) == 5 and all(re.fullmatch(r"[A-Z]{5}", name) for name in names)
        assert f"value {value}" in sample.question[0].text


def listed_words(sample) -> Counter:
    (text,) = [segment.text for segment in sample.context if segment.kind == "text"]
    return Counter(text.split())


def test_common_words_answers_are_the_ten_most_frequent(count_tokens):
    for sample in build_workload("common_words", 3, seed=0, context_tokens=2000, count_tokens=count_tokens):
        (text,) = [segment.text for segment in sample.context if segment.kind == "text"]
        entries = re.findall(r"(\d+)\. (\S+)", text)
        assert [int(number) for number, _ in entries] == list(range(1, len(entries) + 1))
        counts = Counter(word for _, word in entries)
        assert len(sample.answers) == 10
        least_common_answer = min(counts[word] for word in sample.answers)
        most_common_other = max(count for word, count in counts.items() if word not in sample.answers)
        assert least_common_answer > most_common_other


def test_frequent_words_answers_are_ranks_two_to_four(count_tokens):
    for sample in build_workload("frequent_words", 3, seed=0, context_tokens=2000, count_tokens=count_tokens):
        counts = listed_words(sample)
        assert counts["..."] > max(count for word, count in counts.items() if word != "...")
        ranked = [word for word, _ in counts.most_common() if word != "..."]
        assert set(ranked[:3]) == set(sample.answers)
        assert counts[ranked[2]] > counts[ranked[3]]
        assert all(re.fullmatch(r"[a-z]{6}", word) for word in ranked)


# --- segments and length ------------------------------------------------------------------------


@pytest.mark.parametrize("target", [1000, 2000])
@pytest.mark.parametrize("task", list(TASKS))
def test_context_length_is_within_tolerance(task, target, count_tokens):
    for sample in build_workload(task, 3, seed=7, context_tokens=target, count_tokens=count_tokens):
        assert abs(context_length(sample, count_tokens) - target) <= tolerance(target)
        assert sample.context[0].kind == "instruction" and sample.context[0].text.endswith("\n")
        assert [s.kind for s in sample.question] == ["question"]
        assert sample.question[0].text.startswith("\n")
        for previous, segment in zip(sample.context, sample.context[1:]):
            assert previous.text[-1].isspace() or segment.text[0].isspace(), (previous, segment)


def test_tolerance_is_two_percent_or_forty_tokens():
    assert tolerance(1000) == 40
    assert tolerance(10_000) == 200


def test_building_is_fast_with_a_real_tokenizer(bundled_tokenizer):
    fresh = lambda text: len(bundled_tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    Haystack.default()
    started = time.perf_counter()
    build_workload("default", 8, seed=11, context_tokens=2000, count_tokens=fresh)
    assert time.perf_counter() - started < 3.0


# --- haystack -----------------------------------------------------------------------------------


def test_filler_is_python_documentation_prose(count_tokens):
    # The haystack drops reStructuredText emphasis markers ("*name*"), so compare without them.
    docs = " ".join(" ".join(topics.values()).replace("*", "").split())
    haystack = Haystack.default()
    samples = build_workload("passkey,variable_tracking", 4, seed=9, context_tokens=1000, count_tokens=count_tokens)
    for sample in samples:
        filler = " ".join(s.text.strip() for s in sample.context if s.kind == "filler")
        found = [sentence for sentence in haystack.sentences if sentence in filler]
        assert sum(len(sentence) + 1 for sentence in found) >= 0.95 * len(filler)
        assert sum(sentence in docs for sentence in found) >= 0.8 * len(found)
        assert "grass is green" not in filler and "lorem" not in filler.lower()


def test_default_haystack_describes_itself():
    haystack = Haystack.default()
    assert haystack is Haystack.default()
    assert haystack.source.startswith("python-docs:3.")
    assert re.fullmatch(r"[0-9a-f]{64}", haystack.sha256)
    assert len(haystack.sentences) > 1000
    assert not any(">>>" in s or "::=" in s for s in haystack.sentences)
    vocabulary = haystack.vocabulary
    assert list(vocabulary) == sorted(set(vocabulary))
    assert all(word.isalpha() and word.islower() and 4 <= len(word) <= 10 for word in vocabulary)
    assert {"statement", "exception", "attribute"} <= set(vocabulary)


def test_draw_wraps_around_and_respects_the_budget(count_tokens):
    haystack = Haystack.default()
    last = len(haystack.sentences) - 1
    run = haystack.draw(last, 300, count_tokens)
    assert run[:2] == [haystack.sentences[last], haystack.sentences[0]]
    used = sum(count_tokens(" " + sentence) for sentence in run)
    assert 250 <= used <= 300


USER_NOUNS = (
    "garden river mountain window candle harbor lantern meadow orchard bridge valley forest castle "
    "village market kitchen library station blanket basket pencil thunder morning evening winter summer "
    "autumn spring island desert canyon glacier meadowlark sparrow falcon rabbit turtle dolphin whale "
    "salmon carrot potato tomato pepper lemon cherry orange melon peach plum grape violin guitar trumpet"
).split()


def write_user_prose(path, sentences: int) -> None:
    lines = [
        f"The {USER_NOUNS[i % len(USER_NOUNS)]} stood quietly beside the {USER_NOUNS[(i * 7 + 3) % len(USER_NOUNS)]} "
        f"while travellers talked about the {USER_NOUNS[(i * 11 + 5) % len(USER_NOUNS)]}."
        for i in range(sentences)
    ]
    path.write_text("\n\n".join(lines), encoding="utf-8")


def test_user_haystack_file_is_used_for_filler(tmp_path, count_tokens):
    path = tmp_path / "prose.txt"
    write_user_prose(path, 200)
    haystack = Haystack.from_file(path)
    assert haystack.source == f"file:{path}"
    (sample,) = build_workload("passkey", 1, seed=0, context_tokens=1000, count_tokens=count_tokens, haystack=haystack)
    filler = [s.text for s in sample.context if s.kind == "filler"]
    assert filler and all("travellers talked about" in text for text in filler)
    key = re.search(r"for (\S+) is:", sample.context[sample.evidence()[0]].text).group(1)
    assert all(word in USER_NOUNS for word in key.split("-"))


def test_unusable_haystack_files_are_rejected(tmp_path):
    short = tmp_path / "short.txt"
    write_user_prose(short, 5)
    with pytest.raises(KvsimError, match="only 5 usable prose sentences"):
        Haystack.from_file(short)
    with pytest.raises(KvsimError, match="does not exist"):
        Haystack.from_file(tmp_path / "missing.txt")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(KvsimError, match="not UTF-8"):
        Haystack.from_file(binary)


# --- depth --------------------------------------------------------------------------------------


def test_passkey_depth_varies_across_samples(count_tokens):
    positions = []
    for sample in build_workload("passkey", 8, seed=0, context_tokens=2000, count_tokens=count_tokens):
        (needle,) = sample.evidence()
        before = sum(count_tokens(s.text) for s in sample.context[1:needle])
        positions.append(before / context_length(sample, count_tokens))
    assert len({round(p, 2) for p in positions}) >= 5
    assert max(positions) - min(positions) > 0.4


# --- scoring ------------------------------------------------------------------------------------


def test_score_matches_ruler_string_matching():
    answers = ["1234567", "ALPHA", "beta", "9999999"]
    assert score("the numbers are 1234567 and alpha", answers, "all") == 0.5
    assert score("the numbers are 1234567 and alpha", answers, "any") == 1.0
    assert score("nothing here", answers, "any") == 0.0
    assert score("  BETA\x0c", ["beta"], "all") == 1.0
    assert score("line\x01one", ["line\none"], "all") == 1.0
    assert score("", ["x"], "all") == 0.0
    with pytest.raises(KvsimError, match="'all' or 'any'"):
        score("x", ["x"], "exact")


def test_segment_kind_is_checked():
    with pytest.raises(KvsimError, match="unknown segment kind 'prose'"):
        Segment("prose", "text")


# --- specs and errors ---------------------------------------------------------------------------


def test_mix_is_round_robin_with_unique_ids(count_tokens):
    samples = build_workload(
        "passkey, common_words,variable_tracking", 7, seed=0, context_tokens=1000, count_tokens=count_tokens
    )
    tasks = ["passkey", "common_words", "variable_tracking"]
    assert [s.task for s in samples] == [tasks[i % 3] for i in range(7)]
    assert [s.sample_id for s in samples] == [f"{tasks[i % 3]}-{i:04d}" for i in range(7)]
    default = build_workload("default", 3, seed=0, context_tokens=1000, count_tokens=count_tokens)
    assert tuple(s.task for s in default) == DEFAULT_MIX


def test_bad_specs_raise_helpful_errors(count_tokens):
    with pytest.raises(KvsimError, match=r"unknown workload 'foo': choose one of passkey, multikey.*\.jsonl"):
        build_workload("passkey,foo", 2, seed=0, context_tokens=1000, count_tokens=count_tokens)
    with pytest.raises(KvsimError, match="at least 1"):
        build_workload("passkey", 0, seed=0, context_tokens=1000, count_tokens=count_tokens)
    with pytest.raises(KvsimError, match="positive number of tokens"):
        build_workload("passkey", 1, seed=0, context_tokens=0, count_tokens=count_tokens)


@pytest.mark.parametrize("task", ["passkey", "multiquery", "common_words", "frequent_words"])
def test_too_small_context_names_a_minimum_that_works(task, count_tokens):
    with pytest.raises(KvsimError, match=r"too small for .* use context_tokens >= (\d+)") as error:
        build_workload(task, 1, seed=0, context_tokens=30, count_tokens=count_tokens)
    minimum = int(re.search(r">= (\d+)", str(error.value)).group(1))
    (sample,) = build_workload(task, 1, seed=0, context_tokens=minimum, count_tokens=count_tokens)
    assert abs(context_length(sample, count_tokens) - minimum) <= tolerance(minimum)


# --- user JSONL ---------------------------------------------------------------------------------


def write_jsonl(path, rows) -> None:
    path.write_text("\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows) + "\n")


def test_jsonl_rows_become_samples(tmp_path, count_tokens):
    path = tmp_path / "mine.jsonl"
    write_jsonl(
        path,
        [
            {"context": "Alice met Bob.", "question": "Who met Bob?", "answers": ["Alice"], "id": "q1"},
            "",
            {"prompt": "Say hi.", "answers": "hi", "scoring": "any"},
            {"context": "x", "question": "\ny?", "answers": ["a", "b"]},
        ],
    )
    samples = build_workload(str(path), 10, seed=0, context_tokens=5, count_tokens=count_tokens)
    assert [s.sample_id for s in samples] == ["q1", "jsonl-0001", "jsonl-0002"]
    first, prompt_only, third = samples
    assert first.task == "jsonl" and first.context == (Segment("text", "Alice met Bob."),)
    assert first.question == (Segment("question", "\nWho met Bob?"),)
    assert first.answers == ("Alice",) and first.scoring == "all" and first.answer_prefix == ""
    assert first.evidence() == ()
    assert prompt_only.question == () and prompt_only.answers == ("hi",) and prompt_only.scoring == "any"
    assert third.question[0].text == "\ny?"
    assert len(build_workload(str(path), 2, seed=0, context_tokens=5, count_tokens=count_tokens)) == 2


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"context": "c", "question": "q"', "not valid JSON"),
        ('{"context": "c", "question": "q"}', "'answers' must be"),
        ('{"context": "c", "answers": ["a"]}', "needs 'context' and 'question', or 'prompt'"),
        ('{"prompt": 3, "answers": ["a"]}', "'prompt' must be a non-empty string"),
        ('{"prompt": "p", "answers": ["a"], "scoring": "most"}', "use 'all' or 'any'"),
        ('["p"]', "expected a JSON object"),
        ('{"prompt": "p", "answers": ["a"], "id": "jsonl-0000"}', "used twice"),
    ],
)
def test_bad_jsonl_line_is_reported_with_its_number(tmp_path, bad_line, message, count_tokens):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, [{"prompt": "p", "answers": ["a"]}, "", bad_line])
    with pytest.raises(KvsimError, match=re.escape(f"{path} line 3: ") + ".*" + re.escape(message)):
        build_workload(str(path), 5, seed=0, context_tokens=5, count_tokens=count_tokens)


def test_missing_or_empty_jsonl_file(tmp_path, count_tokens):
    with pytest.raises(KvsimError, match="does not exist"):
        build_workload(str(tmp_path / "nope.jsonl"), 1, seed=0, context_tokens=5, count_tokens=count_tokens)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(KvsimError, match="has no rows"):
        build_workload(str(empty), 1, seed=0, context_tokens=5, count_tokens=count_tokens)
