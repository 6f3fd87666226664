"""`kvsim policies`: the presets and the parts a policy spec can combine."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from kvsim.cli.common import console, reports_errors
from kvsim.policies import PRESETS, REGISTRY, resolve_policy


@reports_errors
def policies(
    show: str | None = typer.Argument(None, help="A preset name or spec .json to print as a JSON spec."),
) -> None:
    """List the presets and every registered part, or print one policy's JSON spec.

    Example: [bold]kvsim policies snapkv > my_policy.json[/]
    """
    if show is not None:
        console.print_json(json.dumps(resolve_policy(show).to_spec()))
        return
    presets = Table("preset", "scorer", "allocator", "schedule", "retention")
    for policy in PRESETS.values():
        spec = policy.to_spec()
        presets.add_row(policy.name, *(_describe(spec[kind]) for kind in ("scorer", "allocator", "schedule", "retention")))
    console.print(presets)
    parts = Table("kind", "registered parts")
    for kind, registered in REGISTRY.items():
        parts.add_row(kind, ", ".join(sorted(registered)))
    console.print(parts)


def _describe(spec: dict) -> str:
    params = ", ".join(f"{key}={value}" for key, value in spec.items() if key != "name")
    return f"{spec['name']}({params})" if params else spec["name"]
