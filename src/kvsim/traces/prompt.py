"""Turn a workload sample into token ids with exact spans for its context, question and needles.

Each piece (chat-template text, every context segment, the question, the answer prefix) is
tokenized on its own and the ids are concatenated. That makes every span exact and puts a token
boundary at the end of the context, which query-agnostic evaluation needs: the compressed cache
ends there and the question is fed after it. Segments carry their own leading whitespace, so the
ids match what tokenizing the joined text gives except, rarely, at a piece boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from kvsim.traces.workloads import Sample

_SENTINEL = "\x00kvsim-user-message\x00"


@dataclass(frozen=True)
class RenderedPrompt:
    """Token ids of a prompt and the token spans ([start, end) pairs) of its parts.

    Tokens [0, context_end) are the part query-agnostic mode compresses (chat-template head plus
    the context); the full prompt, compressed in query-aware mode, adds the question, the template's
    tail and the answer prefix.
    """

    input_ids: list[int]
    context_end: int
    needle_spans: list[tuple[int, int]] = field(default_factory=list)
    filler_spans: list[tuple[int, int]] = field(default_factory=list)
    question_span: tuple[int, int] = (0, 0)

    @property
    def prompt_len(self) -> int:
        return len(self.input_ids)


def render_prompt(sample: Sample, tokenizer: PreTrainedTokenizerBase) -> RenderedPrompt:
    """Lay out `sample` in the model's chat template (when it has one) and tokenize piece by piece."""
    head, tail = template_parts(tokenizer)
    ids = encode(tokenizer, head)
    evidence = set(sample.evidence())
    needle_spans, filler_spans = [], []
    for index, segment in enumerate(sample.context):
        span = _append(ids, encode(tokenizer, segment.text))
        if index in evidence:
            needle_spans.append(span)
        elif segment.kind == "filler":
            filler_spans.append(span)
    context_end = len(ids)
    question_start = len(ids)
    for segment in sample.question:
        _append(ids, encode(tokenizer, segment.text))
    question_span = (question_start, len(ids))
    ids += encode(tokenizer, tail)
    prefix = sample.answer_prefix.lstrip() if tail.endswith("\n") else sample.answer_prefix
    ids += encode(tokenizer, prefix)
    return RenderedPrompt(ids, context_end, needle_spans, filler_spans, question_span)


def template_parts(tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """The chat template's text before and after one user message (with the generation prompt).

    Without a template the prompt starts with BOS when the tokenizer normally adds one.
    """
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": _SENTINEL}], add_generation_prompt=True, tokenize=False
        )
        head, tail = text.split(_SENTINEL)
        return head, tail
    bos = tokenizer.bos_token if tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id] else ""
    return bos or "", "\n"


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of one piece of a prompt, without special tokens (the template supplies them)."""
    return tokenizer(text, add_special_tokens=False).input_ids if text else []


def _append(ids: list[int], piece: list[int]) -> tuple[int, int]:
    start = len(ids)
    ids += piece
    return start, len(ids)
