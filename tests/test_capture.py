"""Capture on tiny random models and the bundled model: every stored tensor against an independent
recomputation with plain transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvsim.traces.capture import CaptureSettings, capture_traceset
from kvsim.traces.store import MODES
from kvsim.traces.workloads import build_workload

WINDOW = 16


def passkey_samples(tokenizer, n=1, context_tokens=160, seed=0):
    count = lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    return build_workload("passkey", n, seed=seed, context_tokens=context_tokens, count_tokens=count)


def capture(loaded, tmp_path, samples, dtype="float32", max_new_tokens=6, modes=MODES):
    settings = CaptureSettings(window=WINDOW, max_new_tokens=max_new_tokens, storage_dtype=dtype, modes=modes)
    workload = {"spec": "passkey", "seed": 0}
    return capture_traceset(loaded, samples, tmp_path / "traces", settings, workload)


@pytest.fixture(scope="module")
def tiny_traces(tiny_any_model, tmp_path_factory):
    samples = passkey_samples(tiny_any_model.tokenizer)
    return tiny_any_model, capture(tiny_any_model, tmp_path_factory.mktemp(tiny_any_model.source.name), samples)


def plain_forward(model, ids, attn_implementation="sdpa"):
    """A forward with transformers' own attention and cache, recording each layer's attention inputs."""
    inputs = {}

    def keep_inputs(module, args, kwargs):
        inputs[module.layer_idx] = (kwargs["hidden_states"], kwargs["position_embeddings"])

    hooks = [layer.self_attn.register_forward_pre_hook(keep_inputs, with_kwargs=True) for layer in model.model.layers]
    model.set_attn_implementation(attn_implementation)
    cache = DynamicCache()  # every layer keeps every key (a sliding layer's own cache drops old ones)
    try:
        with torch.no_grad():
            out = model(input_ids=ids[None], past_key_values=cache, output_attentions=attn_implementation == "eager")
    finally:
        for hook in hooks:
            hook.remove()
        model.set_attn_implementation("sdpa")
    return out, cache, inputs


def recomputed_queries(attention, hidden_states, position_embeddings):
    heads_shape = (*hidden_states.shape[:-1], -1, attention.head_dim)
    if hasattr(attention, "qkv_proj"):  # Phi-3 projects queries, keys and values in one matmul, queries first
        q = attention.qkv_proj(hidden_states)[..., : attention.config.num_attention_heads * attention.head_dim]
    else:
        q = attention.q_proj(hidden_states)
    q = q.view(heads_shape).transpose(1, 2)
    if hasattr(attention, "q_norm"):
        q = attention.q_norm(q)
    cos, sin = position_embeddings
    q, _ = apply_rotary_pos_emb(q, q, cos, sin)
    return q[0]


def test_keys_values_and_queries_equal_a_plain_forward(tiny_traces):
    loaded, traceset = tiny_traces
    model = loaded.model
    for sample in traceset:
        ids = sample.input_ids
        _, cache, inputs = plain_forward(model, ids)
        start = sample.prompt_len - WINDOW
        for i, layer in enumerate(model.model.layers):
            trace = sample.layer(i)
            torch.testing.assert_close(trace.k, cache.layers[i].keys[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(trace.v, cache.layers[i].values[0], atol=1e-5, rtol=1e-4)
            with torch.no_grad():
                queries = recomputed_queries(layer.self_attn, *inputs[i])
            torch.testing.assert_close(trace.q, queries[:, start:], atol=1e-5, rtol=1e-4)


def test_column_statistics_equal_dense_attention(tiny_traces):
    loaded, traceset = tiny_traces
    for sample in traceset:
        prompt = sample.prompt_len
        ids = sample.input_ids[: sample.full_prompt_len]
        out, _, _ = plain_forward(loaded.model, ids, attn_implementation="eager")
        for i, attentions in enumerate(out.attentions):
            probs = attentions[0, :, :prompt, :prompt]
            trace = sample.layer(i)
            torch.testing.assert_close(trace.colsum, probs.sum(1), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(trace.colsq, probs.square().sum(1), atol=1e-5, rtol=1e-4)


def test_continuation_is_greedy_with_its_logprobs(tiny_traces):
    loaded, traceset = tiny_traces
    for sample in traceset:
        prompt_ids = sample.input_ids[: sample.full_prompt_len]
        with torch.no_grad():
            generated = loaded.model.generate(
                prompt_ids[None], max_new_tokens=sample.gen_len, min_new_tokens=sample.gen_len, do_sample=False
            )[0]
            logits = loaded.model(input_ids=sample.input_ids[None]).logits[0]
        assert torch.equal(generated, sample.input_ids)
        expected = torch.log_softmax(logits.float(), -1)[sample.prompt_len - 1 : -1]
        targets = sample.input_ids[sample.prompt_len :]
        token_logprobs = sample.tensors["continuation.token_logprobs"]
        torch.testing.assert_close(token_logprobs, expected.gather(1, targets[:, None])[:, 0], atol=1e-4, rtol=1e-4)
        top = expected.topk(traceset.meta["top_k"], dim=-1)
        torch.testing.assert_close(sample.tensors["continuation.topk_logprobs"], top.values, atol=1e-4, rtol=1e-4)


def test_both_modes_come_from_one_capture(tiny_traces):
    _, traceset = tiny_traces
    aware = traceset.sample("passkey-0000", "query-aware")
    agnostic = traceset.sample("passkey-0000", "query-agnostic")
    assert agnostic.prompt_len == aware.context_len < aware.prompt_len == aware.full_prompt_len
    assert torch.equal(aware.input_ids, agnostic.input_ids)
    # The question rows add attention mass in query-aware mode, never remove it.
    for i in range(traceset.n_layers):
        extra = aware.layer(i).colsum[:, : agnostic.prompt_len] - agnostic.layer(i).colsum
        assert extra.min() > -1e-5 and extra.sum() > 0
    continuation = aware.total_len - agnostic.prompt_len
    assert agnostic.layer(0).q.shape[1] == WINDOW + continuation


@pytest.mark.bundled
def test_bundled_model_keys_and_values_match_its_cache_within_fp16(bundled_model, tmp_path):
    samples = passkey_samples(bundled_model.tokenizer, context_tokens=300)
    traceset = capture(bundled_model, tmp_path, samples, dtype="float16", max_new_tokens=12, modes=("query-aware",))
    (sample,) = traceset
    _, cache, _ = plain_forward(bundled_model.model, sample.input_ids)
    for i in (0, 15, 29):
        trace = sample.layer(i)
        assert trace.k.dtype == torch.float16
        reference = cache.layers[i].keys[0]
        tolerance = 2e-3 * reference.abs().max()
        torch.testing.assert_close(trace.k.float(), reference, atol=tolerance, rtol=2e-3)
        torch.testing.assert_close(trace.v.float(), cache.layers[i].values[0], atol=tolerance, rtol=2e-3)
    # Every prompt row's probabilities sum to one, so each head's column sums add up to the row count.
    expected = torch.full((9,), float(sample.prompt_len))
    torch.testing.assert_close(sample.layer(0).colsum.sum(-1), expected, rtol=1e-4, atol=1e-2)
