"""The exported policy file: a policy spec, its budget, the model it was tuned for, and evidence.

Format (JSON, version 2; version 1 files, whose "model" held the layer and head counts directly,
still load):

    {"kvsim_export": 2,
     "policy": {...spec...},              the same spec `kvsim simulate --policy x.json` reads
     "budget": 0.1,                       fraction of the prompt, or an int token count
     "model": {"id", "config_hash", "shape": {...}},   the `ModelShape` it was tuned for
     "provenance": {"kvsim_version", "created", "traceset": {"path", "hash"} | null,
                    "study": str | null, "trial": int | null},
     "metrics": {"simulated": {...} | null, "validated": {...} | null}}

`kvsim.load_policy(path)` reads it back as a `TunedPolicy` that applies itself to a model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import kvsim
from kvsim.errors import KvsimError
from kvsim.paths import read_json, write_atomically
from kvsim.policies.budget import Budget
from kvsim.policies.policy import Policy
from kvsim.shape import ModelShape

EXPORT_VERSION = 2
READABLE_VERSIONS = (1, 2)


@dataclass
class ExportedModel:
    """The model a policy was tuned for: its shape (what the policy depends on) and, for provenance, which model."""

    id: str
    config_hash: str
    shape: ModelShape

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "config_hash": self.config_hash, "shape": self.shape.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExportedModel:
        return cls(data["id"], data["config_hash"], ModelShape.from_stored(data))

    def check(self, shape: ModelShape) -> None:
        """Refuse to apply a policy tuned for one architecture to another."""
        self.shape.check_same(shape, self.id)


@dataclass
class ExportedPolicy:
    policy: Policy
    budget: Budget
    model: ExportedModel
    provenance: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=lambda: {"simulated": None, "validated": None})

    def to_json(self) -> dict[str, Any]:
        return {
            "kvsim_export": EXPORT_VERSION,
            "policy": self.policy.to_spec(),
            "budget": self.budget.value,
            "model": self.model.to_json(),
            "provenance": {"kvsim_version": kvsim.__version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **self.provenance},
            "metrics": self.metrics,
        }

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        text = json.dumps(self.to_json(), indent=2) + "\n"
        write_atomically(path, lambda tmp: Path(tmp).write_text(text))
        return path

    @classmethod
    def read(cls, path: str | Path) -> ExportedPolicy:
        path = Path(path)
        data = read_json(path, "exported policy", "re-export it")
        if not isinstance(data, dict) or data.get("kvsim_export") not in READABLE_VERSIONS:
            raise KvsimError(f"{path} is not a kvsim export (version {EXPORT_VERSION}): write one with `kvsim export`")
        try:
            model = ExportedModel.from_json(data["model"])
            budget = Budget(data["budget"])
        except (KeyError, TypeError) as err:
            raise KvsimError(f"exported policy {path} is missing or has a malformed field ({err}): re-export it") from err
        return cls(Policy.from_spec(data["policy"]), budget, model, data.get("provenance", {}), data.get("metrics", {}))
