"""The policy cache inside transformers on tiny random models: exactness with `full`, true RoPE
positions after eviction, memory held against the budget rule, stepwise and low-precision storage."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvsim.errors import KvsimError
from kvsim.live.cache import PolicyCache
from kvsim.policies.allocators.uniform import Uniform
from kvsim.policies.budget import Budget
from kvsim.policies.held import token_bytes
from kvsim.policies.lowbit import PackedTokens
from kvsim.policies.policy import Policy
from kvsim.policies.presets import PRESETS
from kvsim.policies.retention import fake_quantize, fake_quantize_channels
from kvsim.policies.schedules import PrefillOnce
from kvsim.policies.scorers.recency import Recency

PROMPT = 120


@pytest.fixture(scope="module")
def prompt_ids(tiny_model):
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, tiny_model.model.config.vocab_size, (1, PROMPT), generator=generator)


def greedy(model, ids, cache, steps=12):
    """Greedy tokens and each step's logits, by hand so both caches see identical calls."""
    logits = model(ids, past_key_values=cache).logits[0, -1:]
    tokens, rows = [int(logits[-1].argmax())], [logits]
    for _ in range(steps - 1):
        logits = model(torch.tensor([[tokens[-1]]]), past_key_values=cache).logits[0]
        tokens.append(int(logits[-1].argmax()))
        rows.append(logits)
    return tokens, torch.cat(rows)


@torch.inference_mode()
def test_full_policy_generates_exactly_like_plain_transformers(tiny_model, prompt_ids):
    model = tiny_model.model
    plain = model.generate(prompt_ids, max_new_tokens=12, do_sample=False, past_key_values=DynamicCache(config=model.config))
    cache = PolicyCache.for_model(PRESETS["full"], 0.1, model)
    with_policy = model.generate(prompt_ids, max_new_tokens=12, do_sample=False, past_key_values=cache)
    assert torch.equal(plain, with_policy)
    reference_tokens, reference_logits = greedy(model, prompt_ids, DynamicCache(config=model.config))
    tokens, logits = greedy(model, prompt_ids, PolicyCache.for_model(PRESETS["full"], 0.1, model))
    assert tokens == reference_tokens
    torch.testing.assert_close(logits, reference_logits, atol=2e-5, rtol=1e-4)


def masked_reference(model, ids, hidden, position_shift=0):
    """Logits of a full forward where every query after the prompt cannot see `hidden` prompt
    positions: what a cache that dropped them must produce if new tokens keep their true positions."""
    total = ids.shape[1]
    allowed = torch.ones(total, total, dtype=torch.bool).tril()
    allowed[PROMPT:, hidden] = False
    mask = torch.zeros(1, 1, total, total).masked_fill(~allowed, float("-inf"))
    positions = torch.arange(total)[None]
    positions[:, PROMPT:] -= position_shift
    return model(ids, attention_mask=mask, position_ids=positions).logits[0]


@torch.inference_mode()
def test_new_tokens_keep_their_true_rope_positions(tiny_model, prompt_ids):
    model = tiny_model.model
    model.set_attn_implementation("sdpa")
    # Recency with 4 sinks keeps the same tokens in every layer and head, so a 4D mask can express it.
    policy = Policy("sinks_and_recent", Recency(), Uniform(), PrefillOnce(sinks=4))
    budget = 40
    tokens, logits = greedy(model, prompt_ids, PolicyCache.for_model(policy, budget, model))
    hidden = torch.arange(4, PROMPT - (budget - 4))
    ids = torch.cat([prompt_ids, torch.tensor([tokens[:-1]])], dim=1)
    model.set_attn_implementation("sdpa")
    reference = masked_reference(model, ids, hidden)[PROMPT - 1 :]
    torch.testing.assert_close(logits, reference, atol=2e-5, rtol=1e-4)
    # The check can fail: renumbering the new tokens as if the cache were contiguous changes the logits.
    shifted = masked_reference(model, ids, hidden, position_shift=hidden.numel())[PROMPT:]
    assert (shifted - reference[1:]).abs().max() > 1e-3


