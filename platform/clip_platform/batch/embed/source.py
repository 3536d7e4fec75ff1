"""The embed job's reader: a corpus cut into deterministic shards, each one Ray Data read task.

The data plane's datasources (`image_source` / `text_source`: LMDB key ranges, TSV/JSONL
byte ranges, Parquet row groups, webdataset tar shards, image files) cut their input into
N disjoint pieces for a given N. Planning the corpus once for a fixed N (recorded in the
output's plan file, so a resumed run asks for the same N) makes piece i a deterministic
slice of the input: shard i. `ShardedDatasource` reads the unfinished shards only, each
piece with a sink of its own for the records it skips, and tags every row with (`shard`,
`row` within the shard); after a shard's last row it emits one end-of-shard marker row
(`row` -1) whose `note` holds the shard's row count and the records its reader skipped.
The writer knows a shard is complete when the marker and every row have arrived,
whatever the order.

Ids become int64: cn_clip's are ints already; image files, webdataset keys and Parquet
corpora with string ids get `records.stable_id` (the number of `123.jpg` or `000123`, or
a stable 63-bit hash of the name) and keep the name in `path`.
"""
from __future__ import annotations

import json
import math
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from ...data import image_source, lmdb_io, text_source
from ...data.files import COMPRESSED_SUFFIXES
from ...data.webdataset import TarIndex
from ...data.records import BadRecord, stable_id
from ...data.sources import Piece, PieceDatasource

MARKER_ROW = -1  # `row` of the end-of-shard marker
SAMPLE_BYTES = 4 << 20  # bytes of a line file read to estimate its number of lines


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


def record_to_dict(record: BadRecord) -> dict[str, Any]:
    """JSON-safe: ids may come as numpy scalars or raw bytes from a malformed line."""
    ident = record.id.item() if isinstance(record.id, np.generic) else record.id
    if isinstance(ident, bytes):
        ident = ident.decode("utf-8", "replace")
    elif ident is not None and not isinstance(ident, (int, str)):
        ident = str(ident)
    return {"kind": str(record.kind), "id": ident, "where": str(record.where), "detail": str(record.detail)}


def normalise_ids(column: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, pa.Array]:
    """(int64 ids, names): integer ids pass through with empty names; strings become `stable_id`s."""
    if pa.types.is_integer(column.type):
        ids = column.cast(pa.int64())
        return ids, pa.array([""] * len(column), pa.string())
    names = [str(v) for v in column.to_pylist()]
    return pa.array([stable_id(n) for n in names], pa.int64()), pa.array(names, pa.string())


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


class ShardRecords(list):
    """The bad-record sink of one shard's read: its records end up in the shard's marker."""

    def report(self, records) -> None:
        self.extend(records)


def read_shard(piece: Piece, modality: Modality, shard: int) -> Iterator[pa.Table]:
    """Read one planned piece as shard `shard`: tagged blocks, then the marker."""
    records = ShardRecords()
    num_rows = 0
    for block in piece.read(records):
        if block.num_rows:
            yield tag_block(block, modality, shard, num_rows)
            num_rows += block.num_rows
    yield marker_block(modality, shard, num_rows, records)


class ShardedDatasource(Datasource):
    """The read tasks of shards `todo` of a planned corpus, whatever parallelism Ray asks for:
    the shard boundaries were fixed when the corpus was planned."""

    def __init__(self, pieces: Sequence[Piece], todo: Sequence[int], modality: Modality):
        super().__init__()
        self.pieces = list(pieces)
        self.todo = list(todo)
        self.modality = modality

    def get_name(self) -> str:
        return f"ReadShards[{self.modality.name}]"

    def estimate_inmemory_data_size(self) -> int | None:
        sizes = [self.pieces[i].size_bytes for i in self.todo]
        return None if any(s is None for s in sizes) else int(sum(sizes))

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        tasks = []
        for i in self.todo:
            metadata = BlockMetadata(num_rows=None, size_bytes=self.pieces[i].size_bytes,
                                     input_files=self.pieces[i].input_files or None, exec_stats=None)
            tasks.append(ReadTask(partial(read_shard, self.pieces[i], self.modality, i), metadata,
                                  schema=self.modality.schema, per_task_row_limit=per_task_row_limit))
        return tasks


