"""The embed job's reader: a corpus cut into deterministic shards, each one Ray Data read task.

The data plane's datasources (LMDB key ranges, TSV/JSONL byte ranges, image
files) split their input into N disjoint read tasks for a given N. Planning the
corpus once for a fixed N (recorded in the output's plan file, so a resumed run
asks for the same N) makes "read task i" a deterministic slice of the input:
shard i. `ShardedDatasource` runs the read tasks of the unfinished shards only,
and tags every row with (`shard`, `row` within the shard); after a shard's last
row it emits one end-of-shard marker row (`row` -1) whose `note` holds the
shard's row count and the records its reader skipped. The writer knows a shard
is complete when the marker and every row have arrived, whatever the order.

Ids become int64: cn_clip's are ints already; image files and Parquet corpora
with string ids get `int(<digits>)` for a file named `<digits>.<ext>`, or a
stable 63-bit hash of the name, and keep the name in `path`.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from ..data import LinesDatasource, lmdb_io
from ..data.bad_records import report as log_bad_records
from ..data.files import list_files
from ..data.readers import JSONL_SUFFIXES, image_datasource
from ..data.records import BadRecord
from ..data.sources import TextLines

MARKER_ROW = -1  # `row` of the end-of-shard marker
SAMPLE_BYTES = 4 << 20  # bytes of a line file read to estimate its number of lines
_COMPRESSED = (".gz", ".bz2", ".zst", ".lz4", ".br")
_NUMBERED_FILE = re.compile(r"^(\d{1,18})\.[A-Za-z0-9]+$")


@dataclass(frozen=True)
class Modality:
    name: str  # "images" / "texts": names the output folder and log lines
    id_key: str  # id column, and the id field of cn_clip's feature JSONL
    payload: str  # the column the model reads: encoded image bytes or raw text
    payload_type: pa.DataType = field(compare=False, default=pa.binary())

    @property
    def schema(self) -> pa.Schema:
        return pa.schema([(self.id_key, pa.int64()), (self.payload, self.payload_type), ("path", pa.string()),
                          ("shard", pa.int32()), ("row", pa.int64()), ("note", pa.string())])


IMAGES = Modality("images", "image_id", "image", pa.binary())
TEXTS = Modality("texts", "text_id", "text", pa.string())


# ---------------------------------------------------------------- bad records of the shard being read

_reading = threading.local()  # .records: the list the current shard's reader reports into


class ShardRecordSink:
    """The `bad_records` sink handed to the data plane's datasources: records
    skipped while `read_shard` reads a shard go into that shard's list (the
    reader reports synchronously, from the thread iterating it), so a finished
    shard carries its own skipped records and a resumed run still lists them."""

    def report(self, records) -> None:
        target = getattr(_reading, "records", None)
        if target is None:
            log_bad_records(None, list(records))  # outside a shard read (planning): just log
        else:
            target.extend(records)


def record_to_dict(record: BadRecord) -> dict[str, Any]:
    """JSON-safe: ids may come as numpy scalars or raw bytes from a malformed line."""
    ident = record.id.item() if isinstance(record.id, np.generic) else record.id
    if isinstance(ident, bytes):
        ident = ident.decode("utf-8", "replace")
    elif ident is not None and not isinstance(ident, (int, str)):
        ident = str(ident)
    return {"kind": str(record.kind), "id": ident, "where": str(record.where), "detail": str(record.detail)}


# ---------------------------------------------------------------- ids

def file_id(name: str) -> int:
    """int64 id of an image named by a string: `123.jpg` -> 123, anything else a stable hash."""
    match = _NUMBERED_FILE.match(name)
    if match:
        return int(match.group(1))
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "big") >> 1


def normalise_ids(column: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, pa.Array]:
    """(int64 ids, names): integer ids pass through with empty names; strings become `file_id`s."""
    if pa.types.is_integer(column.type):
        ids = column.cast(pa.int64())
        return ids, pa.array([""] * len(column), pa.string())
    names = [str(v) for v in column.to_pylist()]
    return pa.array([file_id(n) for n in names], pa.int64()), pa.array(names, pa.string())


# ---------------------------------------------------------------- tagging rows with their shard

def tag_block(block: Any, modality: Modality, shard: int, first_row: int) -> pa.Table:
    """A reader's block in the embed schema: int64 ids, `path`, `shard`, `row`, empty `note`."""
    table = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block, preserve_index=False)
    ids, names = normalise_ids(table.column(modality.id_key))
    n = table.num_rows
    return pa.table([ids, table.column(modality.payload).cast(modality.payload_type), names,
                     pa.array(np.full(n, shard, np.int32)), pa.array(np.arange(first_row, first_row + n)),
                     pa.array([""] * n, pa.string())], schema=modality.schema)


