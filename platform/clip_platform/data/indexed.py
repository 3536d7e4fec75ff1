"""Pairs by index, for training: pair i of a dataset, in whatever order the sample plan asks.

    pairs = open_pairs("datasets/MUGE/lmdb/train")   # or a caption JSON, or webdataset shards
    len(pairs)                                        # the pair count the plan is built on
    ds = ray.data.read_datasource(PlannedPairsDatasource(pairs, index_blocks))

Three random-access layouts: a cn_clip LMDB split (pair key i), the clip-pytorch caption
JSON (caption i), and webdataset tar shards (the i-th complete image + caption sample,
shard by shard in file order; member byte ranges come from one header scan of every
shard when the dataset is opened). `PlannedPairsDatasource` reads given blocks of
indices in the given order and keeps a row for every index: a pair that cannot be read
keeps its slot with an `error`, so every training worker's batch keeps its shape.
"""
from __future__ import annotations

import logging
import os
import tarfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from . import lmdb_io
from .captions import is_caption_json, read_caption_json
from .files import list_files
from .records import BAD_FIELD, MISSING_IMAGE, UNREADABLE_FILE, BadRecord, stable_id
from .sources import Piece, PieceDatasource, _blocks
from .webdataset import TAR_SUFFIXES, TarIndex

log = logging.getLogger(__name__)

Pair = tuple[int, int, str, bytes]  # image_id, text_id, text (raw), encoded image
SLOTS_SCHEMA = pa.schema([("index", pa.int64()), ("image_id", pa.int64()), ("text_id", pa.int64()),
                          ("text", pa.string()), ("image", pa.binary()), ("error", pa.string())])
SCAN_THREADS = 16  # shards whose headers are scanned at once


class LmdbPairs:
    """A cn_clip LMDB split (`{path}/pairs` + `{path}/imgs`)."""

    def __init__(self, path: str | os.PathLike):
        if not lmdb_io.is_split_dir(path):
            raise FileNotFoundError(f"{path} is not a cn_clip LMDB split (expected {path}/pairs and {path}/imgs), "
                                    "a clip-pytorch caption JSON, nor webdataset .tar shards; "
                                    "build an LMDB with jobs/build_lmdb.py")
        self.path = str(Path(path).resolve())

    def __len__(self) -> int:
        return lmdb_io.num_samples(self.path)

    def reader(self):
        return lmdb_io.pair_reader(self.path)


