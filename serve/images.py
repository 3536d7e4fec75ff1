"""Images in and out of the HTTP API: base64 / data-URI decoding of request images, and their
media types. The images of search hits are read by id through the data plane
(clip_platform.data.lookup)."""
from __future__ import annotations

import base64
import binascii

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
