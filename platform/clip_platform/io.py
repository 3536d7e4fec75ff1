"""Writing files so that a reader never sees half of one: the platform's one atomic writer, on a
local path or a URI of any pyarrow filesystem (s3://bucket/key, gs://..., hdfs://...).

Every output of the batch jobs and the training run's own files go through `atomic_path`: a
crashed or preempted task leaves the previous file (or none), so a resumed job can trust any file
it finds. Locally the file is written beside its target and renamed onto it; on an object store it
is written to a local temporary file and uploaded in one PUT on success (an object appears whole
or not at all). Paths stay strings: `pathlib.Path` turns "s3://b/k" into "s3:/b/k", a local
folder. `join` builds paths under either kind.

An S3 endpoint other than AWS's is reached as boto3 reaches it: the AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_DEFAULT_REGION variables, or the URI's query
(`s3://bucket/key?endpoint_override=host:port&scheme=http`).
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

PathLike = str | os.PathLike


def is_uri(path: PathLike) -> bool:
    """A path on a filesystem other than the local one (file:// URIs are local)."""
    text = os.fspath(path)
    return "://" in text and not text.startswith("file://")


def resolve_filesystem(path: PathLike, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI; ValueError, in one line, for a
    scheme no installed filesystem knows."""
    path = os.fspath(path)
    if filesystem is not None:
        return filesystem, path
    if "://" in path:
        try:
            return pafs.FileSystem.from_uri(path)
        except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise ValueError(f"{path}: {str(exc).strip().splitlines()[0]}") from None
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def join(base: PathLike, *names: str) -> str:
    """`base`/name/... for a local path or a URI (its query, if any, stays at the end)."""
    base = os.fspath(base)
    if not is_uri(base):
        return os.path.join(base, *names)
    head, mark, query = base.partition("?")
    return "/".join([head.rstrip("/"), *names]) + mark + query


def name_of(path: PathLike) -> str:
    """The last component of a local path or a URI."""
    return os.fspath(path).partition("?")[0].rstrip("/").rsplit("/", 1)[-1]


@contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """A temporary local path, moved onto `path` (renamed, or uploaded to a URI) only if the block
    succeeds: readers (and resumed jobs) never see a half-written file."""
    if is_uri(path):
        fs, inner = resolve_filesystem(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{name_of(path)}.")
        os.close(fd)
        try:
            yield tmp
            fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
            pafs.copy_files(tmp, inner, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_lines(path: PathLike, lines: Iterable[str]) -> str:
    """UTF-8 text from `lines` (each with its own newline), written atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        out.writelines(lines)
    return os.fspath(path)


def write_json(path: PathLike, payload: Any, **options) -> str:
    """One JSON document, written atomically; `options` go to json.dump (default
    ensure_ascii=False, so Chinese stays readable; cn_clip's byte-exact files pass True)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        json.dump(payload, out, **{"ensure_ascii": False, **options})
    return os.fspath(path)


def open_input(path: PathLike, random_access: bool = False):
    """A binary file object over a local path or a URI: buffered and line-iterable, or (random
    access: pyarrow's own seekable file, for Parquet footers and row groups and Arrow's readers)
    seekable."""
    fs, inner = resolve_filesystem(path)
    if random_access:
        return fs.open_input_file(inner)
    return open(inner, "rb") if not is_uri(path) else io.BufferedReader(fs.open_input_stream(inner))


def canonical(path: PathLike) -> str:
    """One spelling per file, to tell whether two paths are the same: the real path of a local
    file, the URI itself."""
    return os.fspath(path) if is_uri(path) else os.path.realpath(os.fspath(path))


def parent(path: PathLike) -> str:
    """The folder holding `path`, a local path or a URI (its query kept)."""
    text = os.fspath(path)
    if not is_uri(text):
        return os.path.dirname(os.path.abspath(text))
    head, mark, query = text.partition("?")
    return head.rstrip("/").rsplit("/", 1)[0] + mark + query


def file_info(path: PathLike) -> pafs.FileInfo:
    fs, inner = resolve_filesystem(path)
    return fs.get_file_info(inner)


def read_file(path: PathLike) -> bytes | None:
    """The whole file, or None where there is none."""
    fs, inner = resolve_filesystem(path)
    try:
        with fs.open_input_stream(inner) as stream:
            return stream.read()
    except FileNotFoundError:
        return None


def is_file(path: PathLike) -> bool:
    fs, inner = resolve_filesystem(path)
    return fs.get_file_info(inner).type == pafs.FileType.File


def file_names(directory: PathLike) -> list[str]:
    """Names of the files directly in `directory` ([] where there is none)."""
    fs, inner = resolve_filesystem(directory)
    if fs.get_file_info(inner).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
    return sorted(info.base_name for info in infos if info.type == pafs.FileType.File)


def remove(path: PathLike) -> None:
    """Delete a file or a folder with everything in it; nothing where there is none."""
    fs, inner = resolve_filesystem(path)
    kind = fs.get_file_info(inner).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(inner)
    elif kind == pafs.FileType.File:
        fs.delete_file(inner)