@torch.inference_mode()
@pytest.mark.parametrize("preset", ["snapkv", "adakv", "pyramidkv", "razor"])
def test_memory_held_matches_the_budget_rule(tiny_model, prompt_ids, preset):
    model = tiny_model.model
    config = model.config
    budget = Budget(0.25)
    cache = PolicyCache.for_model(PRESETS[preset], budget, model)
    model(prompt_ids, past_key_values=cache)
    kv_heads = config.num_key_value_heads
    head_dim = tiny_model.shape.head_dim
    full, low = cache.held_tokens()
    assert low == 0
    assert full == budget.total(PROMPT, config.num_hidden_layers, kv_heads)
    assert full == int(cache.budgets.sum())
    for layer in range(config.num_hidden_layers):
        counts = [len(p) for p in cache.kept_positions(layer)]
        assert counts == cache.budgets[layer].tolist()
    # Each head holds exactly its own tokens (no padding), counted at the serving dtype (fp16, 2 bytes).
    assert cache.held_bytes() == full * 2 * head_dim * 2 == full * token_bytes(head_dim)


@torch.inference_mode()
def test_per_head_budgets_hold_no_more_bytes_than_uniform_ones(tiny_model, prompt_ids):
    model = tiny_model.model
    held = {}
    for preset in ("snapkv", "adakv", "razor"):
        cache = PolicyCache.for_model(PRESETS[preset], 0.25, model)
        model(prompt_ids, past_key_values=cache)
        held[preset] = cache.held_bytes()
    assert held["adakv"] == held["snapkv"] and held["razor"] == held["snapkv"]


@torch.inference_mode()
def test_every_step_schedules_hold_each_head_at_its_budget(tiny_model, prompt_ids):
    model = tiny_model.model
    cache = PolicyCache.for_model(PRESETS["h2o"], 48, model)
    tokens, _ = greedy(model, prompt_ids, cache, steps=6)
    assert cache.get_seq_length() == PROMPT + 5
    for layer in range(model.config.num_hidden_layers):
        kept = cache.kept_positions(layer)
        assert [len(p) for p in kept] == cache.budgets[layer].tolist()
        for positions in kept:  # the recent window is protected: the newest 32 positions are all held
            assert positions[-32:].tolist() == list(range(PROMPT + 5 - 32, PROMPT + 5))


@torch.inference_mode()
def test_lagged_schedules_evict_only_on_their_steps(tiny_model, prompt_ids):
    model = tiny_model.model
    cache = PolicyCache.for_model(PRESETS["lazy"], 48, model)  # every 16 steps
    greedy(model, prompt_ids, cache, steps=10)  # 9 decode tokens: no eviction yet
    assert [len(p) for p in cache.kept_positions(0)] == [48 + 9] * model.config.num_key_value_heads


