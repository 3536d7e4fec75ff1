"""cn_clip's text formats, one record at a time, and the kinds of bad record every reader reports.

* `{split}_imgs.tsv`: `image_id<TAB>base64(image bytes)` per line.
* `{split}_texts.jsonl`: `{"text_id": int, "text": str, "image_ids": [int, ...]}` per line.

Parsers never raise on bad data: they return a `BadRecord` saying what was
wrong, so a reader can skip, count and report it and carry on.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

# Kinds of bad record: a small fixed vocabulary, so summaries can count by kind.
BAD_LINE = "malformed line"
BAD_JSON = "malformed json"
BAD_FIELD = "missing or invalid field"
BAD_ID = "invalid id"
BAD_BASE64 = "bad base64"
BAD_IMAGE = "unreadable image"
BAD_PICKLE = "rejected pickle"
MISSING_IMAGE = "missing image"
MISSING_RECORD = "missing record"
DUPLICATE_ID = "duplicate id"
UNREADABLE_FILE = "unreadable file"

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_NUMBERED_NAME = re.compile(r"^(\d{1,18})(\.[A-Za-z0-9]+)?$")

# Standard and URL-safe base64 differ in two characters; cn_clip writes the
# former (its README) and reads with urlsafe_b64decode, which accepts both.
_URLSAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")


@dataclass(frozen=True)
class BadRecord:
    """One skipped record: what kind of problem, which record, and where."""

    kind: str                 # one of the BAD_* / MISSING_* constants above
    id: Any = None            # the record's image_id / text_id / path when known
    where: str = ""           # file and line, byte offset or LMDB key
    detail: str = ""          # the underlying error, for humans

    def __str__(self) -> str:
        ident = f" id={self.id}" if self.id is not None else ""
        return f"{self.kind}{ident} at {self.where}: {self.detail}".rstrip(": ")

    def to_dict(self) -> dict[str, Any]:
        """The one serialisation (reports, the embed job's shard notes), JSON-safe: ids may come as
        numpy scalars or raw bytes from a malformed line."""
        ident = self.id.item() if hasattr(self.id, "item") and not isinstance(self.id, (int, str, bytes)) else self.id
        if isinstance(ident, bytes):
            ident = ident.decode("utf-8", "replace")
        elif ident is not None and not isinstance(ident, (int, str)):
            ident = str(ident)
        return {"kind": str(self.kind), "id": ident, "where": str(self.where), "detail": str(self.detail)}


@dataclass(frozen=True)
class TextRecord:
    text_id: int
    text: str
    image_ids: tuple[int, ...] = field(default_factory=tuple)


def parse_id(value: Any) -> int | None:
    """An integer id from an int or a string of digits (cn_clip's ids are ints); None for
    anything else, ids outside int64 included (every id column downstream is int64)."""
    if isinstance(value, bool):  # bool is an int subclass, but True is not an id
        return None
    if isinstance(value, (str, bytes)):
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        text = text.strip()
        value = int(text) if text.lstrip("-").isdigit() and text.isascii() else None
    if isinstance(value, int) and INT64_MIN <= value <= INT64_MAX:
        return value
    return None


def stable_id(name: str) -> int:
    """The int64 id of a record named by a string (an image file, a webdataset key):
    `123`, `000123` or `123.jpg` -> 123, anything else a stable 63-bit hash of the name
    (callers keep the name beside it)."""
    match = _NUMBERED_NAME.match(name)
    if match:
        return int(match.group(1))
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "big") >> 1


def line_text(line: bytes | str, where: str) -> str | BadRecord | None:
    """A line's text without surrounding blanks; None for a blank line, a BadRecord for bytes
    that are not UTF-8 (decoding them with replacement would silently change the text)."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            return BadRecord(BAD_LINE, None, where, f"not UTF-8 text ({exc.reason} at byte {exc.start})")
    return line.strip() or None


def b64decode_image(data: str | bytes) -> bytes:
    """Image bytes from standard or URL-safe base64; raises ValueError on anything else."""
    if isinstance(data, str):
        data = data.encode("ascii", "replace")
    data = bytes(data).strip().translate(_URLSAFE_TO_STANDARD)
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"bad base64: {exc}") from None
    if not decoded:
        raise ValueError("bad base64: empty image")
    return decoded


def b64encode_image(data: bytes) -> str:
    """Standard base64, as cn_clip's README writes it (its readers accept it)."""
    return base64.b64encode(data).decode("ascii")


def parse_image_line(line: bytes | str, where: str = "") -> tuple[int, str] | BadRecord | None:
    """(image_id, base64 text) from one TSV line; None for a blank line.
    The base64 is returned undecoded: callers decide whether they need the bytes."""
    line = line_text(line, where)
    if line is None or isinstance(line, BadRecord):
        return line
    parts = line.split("\t")
    if len(parts) != 2:
        return BadRecord(BAD_LINE, None, where, f"expected 'image_id<TAB>base64', got {len(parts)} field(s)")
    image_id = parse_id(parts[0])
    if image_id is None:
        return BadRecord(BAD_ID, parts[0][:40], where, "image_id is not an integer in int64's range")
    return image_id, parts[1]


def format_image_line(image_id: int, image: bytes) -> str:
    return f"{image_id}\t{b64encode_image(image)}\n"


def parse_text_line(line: bytes | str, where: str = "",
                    require_image_ids: bool = True) -> TextRecord | BadRecord | None:
    """A TextRecord from one JSONL line; None for a blank line."""
    line = line_text(line, where)
    if line is None or isinstance(line, BadRecord):
        return line
    try:
        obj = json.loads(line)
    except ValueError as exc:
        return BadRecord(BAD_JSON, None, where, str(exc))
    if not isinstance(obj, dict):
        return BadRecord(BAD_JSON, None, where, f"expected an object, got {type(obj).__name__}")
    text_id = parse_id(obj.get("text_id"))
    if text_id is None:
        return BadRecord(BAD_FIELD, str(obj.get("text_id"))[:40], where,
                         "text_id is missing or not an integer in int64's range")
    text = obj.get("text")
    if not isinstance(text, str):
        return BadRecord(BAD_FIELD, text_id, where, "text is missing or not a string")
    raw_ids = obj.get("image_ids")
    if raw_ids is None and not require_image_ids:
        return TextRecord(text_id, text, ())
    if not isinstance(raw_ids, list):
        return BadRecord(BAD_FIELD, text_id, where, "image_ids is missing or not a list")
    image_ids = tuple(parse_id(i) for i in raw_ids)
    if None in image_ids:
        return BadRecord(BAD_FIELD, text_id, where, "image_ids holds a value that is not an integer in int64's range")
    return TextRecord(text_id, text, image_ids)


def format_text_line(record: TextRecord) -> str:
    obj = {"text_id": record.text_id, "text": record.text, "image_ids": list(record.image_ids)}
    return json.dumps(obj, ensure_ascii=False) + "\n"


def write_images_tsv(path, images) -> int:
    """Write (image_id, image bytes) pairs as a cn_clip image TSV; returns the count."""
    count = 0
    with open(path, "w", encoding="utf-8") as out:
        for image_id, data in images:
            out.write(format_image_line(image_id, data))
            count += 1
    return count


def write_texts_jsonl(path, records) -> int:
    """Write TextRecords as a cn_clip text JSONL; returns the count."""
    count = 0
    with open(path, "w", encoding="utf-8") as out:
        for record in records:
            out.write(format_text_line(record))
            count += 1
    return count
