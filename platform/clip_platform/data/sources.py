"""Ray Data datasources for every input format the jobs read.

Each datasource cuts its input into disjoint `Piece`s -- pair indices, image-key
ranges, byte ranges of line files, file lists, Parquet row groups, tar shards --
so N read tasks cover every record exactly once, on any node, and the same N always
gives the same pieces. A piece is a self-contained reader: `piece.read(sink)` yields
Arrow blocks of bounded size (a dataset far larger than the object store streams
through) and hands the records it skips to `sink`; it never fails a task over bad
data. Ray Data runs the pieces as read tasks (`get_read_tasks`); the embed job runs
them itself as resumable shards, with a sink per shard.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from . import lmdb_io
from .bad_records import BadRecordSink, report
from .files import FileRange, iter_lines, split_ranges
from .records import (BAD_BASE64, UNREADABLE_FILE, BadRecord, b64decode_image, parse_image_line,
                      parse_text_line)
from .webdataset import IMAGE_EXTENSIONS as TAR_IMAGE_EXTENSIONS
from .webdataset import TEXT_EXTENSION, iter_samples

IMAGES_SCHEMA = pa.schema([("image_id", pa.int64()), ("image", pa.binary())])
FILE_IMAGES_SCHEMA = pa.schema([("image_id", pa.string()), ("image", pa.binary())])
LABELED_IMAGES_SCHEMA = pa.schema([("image_id", pa.string()), ("label", pa.int64()), ("image", pa.binary())])
TEXTS_SCHEMA = pa.schema([("text_id", pa.int64()), ("text", pa.string()), ("image_ids", pa.list_(pa.int64()))])
KEYED_TEXTS_SCHEMA = pa.schema([("text_id", pa.string()), ("text", pa.string())])

# Small blocks keep streaming smooth and memory low; image bytes dominate a row.
BLOCK_BYTES = 16 << 20
BLOCK_ROWS = 4096
MIN_SPLIT_BYTES = 16 << 20  # of a line file: ~800 base64 images of 15 KB


@dataclass(frozen=True)
class Piece:
    """One read task's share of an input: `read(sink)` yields its Arrow blocks."""

    read: Callable[[BadRecordSink | None], Iterator[pa.Table]]
    size_bytes: int | None  # in memory, estimated; None when unknown
    input_files: list[str] = field(default_factory=list)


class PieceDatasource(Datasource):
    """A datasource defined by `pieces(parallelism)`; bad records go to `bad_records`."""

    schema: pa.Schema
    bad_records: BadRecordSink | None = None

    def pieces(self, parallelism: int) -> list[Piece]:
        raise NotImplementedError

    def estimate_inmemory_data_size(self) -> int | None:
        return None  # unknown unless a subclass can tell cheaply

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        return [ReadTask(partial(piece.read, self.bad_records), _metadata(piece.size_bytes, piece.input_files),
                         schema=self.schema, per_task_row_limit=per_task_row_limit)
                for piece in self.pieces(parallelism)]


def _blocks(rows: Iterable[tuple], schema: pa.Schema, block_bytes: int = BLOCK_BYTES,
            block_rows: int = BLOCK_ROWS) -> Iterator[pa.Table]:
    """Group row tuples (in schema order) into Arrow tables of bounded size."""
    columns: list[list] = [[] for _ in schema.names]
    size = 0
    for row in rows:
        for column, value in zip(columns, row):
            column.append(value)
        size += sum(len(v) for v in row if isinstance(v, (bytes, str))) + 8 * len(row)
        if size >= block_bytes or len(columns[0]) >= block_rows:
            yield pa.Table.from_arrays(columns, schema=schema)
            columns, size = [[] for _ in schema.names], 0
    if columns[0]:
        yield pa.Table.from_arrays(columns, schema=schema)


def stream_rows(rows: Callable[[list[BadRecord]], Iterable[tuple]], schema: pa.Schema,
                sink: BadRecordSink | None) -> Iterator[pa.Table]:
    """Blocks of `rows(bad)`, handing what it appends to `bad` to the sink as each block
    goes out, not only at the end of the task."""
    bad: list[BadRecord] = []
    for block in _blocks(rows(bad), schema):
        report(sink, bad)
        bad.clear()
        yield block
    report(sink, bad)


def _metadata(size_bytes: int | None, input_files: Sequence[str] | None = None) -> BlockMetadata:
    # num_rows stays unknown: bad records are skipped, so the count is only known after reading.
    return BlockMetadata(num_rows=None, size_bytes=None if size_bytes is None else int(size_bytes),
                         input_files=list(input_files) if input_files else None, exec_stats=None)


