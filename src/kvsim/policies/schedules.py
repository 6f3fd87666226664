"""When eviction runs, and which tokens it never evicts (sinks and the recent window).

- `prefill`: once, at the end of the prompt; the cache then grows by one token per generated
  token (SnapKV, PyramidKV, Ada-KV, CAKE's prefill).
- `every_step`: after the prompt and after every generated token, each head is brought back to
  its budget (H2O, TOVA, StreamingLLM, D2O's decode phase).
- `lagged`: like every_step but only every `interval` tokens, evicting down to the budget in one
  go, so tokens that go quiet for a while survive (LazyEviction's lag).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from kvsim.policies.parts import Part, check, register


@dataclass(frozen=True)
class Schedule(Part):
    kind: ClassVar[str] = "schedule"
    sinks: int = 0
    recent: int = 0

    @property
    def interval(self) -> int | None:
        """Decode steps between evictions; None for prefill-once."""
        raise NotImplementedError

    def validate(self) -> None:
        check(self.sinks >= 0, self, f"sinks must be >= 0, got {self.sinks}")
        check(self.recent >= 0, self, f"recent must be >= 0, got {self.recent}")

    @classmethod
    def suggest(cls, trial, prefix: str) -> Schedule:
        return cls(
            sinks=trial.suggest_categorical(f"{prefix}sinks", [0, 1, 4, 16]),
            # 1: PrefixKV's protected last token
            recent=trial.suggest_categorical(f"{prefix}recent", [0, 1, 8, 16, 32, 64]),
        )


@register
@dataclass(frozen=True)
class PrefillOnce(Schedule):
    name = "prefill"

    @property
    def interval(self) -> int | None:
        return None


@register
@dataclass(frozen=True)
class EveryStep(Schedule):
    name = "every_step"

    @property
    def interval(self) -> int | None:
        return 1


@register
@dataclass(frozen=True)
class Lagged(Schedule):
    name = "lagged"
    every: int = 16

    @property
    def interval(self) -> int | None:
        return self.every

    def validate(self) -> None:
        super().validate()
        check(self.every >= 1, self, f"every must be >= 1, got {self.every}")

    @classmethod
    def suggest(cls, trial, prefix: str) -> Lagged:
        return replace(super().suggest(trial, prefix), every=trial.suggest_int(f"{prefix}every", 2, 64, log=True))
