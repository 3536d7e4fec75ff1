"""Public readers: paths in, streaming `ray.data.Dataset`s out.

Local paths, globs and pyarrow filesystem URIs (s3://, gs://, hdfs://) are
accepted for TSV, JSONL, Parquet and image files. LMDB is a local-file format:
its directory must be at the same path on every node that reads it (a shared
filesystem, or a copy per node).
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow.fs as pafs

from . import lmdb_io
from .bad_records import BadRecordSink, report
from .files import list_files, resolve_filesystem
from .join import PairLines, TextIndex
from .records import BadRecord, TextRecord
from .sources import (ImageFilesDatasource, ImageLines, LinesDatasource, LmdbImagesDatasource, LmdbPairsDatasource,
                      TextLines, iter_line_rows)

PathLike = str | os.PathLike
Paths = PathLike | Sequence[PathLike]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
TSV_SUFFIXES = (".tsv", ".tsv.gz", ".tsv.bz2", ".tsv.zst")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.bz2", ".jsonl.zst")
PARQUET_SUFFIXES = (".parquet",)
LABEL_FILE = "label_cn.txt"


def _is_local(path: PathLike) -> bool:
    return "://" not in os.fspath(path) or os.fspath(path).startswith("file://")


def _local(path: PathLike) -> Path:
    text = os.fspath(path)
    return Path(text[len("file://"):] if text.startswith("file://") else text).expanduser()


def _read(datasource: Any, read_args: dict[str, Any]):
    import ray.data

    return ray.data.read_datasource(datasource, **read_args)


# ------------------------------------------------------------------- pairs

def split_files(data_path: PathLike, split: str) -> tuple[str, str]:
    """cn_clip's file names for a split: ({split}_imgs.tsv, {split}_texts.jsonl) under data_path."""
    base = os.fspath(data_path).rstrip("/")
    return f"{base}/{split}_imgs.tsv", f"{base}/{split}_texts.jsonl"


def _lmdb_split_dir(data_path: PathLike, split: str | None) -> Path | None:
    """The LMDB split directory data_path names, if any: the split dir itself,
    an lmdb root holding {split}/, or a dataset dir holding lmdb/{split}/."""
    if not _is_local(data_path):
        return None
    path = _local(data_path)
    candidates = [path] + ([path / split, path / "lmdb" / split] if split else [])
    return next((c for c in candidates if lmdb_io.is_split_dir(c)), None)


def read_pairs(data_path: PathLike, split: str | None = None, *, bad_records: BadRecordSink | None = None,
               filesystem: pafs.FileSystem | None = None, **read_args: Any):
    """Image-text training pairs as a Dataset with rows
    `image_id` int64, `text_id` int64, `text` str (raw, as stored), `image` bytes (encoded image).

    `data_path` is a cn_clip LMDB split dir (`.../lmdb/train`, holding pairs/ and imgs/),
    or, with `split`, an LMDB root (`.../lmdb`), or a dataset dir holding
    `{split}_imgs.tsv` + `{split}_texts.jsonl` (local or a URI). When a dataset dir
    holds both, the TSV + JSONL files are used. `read_args` go to
    `ray.data.read_datasource` (e.g. `override_num_blocks`, `concurrency`)."""
    if split is not None and (filesystem is not None or not _is_local(data_path)):
        return read_pairs_tsv(*split_files(data_path, split), bad_records=bad_records, filesystem=filesystem,
                              **read_args)
    if split is not None:
        images, texts = split_files(_local(data_path), split)
        if Path(images).is_file() and Path(texts).is_file():
            return read_pairs_tsv(images, texts, bad_records=bad_records, filesystem=filesystem, **read_args)
    split_dir = _lmdb_split_dir(data_path, split)
    if split_dir is not None:
        return _read(LmdbPairsDatasource(split_dir, bad_records), read_args)
    if split is None:
        raise FileNotFoundError(f"{data_path} is not an LMDB split directory (with pairs/ and imgs/); "
                                "for a TSV + JSONL dataset directory, give the split")
    raise FileNotFoundError(f"no {split!r} split in {data_path}: expected {split}_imgs.tsv and {split}_texts.jsonl, "
                            f"or an LMDB directory {split}/ or lmdb/{split}/ with pairs/ and imgs/")


