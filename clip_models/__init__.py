"""Chinese-CLIP models in pure PyTorch, API-compatible with `cn_clip.clip`.

    import clip_models
    model, preprocess = clip_models.load("ViT-B-16")         # or a .pt / HF dir path
    image = preprocess(PIL.Image.open("pokemon.jpeg"))[None]
    text = clip_models.tokenize(["杰尼龟", "妙蛙种子", "小火龙", "皮卡丘"])
    logits_per_image, _ = model.get_similarity(image, text)
"""
from __future__ import annotations

import os

import torch

from .checkpoint import (build_model, export_cn_clip, export_hf, infer_config, load_model, read_checkpoint,
                         save_checkpoint)
from .config import CLIPConfig, TextConfig, VisionConfig, config_from_names, config_from_struct
from .errors import CheckpointError
from .hub import available_models, resolve
from .loss import contrastive_loss, distillation_loss
from .model import CLIP, normalize_features
from .tokenizer import preprocess_text, tokenize
from .transforms import decode_image, image_transform, normalize_pixels, train_transform

__all__ = [
    "CLIP", "CLIPConfig", "CheckpointError", "TextConfig", "VisionConfig", "available_models", "build_model",
    "config_from_names", "config_from_struct", "contrastive_loss", "create_model", "decode_image",
    "distillation_loss", "export_cn_clip", "export_hf", "image_transform", "infer_config", "load", "load_from_name",
    "load_model", "normalize_features", "normalize_pixels", "preprocess_text", "read_checkpoint", "resolve",
    "save_checkpoint", "tokenize", "train_transform",
]


def load(name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
         download_root: str | os.PathLike | None = None):
    """(model in eval mode, preprocess) from a released name or any supported checkpoint path."""
    model = load_model(resolve(name_or_path, download_root)).to(device)
    return model, image_transform(model.image_size)


load_from_name = load


def create_model(struct: str) -> CLIP:
    """A randomly initialised model from "vision@text" config names or a released name."""
    return CLIP(config_from_struct(struct))
