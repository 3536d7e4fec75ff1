"""Config plumbing: frozen dataclasses filled from YAML recipes, then overridden
by command-line flags. Validation lives in each dataclass's __post_init__."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of option: value, got {type(data).__name__}")
    return data


def build(cls: type[T], *layers: dict[str, Any]) -> T:
    """An instance of dataclass `cls` from dicts applied in order (later wins).
    Keys may use dashes (`--batch-size` style); unknown keys are an error."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            name = key.replace("-", "_")
            if name not in fields:
                raise ValueError(f"unknown option {key!r} for {cls.__name__}; known: {', '.join(sorted(fields))}")
            values[name] = value
    return cls(**values)


def as_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def add_arguments(parser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """A flag per dataclass field, in dash spelling (`--batch-size`) with the underscore
    spelling as an alias. Defaults are None so only flags given on the command line
    override a YAML recipe; booleans are switches."""
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        names = dict.fromkeys([f"--{f.name.replace('_', '-')}", f"--{f.name}"])
        comment = _field_comment(cls, f.name)
        kind = hints[f.name]
        if kind is bool:
            parser.add_argument(*names, dest=f.name, action="store_true", default=None, help=comment)
        else:
            parser.add_argument(*names, dest=f.name, type=_scalar_type(kind), default=None, help=comment)


def overrides(args, cls: type) -> dict[str, Any]:
    """The dataclass fields given on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def _scalar_type(kind):
    import types
    import typing

    options = [a for a in typing.get_args(kind) if a is not type(None)] if isinstance(
        kind, (types.UnionType, typing._UnionGenericAlias)) else [kind]  # noqa: SLF001 - typing has no public test
    return options[0] if options and options[0] in (int, float, str) else str


def _field_comment(cls: type, name: str) -> str | None:
    """The `# comment` after a field in the class source: the flag's help text."""
    import inspect

    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return None
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith(f"{name}:") and "#" in stripped:
            return stripped.split("#", 1)[1].strip().replace("%", "%%")
    return None