def marker_block(modality: Modality, shard: int, num_rows: int, records: Sequence[BadRecord]) -> pa.Table:
    note = json.dumps({"num_rows": num_rows, "bad_records": [record_to_dict(r) for r in records]})
    empty = b"" if pa.types.is_binary(modality.payload_type) else ""
    return pa.table([[0], [empty], [""], [shard], [MARKER_ROW], [note]], schema=modality.schema)


def read_shard(task: ReadTask, modality: Modality, shard: int) -> Iterator[pa.Table]:
    """Run one planned read task as shard `shard`: tagged blocks, then the marker."""
    records: list[BadRecord] = []
    num_rows = 0
    blocks = iter(task())
    while True:
        _reading.records = records  # only while the reader runs: its reports belong to this shard
        try:
            block = next(blocks, None)
        finally:
            _reading.records = None
        if block is None:
            break
        if block.num_rows:
            yield tag_block(block, modality, shard, num_rows)
            num_rows += block.num_rows
    yield marker_block(modality, shard, num_rows, records)


class ShardedDatasource(Datasource):
    """The read tasks of shards `todo` of a planned corpus, whatever parallelism Ray asks for:
    the shard boundaries were fixed when the corpus was planned."""

    def __init__(self, tasks: Sequence[ReadTask], todo: Sequence[int], modality: Modality):
        super().__init__()
        self.tasks = list(tasks)
        self.todo = list(todo)
        self.modality = modality

    def get_name(self) -> str:
        return f"ReadShards[{self.modality.name}]"

    def estimate_inmemory_data_size(self) -> int | None:
        sizes = [self.tasks[i].metadata.size_bytes for i in self.todo]
        return None if any(s is None for s in sizes) else int(sum(sizes))

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        return [ReadTask(partial(read_shard, self.tasks[i], self.modality, i), self.tasks[i].metadata,
                         schema=self.modality.schema, per_task_row_limit=per_task_row_limit)
                for i in self.todo]


# ---------------------------------------------------------------- Parquet image corpora

def _read_parquet_groups(pieces: Sequence[tuple[str, tuple[int, ...]]], filesystem: pafs.FileSystem,
                         id_column: str, image_column: str) -> Iterator[pa.Table]:
    for path, groups in pieces:
        with filesystem.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            for group in groups:
                table = parquet.read_row_group(group, columns=[id_column, image_column])
                yield table.rename_columns(["image_id", "image"])


class ParquetImagesDatasource(Datasource):
    """Parquet image corpora (`id`, `image` columns) cut along row groups into N
    contiguous pieces of about equal rows. (The data plane reads Parquet through
    `ray.data.read_parquet`, whose read tasks cannot be tagged with a shard.)"""

    def __init__(self, filesystem: pafs.FileSystem, files: Sequence[pafs.FileInfo], id_column: str = "id",
                 image_column: str = "image"):
        super().__init__()
        self.filesystem, self.id_column, self.image_column = filesystem, id_column, image_column
        self.groups: list[tuple[str, int, int]] = []  # (path, row group, rows)
        for info in files:
            with filesystem.open_input_file(info.path) as handle:
                parquet = pq.ParquetFile(handle)
                missing = [c for c in (id_column, image_column) if c not in parquet.schema_arrow.names]
                if missing:
                    raise ValueError(f"{info.path} has no column {', '.join(missing)} "
                                     f"(columns: {', '.join(parquet.schema_arrow.names)})")
                meta = parquet.metadata
                self.groups.extend((info.path, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups))

    @property
    def num_rows(self) -> int:
        return sum(rows for _, _, rows in self.groups)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        tasks = []
        for piece in _even_row_pieces(self.groups, parallelism):
            by_file: dict[str, list[int]] = {}
            for path, group, _ in piece:
                by_file.setdefault(path, []).append(group)
            pieces = [(path, tuple(groups)) for path, groups in by_file.items()]
            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=list(by_file), exec_stats=None)
            tasks.append(ReadTask(partial(_read_parquet_groups, pieces, self.filesystem, self.id_column,
                                          self.image_column), meta, per_task_row_limit=per_task_row_limit))
        return tasks


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


