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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from ...data import image_source, text_source
from ...data.records import BadRecord, stable_id
from ...data.sources import Piece

MARKER_ROW = -1  # `row` of the end-of-shard marker


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
    note = json.dumps({"num_rows": num_rows, "bad_records": [r.to_dict() for r in records]})
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


def plan_corpus(path: str, modality: Modality, rows_per_shard: int, requested: int | None = None) -> CorpusPlan:
    """Shards of about `rows_per_shard` rows over the corpus at `path`, or exactly the
    split of an earlier plan when `requested` (its N) is given."""
    # min_split_bytes=1: shards are as small as asked, not the data plane's 16 MiB minimum.
    found = (image_source if modality == IMAGES else text_source)(path, min_split_bytes=1)
    estimated = found.estimated_rows()
    if requested is None:
        requested = max(found.min_pieces(), math.ceil(estimated / rows_per_shard), 1)
    return CorpusPlan(found.datasource.pieces(requested), requested, found.fingerprint(path), estimated)
