"""Ray Data datasources: LMDB key ranges, byte ranges of line files, image files.

Each `get_read_tasks(parallelism)` cuts its input into at most `parallelism`
disjoint pieces -- pair indices, image-key ranges, byte ranges, file lists --
so N read tasks cover every record exactly once, on any node. Read tasks yield
Arrow blocks of bounded size, so a dataset far larger than the object store
streams through it. Bad records are skipped and handed to the `bad_records`
sink; they never fail a task.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from . import lmdb_io
from .bad_records import BadRecordSink, report
from .files import FileRange, iter_lines, split_ranges
from .records import (BAD_BASE64, UNREADABLE_FILE, BadRecord, b64decode_image, parse_image_line,
                      parse_text_line)

PAIRS_SCHEMA = pa.schema([("image_id", pa.int64()), ("text_id", pa.int64()), ("text", pa.string()),
                          ("image", pa.binary())])
IMAGES_SCHEMA = pa.schema([("image_id", pa.int64()), ("image", pa.binary())])
FILE_IMAGES_SCHEMA = pa.schema([("image_id", pa.string()), ("image", pa.binary())])
LABELED_IMAGES_SCHEMA = pa.schema([("image_id", pa.string()), ("label", pa.int64()), ("image", pa.binary())])
TEXTS_SCHEMA = pa.schema([("text_id", pa.int64()), ("text", pa.string()), ("image_ids", pa.list_(pa.int64()))])

# Small blocks keep streaming smooth and memory low; image bytes dominate a row.
BLOCK_BYTES = 16 << 20
BLOCK_ROWS = 4096
# Ray sizes read tasks for ~1 MiB of encoded input, but a pair decodes to ~0.6 MB
# (224 px) and every task has a fixed cost, so tasks get at least this much work
# (measured on 2 CPUs, read + decode: 4000 pairs in 68 tasks ~320 pairs/s, in 4 ~460).
MIN_PAIRS_PER_TASK = 1024
MIN_SPLIT_BYTES = 16 << 20  # of a line file: ~800 base64 images of 15 KB


def _blocks(rows: Iterable[tuple], schema: pa.Schema, block_bytes: int = BLOCK_BYTES) -> Iterator[pa.Table]:
    """Group row tuples (in schema order) into Arrow tables of bounded size."""
    columns: list[list] = [[] for _ in schema.names]
    size = 0
    for row in rows:
        for column, value in zip(columns, row):
            column.append(value)
        size += sum(len(v) for v in row if isinstance(v, (bytes, str))) + 8 * len(row)
        if size >= block_bytes or len(columns[0]) >= BLOCK_ROWS:
            yield pa.Table.from_arrays(columns, schema=schema)
            columns, size = [[] for _ in schema.names], 0
    if columns[0]:
        yield pa.Table.from_arrays(columns, schema=schema)


def _metadata(size_bytes: int | None, input_files: Sequence[str] | None = None) -> BlockMetadata:
    # num_rows stays unknown: bad records are skipped, so the count is only known after reading.
    return BlockMetadata(num_rows=None, size_bytes=None if size_bytes is None else int(size_bytes),
                         input_files=list(input_files) if input_files else None, exec_stats=None)


def _even_slices(n: int, parts: int) -> list[tuple[int, int]]:
    parts = max(1, min(parts, n))
    return [(n * i // parts, n * (i + 1) // parts) for i in range(parts)]


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


# ---------------------------------------------------------------- LMDB pairs

def _read_lmdb_pairs(split_dir: str, start: int, stop: int, sink: BadRecordSink | None) -> Iterator[pa.Table]:
    bad: list[BadRecord] = []
    # Report bad records as each block goes out, not only at the end of the task.
    rows = lmdb_io.iter_pairs(split_dir, start, stop, bad)
    for block in _blocks(rows, PAIRS_SCHEMA):
        report(sink, bad)
        bad.clear()
        yield block
    report(sink, bad)


class LmdbPairsDatasource(Datasource):
    """Pairs of a cn_clip LMDB split (`{split_dir}/pairs` + `imgs`), sharded by pair
    index into tasks of at least `min_rows_per_task` (default MIN_PAIRS_PER_TASK) pairs."""

    def __init__(self, split_dir: str | os.PathLike, bad_records: BadRecordSink | None = None,
                 min_rows_per_task: int | None = None):
        super().__init__()
        self.split_dir = str(Path(split_dir).resolve())
        self.bad_records = bad_records
        self.min_rows_per_task = min_rows_per_task
        self.num_samples = lmdb_io.num_samples(self.split_dir)
        self.num_images = lmdb_io.num_images(Path(self.split_dir) / "imgs")

    def estimate_inmemory_data_size(self) -> int:
        # Each pair carries its image: pairs per image times the decoded image store.
        image_bytes = _dir_bytes(Path(self.split_dir) / "imgs") * 3 // 4
        return image_bytes * self.num_samples // max(1, self.num_images)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        if self.num_samples == 0:
            return []
        per_row = self.estimate_inmemory_data_size() / self.num_samples
        min_rows = max(1, self.min_rows_per_task or MIN_PAIRS_PER_TASK)
        num_tasks = min(parallelism, -(-self.num_samples // min_rows))
        return [ReadTask(partial(_read_lmdb_pairs, self.split_dir, start, stop, self.bad_records),
                         _metadata(per_row * (stop - start), [self.split_dir]), schema=PAIRS_SCHEMA,
                         per_task_row_limit=per_task_row_limit)
                for start, stop in _even_slices(self.num_samples, num_tasks)]


# --------------------------------------------------------------- LMDB images

def _read_lmdb_images(imgs_dir: str, lo: bytes | None, hi: bytes | None,
                      sink: BadRecordSink | None) -> Iterator[pa.Table]:
    bad: list[BadRecord] = []
    for block in _blocks(lmdb_io.iter_images(imgs_dir, lo, hi, bad), IMAGES_SCHEMA):
        report(sink, bad)
        bad.clear()
        yield block
    report(sink, bad)


class LmdbImagesDatasource(Datasource):
    """Images of a cn_clip image LMDB (`.../imgs`), sharded by key range."""

    def __init__(self, imgs_dir: str | os.PathLike, bad_records: BadRecordSink | None = None):
        super().__init__()
        self.imgs_dir = str(Path(imgs_dir).resolve())
        self.bad_records = bad_records
        with lmdb_io.open_env(self.imgs_dir):  # fail here, with a clear error, not in a read task
            pass

    def estimate_inmemory_data_size(self) -> int:
        return _dir_bytes(Path(self.imgs_dir)) * 3 // 4

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        bounds = lmdb_io.image_key_bounds(self.imgs_dir, parallelism)
        size = self.estimate_inmemory_data_size() / max(1, len(bounds))
        return [ReadTask(partial(_read_lmdb_images, self.imgs_dir, lo, hi, self.bad_records),
                         _metadata(size, [self.imgs_dir]), schema=IMAGES_SCHEMA,
                         per_task_row_limit=per_task_row_limit)
                for lo, hi in bounds]


# ---------------------------------------------------------------- line files

class ImageLines:
    """TSV `image_id<TAB>base64` lines -> rows (image_id, image bytes)."""

    schema = IMAGES_SCHEMA
    name = "ReadTsvImages"

    def __call__(self, line: bytes, where: str) -> list[tuple] | BadRecord | None:
        parsed = parse_image_line(line, where)
        if parsed is None or isinstance(parsed, BadRecord):
            return parsed
        image_id, b64 = parsed
        try:
            return [(image_id, b64decode_image(b64))]
        except ValueError as exc:
            return BadRecord(BAD_BASE64, image_id, where, str(exc))

    def finish(self, task_index: int, num_tasks: int, sink: BadRecordSink | None) -> None:
        pass


class TextLines:
    """JSONL text lines -> rows (text_id, text, image_ids)."""

    schema = TEXTS_SCHEMA
    name = "ReadJsonlTexts"

    def __init__(self, require_image_ids: bool = False):
        self.require_image_ids = require_image_ids

    def __call__(self, line: bytes, where: str) -> list[tuple] | BadRecord | None:
        parsed = parse_text_line(line, where, self.require_image_ids)
        if parsed is None or isinstance(parsed, BadRecord):
            return parsed
        return [(parsed.text_id, parsed.text, list(parsed.image_ids))]

    def finish(self, task_index: int, num_tasks: int, sink: BadRecordSink | None) -> None:
        pass


def _parse_ranges(fs: pafs.FileSystem, ranges: Sequence[FileRange], parser: Callable,
                  bad: list[BadRecord]) -> Iterator[tuple]:
    for file_range in ranges:
        name = file_range.path.rsplit("/", 1)[-1]
        try:
            for offset, line in iter_lines(fs, file_range):
                result = parser(line, f"{name}@{offset}")
                if isinstance(result, BadRecord):
                    bad.append(result)
                elif result:
                    yield from result
        except OSError as exc:  # e.g. a corrupt .gz or a vanished object: lose this range, not the job
            bad.append(BadRecord(UNREADABLE_FILE, None, f"{name}@{file_range.start}", str(exc)))


def _read_lines(fs: pafs.FileSystem, ranges: Sequence[FileRange], parser: Any, task_index: int, num_tasks: int,
                sink: BadRecordSink | None) -> Iterator[pa.Table]:
    bad: list[BadRecord] = []
    for block in _blocks(_parse_ranges(fs, ranges, parser, bad), parser.schema):
        report(sink, bad)
        bad.clear()
        yield block
    report(sink, bad)
    parser.finish(task_index, num_tasks, sink)


class LinesDatasource(Datasource):
    """Line files (TSV, JSONL; plain or compressed) cut into byte ranges of at least
    `min_split_bytes` (default MIN_SPLIT_BYTES) and parsed by `parser`."""

    def __init__(self, filesystem: pafs.FileSystem, files: Sequence[pafs.FileInfo], parser: Any,
                 bad_records: BadRecordSink | None = None, min_split_bytes: int | None = None):
        super().__init__()
        self.filesystem = filesystem
        self.files = list(files)
        self.parser = parser
        self.bad_records = bad_records
        self.min_split_bytes = min_split_bytes

    def get_name(self) -> str:  # names the operator in progress bars and the dashboard
        return getattr(self.parser, "name", "ReadLines")

    def estimate_inmemory_data_size(self) -> int:
        return sum(f.size or 0 for f in self.files)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        ranges = split_ranges(self.files, parallelism, self.min_split_bytes or MIN_SPLIT_BYTES)
        groups = [ranges[a:b] for a, b in _even_slices(len(ranges), parallelism)]
        return [ReadTask(partial(_read_lines, self.filesystem, group, self.parser, i, len(groups), self.bad_records),
                         _metadata(sum(r.stop - r.start for r in group), sorted({r.path for r in group})),
                         schema=self.parser.schema, per_task_row_limit=per_task_row_limit)
                for i, group in enumerate(groups)]


def iter_line_rows(filesystem: pafs.FileSystem, files: Sequence[pafs.FileInfo], parser: Any,
                   bad: list[BadRecord]) -> Iterator[tuple]:
    """The same rows a LinesDatasource yields, in file order, in this process (no Ray)."""
    yield from _parse_ranges(filesystem, split_ranges(files, 1, 1 << 62), parser, bad)


# --------------------------------------------------------------- image files

def _read_files(fs: pafs.FileSystem, root: str, paths: Sequence[str], labeled: bool,
                sink: BadRecordSink | None) -> Iterator[pa.Table]:
    bad: list[BadRecord] = []

    def rows() -> Iterator[tuple]:
        for path in paths:
            relative = path[len(root):].lstrip("/") if path.startswith(root) else path
            try:
                with fs.open_input_stream(path) as stream:
                    data = stream.read()
            except OSError as exc:
                bad.append(BadRecord(UNREADABLE_FILE, relative, path, str(exc)))
                continue
            if labeled:
                yield relative, int(relative.split("/", 1)[0]), data
            else:
                yield relative, data

    schema = LABELED_IMAGES_SCHEMA if labeled else FILE_IMAGES_SCHEMA
    for block in _blocks(rows(), schema):
        report(sink, bad)
        bad.clear()
        yield block
    report(sink, bad)


class ImageFilesDatasource(Datasource):
    """Image files under `root`; image_id is the path relative to root. With
    `labeled`, the first directory level is a numeric class id (zero-shot
    folders: `test/<zero-padded label id>/*`)."""

    def __init__(self, filesystem: pafs.FileSystem, root: str, files: Sequence[pafs.FileInfo],
                 labeled: bool = False, bad_records: BadRecordSink | None = None):
        super().__init__()
        self.filesystem = filesystem
        self.root = root.rstrip("/")
        self.files = list(files)
        self.labeled = labeled
        self.bad_records = bad_records

    def estimate_inmemory_data_size(self) -> int:
        return sum(f.size or 0 for f in self.files)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        schema = LABELED_IMAGES_SCHEMA if self.labeled else FILE_IMAGES_SCHEMA
        tasks = []
        for a, b in _even_slices(len(self.files), parallelism):
            group = self.files[a:b]
            tasks.append(ReadTask(
                partial(_read_files, self.filesystem, self.root, [f.path for f in group], self.labeled,
                        self.bad_records),
                _metadata(sum(f.size or 0 for f in group), [f.path for f in group][:16]), schema=schema,
                per_task_row_limit=per_task_row_limit))
        return tasks


__all__ = ["IMAGES_SCHEMA", "PAIRS_SCHEMA", "TEXTS_SCHEMA", "ImageFilesDatasource", "ImageLines",
           "LinesDatasource", "LmdbImagesDatasource", "LmdbPairsDatasource", "TextLines", "iter_line_rows"]
