"""kvsim's methods keep the tokens kvpress keeps: the same press and policy, on the same tiny random
llama and qwen2 models and prompt at the same compression, per layer and KV head.

kvpress compresses to n_kept = ⌊n · (1 − ratio)⌋ tokens per head; kvsim is given that count as its
budget. Where kvsim deviates on purpose the test names the deviation and bounds it.
"""

from __future__ import annotations

import pytest
import torch

# kvpress caps transformers below 5.3: these run in .venv-kvpress (`make test-kvpress`).
pytestmark = pytest.mark.kvpress
kvpress = pytest.importorskip("kvpress")

from kvpress_helpers import agreement, kvpress_kept, kvsim_kept  # noqa: E402

from kvsim.policies import PRESETS, Policy  # noqa: E402
from kvsim.policies.allocators.head_adaptive import HeadAdaptive  # noqa: E402
from kvsim.policies.allocators.uniform import Uniform  # noqa: E402
from kvsim.policies.budget import Budget  # noqa: E402
from kvsim.policies.schedules import PrefillOnce  # noqa: E402
from kvsim.policies.scorers.expected_attention import ExpectedAttention  # noqa: E402
from kvsim.policies.scorers.key_diff import KeyDiff  # noqa: E402
from kvsim.policies.scorers.lag_kv import LagKV  # noqa: E402
from kvsim.policies.scorers.last_query import LastQuery  # noqa: E402
from kvsim.policies.scorers.window_attention import WindowAttention  # noqa: E402
from kvsim.traces.prompt import template_parts  # noqa: E402

LENGTH, RATIO = 96, 0.5
KEPT = int(LENGTH * (1 - RATIO))
SINKS = 4

# name: (kvpress press, the kvsim policy that should keep the same tokens)
IDENTICAL = {
    "knorm": lambda: (kvpress.KnormPress(RATIO), PRESETS["knorm"]),
    "keydiff": lambda: (kvpress.KeyDiffPress(RATIO), PRESETS["keydiff"]),
    "streaming_llm": lambda: (kvpress.StreamingLLMPress(RATIO, n_sink=SINKS), PRESETS["streaming_llm"]),
    # kvpress's TOVA always keeps the newest token (the TOVA paper does not), hence recent=1.
    "tova": lambda: (kvpress.TOVAPress(RATIO), Policy("tova", LastQuery(), Uniform(), PrefillOnce(recent=1))),
    # kvpress reads every prompt query after the sinks: a window of LENGTH − SINKS is the same.
    "expected_attention": lambda: (
        kvpress.ExpectedAttentionPress(RATIO, n_sink=SINKS),
        Policy("ea", ExpectedAttention(window=LENGTH - SINKS, sinks=SINKS), Uniform()),
    ),
    "expected_attention_mean_only": lambda: (
        kvpress.ExpectedAttentionPress(RATIO, use_covariance=False, use_vnorm=False),
        Policy("ea", ExpectedAttention(window=LENGTH - SINKS, covariance=False, value_norm=False), Uniform()),
    ),
    "lagkv": lambda: (kvpress.LagKVPress(RATIO, n_sink=SINKS, lag_size=16), Policy("lagkv", LagKV(sinks=SINKS, lag=16), Uniform())),
    "chunkkv_keydiff": lambda: (
        kvpress.ChunkKVPress(kvpress.KeyDiffPress(RATIO), chunk_length=8),
        Policy("chunkkv", KeyDiff(pool="chunk", kernel=8), Uniform()),
    ),
    "kvzip": lambda: (kvpress.KVzipPress(RATIO, n_sink=SINKS), PRESETS["kvzip"]),
}


@pytest.fixture(scope="module")
def model_and_prompt(tiny_model, tmp_path_factory):
    """A tiny model whose config names a folder holding its tokenizer (KVzipPress loads it from
    there), and a prompt: the chat template's head, then random tokens."""
    folder = tmp_path_factory.mktemp("tokenizer")
    tiny_model.tokenizer.save_pretrained(folder)
    tiny_model.model.config._name_or_path = str(folder)
    head = tiny_model.tokenizer(template_parts(tiny_model.tokenizer)[0], add_special_tokens=False).input_ids
    generator = torch.Generator().manual_seed(1)
    ids = torch.tensor([head + torch.randint(100, 40000, (LENGTH - len(head),), generator=generator).tolist()])
    return tiny_model, ids


@pytest.mark.parametrize("method", sorted(IDENTICAL))
def test_kvsim_keeps_exactly_what_kvpress_keeps(model_and_prompt, method):
    loaded, ids = model_and_prompt
    press, policy = IDENTICAL[method]()
    theirs = kvpress_kept(loaded, press, ids)
    ours = kvsim_kept(loaded, policy, Budget(KEPT), ids, kvzip=method == "kvzip")
    for layer, (our_heads, their_heads) in enumerate(zip(ours, theirs)):
        for head, (our, their) in enumerate(zip(our_heads, their_heads)):
            assert torch.equal(our, their), (method, layer, head)


def test_snapkv_differs_only_by_pooling_across_the_window_boundary(model_and_prompt):
    """Deviation: kvpress pools the prefix before the window on its own (zero padding at its end);
    kvsim pools the whole row, so only the kernel // 2 tokens before the window score differently,
    and each can swap places with at most one other token: per head, at most kernel // 2 differ."""
    loaded, ids = model_and_prompt
    window, kernel = 16, 5
    theirs = kvpress_kept(loaded, kvpress.SnapKVPress(RATIO, window_size=window, kernel_size=kernel), ids)
    policy = Policy("snapkv", WindowAttention(window=window, pool="avg", kernel=kernel), Uniform(), PrefillOnce(recent=window))
    ours = kvsim_kept(loaded, policy, Budget(KEPT), ids)
    for our_heads, their_heads in zip(ours, theirs):
        for our, their in zip(our_heads, their_heads):
            assert len(set(our.tolist()) - set(their.tolist())) <= kernel // 2
    assert agreement(ours, theirs) > 0.95


def test_adakv_differs_only_in_head_budgets(model_and_prompt):
    """Deviation: kvsim's head_adaptive follows Ada-KV's reference budget rule (B_h = (1 − α)·c_h
    + α·b); kvpress's AdaKVPress first reserves each head's top α·n_kept and then competes. Both
    rank each head's tokens by the same scores, so per head one kept set contains the other, and
    each layer keeps the same total."""
    loaded, ids = model_and_prompt
    theirs = kvpress_kept(loaded, kvpress.AdaKVPress(kvpress.ExpectedAttentionPress(RATIO), alpha_safeguard=0.2), ids)
    policy = Policy("adakv_ea", ExpectedAttention(window=LENGTH - SINKS), HeadAdaptive(alpha=0.2))
    ours = kvsim_kept(loaded, policy, Budget(KEPT), ids)
    for our_heads, their_heads in zip(ours, theirs):
        assert sum(h.numel() for h in our_heads) == sum(h.numel() for h in their_heads)
        for our, their in zip(our_heads, their_heads):
            small, large = sorted([set(our.tolist()), set(their.tolist())], key=len)
            assert small <= large
