"""Build cn_clip LMDB splits from TSV + JSONL, as cn_clip's
`preprocess/build_lmdb_dataset.py` does, with every image validated first.

Differences from cn_clip, all in the direction of never writing what cannot be
read back: undecodable images are left out (and reported), as are pairs whose
image is absent or was left out; a repeated image id is stored once and
`num_images` counts the keys; a split is built in a temporary directory and
moved into place at the end, so a failed build leaves the old LMDB intact
(cn_clip writes into the old one, leaving stale keys).

Image validation (base64 + full decode) is the costly part. Large inputs are
validated by Ray read tasks over byte ranges of the TSV, in parallel across
the cluster; the driver writes the LMDB in file order.
"""
from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

import clip_models

from .bad_records import BadRecordCounter, BadRecordSummary
from .files import list_files
from .lmdb_io import LmdbSplitWriter
from .records import (BAD_BASE64, BAD_IMAGE, DUPLICATE_ID, MISSING_IMAGE, BadRecord, b64decode_image,
                      parse_image_line)
from .sources import LinesDatasource, TextLines, iter_line_rows

log = logging.getLogger(__name__)
PARALLEL_MODES = ("auto", "ray", "local")


@dataclass(frozen=True)
class BuildLmdbConfig:
    data_dir: str                      # holds {split}_imgs.tsv and {split}_texts.jsonl
    splits: str | tuple[str, ...]      # splits to build, comma separated (train,valid,test); a tuple once built
    lmdb_dir: str | None = None        # output root, {lmdb_dir}/{split}/{imgs,pairs}; default {data_dir}/lmdb
    parallel: Literal[PARALLEL_MODES] = "auto"  # ray, local, or auto: Ray when a split's TSV has >= ray_min_bytes
    ray_min_bytes: int = 256 << 20     # below this, starting Ray costs more than it saves

    def __post_init__(self):
        splits = self.splits.split(",") if isinstance(self.splits, str) else self.splits
        splits = tuple(dict.fromkeys(s.strip() for s in splits if s.strip()))  # dedupe, keep order
        object.__setattr__(self, "splits", splits)
        if not splits:
            raise ValueError("--splits must name at least one split, e.g. train,valid,test")
        if any("/" in s or s.startswith(".") for s in splits):
            raise ValueError(f"split names must be plain names, got {', '.join(splits)}")
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel must be one of {', '.join(PARALLEL_MODES)}, got {self.parallel!r}")
        if not os.path.isdir(self.data_dir):
            raise FileNotFoundError(f"data_dir {self.data_dir} is not a directory")

    @property
    def output_dir(self) -> Path:
        return Path(self.lmdb_dir) if self.lmdb_dir else Path(self.data_dir) / "lmdb"


@dataclass
class SplitReport:
    split: str
    path: str
    num_images: int
    num_samples: int
    bad: BadRecordSummary = field(default_factory=BadRecordSummary)

    def to_dict(self) -> dict[str, Any]:
        return {"split": self.split, "path": self.path, "num_images": self.num_images,
                "num_samples": self.num_samples, "bad_records": self.bad.to_dict()}

    def __str__(self) -> str:
        return f"{self.split}: {self.num_images} images, {self.num_samples} pairs -> {self.path}; {self.bad}"


class CheckedImageLines:
    """TSV lines -> rows (image_id, base64 text, where, error), every image fully
    decoded; a bad line becomes a row with its error, so the driver can count it."""

    schema = pa.schema([("image_id", pa.int64()), ("b64", pa.binary()), ("where", pa.string()),
                        ("error", pa.string())])
    name = "ValidateTsvImages"

    def __call__(self, line: bytes, where: str) -> list[tuple] | None:
        parsed = parse_image_line(line, where)
        if parsed is None:
            return None
        if isinstance(parsed, BadRecord):
            return [(None, b"", where, f"{parsed.kind}\t{parsed.detail}")]
        image_id, b64 = parsed
        return [(image_id, b64.encode("ascii", "replace"), where, _image_error(b64))]


def _image_error(b64: str) -> str:
    """'' for a readable image, else 'kind<TAB>detail'."""
    try:
        image = b64decode_image(b64)
    except ValueError as exc:
        return f"{BAD_BASE64}\t{exc}"
    try:
        clip_models.decode_image(image).convert("RGB")  # as a reader will: full decode, then RGB
    except (ValueError, OSError) as exc:
        return f"{BAD_IMAGE}\t{exc}"
    return ""


