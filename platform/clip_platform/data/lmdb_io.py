"""cn_clip's LMDB layout, read and written exactly.

    {split_dir}/imgs   key str(image_id) -> base64 image bytes, plus b"num_images"
    {split_dir}/pairs  key str(i), i in 0..num_samples-1 -> pickle((image_id, text_id, text)),
                       plus b"num_samples"

Pairs are pickles, and unpickling runs code named by the data. They are read
with `safe_loads`, which accepts only tuples of int and str, so a hostile LMDB
cannot run anything.
"""
from __future__ import annotations

import io
import os
import pickle
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import lmdb

from .records import (BAD_BASE64, BAD_ID, BAD_PICKLE, MISSING_IMAGE, MISSING_RECORD, BadRecord, b64decode_image,
                      parse_id)

NUM_IMAGES_KEY = b"num_images"
NUM_SAMPLES_KEY = b"num_samples"
MAP_SIZE = 1024**4  # as cn_clip: address space only, the file grows as written
PICKLE_PROTOCOL = 4  # readable by every Python 3 that cn_clip supports


class _TupleUnpickler(pickle.Unpickler):
    """Refuses every global and persistent id: with neither, a pickle cannot
    name a callable, so loading it cannot run code."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refused to load global {module}.{name}")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused to load a persistent id")


def _only_tuples_of_int_str(value, depth: int = 0) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, str)):
        return True
    return isinstance(value, tuple) and depth < 4 and all(_only_tuples_of_int_str(v, depth + 1) for v in value)


def safe_loads(data: bytes) -> tuple:
    """Unpickle a value made only of tuples, ints and strs; ValueError for anything else."""
    try:
        value = _TupleUnpickler(io.BytesIO(data)).load()
    except Exception as exc:  # a malformed pickle can raise nearly anything
        raise ValueError(f"rejected pickle: {exc}") from None
    if not isinstance(value, tuple) or not _only_tuples_of_int_str(value):
        raise ValueError(f"rejected pickle: holds {type(value).__name__}, not only tuples of int and str")
    return value


def parse_pair(data: bytes, where: str) -> tuple[int, int, str] | BadRecord:
    """(image_id, text_id, text) from a pickled pair value, or why it is bad."""
    try:
        value = safe_loads(data)
    except ValueError as exc:
        return BadRecord(BAD_PICKLE, None, where, str(exc))
    if len(value) != 3 or not isinstance(value[2], str):
        return BadRecord(BAD_PICKLE, None, where, "expected (image_id, text_id, text)")
    image_id, text_id = parse_id(value[0]), parse_id(value[1])
    if image_id is None or text_id is None:
        return BadRecord(BAD_ID, value[1], where, f"ids are not integers: {value[0]!r}, {value[1]!r}")
    return image_id, text_id, value[2]


def dump_pair(image_id: int, text_id: int, text: str) -> bytes:
    return pickle.dumps((image_id, text_id, text), protocol=PICKLE_PROTOCOL)


_open_envs: dict[tuple[int, int], list] = {}  # (st_dev, st_ino) of data.mdb -> [env, users]
_open_envs_lock = threading.Lock()


@contextmanager
def open_env(path: str | os.PathLike) -> Iterator[lmdb.Environment]:
    """A read-only, lock-free environment, as cn_clip opens its datasets.

    py-lmdb refuses to open one environment twice in a process, and a process may
    hold several readers of one LMDB at once (read tasks sharing a worker, pairs
    and images of one split), so environments are shared and reference counted.
    They are keyed by the data file's inode: a rebuilt LMDB is a new environment."""
    data_file = Path(path) / "data.mdb"
    if not data_file.is_file():
        raise FileNotFoundError(f"{path} is not an LMDB directory (no data.mdb)")
    stat = data_file.stat()
    key = (stat.st_dev, stat.st_ino)
    with _open_envs_lock:
        entry = _open_envs.get(key)
        if entry is None:
            env = lmdb.open(str(path), readonly=True, create=False, lock=False, readahead=False, meminit=False)
            entry = _open_envs[key] = [env, 0]
        entry[1] += 1
    try:
        yield entry[0]
    finally:
        with _open_envs_lock:
            entry[1] -= 1
            if entry[1] == 0:
                del _open_envs[key]
                entry[0].close()


def read_count(env: lmdb.Environment, key: bytes) -> int:
    with env.begin() as txn:
        raw = txn.get(key)
    if raw is None:
        raise ValueError(f"LMDB {env.path()} has no {key.decode()} key: not a cn_clip LMDB")
    count = parse_id(raw)
    if count is None or count < 0:
        raise ValueError(f"LMDB {env.path()}: {key.decode()} is {raw[:40]!r}, not a count")
    return count


def is_split_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / "pairs" / "data.mdb").is_file() and (path / "imgs" / "data.mdb").is_file()


def is_env_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "data.mdb").is_file()


def num_samples(split_dir: str | os.PathLike) -> int:
    with open_env(Path(split_dir) / "pairs") as env:
        return read_count(env, NUM_SAMPLES_KEY)


def num_images(imgs_dir: str | os.PathLike) -> int:
    with open_env(imgs_dir) as env:
        return read_count(env, NUM_IMAGES_KEY)


