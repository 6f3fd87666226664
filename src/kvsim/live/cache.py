"""`PolicyCache`: a transformers cache that applies a kvsim policy while the model runs.

The cache decides once, at the end of the first forward (the prefill: the whole prompt, or the
context alone in query-agnostic evaluation), for every layer together, with the simulator's code
(`kvsim.policies.compress`), then keeps each layer at its decision; every-step and lagged schedules
re-select on their steps. Attention reads the cache through the registered attention function
`kvsim_live` (see `kvsim.live.attention`), which knows the padded per-head layout.
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
from kvsim.policies.policy import Policy
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
    ) -> None:
        if policy is not None:
            policy.check_model(len(shape.policy_layers))
        # Sliding layers keep their window by construction; the policy decides on the others.
        super().__init__(layers=[
            PolicyLayer(index, self) if size is None else SlidingLayer(index, size, row_splits)
            for index, size in enumerate(shape.windows)
        ])
        self.shape = shape
        self.policy = policy
        self.budget = budget if isinstance(budget, Budget) else Budget(budget)
        self.row_splits = tuple(row_splits)
        # One query is kept even when the policy reads none, so stepwise rescoring views have a position.
        self.window = window or max(policy.observation_window if policy else 0, 1)
        self.decided = False
        self.budgets: torch.Tensor | None = None  # [n_layers, kv_heads] tokens per head, once compressed
        self.scaling = 1.0

    @classmethod
    def recording(cls, model: PreTrainedModel, window: int, row_splits: Sequence[int] = ()) -> PolicyCache:
        """A cache that records the prefill for `with_policy` and decides nothing itself."""
        return cls.for_model(None, 1.0, model, window=window, row_splits=row_splits)

    @classmethod
    def for_model(cls, policy: Policy | None, budget: Budget | float | int, model: PreTrainedModel, **kwargs) -> PolicyCache:
        """A cache for `model`, whose attention is switched to `kvsim_live` (plain SDPA without a policy cache)."""
        if model.config._attn_implementation != ATTENTION_NAME:
            model.set_attn_implementation(ATTENTION_NAME)
        return cls(policy, budget, ModelShape.from_config(model.config), **kwargs)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        # transformers 5.2 passes cache_kwargs, 5.3+ keyword `kwargs`: both go on to the layer, which ignores them.
        activate(self)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def with_policy(self, policy: Policy, budget: Budget | float | int) -> PolicyCache:
        """A new cache deciding with `policy` on this recording cache's prefill, without running it again."""
        if self.policy is not None or self.layers[0].get_seq_length() == 0:
            raise KvsimError("with_policy needs a recording cache (PolicyCache.recording) that has run a prefill")
        if policy.observation_window > self.window:
            raise KvsimError(f"policy {policy.name!r} reads {policy.observation_window} queries but {self.window} were recorded")
        cache = PolicyCache(policy, budget, self.shape, window=max(policy.observation_window, 1), row_splits=self.row_splits)
        for layer, recorded in zip(cache.layers, self.layers):
            layer.adopt_prefill(recorded)
        cache.decide()
        return cache

    def decide(self) -> None:
        """Compress every layer at the end of the prefill (called by the last layer's attention)."""
        if self.policy is None or not self.shape.policy_layers:
            self.decided = self.policy is not None
            return
        layers = [self.layers[index] for index in self.shape.policy_layers]
        views = [layer.prefill_view for layer in layers]
        prompt = views[0].length
        self.scaling = views[0].scaling
        self.decided = True
        if not self._compressible(prompt):
            for layer in layers:
                layer.prefill_view = None
            return
        keeps, budgets = compress_prefill(self.policy, views, self.budget, prompt)
        self.budgets = budgets.new_zeros(len(self.layers), budgets.shape[1])  # sliding layers' rows stay 0
        self.budgets[list(self.shape.policy_layers)] = budgets
        for layer, view, keep in zip(layers, views, keeps):
            layer.shrink(view, keep, ~keep)

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
        return sum(layer.held_bytes()[0] for layer in self.layers)

    def padding_bytes(self) -> int:
        return sum(layer.held_bytes()[1] for layer in self.layers)

    def held_tokens(self) -> tuple[int, int]:
        """(full-precision, low-precision) tokens over all layers and KV heads."""
        counts = [layer.held_tokens() for layer in self.layers]
        return sum(full for full, _ in counts), sum(low for _, low in counts)

    def kept_positions(self, layer: int) -> list[torch.Tensor]:
        """Per KV head, the sorted positions held at full precision in `layer`."""
        positions = self.layers[layer].positions
        return [row[row >= 0].sort().values for row in positions]
