"""The embed job's writer: encoded rows -> finished shards -> files, resumable.

`ShardAssembler` groups the rows coming out of the encoder pool by shard and
hands over a shard once its end-of-shard marker and every one of its rows have
arrived (rows of many shards arrive interleaved, in any order, and a retried
task may deliver a row twice).

`ShardStore` is one output folder (`images/` or `texts/`):

    _plan.json                     what was planned: input fingerprint, model, N
    part-00003-of-00012.parquet    features of shard 3 (or .jsonl, cn_clip's lines)
    _shards/00003.ids.npy          its ids, for the duplicate check
    _shards/00003.json             its record: rows, features, skipped records

Every file is written atomically and the shard's record last, so a shard with a
record is finished and a resumed run skips it. Plain numpy/pyarrow: testable
without Ray.
"""
from __future__ import annotations

import fnmatch
import io
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ...data.bad_records import BadRecordCounter, BadRecordSummary
from ...data.features import PLAN_FILE, Features, features_table, jsonl_lines, table_to_features
from ...data.records import DUPLICATE_ID, BadRecord
from ...io import (atomic_path, file_names, join, name_of, read_file, remove, resolve_filesystem, write_json,
                    write_lines)
from .source import MARKER_ROW, Modality

FORMATS = ("parquet", "jsonl")
STATE_DIR = "_shards"


@dataclass
class FinishedShard:
    shard: int
    num_rows: int  # rows its reader produced (skipped records included, reader-level ones not)
    features: Features  # normalised, in input order
    paths: list[str] | None  # names of string-id records (image files), else None
    bad_records: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------- assembling shards from encoded batches

class _PartialShard:
    def __init__(self):
        self.parts: list[dict[str, np.ndarray]] = []
        self.num_rows: int | None = None
        self.reader_bad: list[dict[str, Any]] = []
        self.num_received = 0

    def add(self, rows: dict[str, np.ndarray]) -> None:
        marker = rows["row"] == MARKER_ROW
        if marker.any():
            note = json.loads(str(rows["note"][marker][0]))
            self.num_rows, self.reader_bad = note["num_rows"], note["bad_records"]
            rows = {k: v[~marker] for k, v in rows.items()}
        if len(rows["row"]):
            self.parts.append(rows)
            self.num_received += len(rows["row"])

    @property
    def complete(self) -> bool:
        if self.num_rows is None or self.num_received < self.num_rows:
            return False
        # More rows than planned means a retried task delivered some twice: count distinct ones.
        rows = np.concatenate([p["row"] for p in self.parts]) if self.parts else np.zeros(0)
        return self.num_received == self.num_rows or len(np.unique(rows)) == self.num_rows

    def finish(self, shard: int, modality: Modality) -> FinishedShard:
        if not self.parts:
            return FinishedShard(shard, int(self.num_rows), Features.empty(), None, list(self.reader_bad))
        merged = {k: np.concatenate([p[k] for p in self.parts]) for k in self.parts[0]}
        _, first = np.unique(merged["row"], return_index=True)  # row order, each row once
        rows = {k: v[first] for k, v in merged.items()}
        ok = rows["ok"].astype(bool)
        vectors = np.asarray(rows["feature"], np.float32).reshape(len(ok), -1)[ok]
        names = rows["path"].astype(str)
        bad = self.reader_bad + [json.loads(str(note)) for note in rows["note"][~ok]]
        paths = names[ok].tolist() if (names != "").any() else None
        features = Features(rows[modality.id_key][ok].astype(np.int64), np.ascontiguousarray(vectors))
        return FinishedShard(shard, int(self.num_rows), features, paths, bad)


class ShardAssembler:
    """Rows from the encoder pool in any order -> shards, each handed over once complete."""

    def __init__(self, modality: Modality):
        self.modality = modality
        self.pending: dict[int, _PartialShard] = {}

    def add(self, batch: dict[str, np.ndarray]) -> list[FinishedShard]:
        finished = []
        shards = np.asarray(batch["shard"])
        for shard in np.unique(shards).tolist():
            select = shards == shard
            partial = self.pending.setdefault(shard, _PartialShard())
            partial.add({k: np.asarray(v)[select] for k, v in batch.items()})
            if partial.complete:
                finished.append(partial.finish(shard, self.modality))
                del self.pending[shard]
        return finished