class CaptionJsonPairs:
    """The clip-pytorch layout (JSON list + image folder): one pair per caption."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._dataset = None

    @property
    def dataset(self):
        if self._dataset is None:  # parsed once per process that reads
            self._dataset = read_caption_json(self.path)
        return self._dataset

    def __len__(self) -> int:
        return len(self.dataset.pairs)

    def __getstate__(self):
        return {"path": self.path, "_dataset": None}

    @contextmanager
    def reader(self):
        yield self._read

    def _read(self, index: int) -> Pair | BadRecord:
        pair = self.dataset.pairs[index]
        try:
            return pair.image_id, pair.text_id, pair.text, pair.image_path.read_bytes()
        except OSError as exc:
            return BadRecord(MISSING_IMAGE, pair.image_id, str(pair.image_path), str(exc))


class WebDatasetPairs:
    """webdataset shards (a path, glob, brace pattern or URI): the samples holding both an
    image and a caption, numbered across the shards in order. Ids are the sample keys
    (`records.stable_id`: numeric keys as they are); image_id and text_id are equal.

    Opening scans every shard's member headers once (in parallel threads: I/O-bound, and
    remote stores want many requests in flight) into one compact table, ~50 bytes a pair.
    Pickled into Ray tasks, the table travels as one object-store reference that the tasks
    map without a copy, so no task scans a shard again."""

    def __init__(self, path: str | os.PathLike | Sequence[str]):
        self.filesystem, infos = list_files(path, None, TAR_SUFFIXES)
        self.paths = [info.path for info in infos]
        self._table: dict[str, Any] | None = None  # shard, ranges, ids, keys: one row a pair
        self._ref = None  # the table in Ray's object store, once pickled for a task

    @property
    def table(self) -> dict[str, Any]:
        if self._table is None and self._ref is not None:
            import ray

            self._table = ray.get(self._ref)
        if self._table is None:
            self._table = self._scan()
        return self._table

    def _scan(self) -> dict[str, Any]:
        def scan(path: str) -> TarIndex:
            try:
                return TarIndex.scan(self.filesystem, path)
            except (OSError, EOFError, ValueError, tarfile.TarError) as exc:
                raise ValueError(f"webdataset shard {path} cannot be read as a tar file: {exc}") from None

        with ThreadPoolExecutor(SCAN_THREADS) as pool:
            indexes = list(pool.map(scan, self.paths))
        incomplete = sum(index.num_incomplete for index in indexes)
        if incomplete:
            log.warning("%d webdataset sample(s) without an image or a caption are not training pairs", incomplete)
        keys = [key for index in indexes for key in index.keys]
        return {"shard": np.concatenate([np.full(len(x), i, np.int32) for i, x in enumerate(indexes)] or [[]]),
                "ranges": np.concatenate([x.ranges for x in indexes] or [np.zeros((0, 4), np.int64)]),
                "ids": np.asarray([stable_id(k) for k in keys], np.int64), "keys": pa.array(keys, pa.string())}

    def __getstate__(self):
        state = dict(self.__dict__)
        import ray

        if ray.is_initialized():
            if self._ref is None:
                self._ref = ray.put(self.table)
            state.update(_table=None, _ref=self._ref)
        return state

    def __len__(self) -> int:
        return len(self.table["ids"])

    @contextmanager
    def reader(self):
        table = self.table
        with ExitStack() as stack:
            handles: dict[int, Any] = {}

            def read(index: int) -> Pair | BadRecord:
                shard, ident = int(table["shard"][index]), int(table["ids"][index])
                key = table["keys"][index].as_py()
                where = f"{self.paths[shard].rsplit('/', 1)[-1]}:{key}"
                image_at, image_size, text_at, text_size = (int(v) for v in table["ranges"][index])
                try:
                    if shard not in handles:
                        handles[shard] = stack.enter_context(self.filesystem.open_input_file(self.paths[shard]))
                    image = handles[shard].read_at(image_size, image_at)
                    raw_text = handles[shard].read_at(text_size, text_at)
                except OSError as exc:
                    return BadRecord(UNREADABLE_FILE, key, where, str(exc))
                try:
                    text = raw_text.decode("utf-8").strip()
                except UnicodeDecodeError as exc:
                    return BadRecord(BAD_FIELD, key, where, f"caption is not UTF-8 text ({exc.reason})")
                return ident, ident, text, image

            yield read


def is_webdataset(path: str | os.PathLike | Sequence[str]) -> bool:
    """Whether a data path names tar shards (a .tar file, glob or brace pattern, or a
    folder of them); anything else is left to the other layouts."""
    if not isinstance(path, (str, os.PathLike)):
        return True
    text = os.fspath(path)
    if text.lower().endswith(TAR_SUFFIXES) or "{" in text:
        return True
    if "://" not in text and Path(text).is_dir() and not lmdb_io.is_split_dir(text):
        return any(p.suffix == ".tar" for p in Path(text).iterdir())
    return False


def open_pairs(path: str | os.PathLike):
    """The pair source behind a --train-data / --val-data value: a cn_clip LMDB split,
    a clip-pytorch caption JSON, or webdataset shards."""
    if is_webdataset(path):
        return WebDatasetPairs(path)
    return CaptionJsonPairs(path) if is_caption_json(path) else LmdbPairs(path)


def count_pairs(path: str | os.PathLike) -> int:
    return len(open_pairs(path))


def _slot_rows(pairs: Any, indices: np.ndarray) -> Iterator[tuple]:
    with pairs.reader() as read:
        for index in indices.tolist():
            record = read(index)
            if isinstance(record, BadRecord):
                yield index, -1, -1, "", b"", str(record)
            else:
                yield (index, *record, "")


def _read_slots(pairs: Any, indices: np.ndarray, decode: Callable | None, rows_per_block: int,
                sink: Any) -> Iterator[Any]:
    # Bad pairs travel in their rows (`error`), where the training loop counts them.
    from ray.data.block import BlockAccessor

    for table in _blocks(_slot_rows(pairs, indices), SLOTS_SCHEMA, block_rows=rows_per_block):
        if decode is None:
            yield table
        else:
            batch = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
            yield BlockAccessor.batch_to_block(decode(batch))


class PlannedPairsDatasource(PieceDatasource):
    """The pairs at `blocks` of indices, one read task per block, every index a row
    (SLOTS_SCHEMA) in the given order: with `preserve_order`, the stream is the plan.

    With `decode` (a callable on a numpy batch of those rows, such as training's
    SampleDecoder), each read task decodes its own rows, `rows_per_block` at a time:
    the encoded images never travel through the object store, and there is one
    operator, not a read and a map that Ray Data would not fuse."""

    schema = SLOTS_SCHEMA

    def __init__(self, pairs: Any, blocks: Sequence[np.ndarray], decode: Callable | None = None,
                 rows_per_block: int = 64):
        super().__init__()
        self.pairs = pairs
        self.blocks = [np.asarray(b, dtype=np.int64) for b in blocks]
        self.decode = decode
        self.rows_per_block = rows_per_block
        if decode is not None:
            self.schema = None  # the decoder's columns

    def get_name(self) -> str:
        return "ReadPlannedPairs" + (f"+{type(self.decode).__name__}" if self.decode is not None else "")

    def pieces(self, parallelism: int) -> list[Piece]:
        # The plan fixed the blocks: parallelism does not cut them again.
        read: Callable = partial(_read_slots, self.pairs)
        return [Piece(partial(read, block, self.decode, self.rows_per_block), None)
                for block in self.blocks if len(block)]
