"""Feature files: cn_clip's JSONL and sharded Parquet, read into (ids, vectors).

* JSONL (cn_clip's `extract_features.py` output): one `{"image_id"|"text_id": int,
  "feature": [float, ...]}` per line.
* Parquet (big corpora): columns `id` (int64) and `feature` (fixed-size list of
  float32); a directory of `*.parquet` (or `*.jsonl`) files is one feature set.

Everything here is plain numpy/pyarrow, so the embed job's writers and the KNN
job's readers are testable without Ray. Bad files raise ValueError naming the
file and, for JSONL, the line.
"""
from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..io import atomic_path, is_uri, open_input, resolve_filesystem
from .files import list_files

ID_KEYS = ("image_id", "text_id", "id")  # the id field of a JSONL feature line
FEATURE_SUFFIXES = (".parquet", ".jsonl")
# Beside the shards of a features folder the embed job writes: the input and the model
# (settings.model, its fingerprint) that made them; index builds read the model from it.
PLAN_FILE = "_plan.json"


@dataclass(frozen=True)
class Features:
    """A block of features: ids int64 [N] aligned with vectors float32 [N, D]."""

    ids: np.ndarray
    vectors: np.ndarray

    def __post_init__(self):
        if self.ids.ndim != 1 or self.vectors.ndim != 2 or len(self.ids) != len(self.vectors):
            raise ValueError(f"ids {self.ids.shape} and vectors {self.vectors.shape} do not line up")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    @classmethod
    def empty(cls, dim: int = 0) -> "Features":
        return cls(np.zeros(0, np.int64), np.zeros((0, dim), np.float32))

    @classmethod
    def concat(cls, parts: Sequence["Features"]) -> "Features":
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        dims = {p.dim for p in parts}
        if len(dims) > 1:
            raise ValueError(f"feature blocks have different dimensions: {sorted(dims)}")
        return cls(np.concatenate([p.ids for p in parts]), np.concatenate([p.vectors for p in parts]))

    def slice(self, start: int, stop: int) -> "Features":
        return Features(self.ids[start:stop], self.vectors[start:stop])


# ---------------------------------------------------------------- locating files

def feature_files(path: str | os.PathLike) -> list[str]:
    """The feature files at `path`, a local path or a URI: the file itself, a directory's
    *.parquet / *.jsonl sorted by name, or what a glob pattern matches (`features/*/images`,
    `shards/part-*.parquet`), in the order of the sorted matches."""
    if is_uri(path):
        return _uri_feature_files(os.fspath(path))
    path = Path(path)
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        files = sorted(str(p) for p in path.iterdir() if p.is_file() and p.suffix in FEATURE_SUFFIXES)
        if not files:
            raise ValueError(f"feature directory {path} holds no *.parquet or *.jsonl files")
        return files
    if any(c in str(path) for c in "*?["):
        matches = sorted(Path(p) for p in glob.glob(str(path)))
        files = [f for m in matches if m.is_dir() or m.suffix in FEATURE_SUFFIXES for f in feature_files(m)]
        if not files:
            raise FileNotFoundError(f"no *.parquet or *.jsonl feature files match {path}")
        return files
    raise FileNotFoundError(f"feature file or directory {path} does not exist")


def _uri_feature_files(path: str) -> list[str]:
    """feature_files on another filesystem: the same rules, each file named by a URI like `path`
    (its scheme and query)."""
    scheme, query = path.split("://", 1)[0], path.partition("?")[2]

    def uri(inner: str) -> str:
        return f"{scheme}://{inner}" + (f"?{query}" if query else "")

    fs, inner = resolve_filesystem(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.File:
        return [path]
    if info.type == pafs.FileType.Directory:
        files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(inner))
                       if i.type == pafs.FileType.File and i.path.endswith(FEATURE_SUFFIXES))
        if not files:
            raise ValueError(f"feature directory {path} holds no *.parquet or *.jsonl files")
        return [uri(f) for f in files]
    if any(c in inner for c in "*?["):
        _, infos = list_files(path, None, FEATURE_SUFFIXES)
        return [uri(i.path) for i in infos]
    raise FileNotFoundError(f"feature file or directory {path} does not exist")


