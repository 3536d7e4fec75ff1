"""What is known about each input format, in one place: the file names it claims, what it holds,
how many records a corpus of it has (estimated without reading it), how few pieces it can be cut
into, its fingerprint (what a resumed job compares) and how one record is found again.

A new format is one `Format` here, its parser (records.py, webdataset.py, lmdb_io.py ...) and its
datasource (sources.py); `readers.image_source` / `text_source` pick it by suffix. No Ray here.
"""
from __future__ import annotations

import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pyarrow.fs as pafs

from . import lmdb_io
from .files import COMPRESSED_SUFFIXES
from .webdataset import TAR_SUFFIXES, TarIndex

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
TSV_SUFFIXES = (".tsv", ".tsv.gz", ".tsv.bz2", ".tsv.zst")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.bz2", ".jsonl.zst")
PARQUET_SUFFIXES = (".parquet",)
SAMPLE_BYTES = 4 << 20  # bytes of a line file read to estimate its number of lines


class FoundSource(Protocol):
    """What `readers.image_source` / `text_source` found (readers.Source)."""

    kind: str
    datasource: Any
    filesystem: pafs.FileSystem | None
    files: list[pafs.FileInfo]


@dataclass(frozen=True)
class Format:
    kind: str
    suffixes: tuple[str, ...]  # file names it claims; () for LMDB (a folder)
    holds: tuple[str, ...]  # "images", "texts", "pairs" (training)
    located_by: str  # how one record's bytes are found again (random access)
    estimate: Callable[[FoundSource], int]  # records in the corpus, without reading it all
    min_pieces: Callable[[FoundSource], int]  # files that cannot be split count one piece each

    def fingerprint(self, found: FoundSource, path: Any) -> dict[str, Any]:
        """The input a job was planned on: a resumed job with another one refuses or replans."""
        if self.kind == "lmdb":
            imgs_dir = Path(found.datasource.imgs_dir)
            return {"kind": "lmdb", "path": str(imgs_dir), "files": [["data.mdb", (imgs_dir / "data.mdb").stat().st_size]]}
        return {"kind": self.kind, "path": str(path), "files": [[i.path, i.size] for i in found.files]}


def estimate_lines(found: FoundSource) -> int:
    """Lines in the files, from the newline density of the start of the first plain one."""
    plain = [i for i in found.files if not i.path.lower().endswith(COMPRESSED_SUFFIXES)]
    if not plain:
        return len(found.files)
    with found.filesystem.open_input_stream(plain[0].path) as stream:
        sample = stream.read(SAMPLE_BYTES)
    lines = sample.count(b"\n") + (1 if sample and not sample.endswith(b"\n") else 0)
    total = sum(i.size or 0 for i in plain)
    return max(1, round(total * lines / max(1, len(sample))))


def estimate_samples(found: FoundSource) -> int:
    """Samples in tar shards, from the first shard's member headers (a seek per member, no
    data read) scaled by bytes: img2dataset's shards hold about equal samples."""
    infos = found.files
    try:
        first = TarIndex.scan(found.filesystem, infos[0].path)
    except (OSError, EOFError, tarfile.TarError):  # unreadable: its read task reports it, by name
        return len(infos)
    per_byte = (len(first) + first.num_incomplete) / max(1, infos[0].size or 1)
    return max(len(infos), round(per_byte * sum(i.size or 0 for i in infos)))


def _compressed_files(found: FoundSource) -> int:
    return sum(i.path.lower().endswith(COMPRESSED_SUFFIXES) for i in found.files)


def _one(found: FoundSource) -> int:
    return 1


# In the order suffixes are matched.
FORMATS: dict[str, Format] = {f.kind: f for f in (
    Format("tsv", TSV_SUFFIXES, ("images",), "file + byte offset of the line", estimate_lines, _compressed_files),
    Format("parquet", PARQUET_SUFFIXES, ("images",), "file + row", lambda found: found.datasource.num_rows, _one),
    Format("webdataset", TAR_SUFFIXES, ("images", "texts", "pairs"), "tar shard + member offset and size",
           estimate_samples, lambda found: len(found.files)),
    Format("files", IMAGE_SUFFIXES, ("images",), "file path", lambda found: len(found.files), _one),
    Format("jsonl", JSONL_SUFFIXES, ("texts",), "file + byte offset of the line", estimate_lines, _compressed_files),
    Format("lmdb", (), ("images", "pairs"), "LMDB folder + key",
           lambda found: lmdb_io.num_images(found.datasource.imgs_dir), _one),
)}


def kind_of(path: str) -> str | None:
    """The format a file name claims, by suffix."""
    lower = path.lower()
    return next((f.kind for f in FORMATS.values() if f.suffixes and lower.endswith(f.suffixes)), None)


def suffixes_of(kinds: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(s for kind in kinds for s in FORMATS[kind].suffixes)

