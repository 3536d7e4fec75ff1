"""Images in and out of the HTTP API: base64 / data-URI decoding of request images, and the
images of a cn_clip `{split}_imgs.tsv` served by id for search hits."""
from __future__ import annotations

import base64
import binascii
import logging

log = logging.getLogger("serve")
DATA_URI_PREFIX = "data:image/"


def is_data_uri(value: str) -> bool:
    return value.startswith(DATA_URI_PREFIX)


def decode_base64_image(data: str) -> bytes:
    """Bytes of a base64 or data-URI image; ValueError (a client mistake) when it is neither."""
    if data.startswith("data:"):
        header, _, data = data.partition(",")
        if ";base64" not in header:
            raise ValueError("data URI must be base64 encoded")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("image is not valid base64") from None
    if not raw:
        raise ValueError("image is empty")
    return raw


def image_media_type(data: bytes) -> str:
    for magic, media in ((b"\x89PNG", "image/png"), (b"\xff\xd8", "image/jpeg"), (b"GIF8", "image/gif"),
                         (b"BM", "image/bmp")):
        if data.startswith(magic):
            return media
    return "image/webp" if data[8:12] == b"WEBP" else "application/octet-stream"


class ImageStore:
    """Images of a cn_clip `{split}_imgs.tsv` by id, read on demand: only the byte offset of
    each line is kept in memory, so a large TSV costs one scan at start-up. Lines are parsed
    by the data plane's TSV parser; bad ones are skipped and counted, as the batch jobs do."""

    def __init__(self, path: str):
        from clip_platform.data.records import parse_image_line

        self.path = path
        self.offsets: dict[int, int] = {}
        self.num_bad = 0
        with open(path, "rb") as f:
            offset = 0
            for line in f:
                parsed = parse_image_line(line, f"{path}@{offset}")
                if isinstance(parsed, tuple):
                    self.offsets[parsed[0]] = offset
                elif parsed is not None:
                    self.num_bad += 1
                offset += len(line)
        if self.num_bad:
            log.warning("%s: %d malformed line(s) skipped", path, self.num_bad)

    def __len__(self) -> int:
        return len(self.offsets)

    def __contains__(self, image_id: int) -> bool:
        return image_id in self.offsets

    def get(self, image_id: int) -> bytes | None:
        from clip_platform.data.records import b64decode_image

        offset = self.offsets.get(image_id)
        if offset is None:
            return None
        with open(self.path, "rb") as f:
            f.seek(offset)
            try:
                return b64decode_image(f.readline().partition(b"\t")[2])
            except ValueError:  # bad base64: the page shows no image rather than failing the request
                return None