# ---------------------------------------------------------------- planning

@dataclass
class CorpusPlan:
    """A corpus cut into shards: read task i is shard i."""

    tasks: list[ReadTask]
    requested: int  # the N the datasource was planned for (a resumed run asks for the same)
    fingerprint: dict[str, Any]  # the input it was planned on: kind, path, files and sizes
    estimated_rows: int  # records in the corpus, estimated from its files (exact for LMDB and Parquet)

    @property
    def num_shards(self) -> int:
        return len(self.tasks)


@dataclass
class _Source:
    datasource: Datasource
    estimated_rows: int
    fingerprint: dict[str, Any]
    min_shards: int = 1  # compressed line files cannot be split: at least one shard each


def plan_corpus(path: str, modality: Modality, rows_per_shard: int, requested: int | None = None) -> CorpusPlan:
    """Shards of about `rows_per_shard` rows over the corpus at `path`, or exactly the
    split of an earlier plan when `requested` (its N) is given."""
    source = image_source(path) if modality == IMAGES else text_source(path)
    if requested is None:
        requested = max(source.min_shards, math.ceil(source.estimated_rows / rows_per_shard), 1)
    tasks = source.datasource.get_read_tasks(requested)
    return CorpusPlan(tasks, requested, source.fingerprint, source.estimated_rows)


def _fingerprint(kind: str, path: Any, infos: Sequence[pafs.FileInfo]) -> dict[str, Any]:
    return {"kind": kind, "path": str(path), "files": [[i.path, i.size] for i in infos]}


def _estimate_lines(fs: pafs.FileSystem, infos: Sequence[pafs.FileInfo]) -> int:
    """Lines in the files, from the newline density of the start of the first plain one."""
    plain = [i for i in infos if not i.path.lower().endswith(_COMPRESSED)]
    if not plain:
        return len(infos)
    with fs.open_input_stream(plain[0].path) as stream:
        sample = stream.read(SAMPLE_BYTES)
    lines = sample.count(b"\n") + (1 if sample and not sample.endswith(b"\n") else 0)
    total = sum(i.size or 0 for i in plain)
    return max(1, round(total * lines / max(1, len(sample))))


def _num_compressed(infos: Sequence[pafs.FileInfo]) -> int:
    return sum(i.path.lower().endswith(_COMPRESSED) for i in infos)


def text_source(path: str) -> _Source:
    fs, infos = list_files(path, None, JSONL_SUFFIXES)
    # min_split_bytes=1: shards are as small as asked, not the data plane's 1 MiB minimum.
    datasource = LinesDatasource(fs, infos, TextLines(require_image_ids=False), ShardRecordSink(), min_split_bytes=1)
    return _Source(datasource, _estimate_lines(fs, infos), _fingerprint("jsonl", path, infos), _num_compressed(infos))


def image_source(path: str) -> _Source:
    """The corpus kinds of `clip_platform.data.read_images`, found by the same
    `image_datasource`: an LMDB imgs (or split) dir, `*_imgs.tsv` files, Parquet (`id`,
    `image`) files, or image files / a folder of them. Parquet is cut along row groups here."""
    # min_split_bytes=1: shards are as small as asked, not the data plane's 1 MiB minimum.
    found = image_datasource(path, bad_records=ShardRecordSink(), min_split_bytes=1)
    fs, infos = found.filesystem, found.files
    if found.kind == "lmdb":
        imgs_dir = Path(found.datasource.imgs_dir)  # resolved
        size = (imgs_dir / "data.mdb").stat().st_size
        fingerprint = {"kind": "lmdb", "path": str(imgs_dir), "files": [["data.mdb", size]]}
        return _Source(found.datasource, lmdb_io.num_images(imgs_dir), fingerprint)
    if found.kind == "tsv":
        return _Source(found.datasource, _estimate_lines(fs, infos), _fingerprint(found.kind, path, infos),
                       _num_compressed(infos))
    if found.kind == "parquet":
        datasource = ParquetImagesDatasource(fs, infos)
        return _Source(datasource, datasource.num_rows, _fingerprint(found.kind, path, infos))
    return _Source(found.datasource, len(infos), _fingerprint(found.kind, path, infos))
