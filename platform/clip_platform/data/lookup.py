"""Records by id: random access into a corpus file, for what serves single records (Serve's
GET /images/{id}). Nothing per id is held in Python objects: ids and byte offsets are two
sorted int64 arrays (16 bytes a record), found by binary search.

* `TsvImages`  a cn_clip `{split}_imgs.tsv` (local or any pyarrow filesystem URI): one scan
               through the data plane's line reader and TSV parser when opened, then a ranged
               read of the one line asked for. Bad lines are skipped and counted, as the batch
               jobs do; for a repeated id, its first line is served.
"""
from __future__ import annotations

import logging
import os

import numpy as np

from .files import FileRange, iter_lines, resolve_filesystem
from .records import BadRecord, b64decode_image, parse_image_line

log = logging.getLogger(__name__)


class TsvImages:
    def __init__(self, path: str | os.PathLike):
        self.fs, self.path = resolve_filesystem(path)
        size = self.fs.get_file_info(self.path).size or 0
        ids, offsets, self.num_bad = [], [], 0
        for offset, line in iter_lines(self.fs, FileRange(self.path, 0, size)):
            parsed = parse_image_line(line, f"{path}@{offset}")
            if isinstance(parsed, BadRecord):
                self.num_bad += 1
            elif parsed is not None:
                ids.append(parsed[0])
                offsets.append(offset)
        order = np.argsort(np.asarray(ids, np.int64), kind="stable")  # stable: a repeated id's first line first
        self.ids = np.asarray(ids, np.int64)[order]
        self.offsets = np.asarray(offsets, np.int64)[order]
        if self.num_bad:
            log.warning("%s: %d malformed line(s) skipped", path, self.num_bad)

    def __len__(self) -> int:
        return len(self.ids)

    def _position(self, image_id: int) -> int | None:
        at = int(np.searchsorted(self.ids, image_id))
        return at if at < len(self.ids) and self.ids[at] == image_id else None

    def __contains__(self, image_id: int) -> bool:
        return self._position(image_id) is not None

    def get(self, image_id: int) -> bytes | None:
        """The image's bytes; None for an id the file does not hold or whose base64 is bad."""
        at = self._position(image_id)
        if at is None:
            return None
        with self.fs.open_input_file(self.path) as f:
            f.seek(int(self.offsets[at]))
            line = _read_line(f)
        try:
            return b64decode_image(line.split(b"\n", 1)[0].rstrip(b"\r").partition(b"\t")[2])
        except ValueError:  # bad base64: the page shows no image rather than failing the request
            return None


def _read_line(f, chunk: int = 1 << 20) -> bytes:
    """From the file's position to the end of that line (or a little past it)."""
    parts = []
    while True:
        block = f.read(chunk)
        parts.append(block)
        if not block or b"\n" in block:
            return b"".join(parts)
