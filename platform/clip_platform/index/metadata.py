"""The id -> metadata table of an index: which file and row each id came from (and its
`path` where the embed shards keep one), sorted by id, readable a row group at a time.

Built without holding it: every encoding shard writes its rows as a run sorted by id
(`write_id_run`), and `merge_id_runs` merges the runs a batch of each at a time, which
is also where a duplicate id shows up (equal neighbours), named with both places.

    metadata.parquet      id int64, file (dictionary string), row int64[, path string]
    metadata.ranges.npy   [row groups, 2] first and last id of each row group: a lookup
                          reads only the row groups its ids fall in
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..io import atomic_path

METADATA_FILE = "metadata.parquet"
RANGES_FILE = "metadata.ranges.npy"
GROUP_ROWS = 65536  # rows per row group: the unit a lookup reads
MERGE_BATCH_ROWS = 65536  # rows read from each run at a time while merging


def write_id_run(path: str | os.PathLike, ids: np.ndarray, source: int, first_row: int,
                 paths: list[str] | None) -> None:
    """One shard's rows as a run sorted by id: id, source (file number), row[, path]."""
    order = np.argsort(ids, kind="stable")
    columns = {"id": pa.array(ids[order], pa.int64()),
               "source": pa.array(np.full(len(ids), source, np.int32)),
               "row": pa.array(first_row + order.astype(np.int64))}
    if paths is not None:
        columns["path"] = pa.array([paths[i] for i in order.tolist()], pa.string())
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(columns), tmp)


def _batches(run: Path, with_path: bool) -> Iterator[pa.Table]:
    for batch in pq.ParquetFile(run).iter_batches(batch_size=MERGE_BATCH_ROWS):
        table = pa.Table.from_batches([batch])
        if with_path and "path" not in table.column_names:
            table = table.append_column("path", pa.nulls(len(table), pa.string()))
        yield table


def merge_id_runs(runs: Sequence[Path], sources: Sequence[str], directory: str | os.PathLike) -> int:
    """Merge the sorted runs into `directory`'s metadata table and its ranges; returns the
    rows written. A duplicate id is a ValueError naming the id and both of its places."""
    with_path = any("path" in pq.read_schema(run).names for run in runs)
    readers = [_batches(run, with_path) for run in runs]
    pending: list[pa.Table | None] = [None] * len(runs)
    files = pa.array(list(sources), pa.string())
    writer = _GroupWriter(Path(directory), with_path)
    last_id = None
    with writer:
        while True:
            for i, reader in enumerate(readers):  # refill the runs whose batch was used up
                while reader is not None and (pending[i] is None or not len(pending[i])):
                    pending[i] = next(reader, None)
                    if pending[i] is None:
                        readers[i] = reader = None
            live = [t for t in pending if t is not None and len(t)]
            if not live:
                break
            # Ids up to the smallest last id of a run still being read are final: no run holds a smaller one later.
            bound = min(t.column("id")[-1].as_py() for i, t in enumerate(pending)
                        if t is not None and len(t) and readers[i] is not None) \
                if any(r is not None for r in readers) else None
            parts = []
            for i, table in enumerate(pending):
                if table is None or not len(table):
                    continue
                cut = len(table) if bound is None else int(np.searchsorted(table.column("id").to_numpy(), bound,
                                                                           side="right"))
                parts.append(table.slice(0, cut))
                pending[i] = table.slice(cut)
            merged = pa.concat_tables(parts)
            merged = merged.take(np.argsort(merged.column("id").to_numpy(), kind="stable"))
            _check_unique(merged, last_id, sources)
            last_id = merged.column("id")[-1].as_py() if len(merged) else last_id
            writer.write(merged, files)
    return writer.num_rows


def _check_unique(table: pa.Table, last_id: int | None, sources: Sequence[str]) -> None:
    ids = table.column("id").to_numpy()
    same = np.flatnonzero(ids[1:] == ids[:-1])
    if len(same):
        a, b = table.slice(int(same[0]), 2).to_pylist()
        raise ValueError(f"id {a['id']} appears twice in the features: {sources[a['source']]} row {a['row']} "
                         f"and {sources[b['source']]} row {b['row']}; ids must be unique")
    if last_id is not None and len(ids) and ids[0] == last_id:
        first = table.slice(0, 1).to_pylist()[0]
        raise ValueError(f"id {last_id} appears twice in the features (again at {sources[first['source']]} "
                         f"row {first['row']}); ids must be unique")


class _GroupWriter:
    """Rows in id order -> row groups of exactly GROUP_ROWS, and each group's id range."""

    def __init__(self, directory: Path, with_path: bool):
        self.directory, self.with_path = directory, with_path
        self.buffer: list[pa.Table] = []
        self.buffered = self.num_rows = 0
        self.ranges: list[tuple[int, int]] = []

    def __enter__(self):
        self._atomic = atomic_path(self.directory / METADATA_FILE)
        tmp = self._atomic.__enter__()
        fields = [("id", pa.int64()), ("file", pa.dictionary(pa.int32(), pa.string())), ("row", pa.int64())]
        self.writer = pq.ParquetWriter(tmp, pa.schema(fields + ([("path", pa.string())] if self.with_path else [])))
        return self

    def write(self, table: pa.Table, files: pa.Array) -> None:
        columns = {"id": table.column("id"),
                   "file": pa.DictionaryArray.from_arrays(table.column("source").combine_chunks(), files),
                   "row": table.column("row")}
        if self.with_path:
            columns["path"] = table.column("path")
        self.buffer.append(pa.table(columns))
        self.buffered += len(table)
        while self.buffered >= GROUP_ROWS:
            self._flush(GROUP_ROWS)

    def _flush(self, rows: int) -> None:
        merged = pa.concat_tables(self.buffer)
        group, rest = merged.slice(0, rows), merged.slice(rows)
        self.writer.write_table(group, row_group_size=rows)
        ids = group.column("id")
        self.ranges.append((ids[0].as_py(), ids[-1].as_py()))
        self.num_rows += len(group)
        self.buffer, self.buffered = [rest], len(rest)

    def __exit__(self, *exc_info):
        try:
            if exc_info[0] is None and self.buffered:
                self._flush(self.buffered)
            self.writer.close()
        finally:
            self._atomic.__exit__(*exc_info)
        if exc_info[0] is None:
            with atomic_path(self.directory / RANGES_FILE) as tmp, open(tmp, "wb") as out:
                np.save(out, np.asarray(self.ranges, np.int64).reshape(-1, 2))
        return False


class Metadata:
    """Reads an index's metadata table by id, one row group per range of ids asked for."""

    def __init__(self, directory: str | os.PathLike):
        directory = Path(directory)
        self.file = pq.ParquetFile(directory / METADATA_FILE)
        self.ranges = np.load(directory / RANGES_FILE)

    def lookup(self, ids: Sequence[int] | np.ndarray) -> dict[int, dict]:
        """{id: {"file", "row"[, "path"]}} for the ids present (ids not in the index are left out)."""
        ids = np.unique(np.asarray(ids, np.int64))
        groups = np.searchsorted(self.ranges[:, 1], ids, side="left")
        found: dict[int, dict] = {}
        for group in np.unique(groups[groups < len(self.ranges)]).tolist():
            table = self.file.read_row_group(group)
            wanted = ids[groups == group]
            keep = np.isin(table.column("id").to_numpy(), wanted)
            for row in table.filter(pa.array(keep)).to_pylist():
                found[row.pop("id")] = row
        return found