def read_pairs_tsv(images: Paths, texts: Paths, *, bad_records: BadRecordSink | None = None,
                   filesystem: pafs.FileSystem | None = None, **read_args: Any):
    """Pairs (rows as `read_pairs`) joined from image TSV files and text JSONL files
    (paths, directories, globs or URIs).

    The texts are read here, on the driver, into an index shared with every read
    task; the images stream in byte ranges, one row per (image, text that names
    it). With a `BadRecordLog`, images the texts name but the TSV lacks are
    reported once the images have been read to the end."""
    import ray

    text_fs, text_files = list_files(texts, filesystem, JSONL_SUFFIXES)
    bad: list[BadRecord] = []
    rows = iter_line_rows(text_fs, text_files, TextLines(require_image_ids=True), bad)
    index = TextIndex(TextRecord(text_id, text, image_ids) for text_id, text, image_ids in rows)
    report(bad_records, bad)
    image_fs, image_files = list_files(images, filesystem, TSV_SUFFIXES)
    join_name = uuid.uuid4().hex
    if bad_records is not None and hasattr(bad_records, "expect_images"):
        where = ", ".join(f.base_name for f in image_files[:3]) + (", ..." if len(image_files) > 3 else "")
        bad_records.expect_images(join_name, where, index.referenced_images())
    parser = PairLines(ray.put(index), join_name)
    return _read(LinesDatasource(image_fs, image_files, parser, bad_records), read_args)


def count_pairs(data_path: PathLike, split: str | None = None, filesystem: pafs.FileSystem | None = None) -> int:
    """Pairs the dataset declares (LMDB `num_samples`, or image_ids summed over the
    valid JSONL lines), without reading images. Bad records can make the stream shorter."""
    if split is not None:
        _, texts = split_files(data_path, split)
        if filesystem is not None or not _is_local(data_path) or _local(texts).is_file():
            fs, files = list_files(texts, filesystem, JSONL_SUFFIXES)
            return sum(len(row[2]) for row in iter_line_rows(fs, files, TextLines(require_image_ids=True), []))
    split_dir = _lmdb_split_dir(data_path, split)
    if split_dir is None:
        raise FileNotFoundError(f"no pairs found at {data_path}" + (f" for split {split!r}" if split else ""))
    return lmdb_io.num_samples(split_dir)


# ------------------------------------------------------------------ images

def _kind_of(path: str) -> str | None:
    lower = path.lower()
    for kind, suffixes in (("tsv", TSV_SUFFIXES), ("parquet", PARQUET_SUFFIXES), ("files", IMAGE_SUFFIXES)):
        if lower.endswith(suffixes):
            return kind
    return None


class ImageSource(NamedTuple):
    """An image corpus as `image_datasource` found it."""

    kind: str  # "lmdb", "tsv", "parquet" or "files"
    datasource: Any  # the Ray Data datasource reading it; None for Parquet, which callers read their own way
    filesystem: pafs.FileSystem | None  # of `files` (None for LMDB, a local directory)
    files: list[pafs.FileInfo]  # the TSV, Parquet or image files; [] for LMDB


def image_datasource(path: Paths, *, bad_records: BadRecordSink | None = None,
                     filesystem: pafs.FileSystem | None = None, min_split_bytes: int | None = None) -> ImageSource:
    """What an image corpus path names, and the datasource that reads it: an LMDB image dir
    (`.../lmdb/valid/imgs`, or the split dir), `*_imgs.tsv` files (byte ranges of at least
    `min_split_bytes`), Parquet files, or image files / a directory of them (image ids
    relative to the directory). Directories and globs are expanded; URIs work for all but
    LMDB. Files of several kinds at once are a ValueError. Used by `read_images` and by the
    embed job, which reads the same corpora as deterministic shards."""
    single = path if isinstance(path, (str, os.PathLike)) else None
    if single is not None and _is_local(single):
        local = _local(single)
        if lmdb_io.is_env_dir(local) or lmdb_io.is_split_dir(local):
            imgs_dir = local if lmdb_io.is_env_dir(local) else local / "imgs"
            return ImageSource("lmdb", LmdbImagesDatasource(imgs_dir, bad_records), None, [])
    fs, infos = list_files(path, filesystem, TSV_SUFFIXES + PARQUET_SUFFIXES + IMAGE_SUFFIXES)
    kinds = {_kind_of(info.path) for info in infos}
    if len(kinds) != 1:
        raise ValueError(f"{path} mixes file kinds ({', '.join(sorted(k or '?' for k in kinds))}); "
                         "give TSV, Parquet or image files, one kind at a time")
    kind = kinds.pop()
    if kind == "tsv":
        datasource = LinesDatasource(fs, infos, ImageLines(), bad_records, min_split_bytes=min_split_bytes)
    elif kind == "parquet":
        datasource = None
    else:
        root = _common_root(single, filesystem, fs, infos)
        datasource = ImageFilesDatasource(fs, root, infos, labeled=False, bad_records=bad_records)
    return ImageSource(kind, datasource, fs, infos)


