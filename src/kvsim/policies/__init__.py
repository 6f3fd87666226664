"""Eviction policies as compositions of four registered parts, and the published presets."""

from kvsim.policies import allocators, retention, schedules, scorers  # noqa: F401  (registers the parts)
from kvsim.policies.budget import Budget
from kvsim.policies.parts import REGISTRY, part_from_spec
from kvsim.policies.policy import Policy, load_policy_spec
from kvsim.policies.presets import PRESETS, resolve_policies, resolve_policy
from kvsim.policies.view import CacheView

__all__ = ["PRESETS", "REGISTRY", "Budget", "CacheView", "Policy", "load_policy_spec", "part_from_spec", "resolve_policies", "resolve_policy"]
