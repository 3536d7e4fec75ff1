"""The decode + transform step every job runs on raw rows: `decode_batch`.

Training (train/data.py), the embed job (batch/embed/) and zero-shot
(batch/zeroshot.py) call it inside their `map_batches` functions. It keeps every
row in place and flags the ones it could not decode (`valid`), so a training batch
keeps its shape across workers and the embed writer can account for every row of
a shard.

Input columns (any subset): `image` (encoded image bytes), `text` (str), and
ids. Output: `image` uint8 pixels [B, 3, S, S] (cn_clip's inference transform, or
its training augmentation, stopped before normalising: a quarter of float32's
bytes through the object store; `clip_models.normalize_pixels` or
`CLIP.encode_image` finish them; a float transform gives float32), `tokens`
int64 [B, context_length] (cn_clip's ids after its text normalisation), `num_tokens` int64 [B] ([CLS] .. [SEP] length,
to trim padding), the id columns, and `valid`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

import clip_models

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


def decode_batch(batch: Any, transform: Any, context_length: int = 52, id_columns: Sequence[str] = ID_COLUMNS,
                 todo: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], dict[int, BadRecord]]:
    """One batch through decode + transform + tokenize, every row kept in place: returns
    the arrays (see module docstring; `valid` False and zeros where a row could not be
    decoded) and the BadRecord of each such row by position. Rows outside `todo` (a bool
    mask; default all) are left invalid without a record: their caller knows why."""
    batch = _as_numpy_batch(batch)
    num_rows = len(next(iter(batch.values()))) if batch else 0
    todo = np.ones(num_rows, dtype=bool) if todo is None else np.asarray(todo, dtype=bool)
    valid = np.zeros(num_rows, dtype=bool)
    out: dict[str, np.ndarray] = {}
    if "image" in batch:
        dtype = np.uint8 if getattr(transform, "pixels", False) else np.float32
        out["image"] = np.zeros((num_rows, 3, transform.image_size, transform.image_size), dtype=dtype)
    texts = [""] * num_rows
    bad: dict[int, BadRecord] = {}
    for i in np.flatnonzero(todo).tolist():
        row = _decode_row(batch, i, transform, id_columns)
        if isinstance(row, BadRecord):
            bad[i] = row
            continue
        image, text = row
        if image is not None:
            out["image"][i] = image
        if text is not None:
            texts[i] = text
        valid[i] = True
    if "text" in batch:
        # Invalid rows get the empty text's [CLS] [SEP]: all-padding rows would make
        # attention NaN in a training batch, even though the loss masks them out.
        tokens = clip_models.tokenize(texts, context_length).numpy()
        out["tokens"] = tokens
        out["num_tokens"] = (tokens != 0).sum(axis=1).astype(np.int64)
    for column in id_columns:
        if column in batch:
            out[column] = batch[column]
    out["valid"] = valid
    return out, bad