def _checked_images(tsv: str, use_ray: bool) -> Iterator[tuple[int | None, bytes, str, str]]:
    fs, files = list_files(tsv)
    if not use_ray:
        yield from iter_line_rows(fs, files, CheckedImageLines(), [])
        return
    import ray.data

    ds = ray.data.read_datasource(LinesDatasource(fs, files, CheckedImageLines()))
    ds.context.execution_options.preserve_order = True  # keep-first for repeated ids must mean file order
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        yield from zip(*(batch.column(i).to_pylist() for i in range(4)))


def _use_ray(config: BuildLmdbConfig, tsv: str) -> bool:
    if config.parallel != "auto":
        return config.parallel == "ray"
    return os.path.getsize(tsv) >= config.ray_min_bytes


def _write_images(writer: LmdbSplitWriter, tsv: str, use_ray: bool,
                  bad: BadRecordCounter) -> tuple[set[int], dict[int, str]]:
    """Store every readable image once; returns (stored ids, {rejected id: why})."""
    stored: set[int] = set()
    rejected: dict[int, str] = {}
    for image_id, b64, where, error in _checked_images(tsv, use_ray):
        if error:
            kind, _, detail = error.partition("\t")
            bad.report([BadRecord(kind, image_id, where, detail)])
            if image_id is not None and image_id not in stored:
                rejected[image_id] = kind
        elif not writer.add_image(image_id, b64):
            bad.report([BadRecord(DUPLICATE_ID, image_id, where, "image id seen before: kept the first")])
        else:
            stored.add(image_id)
            rejected.pop(image_id, None)  # a later good copy of an id makes up for a bad one
    return stored, rejected


def _write_pairs(writer: LmdbSplitWriter, jsonl: str, tsv_name: str, stored: set[int], rejected: dict[int, str],
                 bad: BadRecordCounter) -> None:
    """One pair per (text, stored image it names), in file order, as cn_clip numbers them."""
    fs, files = list_files(jsonl)
    skipped: list[BadRecord] = []
    for text_id, text, image_ids in iter_line_rows(fs, files, TextLines(require_image_ids=True), skipped):
        for image_id in image_ids:
            if image_id in stored:
                writer.add_pair(image_id, text_id, text)
                continue
            why = f"was {rejected[image_id]}" if image_id in rejected else f"is not in {tsv_name}"
            skipped.append(BadRecord(MISSING_IMAGE, text_id, Path(jsonl).name, f"pair skipped: image {image_id} {why}"))
    bad.report(skipped)


def split_files(data_dir: str | os.PathLike, split: str) -> tuple[str, str]:
    """cn_clip's file names for a split: ({split}_imgs.tsv, {split}_texts.jsonl) under data_dir."""
    base = os.fspath(data_dir).rstrip("/")
    return f"{base}/{split}_imgs.tsv", f"{base}/{split}_texts.jsonl"


def build_split(config: BuildLmdbConfig, split: str) -> SplitReport:
    """Build {output_dir}/{split}; returns what was written and what was skipped."""
    tsv, jsonl = split_files(config.data_dir, split)
    for path in (tsv, jsonl):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"split {split!r}: {path} does not exist")
    final = config.output_dir / split
    building = config.output_dir / f".{split}.building"
    shutil.rmtree(building, ignore_errors=True)  # leftovers of an interrupted build
    bad = BadRecordCounter()
    use_ray = _use_ray(config, tsv)
    log.info("split %s: validating images of %s (%s)", split, tsv, "Ray" if use_ray else "one process")
    with LmdbSplitWriter(building) as writer:
        stored, rejected = _write_images(writer, tsv, use_ray, bad)
        _write_pairs(writer, jsonl, Path(tsv).name, stored, rejected, bad)
        num_images, num_samples = writer.num_images, writer.num_samples
    _replace_dir(building, final)
    report = SplitReport(split, str(final), num_images, num_samples, bad.summary())
    log.info("%s", report)
    return report


def _replace_dir(new: Path, final: Path) -> None:
    """Move `new` to `final`, removing the old `final` only once the new one is in place."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        log.info("overwriting the existing LMDB %s", final)
        final.rename(old)
    new.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def build_lmdb(config: BuildLmdbConfig) -> list[SplitReport]:
    """Build every split of the config (see module docstring)."""
    log.info("dataset splits to be processed: %s", ", ".join(config.splits))
    for split in config.splits:  # check them all before spending time on any
        for path in split_files(config.data_dir, split):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"split {split!r}: {path} does not exist")
    return [build_split(config, split) for split in config.splits]
