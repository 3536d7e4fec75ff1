"""Public readers: paths in, datasources and streaming `ray.data.Dataset`s out.

`image_source(path)` and `text_source(path)` say what a corpus path names and give the
`PieceDatasource` that reads it: the embed job runs its pieces as resumable shards, and
`read_images` / `read_texts` hand it to Ray Data. Zero-shot folders are listed by
`zeroshot_images` (the order torchvision's ImageFolder, cn_clip's reader, gives) and read
by `read_zeroshot`. Training reads pairs by index instead (`indexed.open_pairs`).

Local paths, globs, brace patterns and pyarrow filesystem URIs (s3://, gs://, hdfs://)
are accepted for TSV, JSONL, Parquet, webdataset and image files. LMDB is a local-file
format: its directory must be at the same path on every node that reads it (a shared
filesystem, or a copy per node).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow.fs as pafs

from . import lmdb_io
from .bad_records import BadRecordSink
from .files import list_files, resolve_filesystem
from .formats import FORMATS, IMAGE_SUFFIXES, JSONL_SUFFIXES, Format, kind_of, suffixes_of
from .records import BadRecord, TextRecord
from .sources import (ImageFilesDatasource, ImageLines, LinesDatasource, LmdbImagesDatasource,
                      ParquetImagesDatasource, PieceDatasource, TextLines, WebDatasetDatasource, iter_line_rows)

PathLike = str | os.PathLike
Paths = PathLike | Sequence[PathLike]
LABEL_FILE = "label_cn.txt"


def _is_local(path: PathLike) -> bool:
    return "://" not in os.fspath(path) or os.fspath(path).startswith("file://")


def _local(path: PathLike) -> Path:
    text = os.fspath(path)
    return Path(text[len("file://"):] if text.startswith("file://") else text).expanduser()


def _read(datasource: Any, read_args: dict[str, Any]):
    import ray.data

    return ray.data.read_datasource(datasource, **read_args)


class Source(NamedTuple):
    """A corpus as `image_source` / `text_source` found it; what its format knows (formats.py)."""

    kind: str  # "lmdb", "tsv", "parquet", "webdataset", "files" or "jsonl"
    datasource: PieceDatasource
    filesystem: pafs.FileSystem | None  # of `files` (None for LMDB, a local directory)
    files: list[pafs.FileInfo]  # the files read; [] for LMDB

    @property
    def format(self) -> Format:
        return FORMATS[self.kind]

    def estimated_rows(self) -> int:
        """Records in the corpus, estimated from its files (exact for LMDB, Parquet, image files)."""
        return self.format.estimate(self)

    def min_pieces(self) -> int:
        """The fewest pieces it can be cut into: compressed line files and tar shards are one each."""
        return self.format.min_pieces(self)

    def fingerprint(self, path: Any) -> dict[str, Any]:
        return self.format.fingerprint(self, path)


def _files_of_one_kind(path: Paths, filesystem: pafs.FileSystem | None,
                       kinds: tuple[str, ...]) -> tuple[pafs.FileSystem, list[pafs.FileInfo], str]:
    fs, infos = list_files(path, filesystem, suffixes_of(kinds))
    found = {kind_of(info.path) for info in infos}
    if len(found) != 1 or not found <= set(kinds):
        raise ValueError(f"{path} holds {', '.join(sorted(k or 'unknown' for k in found))} files; "
                         f"give one kind of {', '.join(kinds)} at a time")
    return fs, infos, found.pop()


def image_source(path: Paths, *, bad_records: BadRecordSink | None = None, filesystem: pafs.FileSystem | None = None,
                 min_split_bytes: int | None = None, id_column: str = "id", image_column: str = "image") -> Source:
    """What an image corpus path names, and the datasource reading it: an LMDB image dir
    (`.../lmdb/valid/imgs`, or the split dir), `*_imgs.tsv` files (byte ranges of at least
    `min_split_bytes`), Parquet files (`id_column`, binary `image_column`), webdataset tar
    shards (the image of each sample; ids are the keys), or image files / a directory of
    them (ids: paths relative to the directory). Directories, globs and brace patterns
    are expanded; URIs work for all but LMDB. Several kinds at once are a ValueError."""
    single = path if isinstance(path, (str, os.PathLike)) else None
    if single is not None and _is_local(single):
        local = _local(single)
        if lmdb_io.is_env_dir(local) or lmdb_io.is_split_dir(local):
            imgs_dir = local if lmdb_io.is_env_dir(local) else local / "imgs"
            return Source("lmdb", LmdbImagesDatasource(imgs_dir, bad_records), None, [])
    fs, infos, kind = _files_of_one_kind(path, filesystem, ("tsv", "parquet", "webdataset", "files"))
    if kind == "tsv":
        datasource = LinesDatasource(fs, infos, ImageLines(), bad_records, min_split_bytes=min_split_bytes)
    elif kind == "parquet":
        datasource = ParquetImagesDatasource(fs, infos, id_column, image_column, bad_records)
    elif kind == "webdataset":
        datasource = WebDatasetDatasource(fs, infos, "images", bad_records)
    else:
        root = _common_root(single, filesystem, fs, infos)
        datasource = ImageFilesDatasource(fs, root, infos, labeled=False, bad_records=bad_records)
    return Source(kind, datasource, fs, infos)


def text_source(path: Paths, *, bad_records: BadRecordSink | None = None, filesystem: pafs.FileSystem | None = None,
                min_split_bytes: int | None = None) -> Source:
    """Texts: cn_clip JSONL files (rows text_id, text, image_ids) or the captions (`.txt`)
    of webdataset tar shards (rows text_id = the sample key, text)."""
    fs, infos, kind = _files_of_one_kind(path, filesystem, ("jsonl", "webdataset"))
    if kind == "jsonl":
        datasource = LinesDatasource(fs, infos, TextLines(require_image_ids=False), bad_records,
                                     min_split_bytes=min_split_bytes)
    else:
        datasource = WebDatasetDatasource(fs, infos, "texts", bad_records)
    return Source(kind, datasource, fs, infos)


def read_images(path: Paths, *, bad_records: BadRecordSink | None = None, filesystem: pafs.FileSystem | None = None,
                id_column: str = "id", image_column: str = "image", **read_args: Any):
    """An image corpus (any kind `image_source` takes) as a Dataset with rows `image_id`,
    `image` (encoded bytes). image_id is int64 for LMDB and TSV, whatever the Parquet
    holds, the key for webdataset and the relative path for image files. `read_args`
    go to `ray.data.read_datasource` (e.g. `override_num_blocks`, `concurrency`)."""
    source = image_source(path, bad_records=bad_records, filesystem=filesystem, id_column=id_column,
                          image_column=image_column)
    return _read(source.datasource, read_args)


def read_texts(path: Paths, *, bad_records: BadRecordSink | None = None, filesystem: pafs.FileSystem | None = None,
               **read_args: Any):
    """Texts (JSONL or webdataset captions, see `text_source`) as a Dataset."""
    return _read(text_source(path, bad_records=bad_records, filesystem=filesystem).datasource, read_args)


def _common_root(single: PathLike | None, filesystem: pafs.FileSystem | None, fs: pafs.FileSystem,
                 infos: Sequence[pafs.FileInfo]) -> str:
    """The directory image ids are relative to: the given directory, else the files' common parent."""
    if single is not None:
        _, resolved = resolve_filesystem(single, filesystem)  # as list_files resolved it
        if fs.get_file_info(resolved).type == pafs.FileType.Directory:
            return resolved.rstrip("/")
    parents = [info.path.rsplit("/", 1)[0] for info in infos]
    return os.path.commonpath(parents) if all(p.startswith("/") for p in parents) else os.path.commonprefix(parents)


