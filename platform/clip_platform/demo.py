"""`make demo`: an end-to-end run on an embedded local Ray with configs/demo.yaml."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import clip_models

log = logging.getLogger(__name__)
LABELS = ["红色的圆形", "蓝色的正方形", "绿色的三角形", "黄色的星星"]
COLOURS = {"红色": (220, 40, 40), "蓝色": (40, 60, 220), "绿色": (40, 180, 60), "黄色": (240, 210, 30)}


@dataclass(frozen=True)
class DemoConfig:
    output_dir: str = "demo_output"  # everything the demo writes goes here
    model: str = "ViT-Tiny@BERT-Tiny-chinese"  # config names for the random-weight model
    photo: str = "../shared/data/pokemon.jpeg"  # used too when present; never downloaded

    def __post_init__(self):
        if not self.output_dir:
            raise ValueError("output_dir must not be empty")


def draw_shape(label: str, size: int = 224) -> Image.Image:
    """A plain picture of one labelled shape, e.g. "红色的圆形"."""
    colour = COLOURS[label[:2]]
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    if "圆" in label:
        draw.ellipse(box, fill=colour)
    elif "三角" in label:
        draw.polygon([(size // 2, size // 4), (size // 4, 3 * size // 4), (3 * size // 4, 3 * size // 4)], fill=colour)
    elif "星" in label:
        angles = np.linspace(-np.pi / 2, 1.5 * np.pi, 11)[:-1]
        radii = np.where(np.arange(10) % 2 == 0, size / 4, size / 10)
        draw.polygon([(size / 2 + r * np.cos(a), size / 2 + r * np.sin(a)) for r, a in zip(radii, angles)], fill=colour)
    else:
        draw.rectangle(box, fill=colour)
    return image


def model_demo(config: DemoConfig) -> torch.Tensor:
    """Embed drawn shapes (and the README photo when present) against Chinese labels."""
    model = clip_models.create_model(config.model).eval()
    preprocess = clip_models.image_transform(model.image_size)
    images = {label: draw_shape(label) for label in LABELS}
    if Path(config.photo).is_file():
        images["pokemon.jpeg"] = Image.open(config.photo)
    pixels = torch.stack([preprocess(image) for image in images.values()])
    with torch.no_grad():
        logits_per_image, _ = model.get_similarity(pixels, clip_models.tokenize(LABELS))
    probs = logits_per_image.softmax(dim=-1)
    print(f"\nZero-shot probabilities of a random-weight {config.model} (untrained: near uniform)")
    print(f"{'image':<16}" + "".join(f"{label:>12}" for label in LABELS))
    for name, row in zip(images, probs):
        print(f"{name:<16}" + "".join(f"{p:>16.3f}" for p in row.tolist()))
    return probs


def run_demo(config: DemoConfig) -> dict[str, float]:
    timings = {}
    start = time.perf_counter()
    model_demo(config)
    timings["model"] = time.perf_counter() - start
    print("\nDemo finished: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return timings
