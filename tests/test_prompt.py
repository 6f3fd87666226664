"""Rendered prompts: recorded token spans point at the needles, the question and the filler."""

from kvsim.traces.prompt import render_prompt
from kvsim.traces.workloads import build_workload


def test_spans_hold_what_they_name(bundled_tokenizer):
    count = lambda text: len(bundled_tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    for sample in build_workload("passkey,multivalue,variable_tracking", 3, seed=5, context_tokens=600, count_tokens=count):
        prompt = render_prompt(sample, bundled_tokenizer)
        decode = lambda span: bundled_tokenizer.decode(prompt.input_ids[span[0] : span[1]])  # noqa: E731
        needles = " ".join(decode(span) for span in prompt.needle_spans)
        assert prompt.needle_spans and all(answer in needles for answer in sample.answers)
        assert all(prompt.question_span[1] <= prompt.prompt_len and span[1] <= prompt.context_end for span in prompt.needle_spans)
        question = decode(prompt.question_span)
        assert question.strip() == "".join(segment.text for segment in sample.question).strip()
        # Filler spans are haystack prose, never a needle.
        assert prompt.filler_spans and not any(answer in decode(span) for span in prompt.filler_spans for answer in sample.answers)
        # The chat template wraps the whole prompt; the answer prefix ends it.
        assert bundled_tokenizer.decode(prompt.input_ids).startswith("<|im_start|>")
        assert bundled_tokenizer.decode(prompt.input_ids).rstrip().endswith(sample.answer_prefix.strip())
