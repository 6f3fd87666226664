"""The exported policy file: a policy spec, its budget, the model it was tuned for, and evidence.

Format (JSON, version 1):

    {"kvsim_export": 1,
     "policy": {...spec...},              the same spec `kvsim simulate --policy x.json` reads
     "budget": 0.1,                       fraction of the prompt, or an int token count
     "model": {"id", "config_hash", "n_layers", "heads", "kv_heads", "head_dim"},
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

EXPORT_VERSION = 1


@dataclass
class ModelShape:
    """What a policy depends on in a model: its layers and heads (and, for provenance, which model)."""

    id: str
    config_hash: str
    n_layers: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, model_id: str, config_hash: str, config) -> ModelShape:
        heads = config.num_attention_heads
        return cls(
            id=model_id,
            config_hash=config_hash,
            n_layers=config.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        )

    def check(self, other: ModelShape) -> None:
        """Refuse to apply a policy tuned for one architecture to another."""
        for name in ("n_layers", "heads", "kv_heads", "head_dim"):
            if getattr(self, name) != getattr(other, name):
                raise KvsimError(
                    f"this policy was tuned for {self.id} ({name} = {getattr(self, name)}) but the model has "
                    f"{name} = {getattr(other, name)}: export a policy for this model"
                )


@dataclass
class ExportedPolicy:
    policy: Policy
    budget: Budget
    model: ModelShape
    provenance: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=lambda: {"simulated": None, "validated": None})

    def to_json(self) -> dict[str, Any]:
        return {
            "kvsim_export": EXPORT_VERSION,
            "policy": self.policy.to_spec(),
            "budget": self.budget.value,
            "model": vars(self.model),
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
        if not isinstance(data, dict) or data.get("kvsim_export") != EXPORT_VERSION:
            raise KvsimError(f"{path} is not a kvsim export (version {EXPORT_VERSION}): write one with `kvsim export`")
        try:
            model = ModelShape(**data["model"])
            budget = Budget(data["budget"])
        except (KeyError, TypeError) as err:
            raise KvsimError(f"exported policy {path} is missing or has a malformed field ({err}): re-export it") from err
        return cls(Policy.from_spec(data["policy"]), budget, model, data.get("provenance", {}), data.get("metrics", {}))