def read_images(path: Paths, *, bad_records: BadRecordSink | None = None, filesystem: pafs.FileSystem | None = None,
                id_column: str = "id", image_column: str = "image", **read_args: Any):
    """An image corpus to embed, as a Dataset with rows `image_id`, `image` (encoded bytes).

    `path` (or a list of them) is one of: an LMDB image dir (`.../lmdb/valid/imgs`, or the
    split dir), `*_imgs.tsv` files, Parquet files with `id_column` and `image_column`
    (binary), or image files / a directory of them (image_id: path relative to the
    directory). Directories and globs are expanded; URIs work for all but LMDB.
    image_id is int64 for LMDB and TSV, whatever the Parquet holds, str for files."""
    import ray.data

    source = image_datasource(path, bad_records=bad_records, filesystem=filesystem)
    if source.kind != "parquet":
        return _read(source.datasource, read_args)
    import pyarrow.parquet as pq

    fs, infos = source.filesystem, source.files
    names = pq.read_schema(infos[0].path, filesystem=fs).names
    missing = [c for c in (id_column, image_column) if c not in names]
    if missing:
        raise ValueError(f"{infos[0].path} has no column {', '.join(missing)} (columns: {', '.join(names)}); "
                         "set id_column / image_column")
    ds = ray.data.read_parquet([i.path for i in infos], filesystem=fs, **read_args)
    return ds.select_columns([id_column, image_column]).rename_columns({id_column: "image_id", image_column: "image"})


def _common_root(single: PathLike | None, filesystem: pafs.FileSystem | None, fs: pafs.FileSystem,
                 infos: Sequence[pafs.FileInfo]) -> str:
    """The directory image ids are relative to: the given directory, else the files' common parent."""
    if single is not None:
        _, resolved = resolve_filesystem(single, filesystem)  # as list_files resolved it
        if fs.get_file_info(resolved).type == pafs.FileType.Directory:
            return resolved.rstrip("/")
    parents = [info.path.rsplit("/", 1)[0] for info in infos]
    return os.path.commonpath(parents) if all(p.startswith("/") for p in parents) else os.path.commonprefix(parents)


# ------------------------------------------------------------------- texts

def read_texts(path: Paths, *, bad_records: BadRecordSink | None = None, filesystem: pafs.FileSystem | None = None,
               **read_args: Any):
    """Texts from cn_clip JSONL files as a Dataset with rows `text_id` int64,
    `text` str, `image_ids` list[int64] (empty when a line has none)."""
    fs, infos = list_files(path, filesystem, JSONL_SUFFIXES)
    return _read(LinesDatasource(fs, infos, TextLines(require_image_ids=False), bad_records), read_args)


def iter_texts(path: Paths, bad: list[BadRecord] | None = None,
               filesystem: pafs.FileSystem | None = None) -> list[TextRecord]:
    """All valid text records of JSONL files, in file order, without Ray (for small files)."""
    fs, infos = list_files(path, filesystem, JSONL_SUFFIXES)
    rows = iter_line_rows(fs, infos, TextLines(require_image_ids=False), bad if bad is not None else [])
    return [TextRecord(text_id, text, tuple(image_ids)) for text_id, text, image_ids in rows]


# ----------------------------------------------------------------- zero-shot

def _zeroshot_dirs(path: PathLike) -> tuple[Path, Path]:
    """(dataset dir holding label_cn.txt, image dir holding <label id>/ folders)."""
    path = _local(path)
    if (path / "test").is_dir():
        return path, path / "test"
    return path.parent, path


def read_labels(path: PathLike) -> list[str]:
    """Class names from label_cn.txt, one per line, line i naming label id i. `path` is the
    file, the dataset dir holding it, or that dataset's test/ dir."""
    path = _local(path)
    label_file = path if path.is_file() else _zeroshot_dirs(path)[0] / LABEL_FILE
    if not label_file.is_file():
        raise FileNotFoundError(f"no {LABEL_FILE} at {label_file}")
    labels = [line.strip() for line in label_file.read_text(encoding="utf-8").splitlines()]
    while labels and not labels[-1]:
        labels.pop()
    if not labels or not all(labels):
        raise ValueError(f"{label_file} must hold one non-empty class name per line")
    return labels


def read_zeroshot(path: PathLike, *, bad_records: BadRecordSink | None = None, **read_args: Any):
    """A zero-shot image folder (`<dataset>/test/<zero-padded label id>/*`, or the test dir
    itself) as a Dataset with rows `image_id` (path relative to test/), `label` int64, `image` bytes.
    Label ids come from the folder names, so they index `read_labels(path)`."""
    _, image_dir = _zeroshot_dirs(path)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"zero-shot image folder {image_dir} does not exist")
    _, root = resolve_filesystem(str(image_dir))  # the form list_files gives paths in
    fs, infos = list_files(root, None, IMAGE_SUFFIXES)
    # Only files inside a class folder count, as torchvision's ImageFolder (cn_clip's reader) does.
    infos = [i for i in infos if "/" in i.path[len(root) + 1:]]
    folders = sorted({i.path[len(root) + 1:].split("/", 1)[0] for i in infos})
    not_ids = [name for name in folders if not name.isdigit()]
    if not folders or not_ids:
        raise ValueError(f"{image_dir} must hold one folder of images per class, named by its zero-padded "
                         f"label id (000, 001, ...); found {', '.join(not_ids[:5]) or 'no images in folders'}")
    return _read(ImageFilesDatasource(fs, root, infos, labeled=True, bad_records=bad_records), read_args)
