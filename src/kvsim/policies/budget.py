"""The one budget rule every part of kvsim uses.

A budget is either a fraction of the compressed prompt's length (`0 < b <= 1`) or a token count
(`b >= 1` given as an int). It means: on average, each layer and KV head keeps
`per_head = round(b * prompt_len)` (or `b`) of the prompt's tokens, sinks and recent window
included, so the whole cache holds exactly `n_layers * kv_heads * per_head` prompt tokens after
compression. Allocators may move tokens between layers and heads but never change that total
(the one exception is `all_tokens`, the allocator of the `full` reference preset, which keeps all).
Tokens generated after the prompt are not part of the budget for prefill-once schedules (the
cache grows as in SnapKV); every-step schedules hold each head at its budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvsim.errors import KvsimError


@dataclass(frozen=True)
class Budget:
    value: float

    def __post_init__(self) -> None:
        if isinstance(self.value, bool) or not isinstance(self.value, int | float):
            raise KvsimError(f"budget {self.value!r} is not a number: give a fraction in (0, 1] or a token count")
        if isinstance(self.value, float) and not 0 < self.value <= 1:
            raise KvsimError(f"budget {self.value} is outside (0, 1]: give a fraction of the prompt or an integer token count")
        if isinstance(self.value, int) and self.value < 1:
            raise KvsimError(f"budget {self.value} tokens is below 1: keep at least one token per head")

    @classmethod
    def parse(cls, text: str) -> Budget:
        """'0.1' -> a fraction, '256' -> 256 tokens."""
        try:
            return cls(int(text)) if text.strip().isdigit() else cls(float(text))
        except ValueError:
            raise KvsimError(f"budget {text!r} is not a number: give a fraction like 0.1 or a token count like 256") from None

    @property
    def label(self) -> str:
        return f"{self.value:g}" if isinstance(self.value, float) else f"{self.value}tok"

    def per_head(self, prompt_len: int) -> int:
        """Average prompt tokens kept per layer and KV head."""
        if isinstance(self.value, int):
            if self.value > prompt_len:
                raise KvsimError(
                    f"budget {self.value} tokens is above the prompt length {prompt_len}: lower the budget"
                )
            return self.value
        return max(1, round(self.value * prompt_len))

    def total(self, prompt_len: int, n_layers: int, kv_heads: int) -> int:
        return self.per_head(prompt_len) * n_layers * kv_heads