def even_slices(n: int, parts: int) -> list[tuple[int, int]]:
    parts = max(1, min(parts, n))
    return [(n * i // parts, n * (i + 1) // parts) for i in range(parts)]


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


class LmdbImagesDatasource(PieceDatasource):
    """Images of a cn_clip image LMDB (`.../imgs`), cut by key range."""

    schema = IMAGES_SCHEMA

    def __init__(self, imgs_dir: str | os.PathLike, bad_records: BadRecordSink | None = None):
        super().__init__()
        self.imgs_dir = str(Path(imgs_dir).resolve())
        self.bad_records = bad_records
        with lmdb_io.open_env(self.imgs_dir):  # fail here, with a clear error, not in a read task
            pass

    def estimate_inmemory_data_size(self) -> int:
        return _dir_bytes(Path(self.imgs_dir)) * 3 // 4

    def pieces(self, parallelism: int) -> list[Piece]:
        bounds = lmdb_io.image_key_bounds(self.imgs_dir, parallelism)
        size = self.estimate_inmemory_data_size() / max(1, len(bounds))
        return [Piece(partial(stream_rows, partial(lmdb_io.iter_images, self.imgs_dir, lo, hi), self.schema),
                      int(size), [self.imgs_dir])
                for lo, hi in bounds]


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


class LinesDatasource(PieceDatasource):
    """Line files (TSV, JSONL; plain or compressed) cut into byte ranges of at least
    `min_split_bytes` (default MIN_SPLIT_BYTES) and parsed by `parser`."""

    def __init__(self, filesystem: pafs.FileSystem, files: Sequence[pafs.FileInfo], parser: Any,
                 bad_records: BadRecordSink | None = None, min_split_bytes: int | None = None):
        super().__init__()
        self.filesystem = filesystem
        self.files = list(files)
        self.parser = parser
        self.schema = parser.schema
        self.bad_records = bad_records
        self.min_split_bytes = min_split_bytes

    def get_name(self) -> str:  # names the operator in progress bars and the dashboard
        return getattr(self.parser, "name", "ReadLines")

    def estimate_inmemory_data_size(self) -> int:
        return sum(f.size or 0 for f in self.files)

    def pieces(self, parallelism: int) -> list[Piece]:
        ranges = split_ranges(self.files, parallelism, self.min_split_bytes or MIN_SPLIT_BYTES)
        groups = [ranges[a:b] for a, b in even_slices(len(ranges), parallelism)]
        return [Piece(partial(stream_rows, partial(_parse_ranges, self.filesystem, group, self.parser), self.schema),
                      sum(r.stop - r.start for r in group), sorted({r.path for r in group}))
                for group in groups]


def iter_line_rows(filesystem: pafs.FileSystem, files: Sequence[pafs.FileInfo], parser: Any,
                   bad: list[BadRecord]) -> Iterator[tuple]:
    """The same rows a LinesDatasource yields, in file order, in this process (no Ray)."""
    yield from _parse_ranges(filesystem, split_ranges(files, 1, 1 << 62), parser, bad)


def _file_rows(fs: pafs.FileSystem, root: str, paths: Sequence[str], labeled: bool,
               bad: list[BadRecord]) -> Iterator[tuple]:
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


class FileListDatasource(PieceDatasource):
    """Whole files per piece, in listing order: `rows(paths)` reads a piece's files."""

    filesystem: pafs.FileSystem
    files: list[pafs.FileInfo]

    def rows(self, paths: list[str]) -> Callable[[list[BadRecord]], Iterable[tuple]]:
        raise NotImplementedError

    def estimate_inmemory_data_size(self) -> int:
        return sum(f.size or 0 for f in self.files)

    def pieces(self, parallelism: int) -> list[Piece]:
        pieces = []
        for a, b in even_slices(len(self.files), parallelism):
            paths = [f.path for f in self.files[a:b]]
            pieces.append(Piece(partial(stream_rows, self.rows(paths), self.schema),
                                sum(f.size or 0 for f in self.files[a:b]), paths[:16]))
        return pieces


class ImageFilesDatasource(FileListDatasource):
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
        self.schema = LABELED_IMAGES_SCHEMA if labeled else FILE_IMAGES_SCHEMA
        self.bad_records = bad_records

    def rows(self, paths: list[str]) -> Callable[[list[BadRecord]], Iterable[tuple]]:
        return partial(_file_rows, self.filesystem, self.root, paths, self.labeled)


def _parquet_blocks(pieces: Sequence[tuple[str, tuple[int, ...]]], filesystem: pafs.FileSystem,
                    id_column: str, image_column: str, sink: BadRecordSink | None) -> Iterator[pa.Table]:
    for path, groups in pieces:
        try:
            with filesystem.open_input_file(path) as handle:
                parquet = pq.ParquetFile(handle)
                for group in groups:
                    table = parquet.read_row_group(group, columns=[id_column, image_column])
                    yield table.rename_columns(["image_id", "image"])
        except OSError as exc:  # a truncated or vanished file: lose its row groups, not the job
            report(sink, [BadRecord(UNREADABLE_FILE, None, path, str(exc))])


class ParquetImagesDatasource(PieceDatasource):
    """Parquet image corpora (`id_column`, binary `image_column`) cut along row groups
    into pieces of about equal rows. image_id keeps the file's type."""

    def __init__(self, filesystem: pafs.FileSystem, files: Sequence[pafs.FileInfo], id_column: str = "id",
                 image_column: str = "image", bad_records: BadRecordSink | None = None):
        super().__init__()
        self.filesystem, self.id_column, self.image_column = filesystem, id_column, image_column
        self.bad_records = bad_records
        self.groups: list[tuple[str, int, int]] = []  # (path, row group, rows)
        id_type = None
        for info in files:
            with filesystem.open_input_file(info.path) as handle:
                parquet = pq.ParquetFile(handle)
                names = parquet.schema_arrow.names
                missing = [c for c in (id_column, image_column) if c not in names]
                if missing:
                    raise ValueError(f"{info.path} has no column {', '.join(missing)} (columns: {', '.join(names)}); "
                                     "name the id and image columns")
                id_type = id_type or parquet.schema_arrow.field(id_column).type
                meta = parquet.metadata
                self.groups.extend((info.path, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups))
        self.schema = pa.schema([("image_id", id_type or pa.int64()), ("image", pa.binary())])

    @property
    def num_rows(self) -> int:
        return sum(rows for _, _, rows in self.groups)

    def pieces(self, parallelism: int) -> list[Piece]:
        pieces = []
        for piece in _even_row_pieces(self.groups, parallelism):
            by_file: dict[str, list[int]] = {}
            for path, group, _ in piece:
                by_file.setdefault(path, []).append(group)
            groups = [(path, tuple(numbers)) for path, numbers in by_file.items()]
            pieces.append(Piece(partial(_parquet_blocks, groups, self.filesystem, self.id_column, self.image_column),
                                None, list(by_file)))
        return pieces


def _even_row_pieces(groups: list[tuple[str, int, int]], parts: int) -> list[list[tuple[str, int, int]]]:
    """Consecutive row groups cut into up to `parts` pieces of about equal rows."""
    total = sum(rows for _, _, rows in groups)
    parts = max(1, min(parts, len(groups)))
    pieces: list[list] = [[] for _ in range(parts)]
    seen = 0
    for group in groups:
        # The piece holding the group's first row, so pieces stay contiguous and balanced.
        pieces[min(parts - 1, seen * parts // max(1, total))].append(group)
        seen += group[2]
    return [p for p in pieces if p]


def _tar_rows(fs: pafs.FileSystem, paths: Sequence[str], modality: str, bad: list[BadRecord]) -> Iterator[tuple]:
    wanted = TAR_IMAGE_EXTENSIONS if modality == "images" else (TEXT_EXTENSION,)
    for path in paths:
        for sample in iter_samples(fs, path, bad, wanted):
            # A sample without this modality's member (a caption-only sample, when reading
            # images) is no record of it: not counted as bad.
            if modality == "images" and sample.image is not None:
                yield sample.key, sample.image
            elif modality == "texts" and sample.text is not None:
                yield sample.key, sample.text


class WebDatasetDatasource(FileListDatasource):
    """The images or the captions of webdataset tar shards (img2dataset's layout), whole
    shards per piece; ids are the sample keys (strings), as image files' ids are paths."""

    def __init__(self, filesystem: pafs.FileSystem, files: Sequence[pafs.FileInfo], modality: str = "images",
                 bad_records: BadRecordSink | None = None):
        super().__init__()
        if modality not in ("images", "texts"):
            raise ValueError(f"modality must be images or texts, got {modality!r}")
        self.filesystem, self.files, self.modality = filesystem, list(files), modality
        self.schema = FILE_IMAGES_SCHEMA if modality == "images" else KEYED_TEXTS_SCHEMA
        self.bad_records = bad_records

    def get_name(self) -> str:
        return f"ReadWebDataset[{self.modality}]"

    def rows(self, paths: list[str]) -> Callable[[list[BadRecord]], Iterable[tuple]]:
        return partial(_tar_rows, self.filesystem, paths, self.modality)


__all__ = ["IMAGES_SCHEMA", "TEXTS_SCHEMA", "ImageFilesDatasource", "ImageLines", "LinesDatasource",
           "LmdbImagesDatasource", "ParquetImagesDatasource", "Piece", "PieceDatasource", "TextLines",
           "WebDatasetDatasource", "iter_line_rows", "stream_rows"]
