"""Image transforms without torchvision.

Inference (`image_transform`) is cn_clip's exactly: PIL bicubic resize to S x S
(no crop), RGB, to [0, 1], CLIP mean/std. Training augmentation (`--use-augment`)
follows cn_clip's timm recipe -- RandomResizedCrop(scale 0.9-1.0), horizontal
flip, AutoAugment with the original ImageNet policy -- through kornia: a
maintained library that works on tensors (CPU or GPU) and needs no torchvision.

With `pixels=True` both stop before normalising and return uint8 [3, S, S]: a
quarter of the bytes through Ray's object store and onto the GPU.
`normalize_pixels` (or `CLIP.encode_image`, which accepts uint8) finishes them
on the model's device, with the same float32 arithmetic as the full transform.
"""
from __future__ import annotations

import io
from functools import cached_property

import numpy as np
import torch
from PIL import Image

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
MAX_IMAGE_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode image bytes fully; raises ValueError for anything not a readable image."""
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > max_pixels:
            raise ValueError(f"image has {image.width}x{image.height} pixels, over the limit of {max_pixels}")
        image.load()  # decode now, so truncated files fail here and not later
        return image
    except ValueError:
        raise
    except Exception as exc:  # PIL raises many types for bad data
        raise ValueError(f"not a readable image: {exc}") from exc


def to_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 HWC RGB -> float CHW in [0, 1], as torchvision's ToTensor."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255)


def normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.tensor(STD, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - mean) / std


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, S, S] from a `pixels=True` transform -> the normalised float32 tensor
    the full transform gives."""
    return normalize(pixels.float().div(255))


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """float [0, 1] CHW -> uint8 CHW (rounded)."""
    return x.mul(255).round_().to(torch.uint8)


class ImageTransform:
    """cn_clip's `image_transform(S)`: PIL image -> normalised tensor [3, S, S], or uint8
    pixels with `pixels=True`."""

    def __init__(self, image_size: int = 224, pixels: bool = False):
        self.image_size = image_size
        self.pixels = pixels

    def __call__(self, image: Image.Image) -> torch.Tensor:
        resized = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        if self.pixels:
            return torch.from_numpy(np.asarray(resized.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1).copy())
        return normalize(to_tensor(resized))

    def __repr__(self) -> str:
        return f"ImageTransform(image_size={self.image_size}, pixels={self.pixels})"


class TrainTransform:
    """cn_clip's training augmentation: PIL image -> normalised tensor [3, S, S], or uint8
    pixels with `pixels=True`."""

    def __init__(self, image_size: int = 224, pixels: bool = False):
        self.image_size = image_size
        self.pixels = pixels

    @cached_property
    def _augment(self):
        import kornia.augmentation as K  # imported on first use: kornia takes seconds to import
        from kornia.augmentation.auto import AutoAugment

        return K.AugmentationSequential(
            K.RandomResizedCrop((self.image_size, self.image_size), scale=(0.9, 1.0), resample="bicubic"),
            K.RandomHorizontalFlip(),
            AutoAugment("imagenet"),
        )

    def __call__(self, image: Image.Image) -> torch.Tensor:
        with torch.no_grad():
            augmented = self._augment(to_tensor(image)[None])[0].clamp(0, 1)
        return to_pixels(augmented) if self.pixels else normalize(augmented)

    def __getstate__(self):  # the kornia pipeline is rebuilt wherever the transform is unpickled
        return {"image_size": self.image_size, "pixels": self.pixels}

    def __repr__(self) -> str:
        return f"TrainTransform(image_size={self.image_size}, pixels={self.pixels})"


def image_transform(image_size: int = 224, pixels: bool = False) -> ImageTransform:
    return ImageTransform(image_size, pixels)


def train_transform(image_size: int = 224, use_augment: bool = False, pixels: bool = False):
    """cn_clip trains on the plain inference transform unless --use-augment is given."""
    return TrainTransform(image_size, pixels) if use_augment else ImageTransform(image_size, pixels)