@contextmanager
def pair_reader(split_dir: str | os.PathLike) -> Iterator[Callable[[int], tuple[int, int, str, bytes] | BadRecord]]:
    """Random access to a split's pairs: `read(i)` -> (image_id, text_id, text, image bytes)
    for pair key i, or the BadRecord saying why there is none (both LMDBs stay open while
    the context lasts)."""
    split_dir = Path(split_dir)
    with open_env(split_dir / "pairs") as env_pairs, open_env(split_dir / "imgs") as env_imgs, \
            env_pairs.begin(buffers=True) as txn_pairs, env_imgs.begin(buffers=True) as txn_imgs:

        def read(index: int) -> tuple[int, int, str, bytes] | BadRecord:
            where = f"{split_dir}/pairs[{index}]"
            raw = txn_pairs.get(str(index).encode())
            if raw is None:
                return BadRecord(MISSING_RECORD, index, where, "pair key absent, though below num_samples")
            pair = parse_pair(bytes(raw), where)
            if isinstance(pair, BadRecord):
                return pair
            image_id, text_id, text = pair
            b64 = txn_imgs.get(str(image_id).encode())
            if b64 is None:
                return BadRecord(MISSING_IMAGE, image_id, where, f"text {text_id} pairs with an absent image")
            try:
                return image_id, text_id, text, b64decode_image(bytes(b64))
            except ValueError as exc:
                return BadRecord(BAD_BASE64, image_id, f"{split_dir}/imgs[{image_id}]", str(exc))

        yield read


def image_key_bounds(imgs_dir: str | os.PathLike, num_ranges: int) -> list[tuple[bytes | None, bytes | None]]:
    """Split the image keys into up to `num_ranges` contiguous [lo, hi) ranges of
    nearly equal size. Keys sort as bytes (not numbers), so the bounds come from
    one pass over the keys; values are not read (images sit on overflow pages)."""
    with open_env(imgs_dir) as env, env.begin() as txn:
        keys = [k for k in txn.cursor().iternext(keys=True, values=False) if k != NUM_IMAGES_KEY]
    num_ranges = max(1, min(num_ranges, len(keys)))
    cuts = [keys[len(keys) * i // num_ranges] for i in range(1, num_ranges)]
    los: list[bytes | None] = [None, *cuts]
    his: list[bytes | None] = [*cuts, None]
    return list(zip(los, his))


def iter_images(imgs_dir: str | os.PathLike, lo: bytes | None, hi: bytes | None,
                bad: list[BadRecord]) -> Iterator[tuple[int, bytes]]:
    """(image_id, image bytes) for keys in [lo, hi) (None: unbounded)."""
    with open_env(imgs_dir) as env, env.begin(buffers=True) as txn:
        cursor = txn.cursor()
        found = cursor.set_range(lo) if lo is not None else cursor.first()
        while found:
            key = bytes(cursor.key())
            if hi is not None and key >= hi:
                break
            if key != NUM_IMAGES_KEY:
                where = f"{imgs_dir}[{key[:40].decode('utf-8', 'replace')}]"
                image_id = parse_id(key)
                if image_id is None:
                    name = key[:40].decode("utf-8", "replace")
                    bad.append(BadRecord(BAD_ID, name, where, "key is not an integer"))
                else:
                    try:
                        yield image_id, b64decode_image(bytes(cursor.value()))
                    except ValueError as exc:
                        bad.append(BadRecord(BAD_BASE64, image_id, where, str(exc)))
            found = cursor.next()


class LmdbSplitWriter:
    """Writes one split in cn_clip's layout. Image ids are written once (a
    repeated id is refused, so the count matches the keys); counts are written
    on close. Use as a context manager."""

    def __init__(self, split_dir: str | os.PathLike, commit_every: int = 1000):
        split_dir = Path(split_dir)
        (split_dir / "imgs").mkdir(parents=True, exist_ok=True)
        (split_dir / "pairs").mkdir(parents=True, exist_ok=True)
        self.split_dir = split_dir
        self.commit_every = commit_every
        self.num_images = 0
        self.num_samples = 0
        self._env_imgs = lmdb.open(str(split_dir / "imgs"), map_size=MAP_SIZE)
        self._env_pairs = lmdb.open(str(split_dir / "pairs"), map_size=MAP_SIZE)
        self._txn_imgs = self._env_imgs.begin(write=True)
        self._txn_pairs = self._env_pairs.begin(write=True)

    def add_image(self, image_id: int, b64: bytes | str) -> bool:
        """Store base64 text for an image id; False (nothing written) if the id is already stored."""
        value = b64.encode("ascii") if isinstance(b64, str) else bytes(b64)
        if not self._txn_imgs.put(str(image_id).encode(), value.strip(), overwrite=False):
            return False
        self.num_images += 1
        if self.num_images % self.commit_every == 0:
            self._txn_imgs.commit()
            self._txn_imgs = self._env_imgs.begin(write=True)
        return True

    def add_pair(self, image_id: int, text_id: int, text: str) -> None:
        self._txn_pairs.put(str(self.num_samples).encode(), dump_pair(image_id, text_id, text))
        self.num_samples += 1
        if self.num_samples % (self.commit_every * 5) == 0:
            self._txn_pairs.commit()
            self._txn_pairs = self._env_pairs.begin(write=True)

    def close(self) -> None:
        self._txn_imgs.put(NUM_IMAGES_KEY, str(self.num_images).encode())
        self._txn_pairs.put(NUM_SAMPLES_KEY, str(self.num_samples).encode())
        self._txn_imgs.commit()
        self._txn_pairs.commit()
        self._env_imgs.close()
        self._env_pairs.close()

    def abort(self) -> None:
        self._txn_imgs.abort()
        self._txn_pairs.abort()
        self._env_imgs.close()
        self._env_pairs.close()

    def __enter__(self) -> LmdbSplitWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