@torch.inference_mode()
def test_low_precision_tokens_are_stored_packed(tiny_model, prompt_ids):
    model = tiny_model.model
    cache = PolicyCache.for_model(PRESETS["mikv"], 0.25, model)  # 2-bit retention of evicted tokens
    model(prompt_ids, past_key_values=cache)
    held = cache.layers[0].held
    kv_heads, head_dim = model.config.num_key_value_heads, held.full.keys.shape[-1]
    evicted = PROMPT - round(0.25 * PROMPT)
    assert held.low.keys.codes.shape == (kv_heads * evicted, head_dim // 4)
    assert cache.held_tokens() == (int(cache.budgets.sum()), evicted * kv_heads * model.config.num_hidden_layers)


@pytest.mark.parametrize("bits", range(1, 9))
def test_packed_tokens_read_back_the_simulators_low_precision_values(bits):
    x = torch.randn(2, 7, 10)
    packed = PackedTokens.pack(x, bits)
    torch.testing.assert_close(packed.unpack(), fake_quantize(x, bits), atol=0, rtol=0)
    per_byte = 8 // bits if 8 % bits == 0 else 1
    assert packed.codes.shape[-1] == -(-10 // per_byte)


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_per_channel_packed_keys_read_back_the_simulators_values_head_by_head(bits):
    """Ragged heads (37, 0 and 64 tokens) in groups of 32: a short last group, an empty head."""
    counts = [37, 0, 64]
    x = torch.randn(sum(counts), 10)
    packed = PackedTokens.pack_channels(x, bits, 32, counts)
    expected = torch.cat([fake_quantize_channels(rows, bits, 32) for rows in torch.split(x, counts)])
    torch.testing.assert_close(packed.unpack(), expected, atol=0, rtol=0)
    assert packed.scale.shape == (2 + 0 + 2, 10)  # one scale per channel per group


@torch.inference_mode()
def test_batches_are_refused_with_a_clear_error(tiny_model, prompt_ids):
    model = tiny_model.model
    with pytest.raises(KvsimError, match="batch size 1"):
        model(prompt_ids.repeat(2, 1), past_key_values=PolicyCache.for_model(PRESETS["snapkv"], 0.2, model))


@torch.inference_mode()
def test_prompts_shorter_than_the_budget_stay_whole(tiny_model, prompt_ids):
    model = tiny_model.model
    cache = PolicyCache.for_model(PRESETS["snapkv"], 500, model)
    model(prompt_ids, past_key_values=cache)
    assert not cache.compressed
    assert cache.held_tokens()[0] == PROMPT * model.config.num_key_value_heads * model.config.num_hidden_layers


@torch.inference_mode()
def test_kvsim_live_without_a_policy_cache_is_plain_causal_attention_even_in_chunks(tiny_model, prompt_ids):
    """A model left in kvsim_live mode still computes ordinary attention with a DynamicCache,
    including a forward of several tokens over a filled cache (queries at the last positions)."""
    model = tiny_model.model
    model.set_attn_implementation("sdpa")
    reference = model(prompt_ids).logits[0, -20:]
    PolicyCache.for_model(PRESETS["snapkv"], 0.2, model)  # switches the model to kvsim_live
    cache = DynamicCache(config=model.config)
    model(prompt_ids[:, :-20], past_key_values=cache)
    chunked = model(prompt_ids[:, -20:], past_key_values=cache).logits[0]
    torch.testing.assert_close(chunked, reference, atol=2e-5, rtol=1e-4)


@torch.inference_mode()
def test_padded_inputs_are_refused_not_silently_attended(tiny_model, prompt_ids):
    model = tiny_model.model
    padded = torch.ones_like(prompt_ids)
    padded[0, :3] = 0
    with pytest.raises(KvsimError, match="padding"):
        model(prompt_ids, attention_mask=padded, past_key_values=PolicyCache.for_model(PRESETS["snapkv"], 0.2, model))
    model(prompt_ids, attention_mask=torch.ones_like(prompt_ids), past_key_values=PolicyCache.for_model(PRESETS["snapkv"], 0.2, model))


def test_attention_refuses_keys_its_policy_cache_did_not_return(tiny_model):
    from types import SimpleNamespace

    from kvsim.live.attention import _attention, activate

    cache = PolicyCache.for_model(PRESETS["snapkv"], 0.2, tiny_model.model)
    query, keys = torch.zeros(1, 6, 1, 8), torch.zeros(1, 2, 4, 8)
    activate(cache, 0, keys)
    with pytest.raises(KvsimError, match="did not return"):
        _attention(SimpleNamespace(layer_idx=0), query, keys.clone(), keys.clone(), None)


@torch.inference_mode()
def test_lagged_schedules_read_a_block_per_eviction_like_token_by_token(tiny_model, prompt_ids):
    """Nothing is evicted between a lagged policy's steps, so `feed` reads up to the next eviction in
    one forward: same logits and same kept tokens as one token per forward (3 forwards, not 40)."""
    from kvsim.live.runner import feed

    model = tiny_model.model
    tokens = torch.randint(0, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    blocked, stepped = (PolicyCache.for_model(PRESETS["lazy"], 48, model) for _ in range(2))  # evicts every 16 tokens
    model(prompt_ids, past_key_values=blocked)
    model(prompt_ids, past_key_values=stepped)
    in_blocks = feed(model, blocked, tokens)
    one_by_one = torch.cat([model(tokens[None, i : i + 1], past_key_values=stepped).logits[0] for i in range(40)])
    torch.testing.assert_close(in_blocks, one_by_one, atol=1e-4, rtol=1e-4)
    for layer in range(model.config.num_hidden_layers):
        assert [p.tolist() for p in blocked.kept_positions(layer)] == [p.tolist() for p in stepped.kept_positions(layer)]
