"""Config plumbing: frozen dataclasses filled from YAML recipes and command-line flags.

A job's config dataclass is the one declaration of its options: `parser` makes a flag per
field (dash and underscore spellings, as cn_clip spells them either way), its type and
default from the field, choices from a `Literal[...]` type and help from the field's
`# comment`; `build` checks recipe values against the field types. Validation lives in
each dataclass's __post_init__; `check_output` and `check_not_empty` are shared checks."""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import functools
import inspect
import io
import os
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import pyarrow.fs as pafs
import yaml

from .io import is_uri, resolve_filesystem

T = TypeVar("T")


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ValueError(f"{path}{where} is not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of option: value, got {type(data).__name__}")
    return data


def build(cls: type[T], *layers: dict[str, Any], source: str | None = None) -> T:
    """An instance of dataclass `cls` from dicts applied in order (later wins). Keys may use
    dashes (`--batch-size` style); unknown keys and values not of the field's type are errors,
    named with `source` (the recipe file) when given."""
    hints = _hints(cls)
    values: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            name = key.replace("-", "_")
            try:
                if name not in hints:
                    raise ValueError(f"unknown option {key!r} for {cls.__name__}; known: {', '.join(sorted(hints))}")
                values[name] = _typed(hints[name], value, key)
            except ValueError as exc:
                raise ValueError(f"{source}: {exc}" if source else str(exc)) from None
    return cls(**values)


def from_args(cls: type[T], args: argparse.Namespace, *recipes: dict[str, Any], source: str | None = None) -> T:
    """`build` from recipes, overridden by the flags actually given (a `parser` leaves the rest out)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return build(cls, *recipes, {k: v for k, v in vars(args).items() if k in names}, source=source)


# ---------------------------------------------------------------- command lines

def program_name() -> str:
    """The program as the user started it: `python -m serve` for a package's __main__.py (not
    "__main__.py"), else the script's file name."""
    path = Path(sys.argv[0])
    return f"python -m {path.parent.name}" if path.name == "__main__.py" else path.name