def is_parquet(path: str | os.PathLike) -> bool:
    return os.fspath(path).partition("?")[0].endswith(".parquet")


# ---------------------------------------------------------------- reading

def read_features(path: str | os.PathLike, id_key: str | None = None) -> Features:
    """All features at `path` (file or directory), checked: integer ids, one
    dimension, finite values, no id twice."""
    files = feature_files(path)
    features = Features.concat([read_feature_file(f, id_key) for f in files])
    if len(files) > 1:
        check_unique_ids(features.ids, f"{path}")
    return features


def read_feature_file(path: str | os.PathLike, id_key: str | None = None) -> Features:
    """One JSONL or Parquet feature file. `id_key` ("image_id"/"text_id") is the
    JSONL id field expected; Parquet files always use `id`."""
    path = os.fspath(path)
    features = read_parquet_features(path) if is_parquet(path) else read_jsonl_features(path, id_key)
    check_finite(features, str(path))
    check_unique_ids(features.ids, str(path))
    return features


def read_parquet_features(path: str, row_groups: Sequence[int] | None = None) -> Features:
    try:
        file = pq.ParquetFile(open_input(path, random_access=True))
        table = file.read_row_groups(list(row_groups), columns=["id", "feature"]) if row_groups is not None \
            else file.read(columns=["id", "feature"])
    except (pa.ArrowInvalid, OSError, KeyError) as exc:
        raise ValueError(f"{path} is not a Parquet feature file with columns 'id' and 'feature': {exc}") from None
    return table_to_features(table, str(path))


def table_to_features(table: pa.Table, source: str) -> Features:
    """(ids, vectors) from an Arrow table with `id` and a list-typed `feature` column."""
    missing = [c for c in ("id", "feature") if c not in table.column_names]
    if missing:
        raise ValueError(f"{source} is not a feature file with columns 'id' and 'feature' "
                         f"(missing {', '.join(missing)}; found {', '.join(table.column_names)})")
    ids, feature = table.column("id"), table.column("feature")
    if not pa.types.is_integer(ids.type):
        raise ValueError(f"{source}: column 'id' must hold integers, found {ids.type}")
    if ids.null_count:
        raise ValueError(f"{source}: column 'id' has {ids.null_count} missing values")
    if not _is_numeric_list(feature.type):
        raise ValueError(f"{source}: column 'feature' must be a list of floats, found {feature.type}")
    if feature.null_count:
        raise ValueError(f"{source}: column 'feature' has {feature.null_count} missing values")
    ids_np = ids.to_numpy().astype(np.int64, copy=False)
    if len(ids_np) == 0:
        dim = feature.type.list_size if pa.types.is_fixed_size_list(feature.type) else 0
        return Features.empty(dim)
    feature = feature.combine_chunks()
    lengths = pc.list_value_length(feature).to_numpy(zero_copy_only=False)
    if lengths.min() != lengths.max():
        row = int(np.argmax(lengths != lengths[0]))
        raise ValueError(f"{source}: row {row} (id {ids_np[row]}) has {lengths[row]} feature values, "
                         f"row 0 has {lengths[0]}")
    values = pc.list_flatten(feature).to_numpy(zero_copy_only=False)
    vectors = np.ascontiguousarray(values.astype(np.float32, copy=False).reshape(len(ids_np), int(lengths[0])))
    return Features(ids_np, vectors)


def _is_numeric_list(t: pa.DataType) -> bool:
    is_list = pa.types.is_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t)
    return is_list and (pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type))


def read_jsonl_features(path: str, id_key: str | None = None) -> Features:
    """cn_clip's JSONL features. A fast Arrow parse first; any problem falls back
    to a line-by-line parse, which reports the offending line."""
    import pyarrow.json as pj

    try:
        with open_input(path, random_access=True) as stream:
            table = pj.read_json(stream)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return _read_jsonl_slowly(path, id_key)
    key = _pick_id_key(table.column_names, id_key, f"{path}")
    if key is None or "feature" not in table.column_names or table.num_rows == 0:
        return _read_jsonl_slowly(path, id_key)
    try:
        return table_to_features(table.select([key, "feature"]).rename_columns(["id", "feature"]), str(path))
    except ValueError:
        return _read_jsonl_slowly(path, id_key)  # for the line number


