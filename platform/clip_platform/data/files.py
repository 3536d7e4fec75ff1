"""Finding and reading files on any pyarrow filesystem (local, s3://, gs://, ...).

Large line files are read in byte ranges so that many tasks can share one file:
a line belongs to the range holding its first byte, so the ranges of a file
cover each line exactly once, whatever the cut points.
"""
from __future__ import annotations

import fnmatch
import io
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pyarrow.fs as pafs

from ..io import resolve_filesystem

_GLOB_CHARS = "*?["
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
MAX_BRACE_PATHS = 1_000_000  # a typo such as {0..9999999999} must not exhaust memory
# Compressed streams cannot be entered in the middle: one range per file.
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4", ".br")


@dataclass(frozen=True)
class FileRange:
    path: str
    start: int
    stop: int   # exclusive; for compressed files the whole file is one range
    compressed: bool = False


def expand_braces(path: str) -> list[str]:
    """Shell-style brace patterns, as webdataset and img2dataset write shard lists:
    `shards/{00000..00003}.tar` (zero padding kept), `{a,b}.tar`, several per path."""
    match = _BRACE.search(path)
    if match is None:
        return [path]
    body = match.group(1)
    numeric = _RANGE.match(body)
    if numeric:
        first, last = numeric.groups()
        lo, hi = int(first), int(last)
        width = len(first) if first.lstrip("-").startswith("0") and len(first) > 1 else 0
        step = 1 if hi >= lo else -1
        if abs(hi - lo) + 1 > MAX_BRACE_PATHS:
            raise ValueError(f"{path}: the range {{{body}}} names over {MAX_BRACE_PATHS} paths")
        options = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    elif "," in body:
        options = body.split(",")
    else:  # a literal brace, e.g. in a file name
        return [path[:match.end()] + rest for rest in expand_braces(path[match.end():])] \
            if _BRACE.search(path[match.end():]) else [path]
    head, tail = path[:match.start()], path[match.end():]
    expanded = [head + option + rest for option in options for rest in expand_braces(tail)]
    if len(expanded) > MAX_BRACE_PATHS:
        raise ValueError(f"{path} names over {MAX_BRACE_PATHS} paths")
    return expanded


def _has_glob(path: str) -> bool:
    return any(c in path for c in _GLOB_CHARS)


def _glob(fs: pafs.FileSystem, pattern: str) -> list[pafs.FileInfo]:
    """Files matching a glob, listing from the deepest directory without wildcards."""
    parts = pattern.split("/")
    first = next(i for i, part in enumerate(parts) if _has_glob(part))
    base = "/".join(parts[:first]) or "/"
    recursive = "**" in pattern or len(parts) - first > 1
    selector = pafs.FileSelector(base, recursive=recursive, allow_not_found=True)
    return [info for info in fs.get_file_info(selector)
            if info.type == pafs.FileType.File and fnmatch.fnmatchcase(info.path, pattern)]


def list_files(paths: str | os.PathLike | Sequence[str | os.PathLike], filesystem: pafs.FileSystem | None = None,
               suffixes: tuple[str, ...] = ()) -> tuple[pafs.FileSystem, list[pafs.FileInfo]]:
    """Expand files, directories (recursively, keeping `suffixes`), globs and brace
    patterns (`shards/{00000..01023}.tar`), sorted and without duplicates. All paths
    must be on one filesystem. Raises FileNotFoundError naming the first path that
    matches nothing."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [expanded for raw in paths for expanded in expand_braces(os.fspath(raw))]
    if not paths:
        raise FileNotFoundError("no input paths given")
    fs = None
    found: dict[str, pafs.FileInfo] = {}
    for raw in paths:
        path_fs, path = resolve_filesystem(raw, filesystem)
        fs = fs or path_fs
        if _has_glob(path):
            infos = _glob(fs, path)
        else:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.Directory:
                infos = [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                         if i.type == pafs.FileType.File and not i.base_name.startswith(".")
                         and (not suffixes or i.path.lower().endswith(suffixes))]
            elif info.type == pafs.FileType.File:
                infos = [info]
            else:
                infos = []
        if not infos:
            kinds = f" {'/'.join(suffixes)}" if suffixes else ""
            raise FileNotFoundError(f"{os.fspath(raw)} matches no{kinds} file")
        for info in infos:
            found.setdefault(info.path, info)
    return fs, [found[p] for p in sorted(found)]


def split_ranges(files: Sequence[pafs.FileInfo], num_ranges: int, min_bytes: int = 1 << 20) -> list[FileRange]:
    """Byte ranges of about total/num_ranges bytes (at least `min_bytes`), never across files."""
    total = sum(f.size or 0 for f in files)
    target = max(min_bytes, -(-total // max(1, num_ranges)))
    ranges = []
    for info in files:
        size = info.size or 0
        if info.path.lower().endswith(COMPRESSED_SUFFIXES):
            ranges.append(FileRange(info.path, 0, size, compressed=True))
            continue
        starts = range(0, max(size, 1), target)
        ranges.extend(FileRange(info.path, s, min(s + target, size)) for s in starts)
    return ranges


def iter_lines(fs: pafs.FileSystem, file_range: FileRange,
               buffer_size: int = 1 << 20) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line without its newline) for each line starting in the range."""
    if file_range.compressed:
        with fs.open_input_stream(file_range.path, compression="detect") as raw:
            reader = io.BufferedReader(raw, buffer_size)
            offset = 0  # of the uncompressed stream
            for line in iter(reader.readline, b""):
                yield offset, line.rstrip(b"\r\n")
                offset += len(line)
        return
    with fs.open_input_file(file_range.path) as raw:
        reader = io.BufferedReader(raw, buffer_size)
        offset = file_range.start
        if offset > 0:
            # The line holding byte start-1 began in an earlier range: skip it.
            reader.seek(offset - 1)
            offset += len(reader.readline()) - 1
        while offset < file_range.stop:
            line = reader.readline()
            if not line:
                return
            yield offset, line.rstrip(b"\r\n")
            offset += len(line)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as stream:
        return stream.read()