def iter_texts(path: Paths, bad: list[BadRecord] | None = None,
               filesystem: pafs.FileSystem | None = None) -> list[TextRecord]:
    """All valid text records of JSONL files, in file order, without Ray (for small files)."""
    fs, infos = list_files(path, filesystem, JSONL_SUFFIXES)
    rows = iter_line_rows(fs, infos, TextLines(require_image_ids=False), bad if bad is not None else [])
    return [TextRecord(text_id, text, tuple(image_ids)) for text_id, text, image_ids in rows]


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
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    label_file = path if path.is_file() else _zeroshot_dirs(path)[0] / LABEL_FILE
    if not label_file.is_file():
        raise FileNotFoundError(f"{path} is not a zero-shot dataset ({LABEL_FILE} and test/<label id>/ images, "
                                f"the ELEVATER layout): {label_file} does not exist")
    try:
        labels = [line.strip() for line in label_file.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise ValueError(f"{label_file} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    while labels and not labels[-1]:
        labels.pop()
    if not labels:
        raise ValueError(f"label file {label_file} holds no class names")
    blank = next((number for number, name in enumerate(labels, 1) if not name), None)
    if blank is not None:
        raise ValueError(f"{label_file} line {blank} is blank: every label id needs a class name")
    return labels


def zeroshot_images(path: PathLike, num_classes: int | None = None) -> tuple[pafs.FileSystem, str, list[pafs.FileInfo]]:
    """The images of a zero-shot folder (`<dataset>/test/<zero-padded label id>/**`, or the
    test dir itself), ordered by label, then path, as torchvision's ImageFolder (cn_clip's
    reader) walks them. Folder names are label ids, so a class without test images does not
    shift the others; with `num_classes`, a label beyond the label file is an error."""
    _, image_dir = _zeroshot_dirs(path)
    if not image_dir.is_dir():
        raise NotADirectoryError(f"zero-shot image folder {image_dir} does not exist or is not a directory")
    classes = sorted(d.name for d in image_dir.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"{image_dir} has no class sub-folders (expected {image_dir}/<label id>/<images>)")
    for name in classes:
        if not name.isdigit():
            raise ValueError(f"class folder {image_dir / name} is not named by a label id (e.g. 000, 001, ...)")
        if num_classes is not None and int(name) >= num_classes:
            raise ValueError(f"class folder {image_dir / name} is label {int(name)}, "
                             f"but the label file has {num_classes} classes")
    labels = {name: int(name) for name in classes}
    if len(set(labels.values())) < len(labels):
        raise ValueError(f"{image_dir} has two class folders for one label id (e.g. 1 and 001)")
    _, root = resolve_filesystem(str(image_dir))  # the form list_files gives paths in
    try:
        fs, infos = list_files(root, None, IMAGE_SUFFIXES)
    except FileNotFoundError:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {image_dir}") from None
    # Only files inside a class folder count, as ImageFolder does.
    infos = [i for i in infos if i.path[len(root) + 1:].split("/", 1)[0] in labels and "/" in i.path[len(root) + 1:]]
    if not infos:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders of {image_dir}")
    # ImageFolder sorts os.walk's (folder, files) tuples: a folder's own files before its sub-folders'.
    infos.sort(key=lambda i: (labels[i.path[len(root) + 1:].split("/", 1)[0]], *i.path.rsplit("/", 1)))
    return fs, root, infos


def read_zeroshot(path: PathLike, *, bad_records: BadRecordSink | None = None, num_classes: int | None = None,
                  **read_args: Any):
    """A zero-shot image folder (see `zeroshot_images`) as a Dataset with rows `image_id`
    (path relative to test/), `label` int64, `image` bytes."""
    fs, root, infos = zeroshot_images(path, num_classes)
    return _read(ImageFilesDatasource(fs, root, infos, labeled=True, bad_records=bad_records), read_args)