# ---------------------------------------------------------------- the shard folder

class ShardStore:
    """One output folder, a local path or a URI (s3://bucket/features/images): every name is
    joined as a string and every file goes through clip_platform.io."""

    def __init__(self, directory: str | os.PathLike, modality: Modality, fmt: str = "parquet"):
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        self.directory = os.fspath(directory)
        self.modality = modality
        self.format = fmt

    # -- names
    def path(self, *names: str) -> str:
        return join(self.directory, *names)

    def data_path(self, shard: int, num_shards: int) -> str:
        return self.path(f"part-{shard:05d}-of-{num_shards:05d}.{self.format}")

    def record_path(self, shard: int) -> str:
        return self.path(STATE_DIR, f"{shard:05d}.json")

    def ids_path(self, shard: int) -> str:
        return self.path(STATE_DIR, f"{shard:05d}.ids.npy")

    # -- the plan
    def load_plan(self) -> dict[str, Any] | None:
        return _read_json(self.path(PLAN_FILE))  # a plan we cannot read is no plan: its shards are redone

    def save_plan(self, plan: dict[str, Any]) -> None:
        write_json(self.path(PLAN_FILE), plan)

    def clear(self) -> None:
        """Forget every shard (the folder's earlier run was of another input or model)."""
        remove(self.path(STATE_DIR))
        for name in file_names(self.directory):
            if fnmatch.fnmatch(name, "part-*-of-*.*") or name == PLAN_FILE:
                remove(self.path(name))

    # -- shards
    def record(self, shard: int) -> dict[str, Any] | None:
        return _read_json(self.record_path(shard))

    def finished(self, num_shards: int) -> set[int]:
        """Shards whose record, ids and data file are all there (one listing of each folder)."""
        state, data = set(file_names(self.path(STATE_DIR))), set(file_names(self.directory))
        done = set()
        for shard in range(num_shards):
            if f"{shard:05d}.json" not in state or f"{shard:05d}.ids.npy" not in state:
                continue
            record = self.record(shard)
            if record is None or (record["num_features"] and name_of(self.data_path(shard, num_shards)) not in data):
                continue
            done.add(shard)
        return done

    def write(self, shard: FinishedShard, num_shards: int) -> None:
        """Data file, ids, then the record that marks the shard finished. An empty
        shard gets no data file: readers take the dimension from the first file."""
        if len(shard.features):
            self._write_data(self.data_path(shard.shard, num_shards), shard.features, shard.paths)
        with atomic_path(self.ids_path(shard.shard)) as tmp, open(tmp, "wb") as out:
            np.save(out, shard.features.ids)
        write_json(self.record_path(shard.shard), {
            "shard": shard.shard, "num_rows": shard.num_rows, "num_features": len(shard.features),
            "file": name_of(self.data_path(shard.shard, num_shards)) if len(shard.features) else None,
            "bad_records": shard.bad_records})

    def _write_data(self, path: str, features: Features, paths: list[str] | None) -> None:
        if self.format == "parquet":
            table = features_table(features)
            if paths is not None:
                table = table.append_column("path", pa.array(paths, pa.string()))
            with atomic_path(path) as tmp:
                pq.write_table(table, tmp)
            return
        write_lines(path, feature_lines(features, self.modality.id_key, paths))

    def records(self, num_shards: int) -> list[dict[str, Any]]:
        return [r for r in (self.record(i) for i in range(num_shards)) if r is not None]

    def _ids(self, shard: int) -> np.ndarray:
        return np.load(io.BytesIO(read_file(self.ids_path(shard))))

    def data_files(self, num_shards: int) -> list[str]:
        return [self.data_path(r["shard"], num_shards) for r in self.records(num_shards) if r["num_features"]]

    # -- after the last shard
    def drop_duplicate_ids(self, num_shards: int) -> int:
        """Keep the first occurrence of every id (in shard, then row order) and drop the
        others, recording them as skipped: the output then has each id exactly once
        even when the input lists an id twice. Idempotent, so safe on every run."""
        shards = [r["shard"] for r in self.records(num_shards) if r["num_features"]]
        ids = [self._ids(s) for s in shards]
        if not ids:
            return 0
        all_ids = np.concatenate(ids)
        _, first = np.unique(all_ids, return_index=True)
        if len(first) == len(all_ids):
            return 0
        keep = np.zeros(len(all_ids), bool)
        keep[first] = True
        offset = 0
        for shard, shard_ids in zip(shards, ids):
            mask = keep[offset:offset + len(shard_ids)]
            offset += len(shard_ids)
            if not mask.all():
                self._drop_rows(shard, num_shards, shard_ids, mask)
        return int((~keep).sum())

    def _drop_rows(self, shard: int, num_shards: int, ids: np.ndarray, keep: np.ndarray) -> None:
        path = self.data_path(shard, num_shards)
        if self.format == "parquet":
            table = _read_table(path).filter(pa.array(keep))
            with atomic_path(path) as tmp:
                pq.write_table(table, tmp)
        else:
            lines = read_file(path).decode("utf-8").splitlines(keepends=True)
            write_lines(path, (line for line, kept in zip(lines, keep) if kept))
        with atomic_path(self.ids_path(shard)) as tmp, open(tmp, "wb") as out:
            np.save(out, ids[keep])
        record = self.record(shard)
        record["num_features"] = int(keep.sum())
        record["bad_records"] += [{"kind": DUPLICATE_ID, "id": int(i), "where": name_of(path),
                                   "detail": "the id was embedded already from an earlier record; the first is kept"}
                                  for i in ids[~keep].tolist()]
        write_json(self.record_path(shard), record)

    def summary(self, num_shards: int, max_examples: int = 1000) -> tuple[int, BadRecordSummary]:
        """(features written, skipped records of every finished shard: exact counts, ids of the first ones)."""
        counter = BadRecordCounter(max_examples)
        num_features = 0
        for record in self.records(num_shards):
            num_features += record["num_features"]
            counter.report(BadRecord(r["kind"], r.get("id"), r.get("where", ""), r.get("detail", ""))
                           for r in record["bad_records"])
        return num_features, counter.summary()

    def merge_jsonl(self, num_shards: int, output: str | os.PathLike) -> int:
        """All shards, in order, as one cn_clip feature JSONL (written atomically); returns its lines."""
        num_lines = 0
        with atomic_path(output) as tmp, open(tmp, "w", encoding="utf-8") as out:
            for path in self.data_files(num_shards):
                for line in self._lines(path):
                    out.write(line)
                    num_lines += 1
        return num_lines

    def _lines(self, path: str) -> Iterator[str]:
        if self.format == "jsonl":
            yield from read_file(path).decode("utf-8").splitlines(keepends=True)
            return
        table = _read_table(path)
        paths = table.column("path").to_pylist() if "path" in table.column_names else None
        yield from feature_lines(table_to_features(table, str(path)), self.modality.id_key, paths)


def _read_json(path: str) -> dict[str, Any] | None:
    data = read_file(path)
    if data is None:
        return None
    try:
        return json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def _read_table(path: str) -> pa.Table:
    fs, inner = resolve_filesystem(path)
    return pq.read_table(inner, filesystem=fs)


def feature_lines(features: Features, id_key: str, paths: list[str] | None = None) -> Iterable[str]:
    """cn_clip's lines (`{"image_id": 1, "feature": [...]}`), plus `path` for string-named records."""
    if paths is None:
        yield from jsonl_lines(features, id_key)
        return
    for id_, vector, name in zip(features.ids.tolist(), features.vectors.tolist(), paths):
        yield json.dumps({id_key: id_, "feature": vector, "path": name}) + "\n"