def _pick_id_key(keys: Sequence[str], expected: str | None, source: str) -> str | None:
    """The id field present in `keys`; a wrong-role id (image_id where text_id is expected) is a user error."""
    if expected and expected in keys:
        return expected
    if "id" in keys:
        return "id"
    present = [k for k in ID_KEYS if k in keys]
    if expected and present:
        raise ValueError(f"{source} has {present[0]!r} where {expected!r} was expected: "
                         f"are the image and text feature files swapped?")
    return present[0] if present else None


def json_objects(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """(where, object) per non-blank line of a JSONL file, `where` being "FILE line N" for
    messages; a line that is not a JSON object is a ValueError naming it. Shared by the
    feature, prediction and annotation readers."""
    with open_input(path) as lines:  # decoded line by line, so a bad byte's error can name its line
        for number, raw in enumerate(lines, 1):
            where = f"{path} line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{where}: not UTF-8 text ({exc.reason})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: cannot parse as JSON ({exc.msg}): {line.strip()[:80]!r}") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield where, obj


def _read_jsonl_slowly(path: str, id_key: str | None) -> Features:
    ids: list[int] = []
    rows: list[list[float]] = []
    key = None
    for where, obj in json_objects(path):
        if key is None:
            key = _pick_id_key(list(obj), id_key, where)
            if key is None:
                raise ValueError(f"{where} has no id field (one of {', '.join(ID_KEYS)})")
        ids.append(_check_id(obj.get(key), key, where))
        rows.append(_check_vector(obj.get("feature"), where, len(rows[0]) if rows else None))
    if not ids:
        return Features.empty()
    return Features(np.asarray(ids, np.int64), np.asarray(rows, np.float32).reshape(len(ids), -1))


def _check_id(value, key: str, where: str) -> int:
    if value is None:
        raise ValueError(f"{where} has no {key!r}")
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{where}: {key} must be an integer, got {value!r}")
    if not -2**63 <= value < 2**63:
        raise ValueError(f"{where}: {key} {value} does not fit in 64 bits")
    return value


def _check_vector(value, where: str, dim: int | None) -> list[float]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: 'feature' must be a non-empty list of numbers")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
        raise ValueError(f"{where}: 'feature' holds a value that is not a number")
    if dim is not None and len(value) != dim:
        raise ValueError(f"{where}: feature has {len(value)} values, earlier lines have {dim}")
    return value


def check_finite(features: Features, source: str) -> None:
    # NaN/inf would silently scramble every top-k that touches them.
    bad = ~np.isfinite(features.vectors).all(axis=1)
    if bad.any():
        raise ValueError(f"{source}: feature of id {features.ids[bad][0]} has NaN or infinite values "
                         f"({int(bad.sum())} such rows)")


def check_unique_ids(ids: np.ndarray, source: str) -> None:
    unique, counts = np.unique(ids, return_counts=True)
    if len(unique) != len(ids):
        raise ValueError(f"{source}: id {unique[counts > 1][0]} appears {counts[counts > 1][0]} times "
                         f"({int((counts > 1).sum())} ids repeated); ids must be unique")


# ---------------------------------------------------------------- streaming / sharding

@dataclass(frozen=True)
class FeatureShard:
    """A slice of the feature files that one task reads: a whole file, or some row groups of a Parquet file."""

    path: str
    row_groups: tuple[int, ...] | None = None  # None: the whole file
    num_rows: int = -1  # -1: unknown until read (JSONL)
    id_key: str | None = None  # JSONL id field expected
    first_row: int = 0  # row of the file where the shard starts (the rows of the row groups before it)

    def read(self) -> Features:
        if self.row_groups is None:
            return read_feature_file(self.path, self.id_key)
        features = read_parquet_features(self.path, self.row_groups)
        check_finite(features, self.path)
        return features

    def read_paths(self) -> list[str] | None:
        """The shard's `path` column (the names the embed job keeps for string-named records,
        such as webdataset keys), aligned with `read()`; None where the file has none (JSONL)."""
        if not is_parquet(self.path):
            return None
        file = pq.ParquetFile(open_input(self.path, random_access=True))
        if "path" not in file.schema_arrow.names:
            return None
        table = file.read(columns=["path"]) if self.row_groups is None \
            else file.read_row_groups(list(self.row_groups), columns=["path"])
        return table.column("path").to_pylist()


