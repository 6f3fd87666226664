"""A policy: scorer × allocator × schedule × retention, with its JSON spec."""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvsim.errors import KvsimError
from kvsim.paths import read_json
from kvsim.policies.allocators.base import Allocator
from kvsim.policies.parts import KINDS, part_from_spec
from kvsim.policies.retention import Drop, Retention
from kvsim.policies.schedules import PrefillOnce, Schedule
from kvsim.policies.scorers.base import Scorer

MAX_NAME_CHARS = 100


@dataclass(frozen=True)
class Policy:
    """One eviction policy. `name` labels it in results; the parts decide everything else."""

    name: str
    scorer: Scorer
    allocator: Allocator
    schedule: Schedule = field(default_factory=PrefillOnce)
    retention: Retention = field(default_factory=Drop)

    def to_spec(self) -> dict[str, Any]:
        return {"name": self.name, **{kind: getattr(self, kind).to_spec() for kind in KINDS}}

    def decision_key(self) -> str:
        """What the policy decides, without its name: equal keys make equal decisions, so results
        can be shared between two trials that drew the same composition."""
        spec = self.to_spec()
        return json.dumps({kind: spec[kind] for kind in KINDS}, sort_keys=True)

    @classmethod
    def from_spec(cls, spec: Any) -> Policy:
        if not isinstance(spec, dict):
            raise KvsimError(f"a policy spec must be a JSON object, got {type(spec).__name__}")
        unknown = set(spec) - {"name", *KINDS}
        if unknown:
            raise KvsimError(f"policy spec has unknown keys {sorted(unknown)}: use name, {', '.join(KINDS)}")
        missing = [kind for kind in ("scorer", "allocator") if kind not in spec]
        if missing:
            raise KvsimError(f"policy spec is missing {', '.join(missing)}")
        parts = {kind: part_from_spec(kind, spec[kind]) for kind in KINDS if kind in spec}
        return cls(name=checked_name(spec.get("name", "custom")), **parts)

    @property
    def observation_window(self) -> int:
        """How many recent queries the policy's parts read (0 when none)."""
        return max(getattr(getattr(self, kind), "window", 0) for kind in KINDS)

    def requirements(self) -> frozenset[str]:
        """Optional trace statistics the policy reads, named by their capture option (e.g. "kvzip")."""
        return self.scorer.requirements()

    def check_traces(self, n_layers: int, window: int, statistics: Collection[str] | None = None) -> None:
        """Refuse a TraceSet or model the policy cannot run on, with the fix in the message.

        statistics: the optional statistics the traces hold (`TraceSet.statistics`); None skips the check.
        """
        self.check_model(n_layers)
        missing = sorted(self.requirements() - set(statistics)) if statistics is not None else []
        if missing:
            options = " ".join(f"--{name}" for name in missing)
            raise KvsimError(f"policy {self.name!r} needs statistics the traces lack: capture them with `kvsim capture {options}`")
        if self.observation_window > window:
            raise KvsimError(
                f"policy {self.name!r} reads a {self.observation_window}-query observation window, but the "
                f"traces hold {window}: capture with --window {self.observation_window} or more"
            )

    def check_model(self, n_layers: int) -> None:
        """Parts sized for a model (a per-layer vector) must match the model evaluated."""
        expected = getattr(self.allocator, "n_layers", None)
        if expected is not None and expected != n_layers:
            raise KvsimError(
                f"policy {self.name!r} has a per-layer budget vector of length {expected}, "
                f"but the model has {n_layers} layers: search or write a vector of length {n_layers}"
            )


def checked_name(name: Any) -> str:
    """A policy name labels rows in tables, reports and terminals: printable text (no control
    characters or lone surrogates, which cannot be written as UTF-8)."""
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
        raise KvsimError(f"a policy name must be a string of 1 to {MAX_NAME_CHARS} characters")
    if not name.isprintable():
        raise KvsimError(f"policy name {name!r} has control or unencodable characters: use plain printable text")
    return name


def load_policy_spec(path: str | Path) -> Policy:
    spec = read_json(Path(path), "policy spec", "fix the file")
    return Policy.from_spec(spec.get("policy", spec) if isinstance(spec, dict) else spec)
