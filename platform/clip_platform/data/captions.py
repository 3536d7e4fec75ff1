"""The clip-pytorch dataset layout: an image folder plus a JSON list of
`{"image": relative path, "caption": [str, ...]}` (e.g. cn_train.json with
flickr8k-images/). Every caption becomes a text whose ground truth is its image.

Ids are assigned in file order: image_id = index of the entry, text_id = running
caption number, so conversion to cn_clip's TSV/JSONL/LMDB is stable and repeatable.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .records import BAD_FIELD, BadRecord


@dataclass(frozen=True)
class CaptionPair:
    image_id: int
    text_id: int
    text: str
    image_path: Path


@dataclass(frozen=True)
class CaptionDataset:
    images: list[Path]  # image_id -> file
    pairs: list[CaptionPair]  # one per caption
    bad: list[BadRecord]  # entries skipped while reading the JSON


def read_caption_json(json_path: str | Path, image_root: str | Path | None = None) -> CaptionDataset:
    """Parse the JSON list; malformed entries are skipped and reported, never fatal."""
    json_path = Path(json_path)
    root = Path(image_root) if image_root else json_path.parent
    try:
        entries = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{json_path} is not a readable JSON list: {exc}") from None
    if not isinstance(entries, list):
        raise ValueError(f"{json_path} must hold a JSON list of {{'image', 'caption'}} objects")
    images, pairs, bad = [], [], []
    for position, entry in enumerate(entries):
        where = f"{json_path}[{position}]"
        image, captions = (entry.get("image"), entry.get("caption")) if isinstance(entry, dict) else (None, None)
        if isinstance(captions, str):
            captions = [captions]
        if not isinstance(image, str) or not isinstance(captions, list):
            bad.append(BadRecord(BAD_FIELD, position, where, "expected {'image': path, 'caption': [str, ...]}"))
            continue
        image_id = len(images)
        images.append(root / image)
        for caption in captions:
            if isinstance(caption, str) and caption.strip():
                pairs.append(CaptionPair(image_id, len(pairs), caption, root / image))
            else:
                bad.append(BadRecord(BAD_FIELD, image_id, where, f"caption {caption!r} is not a non-empty string"))
    return CaptionDataset(images, pairs, bad)


def is_caption_json(path: str | Path) -> bool:
    return Path(path).suffix == ".json" and Path(path).is_file()


@dataclass(frozen=True)
class ConvertConfig:
    output_dir: str  # gets {split}_imgs.tsv, {split}_texts.jsonl (and lmdb/{split} with lmdb=True)
    splits: dict[str, str]  # split name -> caption JSON, e.g. {"train": "cn_train.json", "valid": "cn_val.json"}
    image_root: str | None = None  # folder the JSON's image paths are relative to; default: the JSON's folder
    lmdb: bool = False  # also build cn_clip's LMDB for each split

    def __post_init__(self):
        if not self.splits:
            raise ValueError("give at least one split, e.g. --train cn_train.json")
        for split, path in self.splits.items():
            if not Path(path).is_file():
                raise FileNotFoundError(f"{split} caption JSON {path} does not exist")


def convert_captions(config: ConvertConfig) -> dict[str, dict]:
    """clip-pytorch layout -> cn_clip's TSV + JSONL (+ LMDB); every caption kept as a text."""
    from .records import TextRecord, write_images_tsv, write_texts_jsonl

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report, next_image, next_text = {}, 0, 0
    for split, json_path in config.splits.items():
        dataset = read_caption_json(json_path, config.image_root)
        images, missing = [], []
        for image_id, path in enumerate(dataset.images):
            try:
                images.append((next_image + image_id, path.read_bytes()))
            except OSError:
                missing.append(str(path))
        kept = {image_id for image_id, _ in images}
        texts = [TextRecord(next_text + p.text_id, p.text, (next_image + p.image_id,))
                 for p in dataset.pairs if next_image + p.image_id in kept]
        write_images_tsv(out / f"{split}_imgs.tsv", images)
        write_texts_jsonl(out / f"{split}_texts.jsonl", texts)
        report[split] = {"images": len(images), "texts": len(texts), "missing_images": missing,
                         "bad_entries": [str(b) for b in dataset.bad]}
        # ids stay unique across splits, so features of several splits can share one index
        next_image += len(dataset.images)
        next_text += len(dataset.pairs)
    if config.lmdb:
        from .build import BuildLmdbConfig, build_lmdb

        build_lmdb(BuildLmdbConfig(str(out), tuple(config.splits), parallel="local"))
    return report
