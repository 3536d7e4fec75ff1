"""The decode + transform stage: raw rows -> model-ready arrays.

    ds.map_batches(DecodeStage(224, 52, bad_records=bad), batch_format="numpy")

Leave `batch_size` unset: Ray then fuses the stage into the read tasks (one task
reads a block and decodes it). A set batch_size keeps read and decode apart as
two operators, which costs a copy of every block through the object store and
splits the CPUs between them. The stage yields its output in chunks of
`rows_per_chunk` rows whatever the input batch, so memory stays bounded.

Input columns (any subset): `image` (encoded image bytes), `text` (str), and
ids. Output: `image` uint8 pixels [B, 3, S, S] (cn_clip's inference transform, or
its training augmentation, stopped before normalising: a quarter of float32's
bytes through the object store; `clip_models.normalize_pixels` or
`CLIP.encode_image` finish them; `decode_batch` keeps its transform's dtype), `tokens` int64 [B, context_length] (cn_clip's ids
after its text normalisation), `num_tokens` int64 [B] ([CLS] .. [SEP] length,
to trim padding), and the id columns. Records whose image cannot be decoded
are dropped from the batch and reported.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

import clip_models

from .bad_records import BadRecordSink, report
from .records import BAD_FIELD, BAD_IMAGE, BadRecord

ID_COLUMNS = ("image_id", "text_id", "label")


def _as_array(values: Any) -> np.ndarray:
    if isinstance(values, np.ndarray):
        return values
    array = np.asarray(values)
    if array.dtype.kind in "SU":  # fixed-width bytes drop trailing NULs: image bytes must stay objects
        array = np.empty(len(values), dtype=object)
        array[:] = list(values)
    return array


def _as_numpy_batch(batch: Any) -> dict[str, np.ndarray]:
    """Ray hands batches as dicts of arrays, DataFrames or Arrow tables; accept all."""
    if isinstance(batch, Mapping):
        return {k: _as_array(v) for k, v in batch.items()}
    if hasattr(batch, "to_pydict"):  # pyarrow.Table
        return {k: np.asarray(v, dtype=object) for k, v in batch.to_pydict().items()}
    return {k: batch[k].to_numpy() for k in batch.columns}  # pandas.DataFrame


def _record_id(batch: dict[str, np.ndarray], i: int, columns: Sequence[str]) -> Any:
    for column in columns:
        if column in batch:
            value = batch[column][i]
            return value.item() if isinstance(value, np.generic) else value
    return None


def _decode_row(batch: dict[str, np.ndarray], i: int, transform: Any,
                id_columns: Sequence[str]) -> tuple[np.ndarray | None, str | None] | BadRecord:
    """(image array or None, normalised text or None) for row i, or why the row is bad."""
    image = text = None
    if "text" in batch:
        raw = batch["text"][i]
        if not isinstance(raw, str):  # a null text cannot be tokenized meaningfully
            return BadRecord(BAD_FIELD, _record_id(batch, i, ("text_id", *id_columns)), "decode",
                             f"text is {type(raw).__name__}, not a string")
        text = clip_models.preprocess_text(raw)
    if "image" in batch:
        data = batch["image"][i]
        try:
            if data is None or len(data) == 0:
                raise ValueError("no image bytes")
            # decode_image raises ValueError for every unreadable input; OSError covers
            # conversions PIL can only attempt after decoding (odd modes, bad palettes).
            image = transform(clip_models.decode_image(bytes(data))).numpy()
        except (ValueError, OSError) as exc:
            return BadRecord(BAD_IMAGE, _record_id(batch, i, ("image_id", *id_columns)), "decode", str(exc))
    return image, text


def decode_batch(batch: Any, transform: Any, context_length: int = 52, bad_records: BadRecordSink | None = None,
                 id_columns: Sequence[str] = ID_COLUMNS) -> dict[str, np.ndarray]:
    """One batch through decode + transform + tokenize (see module docstring)."""
    batch = _as_numpy_batch(batch)
    num_rows = len(next(iter(batch.values()))) if batch else 0
    keep = np.ones(num_rows, dtype=bool)
    images, texts, bad = [], [], []
    for i in range(num_rows):
        row = _decode_row(batch, i, transform, id_columns)
        if isinstance(row, BadRecord):
            keep[i] = False
            bad.append(row)
            continue
        image, text = row
        if image is not None:
            images.append(image)
        if text is not None:
            texts.append(text)

    out: dict[str, np.ndarray] = {}
    if "image" in batch:
        size = transform.image_size
        dtype = np.uint8 if getattr(transform, "pixels", False) else np.float32
        out["image"] = np.stack(images) if images else np.empty((0, 3, size, size), dtype=dtype)
    if "text" in batch:
        tokens = clip_models.tokenize(texts, context_length).numpy() if texts else \
            np.zeros((0, context_length), dtype=np.int64)
        out["tokens"] = tokens
        out["num_tokens"] = (tokens != 0).sum(axis=1).astype(np.int64)
    for column in id_columns:
        if column in batch:
            out[column] = batch[column][keep]
    report(bad_records, bad)
    return out


class DecodeStage:
    """Callable for `ds.map_batches`: decode + transform + tokenize, bad records
    skipped and reported to `bad_records`. Pass an instance (runs as tasks, fused
    with the read) or the class with `fn_constructor_kwargs` and `concurrency`
    (actors). Calling it yields decoded batches of at most `rows_per_chunk` rows;
    for one dict in a plain loop, use `decode_batch`."""

    def __init__(self, image_size: int = 224, context_length: int = 52, use_augment: bool = False,
                 bad_records: BadRecordSink | None = None, id_columns: Sequence[str] = ID_COLUMNS,
                 rows_per_chunk: int = 32):
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 ([CLS] and [SEP]), got {context_length}")
        if rows_per_chunk < 1:
            raise ValueError(f"rows_per_chunk must be positive, got {rows_per_chunk}")
        self.image_size = image_size
        self.context_length = context_length
        self.use_augment = use_augment
        self.bad_records = bad_records
        self.id_columns = tuple(id_columns)
        self.rows_per_chunk = rows_per_chunk
        self.transform = clip_models.train_transform(image_size, use_augment, pixels=True)

    def __call__(self, batch: Any) -> Iterator[dict[str, np.ndarray]]:
        batch = _as_numpy_batch(batch)
        num_rows = len(next(iter(batch.values()))) if batch else 0
        for start in range(0, num_rows, self.rows_per_chunk):
            chunk = {name: column[start:start + self.rows_per_chunk] for name, column in batch.items()}
            out = decode_batch(chunk, self.transform, self.context_length, self.bad_records, self.id_columns)
            if out and len(next(iter(out.values()))):  # a chunk of only bad records adds nothing
                yield out

    def __repr__(self) -> str:
        return (f"DecodeStage(image_size={self.image_size}, context_length={self.context_length}, "
                f"use_augment={self.use_augment})")
