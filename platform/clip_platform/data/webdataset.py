"""webdataset tar shards, the layout img2dataset writes: `{key}.jpg|png|webp` (the image),
`{key}.txt` (the caption) and `{key}.json` (metadata), the members of one sample next
to each other in the tar.

Two ways in, both on any pyarrow filesystem:

* `iter_samples(fs, path, bad)` streams a shard front to back (one pass, no seeks): the
  embed job and `read_images` / `read_texts` read corpora this way, one shard per task.
* `TarIndex.scan(fs, path)` reads only the member headers (seeking over the data) and
  keeps each complete sample's byte ranges, so training can fetch sample i of the
  plan directly (`clip_platform.data.indexed.WebDatasetPairs`).

Ray Data's own `read_webdataset` (checked in Ray 2.60) does not fit: it yields one-row
blocks, decodes members with its own decoder, fails the task (so the job) on a truncated
shard, and cannot run as the embed job's resumable pieces with a bad-record sink each.
Here a corrupt image is a named bad record at decode time, and an unreadable shard costs
its remaining samples, reported, not the job.
"""
from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs

from .records import BAD_FIELD, UNREADABLE_FILE, BadRecord

TAR_SUFFIXES = (".tar",)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
TEXT_EXTENSION = "txt"


def split_name(name: str) -> tuple[str, str]:
    """(key, extension) of a member, as webdataset splits them: the key is the path up
    to the first dot of the file name, the extension the rest, lower-cased."""
    directory, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), extension.lower() if dot else ""


@dataclass
class Sample:
    key: str
    image: bytes | None = None  # the first image member, encoded
    text: str | None = None  # the caption (.txt), None when absent or not UTF-8


def _sample(key: str, members: dict[str, bytes], where: str, bad: list[BadRecord]) -> Sample:
    sample = Sample(key)
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    if image_ext is not None:
        sample.image = members[image_ext]
    if TEXT_EXTENSION in members:
        try:
            sample.text = members[TEXT_EXTENSION].decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            bad.append(BadRecord(BAD_FIELD, key, where, f"caption is not UTF-8 text ({exc.reason})"))
    return sample


def iter_samples(fs: pafs.FileSystem, path: str, bad: list[BadRecord],
                 wanted: tuple[str, ...] = IMAGE_EXTENSIONS + (TEXT_EXTENSION,)) -> Iterator[Sample]:
    """The samples of one shard in tar order; members whose extension is not `wanted` are
    skipped unread. A shard that ends in the middle (truncated, not a tar) yields what came
    before and reports the rest as one unreadable-file record."""
    name = path.rsplit("/", 1)[-1]
    key, members = None, {}
    try:
        with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, extension = split_name(member.name)
                if member_key != key:
                    if key is not None:
                        yield _sample(key, members, f"{name}:{key}", bad)
                    key, members = member_key, {}
                if extension in wanted:
                    members[extension] = tar.extractfile(member).read()
    except (OSError, tarfile.TarError, EOFError) as exc:
        detail = str(exc) or type(exc).__name__
        bad.append(BadRecord(UNREADABLE_FILE, None, f"{name} after {key or 'its start'}", detail))
        return
    if key is not None:
        yield _sample(key, members, f"{name}:{key}", bad)


@dataclass
class TarIndex:
    """The complete (image + caption) samples of one shard: keys and member byte ranges."""

    path: str
    keys: list[str]
    ranges: np.ndarray  # int64 [N, 4]: image offset, image size, caption offset, caption size
    num_incomplete: int  # samples without an image or without a caption

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def scan(cls, fs: pafs.FileSystem, path: str) -> TarIndex:
        """Member headers only: the reader seeks over each member's data."""
        found: dict[str, dict[str, tuple[int, int]]] = {}
        with fs.open_input_file(path) as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
            for member in tar:
                if member.isfile():
                    key, extension = split_name(member.name)
                    found.setdefault(key, {}).setdefault(extension, (member.offset_data, member.size))
        keys, ranges = [], []
        for key, members in found.items():
            image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
            if image_ext is not None and TEXT_EXTENSION in members:
                keys.append(key)
                ranges.append(members[image_ext] + members[TEXT_EXTENSION])
        return cls(path, keys, np.asarray(ranges, np.int64).reshape(-1, 4), len(found) - len(keys))
