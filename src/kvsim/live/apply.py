"""Use a tuned policy in your own code:

    policy = kvsim.load_policy("winner.json")
    with policy.apply(model):
        model.generate(...)

or `model.generate(..., past_key_values=policy.cache(model))` without the context manager.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from transformers import PreTrainedModel

from kvsim.live.attention import ATTENTION_NAME
from kvsim.live.cache import PolicyCache
from kvsim.live.export import ExportedPolicy
from kvsim.shape import ModelShape


class TunedPolicy:
    """An exported policy and budget, checked against each model it is applied to."""

    def __init__(self, exported: ExportedPolicy) -> None:
        self.exported = exported
        self.policy = exported.policy
        self.budget = exported.budget

    def check(self, model: PreTrainedModel) -> None:
        self.exported.model.check(ModelShape.from_config(model.config))

    def cache(self, model: PreTrainedModel) -> PolicyCache:
        """A fresh cache for one generation (switches the model's attention to `kvsim_live`)."""
        self.check(model)
        return PolicyCache.for_model(self.policy, self.budget, model)

    @contextmanager
    def apply(self, model: PreTrainedModel) -> Iterator[PreTrainedModel]:
        """Inside the block, every `generate` and every forward without a cache runs with a new policy cache."""
        self.check(model)
        previous = model.config._attn_implementation
        plain_generate = model.generate

        def generate(*args, **kwargs):
            if kwargs.get("past_key_values") is None:
                kwargs["past_key_values"] = self.cache(model)
            return plain_generate(*args, **kwargs)

        def add_cache(module, args, kwargs):
            if kwargs.get("past_key_values") is None and kwargs.get("use_cache") is not False:
                kwargs["past_key_values"] = self.cache(model)
            return args, kwargs

        model.generate = generate
        hook = model.register_forward_pre_hook(add_cache, with_kwargs=True)
        model.set_attn_implementation(ATTENTION_NAME)
        try:
            yield model
        finally:
            hook.remove()
            del model.generate
            model.set_attn_implementation(previous)


def load_policy(path: str | Path) -> TunedPolicy:
    """Read a file written by `kvsim export`."""
    return TunedPolicy(ExportedPolicy.read(path))
