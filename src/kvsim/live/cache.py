"""`PolicyCache`: a transformers cache that applies a kvsim policy while the model runs.

The cache decides once, at the end of the first forward (the prefill: the whole prompt, or the
context alone in query-agnostic evaluation), for every layer together, with the simulator's code
(`kvsim.policies.compress`), then hands each layer a `HeldLayer` (`kvsim.policies.held`), the
decode engine the simulator runs too: it stores each head's tokens without padding and re-selects
on the schedule's steps. Attention reads the cache through the registered attention function
`kvsim_live` (see `kvsim.live.attention`), which asks the cache to decide after the last layer.
Sliding-window layers (`kvsim.live.sliding`) keep their window by construction and take no part in
the decision: the policy's layers are the model's full-attention layers (`ModelShape.policy_layers`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from kvsim.errors import KvsimError
from kvsim.live.attention import ATTENTION_NAME, activate
from kvsim.live.layer import PolicyLayer
from kvsim.live.sliding import SlidingLayer
from kvsim.policies.budget import Budget
from kvsim.policies.compress import compress_prefill
from kvsim.policies.held import HeldLayer
from kvsim.policies.policy import Policy
from kvsim.policies.rope import Rotary
from kvsim.shape import ModelShape


class PolicyCache(Cache):
    """The KV cache of one generation under `policy` at `budget`.

    policy None makes a recording cache: it runs the prefill, keeps what any policy needs to decide,
    and hands it to `with_policy`, so many policies are compared on one prefill forward.
    window: queries kept for decisions (default: what the policy reads).
    row_splits: prompt rows where the column statistics are cut into separately summed groups,
        the way capture sums them; only validation against traces needs it (bit-identical
        statistics make bit-identical decisions).
    """

    def __init__(
        self,
        policy: Policy | None,
        budget: Budget | float | int,
        shape: ModelShape,
        *,
        window: int | None = None,
        row_splits: Sequence[int] = (),
        rope: Rotary | None = None,
    ) -> None:
        if policy is not None:
            policy.check_model(len(shape.policy_layers))
        # One query is kept even when the policy reads none, so stepwise rescoring views have a position.
        self.window = window or max(policy.observation_window if policy else 0, 1)
        self.row_splits = tuple(row_splits)
        self.rope = rope  # the model's RoPE, for scorers that rotate queries
        self.shape = shape
        super().__init__(layers=[
            PolicyLayer(index, shape.n_layers, self.window, self.row_splits, rope) if size is None
            else SlidingLayer(index, size, self.row_splits)
            for index, size in enumerate(shape.windows)
        ])
        self.policy = policy
        self.budget = budget if isinstance(budget, Budget) else Budget(budget)
        self.decided = False
        self.budgets: torch.Tensor | None = None  # [policy layers, kv_heads] tokens per head, once compressed
        self.peak_prefill_bytes = 0

    @classmethod
    def recording(cls, model: PreTrainedModel, window: int, row_splits: Sequence[int] = ()) -> PolicyCache:
        """A cache that records the prefill for `with_policy` and decides nothing itself."""
        return cls.for_model(None, 1.0, model, window=window, row_splits=row_splits)

    @classmethod
    def for_model(cls, policy: Policy | None, budget: Budget | float | int, model: PreTrainedModel, **kwargs) -> PolicyCache:
        """A cache for `model`, whose attention is switched to `kvsim_live` (plain SDPA without a policy cache)."""
        if model.config._attn_implementation != ATTENTION_NAME:
            model.set_attn_implementation(ATTENTION_NAME)
        return cls(policy, budget, ModelShape.from_config(model.config), rope=Rotary.from_model(model), **kwargs)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        # transformers 5.2 passes cache_kwargs, 5.3+ keyword `kwargs`: both go on to the layer, which ignores them.
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        activate(self, layer_idx, keys)
        return keys, values

    def set_reconstruction(self, scores: Sequence[torch.Tensor]) -> None:
        """KVzip's per-layer [heads, prefix] scores (`kvsim.traces.kvzip`), given before the prefill
        when a policy reads them; each layer puts its own into its prefill view."""
        for layer, layer_scores in zip(self.layers, scores):
            layer.reconstruction = layer_scores

    def after_attention(self, layer_idx: int) -> None:
        """Called by the attention function after each layer: the last layer's prefill triggers the decision."""
        last = self._last_policy_layer()
        if not self.decided and last is not None and layer_idx == last.index and last.prefill_view is not None:
            self.peak_prefill_bytes = sum(layer.prefill_bytes() for layer in self.layers)
            self.decide()

    def with_policy(self, policy: Policy, budget: Budget | float | int) -> PolicyCache:
        """A new cache deciding with `policy` on this recording cache's prefill, without running it again."""
        last = self._last_policy_layer()
        if self.policy is not None or self.layers[0].get_seq_length() == 0 or (last is not None and last.prefill_view is None):
            raise KvsimError("with_policy needs a recording cache (PolicyCache.recording) that has run a prefill")
        if policy.observation_window > self.window:
            raise KvsimError(f"policy {policy.name!r} reads {policy.observation_window} queries but {self.window} were recorded")
        cache = PolicyCache(
            policy, budget, self.shape, window=max(policy.observation_window, 1), row_splits=self.row_splits, rope=self.rope
        )
        for layer, recorded in zip(cache.layers, self.layers):
            layer.adopt_prefill(recorded)
        cache.decide()
        return cache

    def decide(self) -> None:
        """Compress every layer at the end of the prefill; a recording cache (no policy) keeps its views."""
        if self.policy is None or not self.shape.policy_layers:
            self.decided = self.policy is not None
            return
        layers = [self.layers[index] for index in self.shape.policy_layers]
        views = [layer.prefill_view for layer in layers]
        prompt = views[0].length
        self.decided = True
        if self._compressible(prompt):
            keeps, self.budgets = compress_prefill(self.policy, views, self.budget, prompt)
        else:
            keeps = [torch.ones(view.kv_heads, view.length, dtype=torch.bool) for view in views]
        budgets = self.budgets if self.budgets is not None else [None] * len(views)
        for layer, view, keep, layer_budgets in zip(layers, views, keeps, budgets):
            layer.hold(HeldLayer.after_prefill(self.policy, view, keep, layer_budgets, self.window, layer.dtype))

    def tokens_until_eviction(self) -> int | None:
        """How many tokens can be fed before the next decode-time eviction (every layer keeps the
        same count), or None when the cache never evicts while decoding."""
        last = self._last_policy_layer()
        held = None if last is None else last.held
        if held is None or not held.stepwise:
            return None
        interval = self.policy.schedule.interval
        return interval - held.rows_since_decision % interval

    def _last_policy_layer(self) -> PolicyLayer | None:
        """The last full-attention layer: its prefill completes what the decision needs (None if every layer slides)."""
        return self.layers[self.shape.policy_layers[-1]] if self.shape.policy_layers else None

    @property
    def compressed(self) -> bool:
        """Whether the prefill decision shrank the cache (short prompts stay whole)."""
        return self.budgets is not None

    def _compressible(self, prompt: int) -> bool:
        """Prompts no longer than the budget, or shorter than the policy's observation window, stay whole."""
        if isinstance(self.budget.value, int) and self.budget.value >= prompt:
            return False
        return prompt >= self.policy.observation_window

    # --- what is held ---------------------------------------------------------------------------

    def held_bytes(self) -> int:
        """Bytes of keys and values held, at the serving dtype (`kvsim.policies.held.kv_bytes`)."""
        return sum(layer.held_bytes() for layer in self.layers)

    def held_tokens(self) -> tuple[int, int]:
        """(full-precision, low-precision) tokens over all layers and KV heads."""
        counts = [layer.held_tokens() for layer in self.layers]
        return sum(full for full, _ in counts), sum(low for _, low in counts)

    def kept_positions(self, layer: int) -> list[torch.Tensor]:
        """Per KV head, the sorted positions held at full precision in `layer`."""
        return self.layers[layer].kept_positions()
