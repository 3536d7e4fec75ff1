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
