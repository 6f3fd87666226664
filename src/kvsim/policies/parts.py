"""The registry of policy parts and their JSON specs.

A policy is four parts: scorer, allocator, schedule, retention. Each part is a frozen dataclass
registered under its kind and a name; its fields are its parameters, `validate` checks their
ranges, and `suggest` declares its Optuna search space beside them. A part's spec is
`{"name": ..., <field>: <value>, ...}`; loading one checks the name, the field names and the types,
so a typo is a clear error rather than a silently ignored setting. A field may hold other parts
(a tuple of scorers, in `mixture`): they are written as their own specs, nested. A parameter a
part no longer has (`retired`) is refused with where it went.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar

from kvsim.errors import KvsimError

KINDS = ("scorer", "allocator", "schedule", "retention")
REGISTRY: dict[str, dict[str, type[Part]]] = {kind: {} for kind in KINDS}


@dataclasses.dataclass(frozen=True)
class Part:
    kind: ClassVar[str]
    name: ClassVar[str]
    # Parameters this part used to have -> where they went; a spec still naming one is refused with it.
    retired: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise KvsimError naming the bad field; the default accepts anything well-typed."""

    @classmethod
    def suggest(cls, trial, prefix: str) -> Part:
        """Sample this part from an Optuna trial; parameter names start with `prefix`."""
        return cls()

    def trial_params(self, prefix: str) -> dict[str, Any]:
        """The trial parameters under which `suggest` rebuilds this part (its inverse), so a preset
        can be enqueued as a point of the search space and the sampler learns from it. By default a
        parameter is named after its field; parts whose `suggest` names them otherwise override this."""
        return {f"{prefix}{f.name}": getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_spec(self) -> dict[str, Any]:
        fields = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"name": self.name, **fields}


def register(cls: type[Part]) -> type[Part]:
    REGISTRY[cls.kind][cls.name] = cls
    return cls


def part_from_spec(kind: str, spec: Any) -> Part:
    """Build a part from `{"name": ..., **params}` or a bare name, checking names and types."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or "name" not in spec:
        raise KvsimError(f"{kind} spec {spec!r} needs a 'name': one of {', '.join(REGISTRY[kind])}")
    params = dict(spec)
    name = params.pop("name")
    cls = REGISTRY[kind].get(name) if isinstance(name, str) else None
    if cls is None:
        raise KvsimError(f"unknown {kind} {name!r}: choose one of {', '.join(sorted(REGISTRY[kind]))}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    for key, value in params.items():
        if key in cls.retired:
            raise KvsimError(f"{kind} {name!r} no longer has parameter {key!r}: {cls.retired[key]}")
        if key not in fields:
            raise KvsimError(f"{kind} {name!r} has no parameter {key!r}: its parameters are {', '.join(sorted(fields)) or 'none'}")
        params[key] = _coerce(value, hints[key], f"{kind} {name!r} parameter {key!r}")
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [key for key in required if key not in params]
    if missing:
        raise KvsimError(f"{kind} {name!r} needs parameter(s) {', '.join(missing)}")
    return cls(**params)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        if not isinstance(value, list | tuple):
            raise KvsimError(f"{where} must be a list of {'specs' if _is_part(item) else 'numbers'}, got {value!r}")
        return tuple(_coerce(element, item, where) for element in value)
    if _is_part(hint):
        return part_from_spec(hint.kind, value)
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    expected = getattr(hint, "__name__", str(hint))
    raise KvsimError(f"{where} must be {expected}, got {value!r}")


def _is_part(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, Part)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Part):
        return value.to_spec()
    return [_jsonable(item) for item in value] if isinstance(value, tuple) else value


def check(condition: bool, part: Part, message: str) -> None:
    """Raise the one-line error a bad parameter gets, naming the part."""
    if not condition:
        raise KvsimError(f"{part.kind} {part.name!r}: {message}")
