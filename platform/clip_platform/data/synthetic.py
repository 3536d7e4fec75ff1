"""A synthetic Chinese image-text dataset in cn_clip's layout, for demos and tests.

Each image is a scene: 1-3 shapes of one colour in one region of a light,
noisy canvas; its captions say exactly that, e.g. "左上角有一个红色的圆形". A scene
is four attributes (colour, shape, count, position), each visible in the
pixels and named in the text, so a small CLIP learns to match them.

Within a split, one text is written per distinct scene (train: several
wordings), and its image_ids are all the split's images of that scene, so
retrieval ground truth is exact. Scenes are dealt from shuffled decks of all
attribute combinations: valid/test of up to 360 images have no repeats.

Also written: a zero-shot folder dataset (`zeroshot/label_cn.txt` +
`zeroshot/test/<label id>/*.jpg`) whose classes are colour + shape.
"""
from __future__ import annotations

import io
import itertools
import logging
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .records import TextRecord, write_images_tsv, write_texts_jsonl

log = logging.getLogger(__name__)

COLOURS = {"红色": (220, 40, 40), "绿色": (40, 160, 60), "蓝色": (40, 80, 220),
           "黄色": (230, 190, 20), "紫色": (150, 60, 190), "黑色": (30, 30, 30)}
SHAPES = ("圆形", "正方形", "三角形", "菱形")
COUNTS = {1: "一个", 2: "两个", 3: "三个"}
# Regions as (left, top, right, bottom) fractions of the canvas.
POSITIONS = {"左上角": (0.0, 0.0, 0.5, 0.5), "右上角": (0.5, 0.0, 1.0, 0.5), "左下角": (0.0, 0.5, 0.5, 1.0),
             "右下角": (0.5, 0.5, 1.0, 1.0), "中间": (0.25, 0.25, 0.75, 0.75)}
TEMPLATES = ("{position}有{count}{colour}的{shape}", "{count}{colour}的{shape}在{position}",
             "图片的{position}是{count}{colour}的{shape}", "{position}画着{count}{colour}的{shape}")
ZEROSHOT_LABEL_DIGITS = 3  # test/000, test/001, ... as cn_clip's zero-shot datasets
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class SyntheticConfig:
    output_dir: str                  # gets {split}_imgs.tsv, {split}_texts.jsonl, lmdb/, zeroshot/
    num_train: int = 2000            # images of the train split
    num_valid: int = 200             # images of the valid split
    num_test: int = 200              # images of the test split
    resolution: int = 64             # canvas side in pixels (models resize to their own input size)
    seed: int = 0                    # same seed, same files
    max_count: int = 3               # shapes per scene: 1..max_count
    train_texts_per_scene: int = 2   # wordings per distinct train scene (valid/test: 1)
    lmdb: bool = False               # also build lmdb/{split} with build_lmdb
    zeroshot_per_class: int = 10     # zero-shot test images per colour+shape class; 0: none

    def __post_init__(self):
        if self.num_train < 1 or self.num_valid < 0 or self.num_test < 0:
            raise ValueError("num_train must be at least 1, num_valid and num_test at least 0")
        if self.resolution < 32:
            raise ValueError(f"resolution must be at least 32 pixels, for shapes to be told apart; "
                             f"got {self.resolution}")
        if not 1 <= self.max_count <= max(COUNTS):
            raise ValueError(f"max_count must be in 1..{max(COUNTS)}, got {self.max_count}")
        if self.train_texts_per_scene < 1 or self.train_texts_per_scene > len(TEMPLATES):
            raise ValueError(f"train_texts_per_scene must be in 1..{len(TEMPLATES)}")
        if self.zeroshot_per_class < 0:
            raise ValueError("zeroshot_per_class must be at least 0")


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    count: int
    position: str

    def caption(self, template: str) -> str:
        return template.format(position=self.position, count=COUNTS[self.count], colour=self.colour,
                               shape=self.shape)


def all_scenes(max_count: int = 3) -> list[Scene]:
    return [Scene(c, s, n, p) for c, s, n, p in
            itertools.product(COLOURS, SHAPES, range(1, max_count + 1), POSITIONS)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float],
                colour: tuple[int, int, int]) -> None:
    left, top, right, bottom = box
    cx, cy = (left + right) / 2, (top + bottom) / 2
    if shape == "圆形":
        draw.ellipse(box, fill=colour)
    elif shape == "正方形":
        draw.rectangle(box, fill=colour)
    elif shape == "三角形":
        draw.polygon([(cx, top), (right, bottom), (left, bottom)], fill=colour)
    elif shape == "菱形":
        draw.polygon([(cx, top), (right, cy), (cx, bottom), (left, cy)], fill=colour)
    else:
        raise ValueError(f"unknown shape {shape}")