@dataclass
class CorpusPlan:
    """A corpus cut into shards: piece i is shard i."""

    pieces: list[Piece]
    requested: int  # the N the datasource was planned for (a resumed run asks for the same)
    fingerprint: dict[str, Any]  # the input it was planned on: kind, path, files and sizes
    estimated_rows: int  # records in the corpus, estimated from its files (exact for LMDB and Parquet)

    @property
    def num_shards(self) -> int:
        return len(self.pieces)


@dataclass
class _Corpus:
    datasource: PieceDatasource
    estimated_rows: int
    fingerprint: dict[str, Any]
    min_shards: int = 1  # compressed line files and tar shards cannot be split: at least one shard each


def plan_corpus(path: str, modality: Modality, rows_per_shard: int, requested: int | None = None) -> CorpusPlan:
    """Shards of about `rows_per_shard` rows over the corpus at `path`, or exactly the
    split of an earlier plan when `requested` (its N) is given."""
    corpus = _image_corpus(path) if modality == IMAGES else _text_corpus(path)
    if requested is None:
        requested = max(corpus.min_shards, math.ceil(corpus.estimated_rows / rows_per_shard), 1)
    return CorpusPlan(corpus.datasource.pieces(requested), requested, corpus.fingerprint, corpus.estimated_rows)


def _fingerprint(kind: str, path: Any, infos: Sequence[pafs.FileInfo]) -> dict[str, Any]:
    return {"kind": kind, "path": str(path), "files": [[i.path, i.size] for i in infos]}


def _estimate_lines(fs: pafs.FileSystem, infos: Sequence[pafs.FileInfo]) -> int:
    """Lines in the files, from the newline density of the start of the first plain one."""
    plain = [i for i in infos if not i.path.lower().endswith(COMPRESSED_SUFFIXES)]
    if not plain:
        return len(infos)
    with fs.open_input_stream(plain[0].path) as stream:
        sample = stream.read(SAMPLE_BYTES)
    lines = sample.count(b"\n") + (1 if sample and not sample.endswith(b"\n") else 0)
    total = sum(i.size or 0 for i in plain)
    return max(1, round(total * lines / max(1, len(sample))))


def _estimate_samples(fs: pafs.FileSystem, infos: Sequence[pafs.FileInfo]) -> int:
    """Samples in tar shards, from the first shard's member headers (a seek per member, no
    data read) scaled by bytes: img2dataset's shards hold about equal samples."""
    try:
        first = TarIndex.scan(fs, infos[0].path)
    except (OSError, EOFError, tarfile.TarError):  # unreadable: its read task reports it, by name
        return len(infos)
    per_byte = (len(first) + first.num_incomplete) / max(1, infos[0].size or 1)
    return max(len(infos), round(per_byte * sum(i.size or 0 for i in infos)))


def _files_corpus(found: Any, path: str) -> _Corpus:
    """A corpus of files: rows estimated from line density (TSV, JSONL), one per image file,
    or a shard per tar file (webdataset shards are the unit img2dataset sizes)."""
    fs, infos = found.filesystem, found.files
    fingerprint = _fingerprint(found.kind, path, infos)
    if found.kind in ("tsv", "jsonl"):
        compressed = sum(i.path.lower().endswith(COMPRESSED_SUFFIXES) for i in infos)
        return _Corpus(found.datasource, _estimate_lines(fs, infos), fingerprint, compressed)
    if found.kind == "webdataset":
        return _Corpus(found.datasource, _estimate_samples(fs, infos), fingerprint, len(infos))
    return _Corpus(found.datasource, len(infos), fingerprint)


def _text_corpus(path: str) -> _Corpus:
    # min_split_bytes=1: shards are as small as asked, not the data plane's 16 MiB minimum.
    return _files_corpus(text_source(path, min_split_bytes=1), path)


def _image_corpus(path: str) -> _Corpus:
    # min_split_bytes=1: shards are as small as asked, not the data plane's 16 MiB minimum.
    found = image_source(path, min_split_bytes=1)
    if found.kind == "lmdb":
        imgs_dir = Path(found.datasource.imgs_dir)  # resolved
        size = (imgs_dir / "data.mdb").stat().st_size
        fingerprint = {"kind": "lmdb", "path": str(imgs_dir), "files": [["data.mdb", size]]}
        return _Corpus(found.datasource, lmdb_io.num_images(imgs_dir), fingerprint)
    if found.kind == "parquet":
        return _Corpus(found.datasource, found.datasource.num_rows, _fingerprint(found.kind, path, found.files))
    return _files_corpus(found, path)