def plan_shards(path: str | os.PathLike, max_rows: int, id_key: str | None = None) -> list[FeatureShard]:
    """Split the feature files at `path` into shards of at most ~max_rows rows:
    Parquet files along row-group boundaries (read without touching other rows),
    JSONL files whole (they can only be parsed front to back)."""
    shards = []
    for file in feature_files(path):
        if not is_parquet(file):
            shards.append(FeatureShard(file, id_key=id_key))
            continue
        shards.extend(_parquet_shards(file, max_rows))
    return shards


def _parquet_shards(file: str, max_rows: int) -> list[FeatureShard]:
    try:
        meta = pq.ParquetFile(open_input(file, random_access=True)).metadata
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"{file} is not a readable Parquet file: {exc}") from None
    shards, groups, rows, first = [], [], 0, 0
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if groups and rows + n > max_rows:
            shards.append(FeatureShard(file, tuple(groups), rows, first_row=first))
            groups, rows, first = [], 0, first + rows
        groups.append(g)
        rows += n
    if groups:
        shards.append(FeatureShard(file, tuple(groups), rows, first_row=first))
    return shards


def iter_feature_blocks(path: str | os.PathLike, block_rows: int, id_key: str | None = None) -> Iterator[Features]:
    """Features at `path` in blocks of `block_rows` rows (the last may be shorter),
    in file order; Parquet is streamed, so memory stays at one block."""
    pending: list[Features] = []
    num_pending = 0
    for file in feature_files(path):
        for part in _iter_file(file, block_rows, id_key):
            pending.append(part)
            num_pending += len(part)
            while num_pending >= block_rows:
                merged = Features.concat(pending)
                yield merged.slice(0, block_rows)
                rest = merged.slice(block_rows, len(merged))
                pending, num_pending = ([rest] if len(rest) else []), len(rest)
    if num_pending:
        yield Features.concat(pending)


def _iter_file(file: str, block_rows: int, id_key: str | None) -> Iterator[Features]:
    if not is_parquet(file):
        yield read_feature_file(file, id_key)
        return
    try:
        batches = pq.ParquetFile(open_input(file, random_access=True)).iter_batches(batch_size=block_rows,
                                                                                   columns=["id", "feature"])
        for batch in batches:
            features = table_to_features(pa.Table.from_batches([batch]), str(file))
            check_finite(features, str(file))
            yield features
    except (pa.ArrowInvalid, OSError, KeyError) as exc:
        raise ValueError(f"{file} is not a Parquet feature file with columns 'id' and 'feature': {exc}") from None


# ---------------------------------------------------------------- writing

def features_table(features: Features) -> pa.Table:
    """Arrow table (`id` int64, `feature` fixed-size list of float32): the Parquet shard layout."""
    vectors = np.ascontiguousarray(features.vectors, dtype=np.float32)
    flat = pa.array(vectors.reshape(-1), pa.float32())
    column = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])
    return pa.table({"id": pa.array(features.ids, pa.int64()), "feature": column})


def write_features_parquet(path: str | os.PathLike, features: Features, row_group_rows: int = 65536) -> Path:
    """One Parquet shard, written atomically (a finished shard is never half-written)."""
    with atomic_path(path) as tmp:
        pq.write_table(features_table(features), tmp, row_group_size=row_group_rows)
    return Path(path)


def jsonl_lines(features: Features, id_key: str) -> Iterator[str]:
    """cn_clip's feature lines: `{"image_id": 1, "feature": [...]}` as json.dumps writes them."""
    for id_, vector in zip(features.ids.tolist(), features.vectors.tolist()):
        yield json.dumps({id_key: id_, "feature": vector}) + "\n"
