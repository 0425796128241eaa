"""Typed, validated configuration objects loaded from YAML.

Every config class derives from ``Config``: unknown keys are rejected, and a validation failure becomes a
``ConfigError`` whose lines name the offending key (``objective.gamma_min``), what was given and what is allowed.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

C = TypeVar("C", bound="Config")


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ConfigError(ValueError):
    """A config that does not validate; ``problems`` holds one line per offending key."""

    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, problems
        super().__init__(f"invalid config {source}:\n" + "\n".join(f"  - {p}" for p in problems))


def load(cls: type[C], data: dict[str, Any], source: str = "<dict>") -> C:
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, [_describe(cls, err) for err in exc.errors()]) from None


def parse_yaml(cls: type[C], text: str, source: str = "<text>") -> C:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, [f"not valid YAML: {exc}"]) from None
    if not isinstance(data, dict):
        raise ConfigError(source, ["the top level must be a mapping of keys to values"])
    return load(cls, data, source)


def load_yaml(cls: type[C], path: str | Path) -> C:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), ["file not found"])
    return parse_yaml(cls, path.read_text(), str(path))


# ----------------------------------------------------------------------------------------------------------------
# Error messages


def _describe(cls: type[BaseModel], err: dict) -> str:
    loc = _display_loc(err["loc"])
    kind, ctx = err["type"], err.get("ctx", {})
    if kind == "extra_forbidden":
        allowed = _allowed_keys(cls, err["loc"][:-1])
        return f"unknown key '{loc}'; allowed keys here: {', '.join(allowed)}"
    if kind == "missing":
        return f"'{loc}' is required"
    if kind in ("literal_error", "enum"):
        return f"{loc}: {err['input']!r} is not allowed; allowed values: {ctx.get('expected', '')}"
    message = err["msg"].removeprefix("Value error, ")
    shown_input = "input" in err and not isinstance(err["input"], (dict, list))
    return f"{loc}: {message} (got {err['input']!r})" if shown_input else f"{loc}: {message}"


def _field_type(annotation: Any, part: str | int) -> Any:
    """The type one step further along an error location (a field of a model, or an element of a collection)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):  # Optional[X]
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _field_type(members[0], part) if len(members) == 1 else Any
    if origin in (list, tuple, dict):
        args = typing.get_args(annotation)
        return args[-1] if args else Any
    if isinstance(annotation, type) and issubclass(annotation, BaseModel) and part in annotation.model_fields:
        return annotation.model_fields[part].annotation
    return Any


def _display_loc(loc: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "<top level>"


def _allowed_keys(cls: type[BaseModel], loc: tuple) -> list[str]:
    current: Any = cls
    for part in loc:
        current = _field_type(current, part)
    members = [a for a in typing.get_args(current) if a is not type(None)] or [current]
    model = next((m for m in members if isinstance(m, type) and issubclass(m, BaseModel)), None)
    return sorted(model.model_fields) if model else []
