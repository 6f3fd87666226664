"""Named presets reproducing published methods with their reference defaults.

Budgets are not part of a preset: every preset is evaluated at the budgets asked for, under the one
budget rule (kvsim.policies.budget). Defaults and sources: ../shared/reference/policies.md.
"""

from __future__ import annotations

from kvsim.errors import KvsimError
from kvsim.policies.allocators.uniform import Uniform
from kvsim.policies.policy import Policy, load_policy_spec
from kvsim.policies.schedules import PrefillOnce
from kvsim.policies.scorers.window_attention import WindowAttention

PRESETS: dict[str, Policy] = {
    policy.name: policy
    for policy in [
        # SnapKV reference LongBench configs: window 32, max pooling, kernel 7; window always kept.
        Policy("snapkv", WindowAttention(window=32, pool="max", kernel=7), Uniform(), PrefillOnce(recent=32)),
    ]
}


def resolve_policy(name_or_path: str) -> Policy:
    """A preset name or a path to a JSON spec."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    if name_or_path.endswith(".json"):
        return load_policy_spec(name_or_path)
    raise KvsimError(f"unknown policy {name_or_path!r}: choose a preset ({', '.join(PRESETS)}) or a .json spec")