def _canvas(rng: random.Random, size: int) -> Image.Image:
    """A light background, slightly tinted and noisy, so no two images are identical."""
    base = np.array([rng.randint(215, 250) for _ in range(3)], dtype=np.int16)
    # numpy's generator, seeded from ours: PIL's noise has its own unseeded RNG.
    noise = np.random.default_rng(rng.getrandbits(32)).integers(-6, 7, size=(size, size, 1))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def draw_scene(scene: Scene, size: int, rng: random.Random) -> Image.Image:
    """The scene's shapes in distinct cells of a 2x2 grid over its region, with jitter."""
    image = _canvas(rng, size)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = (f * size for f in POSITIONS[scene.position])
    cell = (right - left) / 2
    for index in rng.sample(range(4), scene.count):
        x0, y0 = left + (index % 2) * cell, top + (index // 2) * cell
        side = cell * rng.uniform(0.6, 0.85)
        x, y = x0 + rng.uniform(0, cell - side), y0 + rng.uniform(0, cell - side)
        _draw_shape(draw, scene.shape, (x, y, x + side, y + side), COLOURS[scene.colour])
    return image


def draw_object(colour: str, shape: str, size: int, rng: random.Random) -> Image.Image:
    """One shape anywhere on the canvas (zero-shot classes are colour + shape)."""
    image = _canvas(rng, size)
    side = size * rng.uniform(0.25, 0.5)
    x, y = rng.uniform(0, size - side), rng.uniform(0, size - side)
    _draw_shape(ImageDraw.Draw(image), shape, (x, y, x + side, y + side), COLOURS[colour])
    return image


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def _deal(scenes: list[Scene], n: int, rng: random.Random) -> list[Scene]:
    """n scenes from shuffled decks of all scenes: no repeat until every scene has been used."""
    dealt: list[Scene] = []
    while len(dealt) < n:
        deck = scenes[:]
        rng.shuffle(deck)
        dealt.extend(deck[: n - len(dealt)])
    return dealt


def make_split(config: SyntheticConfig, split: str, num_images: int, first_image_id: int, first_text_id: int,
               rng: random.Random) -> tuple[list[tuple[int, bytes]], list[TextRecord]]:
    """(image rows, text records) of one split."""
    scenes = _deal(all_scenes(config.max_count), num_images, rng)
    images, by_scene = [], defaultdict(list)
    for offset, scene in enumerate(scenes):
        image_id = first_image_id + offset
        images.append((image_id, jpeg_bytes(draw_scene(scene, config.resolution, rng))))
        by_scene[scene].append(image_id)
    wordings = config.train_texts_per_scene if split == "train" else 1
    texts, text_id = [], first_text_id
    for scene, image_ids in by_scene.items():
        for template in rng.sample(TEMPLATES, wordings):
            texts.append(TextRecord(text_id, scene.caption(template), tuple(image_ids)))
            text_id += 1
    return images, texts


def make_zeroshot(config: SyntheticConfig, rng: random.Random) -> Path:
    root = Path(config.output_dir) / "zeroshot"
    classes = list(itertools.product(COLOURS, SHAPES))
    (root / "test").mkdir(parents=True, exist_ok=True)
    (root / "label_cn.txt").write_text("".join(f"{c}的{s}\n" for c, s in classes), encoding="utf-8")
    for label, (colour, shape) in enumerate(classes):
        folder = root / "test" / f"{label:0{ZEROSHOT_LABEL_DIGITS}d}"
        folder.mkdir(exist_ok=True)
        for i in range(config.zeroshot_per_class):
            (folder / f"{i:04d}.jpg").write_bytes(jpeg_bytes(draw_object(colour, shape, config.resolution, rng)))
    return root


def make_synthetic(config: SyntheticConfig) -> dict[str, Any]:
    """Write the dataset; returns counts and paths per split."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(config.seed)
    sizes = {"train": config.num_train, "valid": config.num_valid, "test": config.num_test}
    summary: dict[str, Any] = {"output_dir": str(out), "splits": {}}
    # Ids are unique across splits, as in MUGE, so features of all splits can share one index.
    next_image_id, next_text_id = 1, 1
    for split in SPLITS:
        if sizes[split] == 0:
            continue
        images, texts = make_split(config, split, sizes[split], next_image_id, next_text_id, rng)
        write_images_tsv(out / f"{split}_imgs.tsv", images)
        write_texts_jsonl(out / f"{split}_texts.jsonl", texts)
        next_image_id += len(images)
        next_text_id += len(texts)
        summary["splits"][split] = {"num_images": len(images), "num_texts": len(texts),
                                    "num_pairs": sum(len(t.image_ids) for t in texts)}
        log.info("%s: %d images, %d texts", split, len(images), len(texts))
    if config.lmdb:
        from .build import BuildLmdbConfig, build_lmdb

        reports = build_lmdb(BuildLmdbConfig(str(out), tuple(summary["splits"]), parallel="local"))
        summary["lmdb"] = {r.split: r.path for r in reports}
    if config.zeroshot_per_class:
        summary["zeroshot"] = str(make_zeroshot(config, rng))
    return summary
