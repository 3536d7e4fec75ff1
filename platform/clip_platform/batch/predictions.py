"""cn_clip's retrieval files: predictions and ground-truth annotations, both JSONL.

* text->image ("t2i"): `{"text_id": 1, "image_ids": [...]}` (annotations also carry "text").
* image->text ("i2t"): `{"image_id": 1, "text_ids": [...]}` (annotations made by
  transform_annotations from the text->image ones).

Readers apply cn_clip evaluation.py's rules, and every error names the file and
line, so a malformed prediction file is fixed in one look.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from contextlib import ExitStack

from ..io import atomic_path, is_file
from ..data.features import json_objects

MODES = ("t2i", "i2t")
KEYS = {"t2i": ("text_id", "image_ids"), "i2t": ("image_id", "text_ids")}  # mode -> (query key, result key)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


# ---------------------------------------------------------------- writing

def prediction_line(query_id: int, result_ids: Iterable[int], mode: str) -> str:
    query_key, result_key = KEYS[mode]
    return json.dumps({query_key: int(query_id), result_key: [int(i) for i in result_ids]}) + "\n"


class PredictionWriter:
    """Writes prediction lines to a temporary file renamed onto `path` on success,
    so an interrupted job never leaves a truncated file that looks finished."""

    def __init__(self, path: str | os.PathLike, mode: str):
        self.path = os.fspath(path)  # a local path or a URI (clip_platform.io writes both)
        self.mode = check_mode(mode)
        self.num_lines = 0
        self._stack = ExitStack()

    def __enter__(self) -> "PredictionWriter":
        with ExitStack() as stack:
            tmp = stack.enter_context(atomic_path(self.path))
            self._file = stack.enter_context(open(tmp, "w", encoding="utf-8"))
            self._stack = stack.pop_all()
        return self

    def write(self, query_ids: Iterable[int], result_ids: Iterable[Iterable[int]]) -> None:
        """One line per query; ids < 0 (slots an approximate index could not fill) are left out."""
        for query_id, results in zip(query_ids, result_ids):
            self._file.write(prediction_line(query_id, (i for i in results if i >= 0), self.mode))
            self.num_lines += 1

    def __exit__(self, exc_type, exc, tb) -> bool:
        return self._stack.__exit__(exc_type, exc, tb)


# ---------------------------------------------------------------- reading

def _json_lines(path: str | os.PathLike, what: str) -> Iterator[tuple[str, dict]]:
    """(where, object) per non-blank line; `where` is "FILE line N" for messages."""
    if not is_file(path):
        raise FileNotFoundError(f"{what} file {path} does not exist")
    yield from json_objects(path)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _id_list(obj: dict, key: str, query: str, where: str) -> list[int]:
    if key not in obj:
        raise ValueError(f"{where}: {query} has no {key!r} list")
    values = obj[key]
    if not isinstance(values, list):
        raise ValueError(f"{where}: {key!r} of {query} is not a list")
    for rank, value in enumerate(values, 1):
        if not _is_int(value):
            raise ValueError(f"{where}: {query} has an invalid id {value!r} at rank {rank} of {key!r}; "
                             f"ids must be integers (not strings)")
    return values


def iter_annotations(path: str | os.PathLike, mode: str) -> Iterator[tuple[int, list[int]]]:
    """(query id, relevant ids) per line of a ground-truth file, checked."""
    query_key, result_key = KEYS[check_mode(mode)]
    for where, obj in _json_lines(path, "ground-truth"):
        if query_key not in obj:
            other = KEYS["i2t" if mode == "t2i" else "t2i"][0]
            hint = (" (it holds text->image annotations: transform them with jobs/transform_annotations.py)"
                    if other in obj and mode == "i2t" else
                    f" (it holds {other}: use --mode {'i2t' if mode == 't2i' else 't2i'})" if other in obj else "")
            raise ValueError(f"{where}: no {query_key!r}{hint}")
        query_id = obj[query_key]
        if not _is_int(query_id):
            raise ValueError(f"{where}: {query_key} {query_id!r} must be an integer")
        yield query_id, _id_list(obj, result_key, f"{query_key} {query_id}", where)


def read_annotations(path: str | os.PathLike, mode: str) -> dict[int, list[int]]:
    """Ground truth: query id -> relevant ids. A later line for the same query
    replaces an earlier one, as in cn_clip; any of the relevant ids counts as a hit."""
    reference = dict(iter_annotations(path, mode))
    if not reference:
        raise ValueError(f"ground-truth file {path} holds no annotations")
    return reference


def looks_like(path: str | os.PathLike, mode: str) -> bool:
    """Whether the first line of a JSONL file has the query key of `mode`."""
    for _, obj in _json_lines(path, "ground-truth"):
        return KEYS[mode][0] in obj
    return False


def read_predictions(path: str | os.PathLike, mode: str, reference: dict[int, list[int]],
                     k: int = 10) -> dict[int, list[int]]:
    """Predictions checked by cn_clip's rules: exactly k distinct integer ids per
    query, and a prediction for every query of the ground truth."""
    query_key, result_key = KEYS[check_mode(mode)]
    predictions: dict[int, list[int]] = {}
    first_line: dict[int, str] = {}
    for where, obj in _json_lines(path, "prediction"):
        if query_key not in obj:
            raise ValueError(f"{where}: no {query_key!r} (found keys {sorted(obj)[:5]}; is --mode right?)")
        query_id = obj[query_key]
        if not _is_int(query_id):
            raise ValueError(f"{where}: invalid {query_key} {query_id!r}: it must be an integer (not a string)")
        query = f"{query_key} {query_id}"
        ids = _id_list(obj, result_key, query, where)
        if len(ids) != k:
            raise ValueError(f"{where}: {query} has {len(ids)} predicted {result_key}, {k} required")
        if len(set(ids)) != k:
            raise ValueError(f"{where}: {query} has duplicate ids in its top-{k}")
        if query_id in predictions:
            raise ValueError(f"{where}: {query} was already predicted at {first_line[query_id]}")
        predictions[query_id], first_line[query_id] = ids, where
    missing = [q for q in reference if q not in predictions]
    if missing:
        shown = ", ".join(str(q) for q in missing[:10]) + (f" ... ({len(missing)} in all)" if len(missing) > 10 else "")
        raise ValueError(f"{path}: no prediction for {query_key} {shown}")
    return predictions


def transform_t2i_to_i2t(annotations: Iterable[tuple[int, list[int]]]) -> dict[int, list[int]]:
    """text -> images annotations turned into image -> texts, as cn_clip's
    transform_ir_annotation_to_tr.py does: images by first appearance, texts in file order."""
    i2t: dict[int, list[int]] = {}
    for text_id, image_ids in annotations:
        for image_id in image_ids:
            i2t.setdefault(image_id, []).append(text_id)
    return i2t