def parser(cls: type, description: str | None = None, positional: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """An argparse parser with a flag per field of dataclass `cls` (`positional` fields are
    arguments instead). Flags left out of the command line are left out of the namespace, so
    `from_args` takes them from the recipe or the dataclass; the help shows the defaults.
    Fields of dict type have no command-line form: the job fills them. Jobs add their own
    non-config flags to the parser returned."""
    out = argparse.ArgumentParser(prog=program_name(), description=description,
                                  formatter_class=argparse.RawDescriptionHelpFormatter,
                                  argument_default=argparse.SUPPRESS)
    hints, comments = _hints(cls), _comments(cls)
    for f in dataclasses.fields(cls):
        kind, choices, several = _flag_type(hints[f.name])
        if kind is dict:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        comment = comments.get(f.name, "")
        shown = f"(default: {default})" if default and kind is not bool else ""
        options: dict[str, Any] = {"help": " ".join(filter(None, [comment, shown])).replace("%", "%%") or None}
        if f.name in positional:
            out.add_argument(f.name, metavar=f.name.upper(), type=kind, choices=choices, **options)
            continue
        names = list(dict.fromkeys([f"--{f.name.replace('_', '-')}", f"--{f.name}"]))
        if kind is bool:
            options["action"] = "store_false" if default else "store_true"
            if default:  # a switch turns the default around: `--no-access-log` for a True default
                names = list(dict.fromkeys([f"--no-{f.name.replace('_', '-')}", f"--no_{f.name}"]))
                options["help"] = f"turn off: {comment}" if comment else None
        else:
            # short values, as each flag is listed twice: `--img-batch-size N, --img_batch_size N`
            metavar = None if choices else _METAVARS.get(kind) or f.name.rsplit("_", 1)[-1].upper()
            options.update(type=kind, choices=choices, metavar=metavar, nargs="+" if several else None,
                           required=f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        out.add_argument(*names, dest=f.name, **options)
    return out


_METAVARS = {int: "N", float: "X"}  # strings are named by their field's last word: --image-data DATA


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def _comments(cls: type) -> dict[str, str]:
    """The `# comment` on each field's lines in the class source: its flag's help."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (a frozen app, a class made at run time): flags without help
        return {}
    field_of_line = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            field_of_line.update(dict.fromkeys(range(node.lineno, node.end_lineno + 1), node.target.id))
    comments: dict[str, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT and token.start[0] in field_of_line:
            comments.setdefault(field_of_line[token.start[0]], token.string.lstrip("#").strip())
    return comments


def _members(kind: Any) -> tuple[Any, ...]:
    """The types of a union (`int | None`), or the type itself."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return typing.get_args(kind)
    return (kind,)


def _flag_type(kind: Any) -> tuple[Any, tuple | None, bool]:
    """(argparse type, choices, several values) of a field type: the first of bool/int/float/
    str/Literal/tuple[X, ...] in it. A tuple first (`tuple[str, ...] | str`) makes a flag that
    takes one or more values; a str first (`str | tuple[str, ...]`) keeps one value."""
    for member in _members(kind):
        if typing.get_origin(member) is tuple and typing.get_args(member)[1:] == (Ellipsis,):
            item, choices, _ = _flag_type(typing.get_args(member)[0])
            return item, choices, True
        if typing.get_origin(member) is Literal:
            choices = typing.get_args(member)
            return type(choices[0]), choices, False
        if member in (bool, int, float, str):
            return member, None, False
        if member is dict or typing.get_origin(member) is dict:
            return dict, None, False
    raise TypeError(f"no command-line form for a field of type {kind}")


def _typed(kind: Any, value: Any, key: str) -> Any:
    """`value` as a value of field type `kind`, or a ValueError naming the field. YAML reads
    `5e-5` as a string and `1` as an int: both are floats where a float is wanted."""
    for member in _members(kind):
        origin = typing.get_origin(member)
        if member is Any or (member is type(None) and value is None):
            return value
        if origin is Literal:
            if value in typing.get_args(member):
                return value
        elif origin in (tuple, list):
            if isinstance(value, (tuple, list)):
                return origin(_typed(typing.get_args(member)[0], item, key) for item in value)
        elif member is dict or origin is dict:
            if isinstance(value, dict):
                return value
        elif member is float:
            if isinstance(value, (int, float, str)) and not isinstance(value, bool):
                with contextlib.suppress(ValueError):
                    return float(value)
        elif isinstance(value, member) and (member is bool or not isinstance(value, bool)):
            return value  # True is an int to Python, not to a recipe
    raise ValueError(f"{key}: {value!r} is not {_describe(kind)}")


_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null",
          dict: "a mapping", tuple: "a list", list: "a list"}


def _describe(kind: Any) -> str:
    """A field type in a recipe writer's words: "an integer or null", "one of amp, fp32"."""
    names = []
    for member in _members(kind):
        if typing.get_origin(member) is Literal:
            names.append("one of " + ", ".join(map(str, typing.get_args(member))))
        else:
            names.append(_NAMES.get(typing.get_origin(member) or member, str(member)))
    return " or ".join(names)


# ---------------------------------------------------------------- shared checks

LOCAL_ONLY = "this job writes to local or shared-filesystem paths, not URIs"


def check_output(path: str | None, what: str, directory: bool = False, uri: str | None = LOCAL_ONLY) -> None:
    """Fail before any work starts where a job could not write `path`: a directory where its
    file goes, a file where its directory goes, or a file where a parent folder is needed. A URI
    is refused with the message `uri` (why this output must be local), or (uri None: the job
    writes through clip_platform.io) checked for a filesystem that knows its scheme and answers."""
    if not path:
        return
    if is_uri(path):
        if uri is not None:
            raise ValueError(f"{what} {path}: {uri}")
        fs, inner = resolve_filesystem(path)
        try:
            info = fs.get_file_info(inner)
            top = inner.strip("/").split("/")[0]  # the bucket: its writes would fail only after the work
            if info.type == pafs.FileType.NotFound and fs.get_file_info(top).type == pafs.FileType.NotFound:
                raise ValueError(f"{what} {path}: {top} does not exist; create it first")
        except OSError as exc:
            raise ValueError(f"{what} {path} cannot be reached: {str(exc).strip().splitlines()[0]}") from None
        if info.type != pafs.FileType.NotFound and (info.type == pafs.FileType.Directory) != directory:
            raise ValueError(f"{what} {path} is {'a file' if directory else 'a folder'}; give a "
                             f"{'folder' if directory else 'file'} path")
        return
    target = Path(path).expanduser()
    if target.exists() and target.is_dir() != directory:
        kind, wanted = ("a file", "directory") if directory else ("a directory", "file")
        raise ValueError(f"{what} {path} is {kind}; give a {wanted} path")
    above = next((p for p in target.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise ValueError(f"{what} {path} cannot be written: {above} is a file, not a directory")


def check_not_empty(path: str | None, what: str) -> None:
    """A local input file holding nothing but whitespace is a mistake, not an empty result."""
    if not path or not os.path.isfile(path):
        return  # folders, globs, URLs and missing files are the readers' to judge
    with open(path, "rb") as file:
        while chunk := file.read(1 << 16):
            if chunk.strip():
                return
    raise ValueError(f"{what} {path} is empty")


def check_model(source: str | None, context_length: int | None = None, fits: Any = None) -> None:
    """Before a job starts its workers: `source` (--resume) is a checkpoint they will load
    (clip_models.inspect_checkpoint; `fits`: the model config it must fit), and texts of
    `context_length` tokens fit its text tower."""
    if not source:
        return
    from clip_models.checkpoint import inspect_checkpoint

    model = inspect_checkpoint(source, fits)
    if context_length is not None:
        check_context_length(context_length, model, source)


def check_context_length(context_length: int, model: Any, name: str) -> None:
    """`model` (a clip_models.CLIPConfig) has positions for `context_length` tokens."""
    positions = model.text.max_position_embeddings
    if context_length > positions:
        raise ValueError(f"--context-length {context_length} exceeds the {positions} text positions of {name}")
