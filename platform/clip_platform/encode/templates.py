"""Chinese prompt templates for zero-shot classification. `{}` is the class name.

Written for this project: everyday photo descriptions of varied quality, framing
and medium, phrased the way Chinese image captions are (no final punctuation,
as in the Wukong / MUGE captions Chinese-CLIP was trained on). A class embedding
is the normalised mean of its normalised template embeddings, so a wider set
averages out the wording of any one prompt.
"""
from __future__ import annotations

from pathlib import Path

PLACEHOLDER = "{}"

ZH_TEMPLATES: tuple[str, ...] = (
    "{}",
    "一张{}的照片",
    "{}的照片",
    "一张{}的特写",
    "一张清晰的{}的照片",
    "一张模糊的{}的照片",
    "一张小小的{}的照片",
    "一张大大的{}的照片",
    "光线昏暗的{}的照片",
    "光线明亮的{}的照片",
    "一张{}的黑白照片",
    "一张裁剪过的{}的照片",
    "低分辨率的{}的照片",
    "高清的{}图片",
    "这是一张{}的图片",
    "图片中是{}",
    "画面里有{}",
    "我拍的{}",
    "网上找到的{}的图片",
    "一幅{}的画",
    "{}的素描",
    "{}的卡通形象",
    "{}的三维渲染图",
    "{}的雕塑",
    "{}的刺绣图案",
    "{}的折纸作品",
    "一件{}的玩具",
    "视频游戏里的{}",
)


def fill(template: str, classname: str) -> str:
    # replace, not str.format: class names may contain braces.
    return template.replace(PLACEHOLDER, classname)


def load_templates(path: str | None = None) -> tuple[str, ...]:
    """The built-in set, or one template per non-blank line of `path`, each with `{}`."""
    if not path:
        return ZH_TEMPLATES
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"template file {file} does not exist")
    templates = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if PLACEHOLDER not in line:
            raise ValueError(f"{file} line {number}: template {line.strip()!r} has no {PLACEHOLDER} for the class name")
        templates.append(line.strip())
    if not templates:
        raise ValueError(f"template file {file} holds no templates")
    return tuple(templates)
