"""The id table of an index: which file and row each id came from (and its `path` where
the embed shards keep one), and where its vector is stored, sorted by id and read
memory-mapped: a lookup touches the pages of the rows it asks for, not the table.

Built without holding it: every scan task writes its shard's rows as a run sorted by id
(`write_id_run`), and `merge_id_runs` merges the runs a batch of each at a time, which
is also where a duplicate id shows up (equal neighbours), named with both places. An
added batch of features merges its runs with the current table; removed ids are left
out of the next table.

    metadata.arrow     id int64, file (dictionary string), row int64, position int64[, path string],
                       in id order: an Arrow IPC file, uncompressed, in batches of GROUP_ROWS rows
                       (pyarrow, pandas and polars read it; a process maps it instead of reading it)
    ids.npy            the same ids in one contiguous int64 array, for np.searchsorted over the mapped
                       file (the table's id column is in batches): an id's rank is its row in the table
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..io import atomic_path

GROUP_ROWS = 65536  # rows per record batch of the table
MERGE_BATCH_ROWS = 65536  # rows read from each run at a time while merging, at most
MERGE_ROWS = 1 << 22  # rows held over all runs while merging (~200 MB): many runs read fewer rows each


def table_files(generation: int) -> dict[str, str]:
    """The id table's files of one generation (the build's is 0; each --add / --remove-ids
    writes the next beside it, and the manifest switches to it in one write)."""
    suffix = f"-{generation:05d}" if generation else ""
    return {"table": f"metadata{suffix}.arrow", "ids": f"ids{suffix}.npy"}


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


def _read_batches(run: Path, batch_rows: int) -> Iterator[pa.RecordBatch]:
    """A scan run (Parquet, `batch_rows` at a time) or a previous id table (Arrow IPC, mapped:
    a batch at a time)."""
    if run.suffix == ".parquet":
        yield from pq.ParquetFile(run).iter_batches(batch_size=batch_rows)
        return
    with pa.memory_map(str(run)) as source:
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)


def _num_rows(run: Path) -> int:
    if run.suffix == ".parquet":
        return pq.ParquetFile(run).metadata.num_rows
    with pa.memory_map(str(run)) as source:
        reader = pa.ipc.open_file(source)
        return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))


def _schema(run: Path) -> pa.Schema:
    if run.suffix == ".parquet":
        return pq.read_schema(run)
    with pa.memory_map(str(run)) as source:
        return pa.ipc.open_file(source).schema


def _batches(run: Path, with_path: bool, offset: int | None, drop: np.ndarray,
             batch_rows: int) -> Iterator[pa.Table]:
    """A run's rows as (id, source, row, position[, path]) batches: a scan run's positions are
    its rows + `offset`; a previous id table (offset None) has them, and its file numbers."""
    for batch in _read_batches(run, batch_rows):
        table = pa.Table.from_batches([batch])
        if offset is None:
            table = table.set_column(table.schema.get_field_index("file"), "source",
                                     table.column("file").combine_chunks().indices)
        else:
            table = table.append_column("position", pc.add(table.column("row"), offset))
        if with_path and "path" not in table.column_names:
            table = table.append_column("path", pa.nulls(len(table), pa.string()))
        if len(drop):
            table = table.filter(pa.array(~np.isin(table.column("id").to_numpy(), drop)))
        yield table.select(["id", "source", "row", "position"] + (["path"] if with_path else []))


def merge_id_runs(runs: Sequence[Path], offsets: Sequence[int | None], sources: Sequence[str],
                  directory: str | os.PathLike, generation: int = 0, drop: np.ndarray | None = None) -> int:
    """Merge the sorted runs into `directory`'s id table of `generation`, leaving out the ids in
    `drop`; returns the rows written. A run's offset turns its rows into vector positions (None:
    the run is a previous id table; every id in `drop` must be in it). A duplicate id is a
    ValueError naming both of its places."""
    drop = np.zeros(0, np.int64) if drop is None else np.unique(np.asarray(drop, np.int64))
    runs = [Path(run) for run in runs]
    with_path = any("path" in _schema(run).names for run in runs)
    total = sum(_num_rows(run) for run in runs) - len(drop)
    batch_rows = max(1, min(MERGE_BATCH_ROWS, MERGE_ROWS // max(1, len(runs))))  # bounded whatever the run count
    readers = [_batches(run, with_path, offset, drop, batch_rows) for run, offset in zip(runs, offsets)]
    pending: list[pa.Table | None] = [None] * len(runs)
    files = pa.array(list(sources), pa.string())
    writer = _TableWriter(Path(directory), table_files(generation), with_path, total)
    last_id = None
    with writer:
        while True:
            for i, reader in enumerate(readers):  # refill the runs whose batch was used up
                while reader is not None and (pending[i] is None or not len(pending[i])):
                    pending[i] = next(reader, None)
                    if pending[i] is None:
                        readers[i] = reader = None
            if not any(t is not None and len(t) for t in pending):
                break
            # Ids up to the smallest last id of a run still being read are final: no run holds a smaller one later.
            bound = min((t.column("id")[-1].as_py() for i, t in enumerate(pending)
                         if t is not None and len(t) and readers[i] is not None), default=None)
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


class _TableWriter:
    """Rows in id order -> the Arrow table in batches of GROUP_ROWS, and the id array beside
    it, written through a memory map (`rows` of them, known ahead)."""

    def __init__(self, directory: Path, names: dict[str, str], with_path: bool, rows: int):
        self.directory, self.names, self.with_path, self.rows = directory, names, with_path, rows
        self.buffer: list[pa.Table] = []
        self.buffered = self.num_rows = 0

    def __enter__(self):
        self._files = ExitStack()
        tmp = {name: self._files.enter_context(atomic_path(self.directory / self.names[name]))
               for name in ("table", "ids")}
        self.arrays = {name: np.lib.format.open_memmap(tmp[name], "w+", np.int64, (self.rows,))
                       for name in ("ids",)}
        fields = [("id", pa.int64()), ("file", pa.dictionary(pa.int32(), pa.string())), ("row", pa.int64()),
                  ("position", pa.int64())] + ([("path", pa.string())] if self.with_path else [])
        self._sink = pa.OSFile(tmp["table"], "wb")
        self.writer = pa.ipc.new_file(self._sink, pa.schema(fields))
        return self

    def write(self, table: pa.Table, files: pa.Array) -> None:
        columns = {"id": table.column("id"),
                   "file": pa.DictionaryArray.from_arrays(table.column("source").combine_chunks(), files),
                   "row": table.column("row"), "position": table.column("position")}
        if self.with_path:
            columns["path"] = table.column("path")
        self.buffer.append(pa.table(columns))
        self.buffered += len(table)
        while self.buffered >= GROUP_ROWS:
            self._flush(GROUP_ROWS)

    def _flush(self, rows: int) -> None:
        merged = pa.concat_tables(self.buffer)
        group, rest = merged.slice(0, rows), merged.slice(rows)
        self.writer.write_table(group.combine_chunks())  # one record batch per group
        end = self.num_rows + len(group)
        self.arrays["ids"][self.num_rows:end] = group.column("id").to_numpy()
        self.num_rows = end
        self.buffer, self.buffered = [rest], len(rest)

    def __exit__(self, *exc_info):
        error = exc_info[1]
        try:
            if error is None and self.buffered:
                self._flush(self.buffered)
            self.writer.close()
            self._sink.close()
            for values in self.arrays.values():
                values.flush()
            self.arrays.clear()
            if error is None and self.num_rows != self.rows:
                raise RuntimeError(f"id table of {self.num_rows} rows, {self.rows} expected")
        except BaseException as exc:  # nothing is renamed into place
            error = error or exc
        if error is None:
            self._files.close()  # every file renamed into place
            return False
        self._files.__exit__(type(error), error, error.__traceback__)  # every temporary file removed
        if error is not exc_info[1]:
            raise error
        return False


class Metadata:
    """An index's id table, memory-mapped: ranks by binary search over the ids, rows taken
    from the mapped Arrow table (safe to share between threads: nothing is read into state).

    Rows are taken record batch by record batch: Arrow's take over the whole chunked table
    costs about 10 ms at 2M rows (31 batches, a dictionary column) whatever the number of rows
    taken; per batch it is ~1 ms for 10 rows."""

    def __init__(self, directory: str | os.PathLike, files: dict[str, str] | None = None):
        directory, files = Path(directory), files or table_files(0)
        self._map = pa.memory_map(str(directory / files["table"]))
        self.table = pa.ipc.open_file(self._map).read_all()  # zero-copy: views of the mapped file
        self.ids = np.load(directory / files["ids"], mmap_mode="r")
        self._batches = self.table.to_batches()
        self._starts = np.cumsum([0] + [batch.num_rows for batch in self._batches])
        self._positions = [batch.column("position").to_numpy() for batch in self._batches]  # zero-copy views

    def __len__(self) -> int:
        return len(self.ids)

    def ranks(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Each id's row in the table, -1 for ids not in the index."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        ranks = np.searchsorted(self.ids, ids)
        inside = ranks < len(self.ids)
        inside[inside] = self.ids[ranks[inside]] == ids[inside]
        return np.where(inside, ranks, -1)

    def _by_batch(self, ranks: np.ndarray):
        """(batch number, the ranks' positions in `ranks`, their rows within that batch)."""
        batch_of = np.searchsorted(self._starts, ranks, side="right") - 1
        for b in np.unique(batch_of):
            where = np.flatnonzero(batch_of == b)
            yield b, where, ranks[where] - self._starts[b]

    def positions(self, ranks: np.ndarray) -> np.ndarray:
        """The vector-store row of the ids at these ranks (each >= 0)."""
        ranks = np.asarray(ranks, np.int64)
        out = np.empty(len(ranks), np.int64)
        for b, where, rows in self._by_batch(ranks):
            out[where] = self._positions[b][rows]
        return out

    def lookup(self, ids: Sequence[int] | np.ndarray) -> dict[int, dict]:
        """{id: {"file", "row"[, "path"]}} for the ids present (ids not in the index are left out)."""
        ranks = np.unique(self.ranks(ids))
        ranks = ranks[ranks >= 0]
        out = {}
        for b, _, rows in self._by_batch(ranks):
            for row in self._batches[b].take(pa.array(rows, pa.int64())).drop_columns(["position"]).to_pylist():
                out[row.pop("id")] = row
        return out
