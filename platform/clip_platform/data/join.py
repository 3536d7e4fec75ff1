"""The join that turns text records + image ids into training pairs, streaming.

A broadcast hash join: the texts (the small side) become a compact `TextIndex`
shared through the object store; the image TSV (the big side) streams through
read tasks, and each image line becomes one row per text that names it. No
image is shuffled or held, so memory is bounded by the texts, not the images.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa

from .bad_records import BadRecordSink
from .records import BAD_BASE64, BadRecord, TextRecord, b64decode_image, parse_image_line
from .sources import PAIRS_SCHEMA


class TextIndex:
    """image_id -> [(text_id, text)] as three flat arrays sorted by image id.
    Numpy and Arrow arrays leave the object store without a copy and cost ~16
    bytes per pair plus the text, where a dict of lists costs ~10x that."""

    def __init__(self, records: Iterable[TextRecord]):
        image_ids, text_ids, texts = [], [], []
        for record in records:
            for image_id in record.image_ids:
                image_ids.append(image_id)
                text_ids.append(record.text_id)
                texts.append(record.text)
        order = np.argsort(np.asarray(image_ids, dtype=np.int64), kind="stable")  # stable: file order per image
        self.image_ids = np.asarray(image_ids, dtype=np.int64)[order]
        self.text_ids = np.asarray(text_ids, dtype=np.int64)[order]
        self.texts = pa.array(texts, type=pa.large_string()).take(pa.array(order))

    def __len__(self) -> int:
        return len(self.image_ids)

    def referenced_images(self) -> np.ndarray:
        return np.unique(self.image_ids)

    def texts_of(self, image_id: int) -> list[tuple[int, str]]:
        lo, hi = np.searchsorted(self.image_ids, [image_id, image_id + 1])
        return [(int(self.text_ids[i]), self.texts[i].as_py()) for i in range(lo, hi)]


class PairLines:
    """Line parser for `LinesDatasource`: image TSV lines -> rows (image_id,
    text_id, text, image bytes), one per text naming the image. Images no text
    names are dropped. `index` is a TextIndex or an ObjectRef to one (fetched
    once per task). The image ids seen go to the sink when the task ends, so it
    can name the referenced images that never came."""

    schema = PAIRS_SCHEMA
    name = "ReadTsvPairs"

    def __init__(self, index: Any, join_name: str):
        self.index = index
        self.join_name = join_name
        self._seen: list[int] = []

    def _index(self) -> TextIndex:
        if not isinstance(self.index, TextIndex):
            import ray

            self.index = ray.get(self.index)
        return self.index

    def __call__(self, line: bytes, where: str) -> list[tuple] | BadRecord | None:
        parsed = parse_image_line(line, where)
        if parsed is None or isinstance(parsed, BadRecord):
            return parsed
        image_id, b64 = parsed
        self._seen.append(image_id)
        texts = self._index().texts_of(image_id)
        if not texts:
            return None
        try:
            image = b64decode_image(b64)
        except ValueError as exc:
            return BadRecord(BAD_BASE64, image_id, where, str(exc))
        return [(image_id, text_id, text, image) for text_id, text in texts]

    def finish(self, task_index: int, num_tasks: int, sink: BadRecordSink | None) -> None:
        if sink is not None and hasattr(sink, "saw_images"):
            sink.saw_images(self.join_name, task_index, num_tasks, np.asarray(self._seen, dtype=np.int64))
